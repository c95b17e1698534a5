//! `v4rt bench --profile`: time per op, measured by waiting for the device around each op.
//!
//! [`Profiled`] wraps a backend. While profiling is on, every `run` is preceded and followed by
//! `synchronize`, and the wall time between the two waits is charged to the op's key (its name
//! plus the sizes that tell its instances apart: a linear's `rows×in→out format`). The time
//! therefore includes the op's host-side launch cost and its kernels, but not the overlap the
//! stream gives between ops; the report's sum exceeds the unprofiled step by that overlap, which
//! is why the bench's timed figures are taken with recording off.
//!
//! The bytes column is the op's input and output tensors' sizes (for a linear: weight + scale +
//! activations) — the data it must move at least once — except `moe_experts`, whose expert
//! stacks are counted for the experts a decode row touches (see [`op_bytes`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hal::backend::{BackendInfo, Calibration, Numerics, Prepared, Support};
use hal::{Backend, DType, Op, Result, Tensor};

/// One op key's totals.
#[derive(Clone, Debug, Default)]
pub struct OpStat {
    pub calls: u64,
    pub seconds: f64,
    pub bytes: f64,
    /// Multiply-add FLOPs of the GEMM ops ([`op_flops`]), 0 for the others.
    pub flops: f64,
}

/// A backend that can time each op (see the module docs).
pub struct Profiled {
    inner: Arc<dyn Backend>,
    on: AtomicBool,
    stats: Mutex<HashMap<String, OpStat>>,
}

impl Profiled {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Profiled { inner, on: AtomicBool::new(false), stats: Mutex::new(HashMap::new()) }
    }

    /// Starts (clearing earlier totals) or stops timing each op.
    pub fn set_profiling(&self, on: bool) {
        if on {
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.on.store(on, Ordering::SeqCst);
    }

    /// The totals by key, largest time first.
    pub fn report(&self) -> Vec<(String, OpStat)> {
        let mut v: Vec<_> =
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        v
    }
}

fn fmt_label(op: &Op) -> String {
    match op {
        Op::Linear(l) => format!("linear {}×{}→{} {:?}", l.rows, l.in_features, l.out_features, l.format),
        Op::GroupedLinear(g) => {
            format!("grouped_linear {}×{}×{}→{} {:?}", g.rows, g.groups, g.in_per_group, g.out_per_group, g.format)
        }
        Op::MoeExperts(m) => format!("moe_experts {}×{} k{} {:?}", m.rows, m.dim, m.topk, m.format),
        Op::SparseAttention(a) => format!("sparse_attention {}×{}h {:?}", a.rows, a.heads, a.compressed),
        Op::IndexerTopK(x) => format!("indexer_topk {}×{}h cap {}", x.rows, x.heads, x.capacity),
        Op::Compressor(c) => format!("compressor {}× width {} ratio {}", c.rows, c.width, c.ratio),
        other => other.name().to_string(),
    }
}

/// Bytes an op moves at least once: its tensors, with `moe_experts`' expert stacks scaled to
/// the experts `rows × topk` selections can touch (all of them in a large prefill).
pub fn op_bytes(op: &Op, inputs: &[&Tensor], outputs: &[&mut Tensor]) -> f64 {
    let size = |t: &Tensor| t.len_bytes() as f64;
    match op {
        Op::MoeExperts(m) => {
            let touched = (m.rows * m.topk).min(m.experts) as f64 / m.experts.max(1) as f64;
            inputs.iter().take(3).map(|t| size(t)).sum::<f64>()
                + inputs.iter().skip(3).map(|t| size(t) * touched).sum::<f64>()
                + outputs.iter().map(|t| size(t)).sum::<f64>()
        }
        _ => inputs.iter().map(|t| size(t)).sum::<f64>() + outputs.iter().map(|t| size(t)).sum::<f64>(),
    }
}

/// FLOPs (2 per multiply-add) of the GEMM ops: linear, grouped_linear and moe_experts (the
/// useful work of its k experts per row: W1, W3 and W2); 0 for every other op. The same count as
/// `bench::prefill_gemm_flops` for the layers' weights.
pub fn op_flops(op: &Op) -> f64 {
    match op {
        Op::Linear(l) => 2.0 * (l.rows * l.in_features * l.out_features) as f64,
        Op::GroupedLinear(g) => 2.0 * (g.rows * g.groups * g.in_per_group * g.out_per_group) as f64,
        Op::MoeExperts(m) => 2.0 * 3.0 * (m.rows * m.topk * m.dim * m.inter) as f64,
        _ => 0.0,
    }
}

impl Backend for Profiled {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }
    fn supports(&self, op: &Op) -> Support {
        self.inner.supports(op)
    }
    fn numerics(&self, op: &Op) -> Numerics {
        self.inner.numerics(op)
    }
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.inner.alloc(shape, dtype)
    }
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        self.inner.upload(shape, dtype, bytes)
    }
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        self.inner.write(t, offset, bytes)
    }
    fn download(&self, t: &Tensor) -> Result<Vec<u8>> {
        self.inner.download(t)
    }
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        if !self.on.load(Ordering::Relaxed) {
            return self.inner.run(op, inputs, outputs);
        }
        self.inner.synchronize()?;
        let t = Instant::now();
        self.inner.run(op, inputs, outputs)?;
        self.inner.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        let bytes = op_bytes(op, inputs, outputs);
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let e = stats.entry(fmt_label(op)).or_default();
        e.calls += 1;
        e.seconds += s;
        e.bytes += bytes;
        e.flops += op_flops(op);
        Ok(())
    }
    fn download_later(&self, t: &Tensor) -> Result<Box<dyn hal::backend::PendingDownload + '_>> {
        self.inner.download_later(t)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn calibrate(&self) -> Result<Calibration> {
        self.inner.calibrate()
    }
    fn prepare(&self, op: &Op, weights: &[Option<&Tensor>]) -> Result<Prepared> {
        self.inner.prepare(op, weights)
    }
    /// The inner backend's overlap of the two sequences, except while profiling (each op is
    /// then timed alone, in order).
    fn concurrently(
        &self,
        first: &mut dyn FnMut() -> Result<()>,
        second: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if self.on.load(Ordering::SeqCst) {
            first()?;
            return second();
        }
        self.inner.concurrently(first, second)
    }
    /// The inner backend's recording, except while profiling: timing each op needs them issued
    /// one by one, so `ops` then just runs.
    fn record(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<Option<Box<dyn hal::Recording>>> {
        if self.on.load(Ordering::SeqCst) {
            ops()?;
            return Ok(None);
        }
        self.inner.record(ops)
    }
}

/// Prints a profile: per key, calls, total and per-call time, share, and GB/s over its bytes;
/// with `gemm_rate` (a prefill: the GEMMs are compute-bound there, not in a decode step) then
/// the GEMM ops' rate against the calibration's dense GEMMs.
/// `per`: the number of steps recorded (times are shown per step).
pub fn print(title: &str, stats: &[(String, OpStat)], per: usize, cal: Option<&Calibration>, gemm_rate: bool) {
    let copy_bytes_per_s = cal.map(|c| c.copy_bytes_per_s);
    let total: f64 = stats.iter().map(|(_, s)| s.seconds).sum();
    let per = per.max(1) as f64;
    println!(
        "profile ({title}; each op synchronized, so the sum exceeds the unprofiled time): {:.3} ms per step",
        total / per * 1e3
    );
    println!("  {:>9} {:>6} {:>9} {:>6} {:>9} {:>6}  op", "ms/step", "calls", "µs/call", "share", "GB/s", "%copy");
    for (k, s) in stats {
        let gbs = s.bytes / s.seconds.max(1e-12) / 1e9;
        let pct = copy_bytes_per_s.map_or(String::from("-"), |c| format!("{:.0}", 100.0 * gbs * 1e9 / c));
        println!(
            "  {:>9.4} {:>6} {:>9.1} {:>5.1}% {:>9.1} {:>6}  {k}",
            s.seconds / per * 1e3,
            (s.calls as f64 / per).round() as u64,
            s.seconds / s.calls.max(1) as f64 * 1e6,
            100.0 * s.seconds / total.max(1e-12),
            gbs,
            pct
        );
    }
    let (gemm_s, gemm_flops) =
        stats.iter().fold(
            (0.0, 0.0),
            |(t, f), (_, s)| {
                if s.flops > 0.0 {
                    (t + s.seconds, f + s.flops)
                } else {
                    (t, f)
                }
            },
        );
    if gemm_rate && gemm_flops > 0.0 {
        let rate = gemm_flops / gemm_s.max(1e-12);
        print!(
            "  GEMM ops (linear, grouped_linear, moe_experts with its routing and combine): {:.3} ms for {:.3} TFLOP = {:.2} TFLOP/s",
            gemm_s / per * 1e3,
            gemm_flops / per / 1e12,
            rate / 1e12
        );
        println!("{}", cal.map_or(String::new(), |c| shares_of_dense(rate, c)));
    }
}

/// " = X% of the calibrated dense rate[, Y% of the vendor's]" for a GEMM rate in FLOP/s.
pub fn shares_of_dense(flops_per_s: f64, cal: &Calibration) -> String {
    let mut s = format!(" = {:.1}% of the calibrated dense rate", 100.0 * flops_per_s / cal.dense_flops_per_s);
    if let Some(v) = cal.vendor_flops_per_s {
        s += &format!(", {:.1}% of the vendor's", 100.0 * flops_per_s / v);
    }
    s
}
