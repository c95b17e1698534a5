//! placeholder — being written
pub fn probe() -> hal::Probe {
    hal::Probe::Unavailable("cuda backend not built yet".into())
}
