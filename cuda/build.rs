//! Marks whether `V4RT_NVRTC_DIR` was set at build time, so that `tests/kernels_compile.rs` is
//! run where NVRTC was provided (CI) and reported as ignored, not passed, where it was not.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(v4rt_nvrtc_dir)");
    println!("cargo::rerun-if-env-changed=V4RT_NVRTC_DIR");
    if std::env::var_os("V4RT_NVRTC_DIR").is_some_and(|d| !d.is_empty()) {
        println!("cargo::rustc-cfg=v4rt_nvrtc_dir");
    }
}
