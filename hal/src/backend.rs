//! The `Backend` trait every device implements, and the registry that probes them.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::Op;
use crate::tensor::Tensor;

/// What a backend says about itself.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// Short registry name: `cpu-ref`, `cuda`, `ascend`.
    pub name: &'static str,
    /// Human description of the device ("CPU reference, 2 threads", "NVIDIA H100 80GB, sm_90").
    pub device: String,
}

/// Whether a backend can run one op descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Yes,
    No(String),
}

/// Speeds of a device measured in the calling process ([`Backend::calibrate`]): the yardsticks a
/// benchmark compares its achieved rates against.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Device-to-device copy of a large buffer: bytes read + bytes written, per second.
    pub copy_bytes_per_s: f64,
    /// A large dense GEMM this backend runs: 2·M·N·K per second.
    pub dense_flops_per_s: f64,
    /// What the copy was (buffer size, API, repetitions).
    pub copy_method: String,
    /// What the GEMM was (kernel, precision, M×N×K, repetitions).
    pub gemm_method: String,
}

/// A compute device with its own memory and one in-order stream.
///
/// Contract shared by every implementation:
/// * Work is issued in order on one stream. `run`, `upload` and `write` may return before the
///   device finished; `download` and `synchronize` wait for everything issued before them.
/// * Tensors made by one backend are only passed back to that backend (checked, not assumed).
/// * `run` validates shapes and dtypes against [`Op::signature`] before touching memory and
///   returns [`Error::InvalidArgument`] naming the op and tensor on mismatch; it never panics
///   on user input.
pub trait Backend: Send + Sync {
    fn info(&self) -> &BackendInfo;

    /// Whether `op` (with these sizes and formats) runs here. `run` on an op answered `No`
    /// returns [`Error::Unsupported`].
    fn supports(&self, op: &Op) -> Support;

    /// A tensor of the given shape and dtype. Contents are unspecified until written.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;

    /// A tensor holding `bytes` (little-endian, row-major; `bytes.len()` must equal the size).
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor>;

    /// Overwrites the bytes of `t` starting at element `offset` (in units of `t.dtype()`).
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Copies the whole tensor to the host, after all previously issued work.
    fn download(&self, t: &Tensor) -> Result<Vec<u8>>;

    /// Issues `op`. `inputs` and `outputs` follow [`Op::signature`] in order; an output marked
    /// in/out there is read as well as written.
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()>;

    /// Waits until every issued operation has finished.
    fn synchronize(&self) -> Result<()>;

    /// Measures this device's copy bandwidth and dense GEMM rate now (takes about a second; work
    /// issued before is finished first). Optional: the default says it is unsupported.
    fn calibrate(&self) -> Result<Calibration> {
        Err(Error::Unsupported {
            backend: self.info().name.to_string(),
            op: "calibrate".into(),
            reason: "this backend does not measure its copy bandwidth and GEMM rate".into(),
        })
    }
}

/// A probed backend: ready to use, or the reason it is not.
pub enum Probe {
    Available(Box<dyn Backend>),
    Unavailable(String),
}

/// Every backend this binary knows, probed once.
pub struct Registry {
    entries: Vec<(&'static str, Probe)>,
}

impl Registry {
    pub fn new() -> Self {
        Registry { entries: Vec::new() }
    }
    /// Adds a backend under `name` with the outcome of its probe.
    pub fn register(&mut self, name: &'static str, probe: Probe) {
        self.entries.push((name, probe));
    }
    /// Names and availability, in registration order: `Ok(device)` or `Err(reason)`.
    pub fn status(&self) -> Vec<(&'static str, std::result::Result<String, String>)> {
        self.entries
            .iter()
            .map(|(n, p)| match p {
                Probe::Available(b) => (*n, Ok(b.info().device.clone())),
                Probe::Unavailable(r) => (*n, Err(r.clone())),
            })
            .collect()
    }
    /// Takes the named backend out of the registry.
    pub fn take(&mut self, name: &str) -> Result<Box<dyn Backend>> {
        let Some(pos) = self.entries.iter().position(|(n, _)| *n == name) else {
            let known: Vec<_> = self.entries.iter().map(|(n, _)| *n).collect();
            return Err(Error::invalid("backend", format!("unknown backend '{name}' (known: {})", known.join(", "))));
        };
        match self.entries.remove(pos).1 {
            Probe::Available(b) => Ok(b),
            Probe::Unavailable(reason) => Err(Error::Unavailable { backend: name.to_string(), reason }),
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}
