//! The CPU backend through the `hal::Backend` API: the window/ring rule, the compressor state
//! machine across calls, weight caching, and error cases (which must be `Err`, never a panic).

use std::any::Any;

use cpu_ref::ops::attention::sparse_attn_row;
use cpu_ref::ops::compressor::{finish_entry, pool_entry};
use cpu_ref::ops::linear::{dequant_fp8_block128, linear};
use cpu_ref::CpuBackend;
use hal::dtype::{bytes_f32, bytes_i32, f32_bytes, i32_bytes};
use hal::ops::attention::CompressedKv;
use hal::ops::*;
use hal::{Backend, DType, Error, Storage, Tensor};

fn f32t(b: &CpuBackend, shape: &[usize], v: &[f32]) -> Tensor {
    b.upload(shape, DType::F32, &f32_bytes(v)).expect("upload f32")
}

fn i32t(b: &CpuBackend, shape: &[usize], v: &[i32]) -> Tensor {
    b.upload(shape, DType::I32, &i32_bytes(v)).expect("upload i32")
}

fn read(b: &CpuBackend, t: &Tensor) -> Vec<f32> {
    bytes_f32(&b.download(t).expect("download"))
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn invalid(r: hal::Result<()>, needle: &str) {
    match r {
        Err(Error::InvalidArgument { context, message }) => {
            let text = format!("{context}: {message}");
            assert!(text.contains(needle), "error '{text}' does not mention '{needle}'");
        }
        other => panic!("expected InvalidArgument mentioning '{needle}', got {other:?}"),
    }
}

/// Slot 0: a 3-row chunk at positions 5..=7 with older positions in the ring; slot 1: one
/// decode row at position 1. Window 4, HCA-style compressed entries (ratio 2).
#[test]
fn window_reads_fresh_rows_then_ring() {
    let b = CpuBackend::new();
    let (h, d, w, cap) = (2, 8, 4, 4);
    let rows = 4;
    let q = noise(rows * h * d, 1);
    let kv = noise(rows * d, 2);
    let ring = noise(2 * w * d, 3);
    let comp = noise(2 * cap * d, 4);
    let sink = [0.3f32, -0.2];
    let (slots, pos) = ([0, 0, 0, 1], [5, 6, 7, 1]);
    let op = SparseAttention {
        rows,
        heads: h,
        head_dim: d,
        slots: 2,
        window: w,
        compressed: CompressedKv::All { ratio: 2, capacity: cap },
        softmax_scale: 0.35,
        cache_dtype: hal::DType::F32,
    };
    let ins = [
        f32t(&b, &[rows, h, d], &q),
        f32t(&b, &[rows, d], &kv),
        f32t(&b, &[2, w, d], &ring),
        f32t(&b, &[h], &sink),
        i32t(&b, &[rows], &slots),
        i32t(&b, &[rows], &pos),
        f32t(&b, &[2, cap, d], &comp),
    ];
    let mut o = b.alloc(&[rows, h, d], DType::F32).expect("alloc");
    b.run(&Op::SparseAttention(op), &ins.iter().collect::<Vec<_>>(), &mut [&mut o]).expect("run");
    let got = read(&b, &o);

    let kv_row = |r: usize| &kv[r * d..(r + 1) * d];
    let ring_at = |s: usize, p: usize| &ring[(s * w + p % w) * d..(s * w + p % w + 1) * d];
    let comp_at = |s: usize, j: usize| &comp[(s * cap + j) * d..(s * cap + j + 1) * d];
    // Expected key lists, spelled out: window oldest first, then compressed j < (p+1)/2.
    let keys: [Vec<&[f32]>; 4] = [
        vec![ring_at(0, 2), ring_at(0, 3), ring_at(0, 4), kv_row(0), comp_at(0, 0), comp_at(0, 1), comp_at(0, 2)],
        vec![ring_at(0, 3), ring_at(0, 4), kv_row(0), kv_row(1), comp_at(0, 0), comp_at(0, 1), comp_at(0, 2)],
        vec![
            ring_at(0, 4),
            kv_row(0),
            kv_row(1),
            kv_row(2),
            comp_at(0, 0),
            comp_at(0, 1),
            comp_at(0, 2),
            comp_at(0, 3),
        ],
        vec![ring_at(1, 0), kv_row(3), comp_at(1, 0)],
    ];
    for (r, ks) in keys.iter().enumerate() {
        for (hh, &sk) in sink.iter().enumerate() {
            let at = (r * h + hh) * d;
            let mut want = vec![0.0; d];
            sparse_attn_row(&q[at..at + d], ks.iter().copied(), sk, 0.35, &mut want);
            assert_eq!(&got[at..at + d], &want[..], "row {r} head {hh}");
        }
    }
}

#[test]
fn attention_rejects_bad_rows_and_indices() {
    let b = CpuBackend::new();
    let (h, d, w, cap, k) = (1, 4, 2, 3, 2);
    let run = |slots: &[i32], pos: &[i32], idx: &[i32]| {
        let rows = slots.len();
        let op = SparseAttention {
            rows,
            heads: h,
            head_dim: d,
            slots: 2,
            window: w,
            compressed: CompressedKv::Selected { ratio: 4, capacity: cap, topk: k },
            softmax_scale: 1.0,
            cache_dtype: hal::DType::F32,
        };
        let ins = [
            f32t(&b, &[rows, h, d], &vec![0.5; rows * h * d]),
            f32t(&b, &[rows, d], &vec![0.5; rows * d]),
            f32t(&b, &[2, w, d], &vec![0.0; 2 * w * d]),
            f32t(&b, &[h], &[0.0]),
            i32t(&b, &[rows], slots),
            i32t(&b, &[rows], pos),
            f32t(&b, &[2, cap, d], &vec![0.0; 2 * cap * d]),
            i32t(&b, &[rows, k], idx),
        ];
        let mut o = b.alloc(&[rows, h, d], DType::F32).expect("alloc");
        b.run(&Op::SparseAttention(op), &ins.iter().collect::<Vec<_>>(), &mut [&mut o])
    };
    run(&[0, 0], &[8, 9], &[0, -1, 2, 1]).expect("valid call");
    invalid(run(&[0, 1, 0], &[8, 0, 9], &[0, -1, 0, -1, 0, -1]), "row 2");
    invalid(run(&[0, 0], &[8, 10], &[0, -1, 0, -1]), "row 1");
    invalid(run(&[0, 0], &[8, 9], &[0, -1, 3, -1]), "sparse_attention row 1");
    invalid(run(&[0, 0], &[8, 9], &[-2, -1, 0, -1]), "row 0");
    invalid(run(&[2], &[0], &[0, -1]), "slot 2");
    invalid(run(&[0], &[-1], &[0, -1]), "negative");
}

#[test]
fn window_store_keeps_the_last_window() {
    let b = CpuBackend::new();
    let (w, d, rows) = (2, 1, 3);
    let op = WindowStore { rows, slots: 1, window: w, dim: d, cache_dtype: hal::DType::F32 };
    let ins = [f32t(&b, &[rows, d], &[10.0, 11.0, 12.0]), i32t(&b, &[rows], &[0, 0, 0]), i32t(&b, &[rows], &[4, 5, 6])];
    let mut ring = f32t(&b, &[1, w, d], &[0.0, 0.0]);
    b.run(&Op::WindowStore(op), &ins.iter().collect::<Vec<_>>(), &mut [&mut ring]).expect("run");
    // Position 6 → slot 0, position 5 → slot 1.
    assert_eq!(read(&b, &ring), vec![12.0, 11.0]);
}

/// Runs a compressor over `positions` of slot 0 in one call, returning (state_kv, state_score,
/// cache) after it, starting from the given state.
fn compress(
    b: &CpuBackend,
    op: &Compressor,
    kv: &[f32],
    score: &[f32],
    start: usize,
    state: [&mut Tensor; 3],
) -> hal::Result<()> {
    let (cd, rows) = (op.coff() * op.width, op.rows);
    let ape = noise(op.ratio * cd, 11);
    let norm_w = noise(op.width, 12);
    let freqs: Vec<f32> = (0..op.rope_dim / 2).map(|i| 1.0 / (1.0 + i as f32)).collect();
    let positions: Vec<i32> = (start..start + rows).map(|p| p as i32).collect();
    let ins = [
        f32t(b, &[rows, cd], kv),
        f32t(b, &[rows, cd], score),
        f32t(b, &[op.ratio, cd], &ape),
        f32t(b, &[op.width], &norm_w),
        f32t(b, &[op.rope_dim / 2], &freqs),
        i32t(b, &[rows], &vec![0; rows]),
        i32t(b, &[rows], &positions),
    ];
    let [a, s, c] = state;
    b.run(&Op::Compressor(op.clone()), &ins.iter().collect::<Vec<_>>(), &mut [a, s, c])
}

#[test]
fn compressor_chunked_equals_token_by_token() {
    let b = CpuBackend::new();
    let (ratio, width, rd, cap, n) = (4, 128, 64, 4, 11);
    let base = Compressor {
        rows: n,
        slots: 1,
        ratio,
        overlap: true,
        width,
        rope_dim: rd,
        rotate: false,
        capacity: cap,
        norm_eps: 1e-6,
        cache_dtype: hal::DType::F32,
    };
    let (cr, cd) = (2 * ratio, 2 * width);
    let kv = noise(n * cd, 21);
    let score = noise(n * cd, 22);
    let fresh = |b: &CpuBackend| {
        [
            f32t(b, &[1, cr, cd], &vec![0.0; cr * cd]),
            f32t(b, &[1, cr, cd], &vec![f32::NEG_INFINITY; cr * cd]),
            f32t(b, &[1, cap, width], &vec![0.0; cap * width]),
        ]
    };
    let [mut a1, mut s1, mut c1] = fresh(&b);
    compress(&b, &base, &kv, &score, 0, [&mut a1, &mut s1, &mut c1]).expect("one call");
    let [mut a2, mut s2, mut c2] = fresh(&b);
    for t in 0..n {
        let op = Compressor { rows: 1, ..base.clone() };
        let (kr, sr) = (&kv[t * cd..(t + 1) * cd], &score[t * cd..(t + 1) * cd]);
        compress(&b, &op, kr, sr, t, [&mut a2, &mut s2, &mut c2]).expect("token call");
    }
    assert_eq!(read(&b, &c1), read(&b, &c2));
    assert_eq!(read(&b, &a1), read(&b, &a2));
    assert_eq!(read(&b, &s1), read(&b, &s2));

    // Entry 0 by hand: this block's rows (B channels) only, then the finishing steps.
    let ape = noise(ratio * cd, 11);
    let mut sk = vec![0.0; cr * cd];
    let mut ss = vec![f32::NEG_INFINITY; cr * cd];
    for t in 0..ratio {
        let row = (ratio + t) * cd;
        sk[row..row + cd].copy_from_slice(&kv[t * cd..(t + 1) * cd]);
        for c in 0..cd {
            ss[row + c] = score[t * cd + c] + ape[t * cd + c];
        }
    }
    let mut e = vec![0.0; width];
    pool_entry(&sk, &ss, ratio, true, width, true, &mut e);
    let freqs: Vec<f32> = (0..rd / 2).map(|i| 1.0 / (1.0 + i as f32)).collect();
    finish_entry(&mut e, &noise(width, 12), 1e-6, &freqs, 0, false);
    assert_eq!(&read(&b, &c1)[..width], &e[..]);

    // Entry index 4 would overflow the 4-entry cache: rejected before any state changes.
    let [mut a3, mut s3, mut c3] = fresh(&b);
    let long = Compressor { rows: 1, ..base.clone() };
    let r = compress(&b, &long, &kv[..cd], &score[..cd], 19, [&mut a3, &mut s3, &mut c3]);
    invalid(r, "compressor row 0");
    assert!(read(&b, &s3).iter().all(|v| *v == f32::NEG_INFINITY));
}

#[test]
fn indexer_pads_with_minus_one() {
    let b = CpuBackend::new();
    let op = IndexerTopK {
        rows: 1,
        heads: 1,
        head_dim: 2,
        slots: 1,
        capacity: 4,
        ratio: 4,
        topk: 3,
        weight_scale: 1.0,
        cache_dtype: hal::DType::F32,
    };
    let ins = [
        f32t(&b, &[1, 1, 2], &[1.0, 0.0]),
        f32t(&b, &[1, 1], &[1.0]),
        f32t(&b, &[1, 4, 2], &[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0]),
        i32t(&b, &[1], &[0]),
        i32t(&b, &[1], &[9]),
    ];
    let mut idx = b.alloc(&[1, 3], DType::I32).expect("alloc");
    let mut scores = b.alloc(&[1, 3], DType::F32).expect("alloc");
    b.run(&Op::IndexerTopK(op), &ins.iter().collect::<Vec<_>>(), &mut [&mut idx, &mut scores]).expect("run");
    // Position 9 sees entries 0 and 1 only (⌊10/4⌋ = 2); entry 1 scores higher.
    assert_eq!(bytes_i32(&b.download(&idx).expect("download")), vec![1, 0, -1]);
    assert_eq!(read(&b, &scores), vec![2.0, 1.0, f32::NEG_INFINITY]);
}

#[test]
fn gate_and_experts_reject_bad_ids() {
    let b = CpuBackend::new();
    let gate = MoeGate { rows: 1, dim: 2, experts: 3, topk: 2, route_scale: 1.0, mode: GateMode::Hashed { vocab: 2 } };
    let run_gate = |id: i32, table: &[i32]| {
        let ins = [
            f32t(&b, &[1, 2], &[1.0, 2.0]),
            f32t(&b, &[3, 2], &[0.1; 6]),
            i32t(&b, &[2, 2], table),
            i32t(&b, &[1], &[id]),
        ];
        let mut e = b.alloc(&[1, 2], DType::I32).expect("alloc");
        let mut w = b.alloc(&[1, 2], DType::F32).expect("alloc");
        b.run(&Op::MoeGate(gate.clone()), &ins.iter().collect::<Vec<_>>(), &mut [&mut e, &mut w]).map(|_| read(&b, &w))
    };
    let w = run_gate(1, &[0, 1, 2, 0]).expect("valid");
    assert_eq!(w, vec![0.5, 0.5]);
    invalid(run_gate(2, &[0, 1, 2, 0]).map(|_| ()), "token id 2");
    invalid(run_gate(0, &[0, 3, 2, 0]).map(|_| ()), "expert 3");

    let op = MoeExperts {
        rows: 1,
        dim: 128,
        inter: 128,
        experts: 2,
        topk: 2,
        swiglu_limit: 10.0,
        format: WeightFormat::F32,
    };
    let wt = f32t(&b, &[2, 128, 128], &noise(2 * 128 * 128, 5));
    let ins = [f32t(&b, &[1, 128], &noise(128, 6)), i32t(&b, &[1, 2], &[1, 1]), f32t(&b, &[1, 2], &[0.5, 0.5]), wt];
    let refs = [&ins[0], &ins[1], &ins[2], &ins[3], &ins[3], &ins[3]];
    let mut y = b.alloc(&[1, 128], DType::F32).expect("alloc");
    invalid(b.run(&Op::MoeExperts(op), &refs, &mut [&mut y]), "listed twice");
}

#[test]
fn embed_rejects_out_of_range_ids() {
    let b = CpuBackend::new();
    let op = Embed { rows: 2, vocab: 3, dim: 2, table_dtype: DType::F32 };
    let ins = [i32t(&b, &[2], &[0, 3]), f32t(&b, &[3, 2], &[0.0; 6])];
    let mut out = b.alloc(&[2, 2], DType::F32).expect("alloc");
    invalid(b.run(&Op::Embed(op), &ins.iter().collect::<Vec<_>>(), &mut [&mut out]), "embed row 1");
}

/// FP8 weights are decoded once and reused; rewriting the scales invalidates that copy.
#[test]
fn fp8_linear_matches_spec_and_tracks_scale_writes() {
    let b = CpuBackend::new();
    let (rows, inp, out) = (2, 256, 130);
    let x = noise(rows * inp, 7);
    let codes: Vec<u8> = noise(out * inp, 8).iter().map(|v| hal::dtype::f32_to_e4m3(v * 300.0)).collect();
    let mut scales = vec![120u8, 121, 122, 123];
    let op = Op::Linear(Linear { rows, in_features: inp, out_features: out, format: WeightFormat::Fp8Block128 });
    let xt = f32t(&b, &[rows, inp], &x);
    let wt = b.upload(&[out, inp], DType::F8E4M3, &codes).expect("upload");
    let mut st = b.upload(&[2, 2], DType::F8E8M0, &scales).expect("upload");
    let mut y = b.alloc(&[rows, out], DType::F32).expect("alloc");
    let expect = |scales: &[u8]| {
        let w = dequant_fp8_block128(&codes, scales, 1, out, inp);
        let mut want = vec![0.0; rows * out];
        linear(&x, &w, inp, out, true, &mut want);
        want
    };
    for _ in 0..2 {
        b.run(&op, &[&xt, &wt, &st], &mut [&mut y]).expect("run");
        assert_eq!(read(&b, &y), expect(&scales));
    }
    scales[3] = 125;
    b.write(&mut st, 3, &[125]).expect("write");
    b.run(&op, &[&xt, &wt, &st], &mut [&mut y]).expect("run");
    assert_eq!(read(&b, &y), expect(&scales));
}

/// A storage from some other backend.
struct Foreign(Vec<u8>);

impl Storage for Foreign {
    fn backend(&self) -> &'static str {
        "elsewhere"
    }
    fn len_bytes(&self) -> usize {
        self.0.len()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[test]
fn foreign_tensors_shapes_and_overruns_are_errors() {
    let b = CpuBackend::new();
    let op = Op::RmsNorm(RmsNorm { rows: 1, dim: 4, eps: 1e-6, weighted: false, rope: None });
    let foreign = Tensor::from_storage(Box::new(Foreign(vec![0; 16])), vec![1, 4], DType::F32);
    let mut y = b.alloc(&[1, 4], DType::F32).expect("alloc");
    invalid(b.run(&op, &[&foreign], &mut [&mut y]), "rms_norm input 'x'");
    let wrong = b.alloc(&[1, 5], DType::F32).expect("alloc");
    invalid(b.run(&op, &[&wrong], &mut [&mut y]), "'x'");
    invalid(b.write(&mut y, 3, &[0; 8]), "overrun");
    assert!(b.write(&mut y, 2, &[0; 8]).is_ok());
    let add = Op::Add(Add { rows: 3, b_rows: 2, width: 1 });
    let (a, bb) = (f32t(&b, &[3, 1], &[1.0; 3]), f32t(&b, &[2, 1], &[1.0; 2]));
    let mut out = b.alloc(&[3, 1], DType::F32).expect("alloc");
    invalid(b.run(&add, &[&a, &bb], &mut [&mut out]), "must divide");
    let g = f32t(&b, &[1, 1], &[1.0]);
    let ok_limit = Op::SwiGlu(SwiGlu { rows: 1, width: 1, limit: 1.0 });
    invalid(b.run(&ok_limit, &[&g, &g], &mut [&mut out]), "'h'");
    let sw = Op::SwiGlu(SwiGlu { rows: 1, width: 1, limit: -1.0 });
    let mut h = b.alloc(&[1, 1], DType::F32).expect("alloc");
    invalid(b.run(&sw, &[&g, &g], &mut [&mut h]), "limit");
}

/// Inputs for any op, built from its signature: noise for f32, valid codes for quantized
/// weights, slot 0 at consecutive positions from 2, distinct experts, −1 indices.
fn inputs_for(b: &CpuBackend, op: &Op) -> Vec<Tensor> {
    op.signature()
        .inputs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let n: usize = spec.shape.iter().product();
            let v = noise(n, 100 + i as u64);
            let bytes: Vec<u8> = match (spec.dtype, spec.name) {
                (DType::F32, _) => f32_bytes(&v),
                (DType::BF16, _) => v.iter().flat_map(|x| hal::dtype::f32_to_bf16(*x).to_le_bytes()).collect(),
                (DType::F8E4M3, _) => v.iter().map(|x| hal::dtype::f32_to_e4m3(x * 400.0)).collect(),
                (DType::F8E8M0, _) => vec![127; n],
                (DType::F4E2M1x2, _) => v.iter().map(|x| (x.to_bits() >> 8) as u8).collect(),
                (DType::I32, name) => {
                    let cols = spec.shape.last().copied().unwrap_or(1).max(1);
                    i32_bytes(
                        &(0..n as i32)
                            .map(|j| match name {
                                "positions" => 2 + j,
                                "experts" | "tid2eid" => j % cols as i32,
                                "indices" => -1,
                                _ => 0,
                            })
                            .collect::<Vec<_>>(),
                    )
                }
                (other, name) => panic!("no generator for {name}: {other}"),
            };
            b.upload(&spec.shape, spec.dtype, &bytes).expect("upload")
        })
        .collect()
}

fn every_op(rows: usize) -> Vec<Op> {
    let sa = |compressed| SparseAttention {
        rows,
        heads: 2,
        head_dim: 16,
        slots: 2,
        window: 4,
        compressed,
        softmax_scale: 0.25,
        cache_dtype: hal::DType::F32,
    };
    let lin = |format| Linear { rows, in_features: 128, out_features: 130, format };
    let comp = |overlap, ratio, width, rope_dim, rotate| Compressor {
        rows,
        slots: 2,
        ratio,
        overlap,
        width,
        rope_dim,
        rotate,
        capacity: 4,
        norm_eps: 1e-6,
        cache_dtype: hal::DType::F32,
    };
    let experts = |format| MoeExperts { rows, dim: 128, inter: 128, experts: 3, topk: 2, swiglu_limit: 10.0, format };
    vec![
        Op::Embed(Embed { rows, vocab: 5, dim: 8, table_dtype: DType::BF16 }),
        Op::HcExpand(HcExpand { rows, mult: 4, dim: 8 }),
        Op::Add(Add { rows, b_rows: rows, width: 8 }),
        Op::HcPre(HcPre { rows, mult: 4, dim: 8, sinkhorn_iters: 20, hc_eps: 1e-6, norm_eps: 1e-6, after_post: false }),
        Op::HcPost(HcPost { rows, mult: 4, dim: 8 }),
        Op::HcHead(HcHead { rows, mult: 4, dim: 8, hc_eps: 1e-6, norm_eps: 1e-6, after_post: false }),
        Op::RmsNorm(RmsNorm { rows, dim: 8, eps: 1e-6, weighted: true, rope: None }),
        Op::RmsNorm(RmsNorm { rows, dim: 8, eps: 1e-6, weighted: false, rope: None }),
        Op::Linear(lin(WeightFormat::F32)),
        Op::Linear(lin(WeightFormat::Bf16)),
        Op::Linear(lin(WeightFormat::Fp8Block128)),
        Op::Linear(lin(WeightFormat::Fp4Group32)),
        Op::GroupedLinear(GroupedLinear {
            rows,
            groups: 2,
            in_per_group: 32,
            out_per_group: 16,
            format: WeightFormat::Bf16,
        }),
        Op::GroupedLinear(GroupedLinear {
            rows,
            groups: 2,
            in_per_group: 32,
            out_per_group: 16,
            format: WeightFormat::Fp8Block128,
        }),
        Op::Rope(Rope { rows, heads: 2, head_dim: 16, rope_dim: 8, inverse: true }),
        Op::QuantSim(QuantSim { rows, dim: 96, quant_dims: 64, block: 64, format: QuantFormat::Fp8E4M3 }),
        Op::QuantSim(QuantSim { rows, dim: 64, quant_dims: 64, block: 32, format: QuantFormat::Fp4E2M1 }),
        Op::Hadamard(Hadamard { rows, dim: 64 }),
        Op::WindowStore(WindowStore { rows, slots: 2, window: 4, dim: 8, cache_dtype: hal::DType::F32 }),
        Op::Compressor(comp(true, 4, 128, 64, false)),
        Op::Compressor(comp(false, 2, 64, 16, true)),
        Op::IndexerTopK(IndexerTopK {
            rows,
            heads: 2,
            head_dim: 8,
            slots: 2,
            capacity: 4,
            ratio: 2,
            topk: 3,
            weight_scale: 0.1,
            cache_dtype: hal::DType::F32,
        }),
        Op::SparseAttention(sa(CompressedKv::None)),
        Op::SparseAttention(sa(CompressedKv::All { ratio: 2, capacity: 4 })),
        Op::SparseAttention(sa(CompressedKv::Selected { ratio: 4, capacity: 4, topk: 3 })),
        Op::MoeGate(MoeGate { rows, dim: 8, experts: 4, topk: 2, route_scale: 1.5, mode: GateMode::Scored }),
        Op::MoeGate(MoeGate {
            rows,
            dim: 8,
            experts: 4,
            topk: 2,
            route_scale: 1.5,
            mode: GateMode::Hashed { vocab: 5 },
        }),
        Op::MoeExperts(experts(WeightFormat::Fp4Group32)),
        Op::MoeExperts(experts(WeightFormat::Fp8Block128)),
        Op::SwiGlu(SwiGlu { rows, width: 8, limit: 0.0 }),
        Op::GatherRows(GatherRows { rows: 4, width: 3, out_rows: rows }),
    ]
}

/// Every op runs (including with zero rows) and writes finite f32 outputs.
#[test]
fn every_op_runs_on_signature_built_inputs() {
    let b = CpuBackend::new();
    for rows in [0, 1, 3] {
        for op in every_op(rows) {
            assert_eq!(b.supports(&op), hal::Support::Yes, "{op:?}");
            let ins = inputs_for(&b, &op);
            let sig = op.signature();
            let mut outs: Vec<Tensor> =
                sig.outputs.iter().map(|s| b.alloc(&s.shape, s.dtype).expect("alloc")).collect();
            let mut out_refs: Vec<&mut Tensor> = outs.iter_mut().collect();
            b.run(&op, &ins.iter().collect::<Vec<_>>(), &mut out_refs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            for (t, spec) in outs.iter().zip(&sig.outputs) {
                // Indexer scores are −∞ exactly where the index is −1 padding.
                if t.dtype() == DType::F32 && spec.name != "scores" {
                    assert!(read(&b, t).iter().all(|v| v.is_finite()), "{} of {op:?} not finite", spec.name);
                }
            }
        }
    }
}

/// Zero-sized dimensions are legal descriptors: they must run (or be refused) without panics.
#[test]
fn zero_sized_dimensions_do_not_panic() {
    let b = CpuBackend::new();
    let ops = [
        Op::Linear(Linear { rows: 2, in_features: 0, out_features: 3, format: WeightFormat::F32 }),
        Op::GroupedLinear(GroupedLinear {
            rows: 2,
            groups: 2,
            in_per_group: 0,
            out_per_group: 3,
            format: WeightFormat::Bf16,
        }),
        Op::HcPre(HcPre {
            rows: 2,
            mult: 4,
            dim: 0,
            sinkhorn_iters: 1,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
            after_post: false,
        }),
        Op::MoeGate(MoeGate { rows: 2, dim: 0, experts: 3, topk: 2, route_scale: 1.0, mode: GateMode::Scored }),
        Op::MoeExperts(MoeExperts {
            rows: 1,
            dim: 0,
            inter: 0,
            experts: 2,
            topk: 1,
            swiglu_limit: 0.0,
            format: WeightFormat::Fp4Group32,
        }),
        Op::Rope(Rope { rows: 2, heads: 1, head_dim: 4, rope_dim: 0, inverse: false }),
        Op::IndexerTopK(IndexerTopK {
            rows: 1,
            heads: 0,
            head_dim: 0,
            slots: 1,
            capacity: 2,
            ratio: 1,
            topk: 2,
            weight_scale: 1.0,
            cache_dtype: hal::DType::F32,
        }),
        Op::SparseAttention(SparseAttention {
            rows: 1,
            heads: 0,
            head_dim: 0,
            slots: 1,
            window: 1,
            compressed: CompressedKv::None,
            softmax_scale: 1.0,
            cache_dtype: hal::DType::F32,
        }),
        Op::Compressor(Compressor {
            rows: 1,
            slots: 1,
            ratio: 1,
            overlap: false,
            width: 0,
            rope_dim: 0,
            rotate: false,
            capacity: 1,
            norm_eps: 1e-6,
            cache_dtype: hal::DType::F32,
        }),
    ];
    for op in ops {
        let ins = inputs_for(&b, &op);
        let mut outs: Vec<Tensor> =
            op.signature().outputs.iter().map(|s| b.alloc(&s.shape, s.dtype).expect("alloc")).collect();
        let mut out_refs: Vec<&mut Tensor> = outs.iter_mut().collect();
        let _ = b.run(&op, &ins.iter().collect::<Vec<_>>(), &mut out_refs);
    }
    let refused = Op::Hadamard(Hadamard { rows: 1, dim: 0 });
    let mut x = b.alloc(&[1, 0], DType::F32).expect("alloc");
    assert!(b.run(&refused, &[], &mut [&mut x]).is_err());
}
