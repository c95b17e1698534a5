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

/// The arithmetic a backend uses for one op: which tolerance class the conformance suite (and
/// the end-to-end tiers) hold it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Numerics {
    /// The op's documented math in f32 (or wider): cpu-ref's tolerances, which leave only
    /// summation order and ≤ 2-ulp transcendental functions to the implementation.
    F32,
    /// Activations rounded to bf16 somewhere inside the op (e.g. a vendor kernel that only
    /// takes bf16); `why` names the kernel. Held to bf16-derived tolerances.
    Bf16 { why: String },
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
    /// The vendor library's dense GEMM on the same problem (cuBLAS on CUDA), where the backend
    /// has one and can load it: what the chip reaches, beside `dense_flops_per_s` of our own
    /// kernel.
    pub vendor_flops_per_s: Option<f64>,
    /// What that GEMM was, or why it was not measured.
    pub vendor_method: String,
}

/// What [`Backend::prepare`] did with an op's weights (the default: nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Weight tensors the backend now also keeps in a converted form.
    pub converted: usize,
    /// Device bytes those converted copies occupy, on top of the tensors themselves.
    pub bytes: usize,
    /// Weight tensors left in their uploaded format although the backend would have converted
    /// them (for example: no device memory for the copy); they take the per-call path.
    pub kept: usize,
    /// What was converted to what, and why; empty when nothing was done.
    pub note: String,
}

impl Prepared {
    /// Adds `other` to this summary (counts summed, first non-empty note kept).
    pub fn absorb(&mut self, other: Prepared) {
        self.converted += other.converted;
        self.bytes += other.bytes;
        self.kept += other.kept;
        if self.note.is_empty() {
            self.note = other.note;
        }
    }
}

/// Checks the arguments of [`Backend::prepare`]: one entry per input of [`Op::signature`],
/// and every tensor given matches its spec (the descriptor's row count does not matter for
/// weights, whose shapes do not depend on it). The default `prepare` runs only this.
pub fn check_prepare(op: &Op, weights: &[Option<&Tensor>]) -> Result<()> {
    op.check_params()?;
    let sig = op.signature();
    if weights.len() != sig.inputs.len() {
        return Err(Error::invalid(
            format!("{} prepare", op.name()),
            format!("expected {} inputs (None for per-call ones), got {}", sig.inputs.len(), weights.len()),
        ));
    }
    for (spec, t) in sig.inputs.iter().zip(weights) {
        if let Some(t) = t {
            if t.shape() != spec.shape.as_slice() || t.dtype() != spec.dtype {
                return Err(Error::invalid(
                    format!("{} prepare input '{}'", op.name(), spec.name),
                    format!("expected {} {:?}, got {} {:?}", spec.dtype, spec.shape, t.dtype(), t.shape()),
                ));
            }
        }
    }
    Ok(())
}

/// A compute device with its own memory and one in-order stream.
///
/// Contract shared by every implementation:
/// * Work is issued in order on one stream. `run`, `upload`, `write` and `download_later` may
///   return before the device finished; `download` and `synchronize` wait for everything issued
///   before them.
/// * Tensors made by one backend are only passed back to that backend (checked, not assumed).
/// * `run` validates shapes and dtypes against [`Op::signature`] before touching memory and
///   returns [`Error::InvalidArgument`] naming the op and tensor on mismatch; it never panics
///   on user input.
pub trait Backend: Send + Sync {
    fn info(&self) -> &BackendInfo;

    /// Whether `op` (with these sizes and formats) runs here. `run` on an op answered `No`
    /// returns [`Error::Unsupported`].
    fn supports(&self, op: &Op) -> Support;

    /// The arithmetic `run` uses for `op` (asked after `supports` answered `Yes`). The default,
    /// [`Numerics::F32`], is the HAL's contract; a backend answering `Bf16` trades accuracy for
    /// a vendor kernel and must say so here so that callers and the conformance suite know.
    fn numerics(&self, _op: &Op) -> Numerics {
        Numerics::F32
    }

    /// A tensor of the given shape and dtype. Contents are unspecified until written.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;

    /// A tensor holding `bytes` (little-endian, row-major; `bytes.len()` must equal the size).
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor>;

    /// Overwrites the bytes of `t` starting at element `offset` (in units of `t.dtype()`).
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Copies the whole tensor to the host, after all previously issued work.
    fn download(&self, t: &Tensor) -> Result<Vec<u8>>;

    /// [`download`](Self::download) without waiting: the copy is issued in order after all
    /// previously issued work, and [`PendingDownload::wait`] returns the bytes the tensor held
    /// then, whatever work issued later does to it. This is how a host keeps the device busy
    /// while it reads a result (a decode step's sampled tokens while the next step runs).
    /// Deferred device-side errors of the work before the copy surface at `wait`, as they do at
    /// `download`. The default downloads at once.
    fn download_later(&self, t: &Tensor) -> Result<Box<dyn PendingDownload + '_>> {
        Ok(Box::new(Downloaded(self.download(t)?)))
    }

    /// Issues `op`. `inputs` and `outputs` follow [`Op::signature`] in order; an output marked
    /// in/out there is read as well as written.
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()>;

    /// Waits until every issued operation has finished.
    fn synchronize(&self) -> Result<()>;

    /// Issues what `first` issues, then what `second` issues, and lets the device run the two
    /// side by side: a decode step has independent chains of small kernels (the shared expert
    /// beside the routed experts, the KV entry beside the query) that each leave most of the
    /// device idle. Both see everything issued before this call; everything issued after it
    /// sees both finished. The default runs them in order, as plain `run` calls would.
    ///
    /// Contract for `first` and `second` (the caller's promise; a backend that overlaps them
    /// relies on it):
    /// * they issue only `alloc` and `run` (as in [`Backend::record`], which may contain this
    ///   call; a call inside either closure runs its two closures in order);
    /// * neither writes a tensor the other reads or writes: the two are independent;
    /// * tensors they allocate may outlive the call (outputs are typically returned).
    ///
    /// An error from `first` is returned without issuing `second`; device-side errors surface
    /// as for `run`.
    fn concurrently(
        &self,
        first: &mut dyn FnMut() -> Result<()>,
        second: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        first()?;
        second()
    }

    /// Measures this device's copy bandwidth and dense GEMM rate now (takes about a second; work
    /// issued before is finished first). Optional: the default says it is unsupported.
    fn calibrate(&self) -> Result<Calibration> {
        Err(Error::Unsupported {
            backend: self.info().name.to_string(),
            op: "calibrate".into(),
            reason: "this backend does not measure its copy bandwidth and GEMM rate".into(),
        })
    }

    /// Load-time hook for persistent weights. `weights` follows [`Op::signature`]'s inputs:
    /// `Some` for the tensors that stay the same across calls (a `Linear`'s `weight`/`scale`,
    /// `MoeExperts`' `w1`…`w2_scale`), `None` for per-call inputs (activations, routing); the
    /// descriptor's row count is irrelevant. The model calls it once after uploading, for every
    /// op it will issue with FP8/FP4 weights; it may be called for any op, any number of times.
    ///
    /// A backend may derive another format then (e.g. convert FP8/FP4 weights a chip cannot
    /// compute into one it can) instead of converting on every `run`. Contract:
    /// * later `run` results stay within the op's tolerance whether or not `prepare` ran; a
    ///   lossless conversion (the only kind the backends here do) keeps them bit-identical;
    /// * the tensors keep their bytes: `download` returns what was uploaded;
    /// * writing a tensor (`write`, or as an op output) discards whatever was derived from it,
    ///   so the next `run` uses the new bytes; derived data is freed with the tensor;
    /// * a mismatch against the signature is [`Error::InvalidArgument`] naming the op and
    ///   tensor, as for `run`.
    ///
    /// The default validates ([`check_prepare`]) and does nothing.
    fn prepare(&self, op: &Op, weights: &[Option<&Tensor>]) -> Result<Prepared> {
        check_prepare(op, weights)?;
        Ok(Prepared::default())
    }

    /// Runs `ops` once and, where this backend can, records what it issued so that
    /// [`Recording::replay`] issues the same work again without the host building each op
    /// (a CUDA graph; the point is a decode step whose few hundred small launches otherwise
    /// cost more host time than device time). `None`: this backend does not record (the
    /// default); `ops` then simply ran, as a plain sequence of `run` calls would.
    ///
    /// Contract for `ops`, which a recording backend checks where it can (an error, never a
    /// silently wrong recording):
    /// * it issues only `alloc` and `run`: `upload`, `write`, `download`, `download_later`,
    ///   `synchronize` and
    ///   `calibrate` return [`Error::InvalidArgument`] while recording;
    /// * every tensor it allocates is dropped before it returns (a recording owns its
    ///   intermediates; the results a caller wants go into tensors made before);
    /// * the tensors it reads or writes that were made before must outlive the recording and
    ///   are the ones every replay uses, with their contents at replay time. Whatever changes
    ///   between replays (token ids, positions) therefore lives in such tensors, written with
    ///   `write` before each replay, never in op descriptors.
    ///
    /// Errors from `ops` are returned and leave no recording. Deferred device-side argument
    /// errors of recorded ops surface, as for `run`, at the next `download` or `synchronize`
    /// after the first run or any replay.
    fn record(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<Option<Box<dyn Recording>>> {
        ops()?;
        Ok(None)
    }
}

/// A copy to the host issued by [`Backend::download_later`].
pub trait PendingDownload {
    /// Waits for the copy and returns the bytes (or the deferred device-side error of the work
    /// issued before it).
    fn wait(self: Box<Self>) -> Result<Vec<u8>>;
}

/// A [`PendingDownload`] that has already finished (the default `download_later`).
pub struct Downloaded(pub Vec<u8>);

impl PendingDownload for Downloaded {
    fn wait(self: Box<Self>) -> Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Work recorded by [`Backend::record`].
pub trait Recording {
    /// Issues the recorded work again, in order after everything issued before, on the same
    /// tensors. Like `run`, it may return before the device finished.
    fn replay(&self) -> Result<()>;

    /// What was recorded, in one line for reports (e.g. a CUDA graph's kernels by name).
    fn describe(&self) -> String;
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
