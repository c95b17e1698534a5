//! Every op on the CUDA backend against cpu-ref, on small random cases (and a few multi-call
//! sequences and argument errors). Needs a GPU, so it is ignored by default: run it with
//! `cargo test --release -p v4rt-cuda --test vs_cpu_ref -- --ignored` (it fails without one).
//!
//! Thresholds follow the conformance suite's table (tests/src/conformance.rs): bit-exact for
//! copies, quantizers and compressor state; NMSE elsewhere. Every case prints one line.

use cpu_ref::CpuBackend;
use hal::dtype::{bf16_to_f32, bytes_f32, bytes_i32, f32_bytes, f32_to_bf16, i32_bytes};
use hal::ops::attention::CompressedKv;
use hal::ops::*;
use hal::{Backend, DType, Probe, Tensor};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vf(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone)]
struct HostT {
    shape: Vec<usize>,
    dtype: DType,
    bytes: Vec<u8>,
}

fn tf(shape: &[usize], v: &[f32]) -> HostT {
    HostT { shape: shape.to_vec(), dtype: DType::F32, bytes: f32_bytes(v) }
}
fn ti(shape: &[usize], v: &[i32]) -> HostT {
    HostT { shape: shape.to_vec(), dtype: DType::I32, bytes: i32_bytes(v) }
}
fn tb(shape: &[usize], dtype: DType, b: Vec<u8>) -> HostT {
    HostT { shape: shape.to_vec(), dtype, bytes: b }
}

/// How an output is judged.
#[derive(Clone, Copy, Debug)]
enum Check {
    Exact,
    Nmse(f64),
    /// Compressor cache: NMSE over entries, allowing a few single-code quantization flips.
    Quantized(f64),
    /// Top-k indices: same sets (order may differ only among near-equal scores).
    Indices,
}

struct Suite {
    cpu: CpuBackend,
    gpu: Box<dyn Backend>,
    failures: Vec<String>,
}

fn up(b: &dyn Backend, h: &HostT) -> Tensor {
    b.upload(&h.shape, h.dtype, &h.bytes).expect("upload")
}

fn nmse(a: &[f32], r: &[f32]) -> (f64, f64, usize, usize) {
    let (mut num, mut den, mut maxd, mut diff, mut nonfinite) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(r) {
        if x.to_bits() != y.to_bits() {
            diff += 1;
        }
        if !x.is_finite() && y.is_finite() || x.is_nan() != y.is_nan() {
            nonfinite += 1;
            continue;
        }
        if !x.is_finite() {
            continue;
        }
        let d = x as f64 - y as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        maxd = maxd.max(d.abs());
    }
    (if den > 0.0 { num / den } else { num }, maxd, diff, nonfinite)
}

impl Suite {
    /// Runs `op` on both backends with the same inputs and initial outputs (None: write-only,
    /// poisoned on the GPU) and compares the outputs. Returns (cpu, gpu) output bytes.
    fn case(&mut self, name: &str, op: &Op, ins: &[HostT], outs: &[(HostT, Option<Check>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let cin: Vec<Tensor> = ins.iter().map(|h| up(&self.cpu, h)).collect();
        let gin: Vec<Tensor> = ins.iter().map(|h| up(self.gpu.as_ref(), h)).collect();
        let mut cout: Vec<Tensor> = outs.iter().map(|(h, _)| up(&self.cpu, h)).collect();
        let mut gout: Vec<Tensor> = outs.iter().map(|(h, _)| up(self.gpu.as_ref(), h)).collect();
        self.cpu
            .run(op, &cin.iter().collect::<Vec<_>>(), &mut cout.iter_mut().collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{name}: cpu-ref failed: {e}"));
        let t0 = std::time::Instant::now();
        let r = self.gpu.run(op, &gin.iter().collect::<Vec<_>>(), &mut gout.iter_mut().collect::<Vec<_>>());
        if let Err(e) = r {
            self.failures.push(format!("{name}: cuda run failed: {e}"));
            println!("FAIL {name}: cuda run failed: {e}");
            return Vec::new();
        }
        if let Err(e) = self.gpu.synchronize() {
            self.failures.push(format!("{name}: cuda synchronize failed: {e}"));
            println!("FAIL {name}: synchronize: {e}");
            return Vec::new();
        }
        let dt = t0.elapsed();
        let mut res = Vec::new();
        for (i, ((h, check), (c, g))) in outs.iter().zip(cout.iter().zip(&gout)).enumerate() {
            let cb = self.cpu.download(c).expect("cpu download");
            let gb = match self.gpu.download(g) {
                Ok(b) => b,
                Err(e) => {
                    self.failures.push(format!("{name} out {i}: download failed: {e}"));
                    continue;
                }
            };
            if let Some(check) = check {
                self.judge(&format!("{name} out{i}"), h.dtype, &cb, &gb, *check, dt);
            }
            res.push((cb, gb));
        }
        res
    }

    fn judge(&mut self, name: &str, dtype: DType, cb: &[u8], gb: &[u8], check: Check, dt: std::time::Duration) {
        if dtype == DType::BF16 {
            // bf16 caches: widened exactly (so Exact still means bit-equal), then judged as f32.
            let widen = |b: &[u8]| {
                f32_bytes(&b.chunks_exact(2).map(|h| bf16_to_f32(u16::from_le_bytes([h[0], h[1]]))).collect::<Vec<_>>())
            };
            return self.judge(name, DType::F32, &widen(cb), &widen(gb), check, dt);
        }
        let ok;
        let line;
        match (dtype, check) {
            (DType::F32, Check::Exact) => {
                let (e, m, diff, nf) = nmse(&bytes_f32(gb), &bytes_f32(cb));
                ok = diff == 0;
                line =
                    format!("exact: {diff} differing of {} (nmse {e:.2e}, max {m:.2e}, nonfinite {nf})", cb.len() / 4);
            }
            (DType::F32, Check::Nmse(t)) => {
                let (e, m, diff, nf) = nmse(&bytes_f32(gb), &bytes_f32(cb));
                ok = e <= t && nf == 0;
                line = format!(
                    "nmse {e:.2e} (≤ {t:.0e}), max {m:.2e}, {diff} not bit-equal of {}, nonfinite {nf}",
                    cb.len() / 4
                );
            }
            (DType::F32, Check::Quantized(t)) => {
                let (g, c) = (bytes_f32(gb), bytes_f32(cb));
                let (e, m, diff, nf) = nmse(&g, &c);
                // Count elements differing by more than a rounding: single quantization flips.
                let rms = (c.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c.len().max(1) as f64).sqrt();
                let flips = g.iter().zip(&c).filter(|(a, b)| ((**a as f64) - (**b as f64)).abs() > 1e-5 * rms).count();
                ok = nf == 0 && (e <= t || flips <= (c.len() / 100).max(2));
                line = format!("nmse {e:.2e}, max {m:.2e}, {diff} not bit-equal, {flips} flips of {}", c.len());
            }
            (DType::I32, Check::Indices) | (DType::I32, _) => {
                let (g, c) = (bytes_i32(gb), bytes_i32(cb));
                let diff = g.iter().zip(&c).filter(|(a, b)| a != b).count();
                ok = diff == 0 || matches!(check, Check::Indices);
                line = format!("i32: {diff} differing of {}", c.len());
            }
            _ => {
                ok = cb == gb;
                line = "bytes".into();
            }
        }
        println!("{} {name}: {line} [{:.2} ms]", if ok { "ok  " } else { "FAIL" }, dt.as_secs_f64() * 1e3);
        if !ok {
            self.failures.push(format!("{name}: {line}"));
        }
    }
}

fn poison(shape: &[usize]) -> HostT {
    let n: usize = shape.iter().product();
    tb(shape, DType::F32, (0..n).flat_map(|_| 0xFFC0_DEADu32.to_le_bytes()).collect())
}
fn poison_i(shape: &[usize]) -> HostT {
    let n: usize = shape.iter().product();
    tb(shape, DType::I32, (0..n).flat_map(|_| 0x7FFF_FFFFi32.to_le_bytes()).collect())
}

/// Random FP8 weight [out, inp] codes (no NaN codes) and e8m0 scales near 2^0.
fn fp8_weight(rng: &mut Rng, out: usize, inp: usize) -> (HostT, HostT) {
    let codes: Vec<u8> = (0..out * inp)
        .map(|_| match rng.below(256) as u8 {
            0x7F | 0xFF => 0x7E,
            c => c,
        })
        .collect();
    let (sr, sc) = (out.div_ceil(128), inp.div_ceil(128));
    let scales: Vec<u8> = (0..sr * sc).map(|_| 118 + rng.below(6) as u8).collect();
    (tb(&[out, inp], DType::F8E4M3, codes), tb(&[sr, sc], DType::F8E8M0, scales))
}
fn fp4_weight(rng: &mut Rng, out: usize, inp: usize) -> (HostT, HostT) {
    let packed: Vec<u8> = (0..out * inp / 2).map(|_| rng.below(256) as u8).collect();
    let scales: Vec<u8> = (0..out * inp / 32).map(|_| 122 + rng.below(6) as u8).collect();
    (tb(&[out, inp / 2], DType::F4E2M1x2, packed), tb(&[out, inp / 32], DType::F8E8M0, scales))
}
fn bf16_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f32_to_bf16(*x).to_le_bytes()).collect()
}
/// A KV cache tensor of dtype `dtype` (F32 or BF16) holding `v` (rounded to bf16 for BF16).
fn tcache(shape: &[usize], dtype: DType, v: &[f32]) -> HostT {
    match dtype {
        DType::BF16 => tb(shape, dtype, bf16_of(v)),
        _ => tf(shape, v),
    }
}
fn weight(rng: &mut Rng, f: WeightFormat, out: usize, inp: usize) -> Vec<HostT> {
    match f {
        WeightFormat::F32 => vec![tf(&[out, inp], &rng.vf(out * inp, 0.1))],
        WeightFormat::Bf16 => vec![tb(&[out, inp], DType::BF16, bf16_of(&rng.vf(out * inp, 0.1)))],
        WeightFormat::Fp8Block128 => {
            let (a, b) = fp8_weight(rng, out, inp);
            vec![a, b]
        }
        WeightFormat::Fp4Group32 => {
            let (a, b) = fp4_weight(rng, out, inp);
            vec![a, b]
        }
    }
}
/// Stacks per-expert weights [E, ...].
fn stack(parts: Vec<Vec<HostT>>) -> Vec<HostT> {
    let n = parts[0].len();
    (0..n)
        .map(|i| {
            let mut shape = parts[0][i].shape.clone();
            shape.insert(0, parts.len());
            let bytes = parts.iter().flat_map(|p| p[i].bytes.clone()).collect();
            tb(&shape, parts[0][i].dtype, bytes)
        })
        .collect()
}

fn freqs(n: usize) -> Vec<f32> {
    (0..n).map(|i| 10000f32.powf(-((2 * i) as f32) / (2 * n) as f32)).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn cuda_matches_cpu_ref() {
    let gpu = match v4rt_cuda::probe() {
        Probe::Available(b) => b,
        Probe::Unavailable(r) => panic!("cuda backend unavailable: {r}"),
    };
    println!("device: {}", gpu.info().device);
    let mut s = Suite { cpu: CpuBackend::new(), gpu, failures: Vec::new() };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // ---- embed family
    for (dtype, bytes_of) in [
        (DType::F32, (|v: &[f32]| f32_bytes(v)) as fn(&[f32]) -> Vec<u8>),
        (DType::BF16, |v: &[f32]| bf16_of(v)),
        (DType::F16, |v: &[f32]| v.iter().flat_map(|x| half_bits(*x).to_le_bytes()).collect()),
    ] {
        let (vocab, dim, rows) = (50, 72, 7);
        let table = tb(&[vocab, dim], dtype, bytes_of(&rng.vf(vocab * dim, 3.0)));
        let ids: Vec<i32> = (0..rows).map(|_| rng.below(vocab as u64) as i32).collect();
        let op = Op::Embed(Embed { rows, vocab, dim, table_dtype: dtype });
        s.case(
            &format!("embed {dtype}"),
            &op,
            &[ti(&[rows], &ids), table],
            &[(poison(&[rows, dim]), Some(Check::Exact))],
        );
    }
    {
        let (rows, mult, dim) = (5, 4, 33);
        let op = Op::HcExpand(HcExpand { rows, mult, dim });
        s.case(
            "hc_expand",
            &op,
            &[tf(&[rows, dim], &rng.vf(rows * dim, 1.0))],
            &[(poison(&[rows, mult, dim]), Some(Check::Exact))],
        );
        let op = Op::Add(Add { rows: 8, b_rows: 2, width: 40 });
        s.case(
            "add bcast",
            &op,
            &[tf(&[8, 40], &rng.vf(320, 1.0)), tf(&[2, 40], &rng.vf(80, 1.0))],
            &[(poison(&[8, 40]), Some(Check::Exact))],
        );
        let op = Op::GatherRows(GatherRows { rows: 9, width: 20, out_rows: 4 });
        s.case(
            "gather_rows",
            &op,
            &[tf(&[9, 20], &rng.vf(180, 1.0)), ti(&[4], &[8, 0, 3, 3])],
            &[(poison(&[4, 20]), Some(Check::Exact))],
        );
    }

    // ---- hc
    for &(rows, m, d) in &[(3usize, 4usize, 64usize), (2, 4, 1024), (1, 2, 7)] {
        let nm = (2 + m) * m;
        let x = rng.vf(rows * m * d, 2.0);
        let op = Op::HcPre(HcPre {
            rows,
            mult: m,
            dim: d,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
            after_post: false,
        });
        let ins = [
            tf(&[rows, m, d], &x),
            tf(&[nm, m * d], &rng.vf(nm * m * d, 0.05)),
            tf(&[nm], &rng.vf(nm, 0.5)),
            tf(&[3], &[0.7, 1.1, 1.3]),
            tf(&[d], &rng.vf(d, 1.0)),
        ];
        s.case(
            &format!("hc_pre {rows}x{m}x{d}"),
            &op,
            &ins,
            &[
                (poison(&[rows, d]), Some(Check::Nmse(1e-9))),
                (poison(&[rows, m]), Some(Check::Nmse(1e-9))),
                (poison(&[rows, m, m]), Some(Check::Nmse(1e-9))),
            ],
        );
        let op = Op::HcHead(HcHead { rows, mult: m, dim: d, hc_eps: 1e-6, norm_eps: 1e-6, after_post: false });
        let ins = [
            tf(&[rows, m, d], &x),
            tf(&[m, m * d], &rng.vf(m * m * d, 0.05)),
            tf(&[m], &rng.vf(m, 0.5)),
            tf(&[1], &[0.9]),
            tf(&[d], &rng.vf(d, 1.0)),
        ];
        s.case(&format!("hc_head {rows}x{m}x{d}"), &op, &ins, &[(poison(&[rows, d]), Some(Check::Nmse(1e-9)))]);
        let op = Op::HcPost(HcPost { rows, mult: m, dim: d });
        let ins = [
            tf(&[rows, d], &rng.vf(rows * d, 1.0)),
            tf(&[rows, m, d], &x),
            tf(&[rows, m], &rng.vf(rows * m, 1.0)),
            tf(&[rows, m, m], &rng.vf(rows * m * m, 1.0)),
        ];
        s.case(&format!("hc_post {rows}x{m}x{d}"), &op, &ins, &[(poison(&[rows, m, d]), Some(Check::Nmse(1e-12)))]);
    }

    // ---- norm
    for weighted in [true, false] {
        let (rows, dim) = (6, 7168);
        let op = Op::RmsNorm(RmsNorm { rows, dim, eps: 1e-6, weighted, rope: None });
        let mut ins = vec![tf(&[rows, dim], &rng.vf(rows * dim, 3.0))];
        if weighted {
            ins.push(tf(&[dim], &rng.vf(dim, 1.0)));
        }
        s.case(
            &format!("rms_norm weighted={weighted}"),
            &op,
            &ins,
            &[(poison(&[rows, dim]), Some(Check::Nmse(1e-10)))],
        );
    }

    // ---- linear
    for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8Block128, WeightFormat::Fp4Group32] {
        for &(rows, inp, out) in &[(1usize, 256usize, 130usize), (19, 512, 300), (3, 7168, 64)] {
            let op = Op::Linear(Linear { rows, in_features: inp, out_features: out, format });
            let mut ins = vec![tf(&[rows, inp], &rng.vf(rows * inp, 2.0))];
            ins.extend(weight(&mut rng, format, out, inp));
            let t = if format.quantizes_input() { 1e-7 } else { 1e-9 };
            s.case(
                &format!("linear {format:?} {rows}x{inp}->{out}"),
                &op,
                &ins,
                &[(poison(&[rows, out]), Some(Check::Nmse(t)))],
            );
        }
    }
    for (format, inp) in [(WeightFormat::F32, 100usize), (WeightFormat::Bf16, 36)] {
        // Scalar path (in_features not a multiple of 32).
        let (rows, out) = (3, 50);
        let op = Op::Linear(Linear { rows, in_features: inp, out_features: out, format });
        let mut ins = vec![tf(&[rows, inp], &rng.vf(rows * inp, 2.0))];
        ins.extend(weight(&mut rng, format, out, inp));
        s.case(
            &format!("linear {format:?} {rows}x{inp}->{out}"),
            &op,
            &ins,
            &[(poison(&[rows, out]), Some(Check::Nmse(1e-9)))],
        );
    }
    for (format, ipg) in [
        (WeightFormat::F32, 64usize),
        (WeightFormat::Bf16, 64),
        (WeightFormat::Fp8Block128, 64),
        (WeightFormat::F32, 20),
        (WeightFormat::Fp4Group32, 96),
    ] {
        let (rows, g, opg) = (5, 8, 48);
        let op = Op::GroupedLinear(GroupedLinear { rows, groups: g, in_per_group: ipg, out_per_group: opg, format });
        let mut ins = vec![tf(&[rows, g * ipg], &rng.vf(rows * g * ipg, 1.0))];
        ins.extend(weight(&mut rng, format, g * opg, ipg));
        s.case(
            &format!("grouped_linear {format:?}"),
            &op,
            &ins,
            &[(poison(&[rows, g * opg]), Some(Check::Nmse(1e-9)))],
        );
    }

    // ---- rope
    for inverse in [false, true] {
        let (rows, heads, hd, rd) = (5, 3, 96, 64);
        let pos = [0, 1, 4097, 65535, 1_000_000];
        let op = Op::Rope(Rope { rows, heads, head_dim: hd, rope_dim: rd, inverse });
        let x = tf(&[rows, heads, hd], &rng.vf(rows * heads * hd, 1.0));
        s.case(
            &format!("rope inverse={inverse}"),
            &op,
            &[tf(&[rd / 2], &freqs(rd / 2)), ti(&[rows], &pos)],
            &[(x, Some(Check::Nmse(1e-12)))],
        );
    }

    // ---- quant
    for (format, block, qd, dim) in [
        (QuantFormat::Fp8E4M3, 64usize, 448usize, 512usize),
        (QuantFormat::Fp4E2M1, 32, 128, 128),
        (QuantFormat::Fp8E4M3, 128, 256, 256),
    ] {
        let rows = 7;
        let mut v = rng.vf(rows * dim, 5.0);
        v[3] = 0.0;
        v[dim..2 * dim].iter_mut().for_each(|x| *x = 0.0);
        v[2 * dim + 5] = 1e-30;
        let op = Op::QuantSim(QuantSim { rows, dim, quant_dims: qd, block, format });
        s.case(&format!("quant_sim {format:?} b{block}"), &op, &[], &[(tf(&[rows, dim], &v), Some(Check::Exact))]);
    }
    for dim in [128usize, 8192] {
        let rows = 3;
        let op = Op::Hadamard(Hadamard { rows, dim });
        s.case(
            &format!("hadamard {dim}"),
            &op,
            &[],
            &[(tf(&[rows, dim], &rng.vf(rows * dim, 1.0)), Some(Check::Nmse(1e-11)))],
        );
    }

    // ---- swiglu
    for limit in [0.0f32, 7.0] {
        let n = 1000;
        let op = Op::SwiGlu(SwiGlu { rows: 4, width: n / 4, limit });
        s.case(
            &format!("swiglu limit {limit}"),
            &op,
            &[tf(&[4, n / 4], &rng.vf(n, 12.0)), tf(&[4, n / 4], &rng.vf(n, 12.0))],
            &[(poison(&[4, n / 4]), Some(Check::Nmse(1e-12)))],
        );
    }

    // ---- attention: slot 0 prefill chunk at 5..=12 (window 8: reads ring for 0..4), slot 1 decode at 30,
    // slot 2 a long prefill 0..=20 (longer than the window). With an f32 cache, and a bf16 one (fresh
    // keys rounded too) at head_dim 64 (shared-memory path) and 128 (register path).
    for (cache_dtype, d) in [(DType::F32, 64), (DType::BF16, 64), (DType::BF16, 128)] {
        let (h, w, cap, ns) = (4, 8, 16, 3);
        let tag = if cache_dtype == DType::F32 { String::new() } else { format!(" {cache_dtype} cache d{d}") };
        let mut slots = vec![0; 8];
        let mut pos: Vec<i32> = (5..13).collect();
        slots.push(1);
        pos.push(30);
        slots.extend([2; 21]);
        pos.extend(0..21);
        let rows = slots.len();
        let q = tf(&[rows, h, d], &rng.vf(rows * h * d, 1.0));
        let kv = tf(&[rows, d], &rng.vf(rows * d, 1.0));
        let ring = tcache(&[ns, w, d], cache_dtype, &rng.vf(ns * w * d, 1.0));
        let sink = tf(&[h], &rng.vf(h, 1.0));
        let comp = tcache(&[ns, cap, d], cache_dtype, &rng.vf(ns * cap * d, 1.0));
        let topk = 6;
        let idx: Vec<i32> =
            (0..rows * topk).map(|i| if i % 5 == 4 { -1 } else { rng.below(cap as u64) as i32 }).collect();
        for (label, compressed) in [
            ("none", CompressedKv::None),
            ("all r2", CompressedKv::All { ratio: 2, capacity: cap }),
            ("selected", CompressedKv::Selected { ratio: 4, capacity: cap, topk }),
        ] {
            let op = Op::SparseAttention(SparseAttention {
                rows,
                heads: h,
                head_dim: d,
                slots: ns,
                window: w,
                compressed: compressed.clone(),
                softmax_scale: 0.125,
                cache_dtype,
            });
            let mut ins =
                vec![q.clone(), kv.clone(), ring.clone(), sink.clone(), ti(&[rows], &slots), ti(&[rows], &pos)];
            match compressed {
                CompressedKv::None => {}
                CompressedKv::All { .. } => ins.push(comp.clone()),
                CompressedKv::Selected { .. } => {
                    ins.push(comp.clone());
                    ins.push(ti(&[rows, topk], &idx));
                }
            }
            s.case(
                &format!("sparse_attention {label}{tag}"),
                &op,
                &ins,
                &[(poison(&[rows, h, d]), Some(Check::Nmse(1e-10)))],
            );
        }
        let op = Op::WindowStore(WindowStore { rows, slots: ns, window: w, dim: d, cache_dtype });
        s.case(
            &format!("window_store{tag}"),
            &op,
            &[kv.clone(), ti(&[rows], &slots), ti(&[rows], &pos)],
            &[(ring.clone(), Some(Check::Exact))],
        );
    }
    // window_store into a bf16 ring, bit for bit on the rounding's edge cases: ties to even (down and
    // up), just above a tie, overflow to ±inf, ±inf, NaNs (quiet bit set, payload kept), subnormals.
    {
        let special: [u32; 16] = [
            0x3F80_8000,
            0x3F81_8000,
            0xBF80_8001,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x7F81_0000,
            0xFFC0_1234,
            0x7FFF_FFFF,
            0x0000_8000,
            0x0001_8000,
            0x8000_7FFF,
            0x3F7F_FFFF,
            0x0000_0000,
            0x8000_0000,
        ];
        let kv: Vec<f32> = special.iter().map(|&b| f32::from_bits(b)).collect();
        let op = Op::WindowStore(WindowStore { rows: 2, slots: 1, window: 4, dim: 8, cache_dtype: DType::BF16 });
        let ring = tcache(&[1, 4, 8], DType::BF16, &rng.vf(32, 1.0));
        s.case(
            "window_store bf16 rounding",
            &op,
            &[tf(&[2, 8], &kv), ti(&[2], &[0, 0]), ti(&[2], &[5, 6])],
            &[(ring, Some(Check::Exact))],
        );
    }
    // head_dim 512 like the model, decode rows (key splits and their combination).
    for cache_dtype in [DType::F32, DType::BF16] {
        let tag = if cache_dtype == DType::F32 { String::new() } else { format!(" {cache_dtype} cache") };
        let (h, d) = (16, 512);
        let rows = 2;
        let op = Op::SparseAttention(SparseAttention {
            rows,
            heads: h,
            head_dim: d,
            slots: 2,
            window: 128,
            compressed: CompressedKv::All { ratio: 4, capacity: 64 },
            softmax_scale: 0.044,
            cache_dtype,
        });
        let ins = vec![
            tf(&[rows, h, d], &rng.vf(rows * h * d, 1.0)),
            tf(&[rows, d], &rng.vf(rows * d, 1.0)),
            tcache(&[2, 128, d], cache_dtype, &rng.vf(2 * 128 * d, 1.0)),
            tf(&[h], &rng.vf(h, 1.0)),
            ti(&[rows], &[0, 1]),
            ti(&[rows], &[200, 17]),
            tcache(&[2, 64, d], cache_dtype, &rng.vf(2 * 64 * d, 1.0)),
        ];
        s.case(
            &format!("sparse_attention d512 decode{tag}"),
            &op,
            &ins,
            &[(poison(&[rows, h, d]), Some(Check::Nmse(1e-10)))],
        );
    }

    // ---- compressor sequences: three calls on persistent state per backend, with an f32 cache and a
    // bf16 one (the state stays f32).
    let configs = [
        ("csa r4 overlap", 4usize, true, 128usize, 64usize, false),
        ("hca r8", 8, false, 128, 64, false),
        ("indexer r4 rotate", 4, true, 128, 64, true),
        ("r1 overlap", 1, true, 64, 0, false),
    ];
    for (cache_dtype, (label, ratio, overlap, width, rope_dim, rotate)) in
        [DType::F32, DType::BF16].into_iter().flat_map(|t| configs.map(move |c| (t, c)))
    {
        let tag = if cache_dtype == DType::F32 { String::new() } else { format!(" {cache_dtype} cache") };
        let (ns, cap) = (2, 24 / ratio.min(4) * 4);
        let c = if overlap { 2 } else { 1 };
        let calls: [(Vec<i32>, Vec<i32>); 3] = [
            (vec![0; 11].into_iter().chain(vec![1; 6]).collect(), (0..11).chain(0..6).collect()),
            (vec![1; 15].into_iter().chain(vec![0; 3]).collect(), (6..21).chain(11..14).collect()),
            (vec![0, 1], vec![14, 21]),
        ];
        let ape = tf(&[ratio, c * width], &rng.vf(ratio * c * width, 0.5));
        let norm_w = tf(&[width], &rng.vf(width, 1.0));
        let fr = tf(&[rope_dim / 2], &freqs(rope_dim / 2));
        let mut score0 = vec![0f32; ns * c * ratio * c * width];
        score0.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        let mut state: Vec<HostT> = vec![
            tf(&[ns, c * ratio, c * width], &vec![0.0; ns * c * ratio * c * width]),
            tf(&[ns, c * ratio, c * width], &score0),
            tcache(&[ns, cap, width], cache_dtype, &vec![0.0; ns * cap * width]),
        ];
        let mut gstate = state.clone();
        for (ci, (sl, ps)) in calls.iter().enumerate() {
            let rows = sl.len();
            let op = Op::Compressor(Compressor {
                rows,
                slots: ns,
                ratio,
                overlap,
                width,
                rope_dim,
                rotate,
                capacity: cap,
                norm_eps: 1e-6,
                cache_dtype,
            });
            let ins = [
                tf(&[rows, c * width], &rng.vf(rows * c * width, 1.0)),
                tf(&[rows, c * width], &rng.vf(rows * c * width, 1.0)),
                ape.clone(),
                norm_w.clone(),
                fr.clone(),
                ti(&[rows], sl),
                ti(&[rows], ps),
            ];
            // Both backends start each call from their own previous state (GPU state is
            // compared bit-exactly, so they stay equal when correct).
            let res = s.case_with_states(
                &format!("compressor {label}{tag} call {ci}"),
                &op,
                &ins,
                &state,
                &gstate,
                &[Check::Exact, Check::Exact, Check::Quantized(1e-10)],
            );
            if res.len() == 3 {
                for (k, (cb, gb)) in res.into_iter().enumerate() {
                    state[k].bytes = cb;
                    gstate[k].bytes = gb;
                }
            }
        }
    }

    // ---- indexer, with f32 keys and bf16 ones (the indexer compressor's cache).
    for cache_dtype in [DType::F32, DType::BF16] {
        let tag = if cache_dtype == DType::F32 { String::new() } else { format!(" {cache_dtype} keys") };
        let (h, d, ns, cap, ratio, topk) = (8, 128, 2, 40, 4, 12);
        let slots = vec![0, 0, 0, 1];
        let pos = vec![60, 61, 62, 150];
        let rows = slots.len();
        // e2m1-grid values so that exact ties appear (bf16 holds them exactly).
        let grid = |r: &mut Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| hal::dtype::e2m1_to_f32(r.below(16) as u8) * 0.25).collect()
        };
        let q = tf(&[rows, h, d], &grid(&mut rng, rows * h * d));
        let w = tf(&[rows, h], &rng.vf(rows * h, 1.0));
        let keys = tcache(&[ns, cap, d], cache_dtype, &grid(&mut rng, ns * cap * d));
        let op = Op::IndexerTopK(IndexerTopK {
            rows,
            heads: h,
            head_dim: d,
            slots: ns,
            capacity: cap,
            ratio,
            topk,
            weight_scale: 0.03,
            cache_dtype,
        });
        s.case(
            &format!("indexer_topk{tag}"),
            &op,
            &[q, w, keys, ti(&[rows], &slots), ti(&[rows], &pos)],
            &[(poison_i(&[rows, topk]), Some(Check::Indices)), (poison(&[rows, topk]), Some(Check::Nmse(1e-9)))],
        );
        // Random values, two slots: (name, head_dim, capacity, topk, positions).
        for (what, d, cap, topk, pos) in [
            // More entries than topk, one row with fewer visible than topk.
            ("3000/512", 128, 3000, 512, [11999, 40]),
            // head_dim 30 (not a multiple of 4): the warp-per-key index_scores.
            ("d30", 30, 50, 7, [150, 9]),
        ] {
            let q = tf(&[2, h, d], &rng.vf(2 * h * d, 1.0));
            let w = tf(&[2, h], &rng.vf(2 * h, 1.0));
            let keys = tcache(&[2, cap, d], cache_dtype, &rng.vf(2 * cap * d, 1.0));
            let op = Op::IndexerTopK(IndexerTopK {
                rows: 2,
                heads: h,
                head_dim: d,
                slots: 2,
                capacity: cap,
                ratio,
                topk,
                weight_scale: 0.03,
                cache_dtype,
            });
            s.case(
                &format!("indexer_topk {what}{tag}"),
                &op,
                &[q, w, keys, ti(&[2], &[0, 1]), ti(&[2], &pos)],
                &[(poison_i(&[2, topk]), Some(Check::Indices)), (poison(&[2, topk]), Some(Check::Nmse(1e-9)))],
            );
        }
    }

    // ---- moe
    {
        let (rows, dim, e_n, k) = (9, 256, 16, 4);
        let x = tf(&[rows, dim], &rng.vf(rows * dim, 1.0));
        let gw = tf(&[e_n, dim], &rng.vf(e_n * dim, 0.2));
        let op = Op::MoeGate(MoeGate { rows, dim, experts: e_n, topk: k, route_scale: 2.5, mode: GateMode::Scored });
        s.case(
            "moe_gate scored",
            &op,
            &[x.clone(), gw.clone(), tf(&[e_n], &rng.vf(e_n, 0.1))],
            &[(poison_i(&[rows, k]), Some(Check::Indices)), (poison(&[rows, k]), Some(Check::Nmse(1e-10)))],
        );
        let vocab = 30;
        let table: Vec<i32> = (0..vocab * k).map(|i| ((i * 7 + i / k) % e_n) as i32).collect();
        let ids: Vec<i32> = (0..rows).map(|_| rng.below(vocab as u64) as i32).collect();
        let op = Op::MoeGate(MoeGate {
            rows,
            dim,
            experts: e_n,
            topk: k,
            route_scale: 1.5,
            mode: GateMode::Hashed { vocab },
        });
        s.case(
            "moe_gate hashed",
            &op,
            &[x.clone(), gw, ti(&[vocab, k], &table), ti(&[rows], &ids)],
            &[(poison_i(&[rows, k]), Some(Check::Exact)), (poison(&[rows, k]), Some(Check::Nmse(1e-10)))],
        );
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8Block128, WeightFormat::Fp4Group32] {
            let (inter, e_n, k) = (128, 8, 3);
            let ex: Vec<i32> =
                (0..rows).flat_map(|r| [(r % 8) as i32, ((r + 3) % 8) as i32, ((r * 5 + 1) % 8) as i32]).collect();
            // Make rows distinct experts.
            let ex: Vec<i32> = ex
                .chunks(3)
                .flat_map(|c| if c[2] == c[0] || c[2] == c[1] { vec![c[0], c[1], (c[1] + 1) % 8] } else { c.to_vec() })
                .collect();
            let ex: Vec<i32> = ex
                .chunks(3)
                .flat_map(|c| if c[2] == c[0] { vec![c[0], c[1], (c[2] + 2) % 8] } else { c.to_vec() })
                .collect();
            let wts = rng.vf(rows * k, 1.0);
            let mut ins = vec![x.clone(), ti(&[rows, k], &ex), tf(&[rows, k], &wts)];
            let w1 = stack((0..e_n).map(|_| weight(&mut rng, format, inter, dim)).collect());
            let w3 = stack((0..e_n).map(|_| weight(&mut rng, format, inter, dim)).collect());
            let w2 = stack((0..e_n).map(|_| weight(&mut rng, format, dim, inter)).collect());
            ins.extend(w1);
            ins.extend(w3);
            ins.extend(w2);
            let op = Op::MoeExperts(MoeExperts { rows, dim, inter, experts: e_n, topk: k, swiglu_limit: 10.0, format });
            let t = if format.quantizes_input() { 1e-6 } else { 1e-9 };
            s.case(
                &format!("moe_experts {format:?}"),
                &op,
                &ins.clone(),
                &[(poison(&[rows, dim]), Some(Check::Nmse(t)))],
            );
            // Decode-like: 2 rows, distinct experts (one pair per expert in use).
            let mut ins2 = ins;
            ins2[0] = tf(&[2, dim], &rng.vf(2 * dim, 1.0));
            ins2[1] = ti(&[2, k], &[0, 5, 2, 7, 1, 4]);
            ins2[2] = tf(&[2, k], &rng.vf(2 * k, 1.0));
            let op =
                Op::MoeExperts(MoeExperts { rows: 2, dim, inter, experts: e_n, topk: k, swiglu_limit: 10.0, format });
            s.case(&format!("moe_experts {format:?} decode"), &op, &ins2, &[(poison(&[2, dim]), Some(Check::Nmse(t)))]);
        }
    }

    // ---- deferred argument errors
    s.error_case(
        "embed bad id",
        &Op::Embed(Embed { rows: 3, vocab: 4, dim: 2, table_dtype: DType::F32 }),
        &[ti(&[3], &[0, 7, -1]), tf(&[4, 2], &[0.0; 8])],
        &[poison(&[3, 2])],
        "embed row 1: token id 7 outside [0, 4)",
    );
    s.error_case(
        "window_store not contiguous",
        &Op::WindowStore(WindowStore { rows: 3, slots: 2, window: 4, dim: 2, cache_dtype: hal::DType::F32 }),
        &[tf(&[3, 2], &[0.0; 6]), ti(&[3], &[0, 1, 0]), ti(&[3], &[3, 0, 4])],
        &[tf(&[2, 4, 2], &[0.0; 16])],
        "window_store row 2: rows of slot 0 are not contiguous (previous one is row 0)",
    );
    // Bad expert lists: two rows, and a single row (a decode step at batch 1), which the
    // one-block routing kernel checks.
    let bad_experts: [(&str, &[i32], &str); 3] = [
        ("moe_experts duplicate", &[0, 1, 1, 1], "moe_experts row 1: expert 1 is listed twice"),
        ("moe_experts one row [2, 0]", &[2, 0], "moe_experts row 0: expert 2 outside [0, 2)"),
        ("moe_experts one row [1, 1]", &[1, 1], "moe_experts row 0: expert 1 is listed twice"),
    ];
    for (name, ex, msg) in bad_experts {
        let rows = ex.len() / 2;
        let w = tf(&[2, 128, 128], &vec![0.0; 2 * 128 * 128]);
        s.error_case(
            name,
            &Op::MoeExperts(MoeExperts {
                rows,
                dim: 128,
                inter: 128,
                experts: 2,
                topk: 2,
                swiglu_limit: 0.0,
                format: WeightFormat::F32,
            }),
            &[
                tf(&[rows, 128], &vec![0.0; rows * 128]),
                ti(&[rows, 2], ex),
                tf(&[rows, 2], &vec![1.0; rows * 2]),
                w.clone(),
                w.clone(),
                w,
            ],
            &[poison(&[rows, 128])],
            msg,
        );
    }

    s.error_case(
        "rope negative position",
        &Op::Rope(Rope { rows: 2, heads: 1, head_dim: 4, rope_dim: 4, inverse: false }),
        &[tf(&[2], &[1.0, 0.5]), ti(&[2], &[3, -2])],
        &[tf(&[2, 1, 4], &[0.5; 8])],
        "rope row 1: position -2 is negative",
    );
    s.error_case(
        "gather_rows bad index",
        &Op::GatherRows(GatherRows { rows: 3, width: 2, out_rows: 2 }),
        &[tf(&[3, 2], &[0.0; 6]), ti(&[2], &[2, 3])],
        &[poison(&[2, 2])],
        "gather_rows index 1: row 3 outside [0, 3)",
    );
    {
        let (h, d, w, cap) = (1, 4, 4, 2);
        let base = |compressed: CompressedKv, extra: Vec<HostT>| {
            let op = Op::SparseAttention(SparseAttention {
                rows: 2,
                heads: h,
                head_dim: d,
                slots: 1,
                window: w,
                compressed,
                softmax_scale: 1.0,
                cache_dtype: hal::DType::F32,
            });
            let mut ins = vec![
                tf(&[2, h, d], &[0.1; 8]),
                tf(&[2, d], &[0.2; 8]),
                tf(&[1, w, d], &[0.3; 16]),
                tf(&[h], &[0.0]),
                ti(&[2], &[0, 0]),
                ti(&[2], &[4, 5]),
            ];
            ins.extend(extra);
            (op, ins)
        };
        let (op, ins) = base(
            CompressedKv::Selected { ratio: 4, capacity: cap, topk: 2 },
            vec![tf(&[1, cap, d], &[0.0; 8]), ti(&[2, 2], &[0, -1, 1, 2])],
        );
        s.error_case(
            "sparse_attention bad index",
            &op,
            &ins,
            &[poison(&[2, h, d])],
            "sparse_attention row 1: compressed index 2 outside [0, 2) (or −1)",
        );
        let (op, ins) = base(CompressedKv::All { ratio: 2, capacity: cap }, vec![tf(&[1, cap, d], &[0.0; 8])]);
        s.error_case(
            "sparse_attention capacity",
            &op,
            &ins,
            &[poison(&[2, h, d])],
            "sparse_attention row 1: position 5 sees 3 compressed entries, capacity is 2",
        );
    }
    {
        let op = Op::Compressor(Compressor {
            rows: 2,
            slots: 1,
            ratio: 2,
            overlap: false,
            width: 64,
            rope_dim: 0,
            rotate: false,
            capacity: 1,
            norm_eps: 1e-6,
            cache_dtype: hal::DType::F32,
        });
        let ins = [
            tf(&[2, 64], &[0.1; 128]),
            tf(&[2, 64], &[0.1; 128]),
            tf(&[2, 64], &[0.0; 128]),
            tf(&[64], &[1.0; 64]),
            tf(&[0], &[]),
            ti(&[2], &[0, 0]),
            ti(&[2], &[2, 3]),
        ];
        let outs = [tf(&[1, 2, 64], &[0.0; 128]), tf(&[1, 2, 64], &[0.0; 128]), tf(&[1, 1, 64], &[0.0; 64])];
        s.error_case(
            "compressor capacity",
            &op,
            &ins,
            &outs,
            "compressor row 1: position 3 emits entry 1 but the cache holds 1",
        );
    }
    {
        let op = Op::IndexerTopK(IndexerTopK {
            rows: 1,
            heads: 1,
            head_dim: 4,
            slots: 1,
            capacity: 2,
            ratio: 4,
            topk: 2,
            weight_scale: 1.0,
            cache_dtype: hal::DType::F32,
        });
        let ins = [
            tf(&[1, 1, 4], &[0.0; 4]),
            tf(&[1, 1], &[1.0]),
            tf(&[1, 2, 4], &[0.0; 8]),
            ti(&[1], &[0]),
            ti(&[1], &[11]),
        ];
        s.error_case(
            "indexer capacity",
            &op,
            &ins,
            &[poison_i(&[1, 2]), poison(&[1, 2])],
            "indexer_topk row 0: position 11 sees 3 entries, capacity is 2",
        );
    }
    {
        let op = Op::MoeGate(MoeGate {
            rows: 2,
            dim: 4,
            experts: 4,
            topk: 2,
            route_scale: 1.0,
            mode: GateMode::Hashed { vocab: 3 },
        });
        let ins =
            [tf(&[2, 4], &[0.5; 8]), tf(&[4, 4], &[0.1; 16]), ti(&[3, 2], &[0, 1, 2, 9, 1, 3]), ti(&[2], &[2, 1])];
        s.error_case(
            "moe_gate hashed table",
            &op,
            &ins,
            &[poison_i(&[2, 2]), poison(&[2, 2])],
            "moe_gate row 1: tid2eid[1] holds expert 9 outside [0, 4)",
        );
    }
    // HCA-sized compressor: ratio 128, width 512, a 300-row prefill then the rest of the block.
    {
        let (ratio, width, rope_dim, cap) = (128usize, 512usize, 64usize, 4usize);
        let mut skv = tf(&[1, ratio, width], &vec![0.0; ratio * width]);
        let mut ssc = tf(&[1, ratio, width], &vec![f32::NEG_INFINITY; ratio * width]);
        let mut cache = tf(&[1, cap, width], &vec![0.0; cap * width]);
        let mut g = [skv.clone(), ssc.clone(), cache.clone()];
        let ape = tf(&[ratio, width], &rng.vf(ratio * width, 0.5));
        let norm_w = tf(&[width], &rng.vf(width, 1.0));
        let fr = tf(&[rope_dim / 2], &freqs(rope_dim / 2));
        for (ci, (p0, p1)) in [(0i32, 300i32), (300, 384)].into_iter().enumerate() {
            let rows = (p1 - p0) as usize;
            let op = Op::Compressor(Compressor {
                rows,
                slots: 1,
                ratio,
                overlap: false,
                width,
                rope_dim,
                rotate: false,
                capacity: cap,
                norm_eps: 1e-6,
                cache_dtype: hal::DType::F32,
            });
            let ins = [
                tf(&[rows, width], &rng.vf(rows * width, 1.0)),
                tf(&[rows, width], &rng.vf(rows * width, 1.0)),
                ape.clone(),
                norm_w.clone(),
                fr.clone(),
                ti(&[rows], &vec![0; rows]),
                ti(&[rows], &(p0..p1).collect::<Vec<_>>()),
            ];
            let res = s.case_with_states(
                &format!("compressor hca r128 w512 call {ci}"),
                &op,
                &ins,
                &[skv.clone(), ssc.clone(), cache.clone()],
                &g,
                &[Check::Exact, Check::Exact, Check::Quantized(1e-10)],
            );
            if res.len() == 3 {
                skv.bytes = res[0].0.clone();
                ssc.bytes = res[1].0.clone();
                cache.bytes = res[2].0.clone();
                for (k, (_, gb)) in res.into_iter().enumerate() {
                    g[k].bytes = gb;
                }
            }
        }
    }

    println!("{} failures", s.failures.len());
    assert!(s.failures.is_empty(), "failures:\n{}", s.failures.join("\n"));
}

impl Suite {
    /// Like `case`, but the (read-write) outputs start from each backend's own state.
    fn case_with_states(
        &mut self,
        name: &str,
        op: &Op,
        ins: &[HostT],
        cstate: &[HostT],
        gstate: &[HostT],
        checks: &[Check],
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let cin: Vec<Tensor> = ins.iter().map(|h| up(&self.cpu, h)).collect();
        let gin: Vec<Tensor> = ins.iter().map(|h| up(self.gpu.as_ref(), h)).collect();
        let mut cout: Vec<Tensor> = cstate.iter().map(|h| up(&self.cpu, h)).collect();
        let mut gout: Vec<Tensor> = gstate.iter().map(|h| up(self.gpu.as_ref(), h)).collect();
        self.cpu.run(op, &cin.iter().collect::<Vec<_>>(), &mut cout.iter_mut().collect::<Vec<_>>()).expect("cpu-ref");
        let t0 = std::time::Instant::now();
        if let Err(e) = self
            .gpu
            .run(op, &gin.iter().collect::<Vec<_>>(), &mut gout.iter_mut().collect::<Vec<_>>())
            .and_then(|_| self.gpu.synchronize())
        {
            println!("FAIL {name}: {e}");
            self.failures.push(format!("{name}: {e}"));
            return Vec::new();
        }
        let dt = t0.elapsed();
        let mut res = Vec::new();
        for (i, (c, g)) in cout.iter().zip(&gout).enumerate() {
            let cb = self.cpu.download(c).expect("cpu download");
            let gb = self.gpu.download(g).expect("gpu download");
            self.judge(&format!("{name} out{i}"), cstate[i].dtype, &cb, &gb, checks[i], dt);
            res.push((cb, gb));
        }
        res
    }

    /// An op whose error is found on the device: `run` succeeds, `synchronize` reports it (with
    /// cpu-ref's text), and the next synchronize is clean.
    fn error_case(&mut self, name: &str, op: &Op, ins: &[HostT], outs: &[HostT], want: &str) {
        let cin: Vec<Tensor> = ins.iter().map(|h| up(&self.cpu, h)).collect();
        let mut cout: Vec<Tensor> = outs.iter().map(|h| up(&self.cpu, h)).collect();
        let cpu_err = self
            .cpu
            .run(op, &cin.iter().collect::<Vec<_>>(), &mut cout.iter_mut().collect::<Vec<_>>())
            .err()
            .map(|e| e.to_string());
        let gin: Vec<Tensor> = ins.iter().map(|h| up(self.gpu.as_ref(), h)).collect();
        let mut gout: Vec<Tensor> = outs.iter().map(|h| up(self.gpu.as_ref(), h)).collect();
        let r = self.gpu.run(op, &gin.iter().collect::<Vec<_>>(), &mut gout.iter_mut().collect::<Vec<_>>());
        let got = match r {
            Err(e) => Some(e.to_string()),
            Ok(()) => self.gpu.synchronize().err().map(|e| e.to_string()),
        };
        let clean = self.gpu.synchronize().is_ok();
        let ok = got.as_deref() == Some(want) && clean && cpu_err.as_deref() == Some(want);
        println!(
            "{} {name}: cuda {got:?}, cpu-ref {cpu_err:?}, next sync clean: {clean}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.failures.push(format!("{name}: cuda {got:?} vs want {want:?} (cpu-ref {cpu_err:?})"));
        }
    }
}

fn half_bits(x: f32) -> u16 {
    // Round-to-nearest f32 → f16 for test data (values are small and normal here).
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    if e <= 0 {
        return sign;
    }
    let m = (b >> 13) & 0x3FF;
    sign | ((e as u16) << 10) | m as u16
}
