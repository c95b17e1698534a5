//! Rough per-op timings at V4-Flash shapes (decode and a prefill chunk). Ignored by default;
//! run with `cargo test --release -p v4rt-cuda --test timing -- --ignored --nocapture` on a
//! GPU (it fails without one). Weights are zero-filled (timing only); positions and indices are
//! valid.

use hal::dtype::i32_bytes;
use hal::ops::attention::CompressedKv;
use hal::ops::*;
use hal::{Backend, DType, Probe, Tensor};

fn time(b: &dyn Backend, label: &str, op: &Op, ins: &[&Tensor], outs: &mut [&mut Tensor]) {
    // V4RT_CUDA_TIMING_FILTER: only labels containing this text.
    if let Ok(f) = std::env::var("V4RT_CUDA_TIMING_FILTER") {
        if !label.contains(&f) {
            return;
        }
    }
    b.run(op, ins, outs).expect("warm-up run");
    b.synchronize().expect("sync");
    let n = 5;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        b.run(op, ins, outs).expect("run");
    }
    b.synchronize().expect("sync");
    println!("{label:<48} {:>9.3} ms", t0.elapsed().as_secs_f64() * 1e3 / n as f64);
}

fn z(b: &dyn Backend, shape: &[usize], dtype: DType) -> Tensor {
    b.alloc(shape, dtype).expect("alloc")
}
fn ints(b: &dyn Backend, shape: &[usize], v: &[i32]) -> Tensor {
    b.upload(shape, DType::I32, &i32_bytes(v)).expect("upload")
}

#[test]
#[ignore = "times the CUDA ops on a GPU: run with --ignored --nocapture"]
fn op_timings() {
    let b = match v4rt_cuda::probe() {
        Probe::Available(b) => b,
        Probe::Unavailable(r) => panic!("cuda backend unavailable: {r}"),
    };
    let b = b.as_ref();
    println!("device: {}", b.info().device);
    let dim = 4096;
    for rows in [1usize, 32, 512] {
        let x = z(b, &[rows, dim], DType::F32);
        // Linear FP8 4096 → 4096, FP4 4096 → 4096, bf16 head 4096 → 129280 (decode only).
        for (label, f) in [("fp8", WeightFormat::Fp8Block128), ("fp4", WeightFormat::Fp4Group32)] {
            let op = Linear { rows, in_features: dim, out_features: dim, format: f };
            let w: Vec<Tensor> = f.weight_specs(dim, dim).iter().map(|s| z(b, &s.shape, s.dtype)).collect();
            let mut y = z(b, &[rows, dim], DType::F32);
            let mut ins = vec![&x];
            ins.extend(w.iter());
            time(b, &format!("linear {label} {rows}x4096->4096"), &Op::Linear(op), &ins, &mut [&mut y]);
        }
        if rows == 1 {
            let op = Linear { rows, in_features: dim, out_features: 129_280, format: WeightFormat::Bf16 };
            let w = z(b, &[129_280, dim], DType::BF16);
            let mut y = z(b, &[rows, 129_280], DType::F32);
            time(b, "linear bf16 1x4096->129280 (lm head)", &Op::Linear(op), &[&x, &w], &mut [&mut y]);
        }
        // MoE: 256 experts FP4, top-6, inter 2048.
        {
            let (e_n, k, inter) = (256, 6, 2048);
            let ex: Vec<i32> = (0..rows * k).map(|i| ((i / k) * 37 + (i % k) * 41) as i32 % e_n as i32).collect();
            let op = MoeExperts {
                rows,
                dim,
                inter,
                experts: e_n,
                topk: k,
                swiglu_limit: 10.0,
                format: WeightFormat::Fp4Group32,
            };
            let sig = Op::MoeExperts(op.clone()).signature();
            let mut ts: Vec<Tensor> =
                vec![z(b, &[rows, dim], DType::F32), ints(b, &[rows, k], &ex), z(b, &[rows, k], DType::F32)];
            ts.extend(sig.inputs[3..].iter().map(|s| z(b, &s.shape, s.dtype)));
            let mut y = z(b, &[rows, dim], DType::F32);
            time(
                b,
                &format!("moe_experts fp4 256e top6 {rows}x4096/2048"),
                &Op::MoeExperts(op),
                &ts.iter().collect::<Vec<_>>(),
                &mut [&mut y],
            );
        }
        // Gate.
        {
            let op = MoeGate { rows, dim, experts: 256, topk: 6, route_scale: 1.5, mode: GateMode::Scored };
            let (gw, bias) = (z(b, &[256, dim], DType::F32), z(b, &[256], DType::F32));
            let (mut e, mut w) = (z(b, &[rows, 6], DType::I32), z(b, &[rows, 6], DType::F32));
            time(b, &format!("moe_gate 256e {rows}"), &Op::MoeGate(op), &[&x, &gw, &bias], &mut [&mut e, &mut w]);
        }
        // mHC pre.
        {
            let op = HcPre { rows, mult: 4, dim, sinkhorn_iters: 20, hc_eps: 1e-6, norm_eps: 1e-6, after_post: false };
            let xs = z(b, &[rows, 4, dim], DType::F32);
            let (f, base, sc) = (z(b, &[24, 4 * dim], DType::F32), z(b, &[24], DType::F32), z(b, &[3], DType::F32));
            let norm = z(b, &[dim], DType::F32);
            let (mut u, mut p, mut c) =
                (z(b, &[rows, dim], DType::F32), z(b, &[rows, 4], DType::F32), z(b, &[rows, 4, 4], DType::F32));
            time(
                b,
                &format!("hc_pre {rows}x4x4096"),
                &Op::HcPre(op),
                &[&xs, &f, &base, &sc, &norm],
                &mut [&mut u, &mut p, &mut c],
            );
        }
        // Attention: one slot per row (decode at position 8191) or one prefill chunk.
        let (slots, pos): (Vec<i32>, Vec<i32>) = if rows <= 32 {
            ((0..rows as i32).collect(), vec![8191; rows])
        } else {
            (vec![0; rows], (7680..7680 + rows as i32).collect())
        };
        let ns = rows.min(32);
        // The attention and indexer caches as f32 and as bf16 (labels of the bf16 ones end in "bf16").
        for cache_dtype in [DType::F32, DType::BF16] {
            let tag = if cache_dtype == DType::F32 { "" } else { " bf16" };
            let (h, d, w, cap, topk) = (64, 512, 128, 2048, 512);
            let op = SparseAttention {
                rows,
                heads: h,
                head_dim: d,
                slots: ns,
                window: w,
                compressed: CompressedKv::Selected { ratio: 4, capacity: cap, topk },
                softmax_scale: 0.044,
                cache_dtype,
            };
            let idx: Vec<i32> = (0..rows * topk).map(|i| (i % cap) as i32).collect();
            let ts = [
                z(b, &[rows, h, d], DType::F32),
                z(b, &[rows, d], DType::F32),
                z(b, &[ns, w, d], cache_dtype),
                z(b, &[h], DType::F32),
                ints(b, &[rows], &slots),
                ints(b, &[rows], &pos),
                z(b, &[ns, cap, d], cache_dtype),
                ints(b, &[rows, topk], &idx),
            ];
            let mut o = z(b, &[rows, h, d], DType::F32);
            time(
                b,
                &format!("sparse_attention 64h d512 w128 top512 {rows}{tag}"),
                &Op::SparseAttention(op),
                &ts.iter().collect::<Vec<_>>(),
                &mut [&mut o],
            );
            let (h, d) = (64, 128);
            let op = IndexerTopK {
                rows,
                heads: h,
                head_dim: d,
                slots: ns,
                capacity: cap,
                ratio: 4,
                topk,
                weight_scale: 0.01,
                cache_dtype,
            };
            let ts = [
                z(b, &[rows, h, d], DType::F32),
                z(b, &[rows, h], DType::F32),
                z(b, &[ns, cap, d], cache_dtype),
                ints(b, &[rows], &slots),
                ints(b, &[rows], &pos),
            ];
            let (mut i, mut s) = (z(b, &[rows, topk], DType::I32), z(b, &[rows, topk], DType::F32));
            time(
                b,
                &format!("indexer_topk 64h d128 2048 entries top512 {rows}{tag}"),
                &Op::IndexerTopK(op),
                &ts.iter().collect::<Vec<_>>(),
                &mut [&mut i, &mut s],
            );
        }
        {
            let (ratio, width, cap) = (4, 512, 2048);
            let op = Compressor {
                rows,
                slots: ns,
                ratio,
                overlap: true,
                width,
                rope_dim: 64,
                rotate: false,
                capacity: cap,
                norm_eps: 1e-6,
                cache_dtype: hal::DType::F32,
            };
            let ts = [
                z(b, &[rows, 2 * width], DType::F32),
                z(b, &[rows, 2 * width], DType::F32),
                z(b, &[ratio, 2 * width], DType::F32),
                z(b, &[width], DType::F32),
                z(b, &[32], DType::F32),
                ints(b, &[rows], &slots),
                ints(b, &[rows], &pos),
            ];
            let (mut skv, mut ssc, mut c) = (
                z(b, &[ns, 2 * ratio, 2 * width], DType::F32),
                z(b, &[ns, 2 * ratio, 2 * width], DType::F32),
                z(b, &[ns, cap, width], DType::F32),
            );
            time(
                b,
                &format!("compressor r4 overlap w512 {rows}"),
                &Op::Compressor(op),
                &ts.iter().collect::<Vec<_>>(),
                &mut [&mut skv, &mut ssc, &mut c],
            );
        }
    }
}
