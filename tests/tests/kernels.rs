//! Op-level goldens: every tensor group of `tests/data/golden/kernels.safetensors` (see
//! `MANIFEST.md` next to it) against cpu-ref's slice functions, with the manifest's tolerances:
//! quantizer codes, scales and dequantized/simulated values bit for bit; GEMMs, Hadamard,
//! Sinkhorn and sparse attention to ~1e-6 relative; RoPE tables to a few f32 ulps.

use std::path::Path;

use cpu_ref::ops::attention::sparse_attn_row;
use cpu_ref::ops::hc::hc_split_sinkhorn;
use cpu_ref::ops::linear::{dequant_fp4_group32, dequant_fp8_block128};
use cpu_ref::ops::matmul;
use cpu_ref::ops::quant::{act_dequant, act_quant, hadamard, quant_sim_fp4, quant_sim_fp8};
use cpu_ref::ops::rope::cos_sin;
use hal::dtype::{bf16_to_f32, e8m0_to_f32, f32_to_bf16};
use model::safetensors::SafeTensors;
use v4rt_tests::metrics::{bit_mismatches, compare, max_rel_to_peak, peak, ulp_distance};

fn golden() -> SafeTensors {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/golden/kernels.safetensors");
    SafeTensors::open(Path::new(path)).unwrap_or_else(|e| panic!("{e}"))
}

fn f32s(g: &SafeTensors, name: &str) -> Vec<f32> {
    g.f32(name).unwrap_or_else(|e| panic!("{e}"))
}

fn bytes<'a>(g: &'a SafeTensors, name: &str) -> &'a [u8] {
    g.bytes(name).unwrap_or_else(|e| panic!("{e}"))
}

fn shape(g: &SafeTensors, name: &str) -> Vec<usize> {
    g.info(name).unwrap_or_else(|| panic!("{name} missing")).shape.clone()
}

/// Asserts bit-identical f32 tensors, printing the first differences.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    let bad = bit_mismatches(got, want);
    let show: Vec<_> = bad.iter().take(5).map(|&i| (i, got.get(i), want.get(i))).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first (index, got, want): {show:?}",
        bad.len(),
        want.len()
    );
    println!("{what}: {} values bit-exact", want.len());
}

/// Asserts `max |g − w| / max(|w|, floor) ≤ tol` and prints the worst error.
fn assert_rel(what: &str, got: &[f32], want: &[f32], floor: f64, tol: f64) {
    let e = compare(got, want, floor);
    println!("{what}: max rel {:.3e} (floor {floor:.1e}), max abs {:.3e}, nmse {:.3e}", e.max_rel, e.max_abs, e.nmse);
    assert!(
        e.max_rel <= tol,
        "{what}: max rel error {:.3e} > {tol:.1e} at {} (got {:?}, want {:?})",
        e.max_rel,
        e.worst,
        got.get(e.worst),
        want.get(e.worst)
    );
}

/// Asserts `max |g − w| / max |w| ≤ tol` and NMSE ≤ tol²: the measure for sums computed in a
/// different order than the reference's f32 accumulation, whose error scales with the summed
/// terms (≈ the output's peak), not with an output that happens to cancel to near zero.
fn assert_rel_to_peak(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = compare(got, want, 1e-3 * peak(want));
    let rel = max_rel_to_peak(got, want);
    println!(
        "{what}: max error / peak {rel:.3e}, nmse {:.3e} (per element, floor 1e-3·peak: {:.3e} at {})",
        e.nmse, e.max_rel, e.worst
    );
    assert!(rel <= tol && e.nmse <= tol * tol, "{what}: max error / peak {rel:.3e}, nmse {:.3e}", e.nmse);
}

/// Bytes compared exactly, with the first differences in the message.
fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    let bad: Vec<_> = (0..want.len().max(got.len())).filter(|&i| got.get(i) != want.get(i)).collect();
    let show: Vec<_> = bad.iter().take(5).map(|&i| (i, got.get(i), want.get(i))).collect();
    assert!(bad.is_empty(), "{what}: {} of {} bytes differ, first (index, got, want): {show:?}", bad.len(), want.len());
    println!("{what}: {} bytes exact", want.len());
}

#[test]
fn act_quant_codes_scales_and_dequant_are_bit_exact() {
    let g = golden();
    let x = f32s(&g, "act_quant.x");
    let (codes, scales) = act_quant(&x, 128);
    assert_bytes("act_quant codes", &codes, bytes(&g, "act_quant.codes_e4m3"));
    assert_bytes("act_quant scales", &scales, bytes(&g, "act_quant.scale_e8m0"));
    let scale_f32: Vec<f32> = scales.iter().map(|&b| e8m0_to_f32(b)).collect();
    assert_bits("act_quant scale", &scale_f32, &f32s(&g, "act_quant.scale"));
    let want = f32s(&g, "act_quant.dequant");
    assert_bits("act_quant dequant", &act_dequant(&codes, &scales, 128), &want);
    let mut sim = x.clone();
    quant_sim_fp8(&mut sim, 128);
    assert_bits("act_quant in-place simulation", &sim, &want);
}

#[test]
fn fp8_simulation_block64_is_bit_exact() {
    let g = golden();
    let mut x = f32s(&g, "act_quant_sim64.x");
    let dim = shape(&g, "act_quant_sim64.x")[1];
    for row in x.chunks_mut(dim) {
        quant_sim_fp8(row, 64);
    }
    assert_bits("act_quant_sim64", &x, &f32s(&g, "act_quant_sim64.y"));
}

#[test]
fn fp4_simulation_block32_is_bit_exact() {
    let g = golden();
    let mut x = f32s(&g, "fp4_act_quant_sim32.x");
    let dim = shape(&g, "fp4_act_quant_sim32.x")[1];
    for row in x.chunks_mut(dim) {
        quant_sim_fp4(row, 32);
    }
    assert_bits("fp4_act_quant_sim32", &x, &f32s(&g, "fp4_act_quant_sim32.y"));
}

/// Checks an f32 GEMM result and its bf16 rounding against the golden's two outputs.
fn check_gemm(what: &str, c: &[f32], want: &[f32], want_bf16: &[f32]) {
    assert_rel_to_peak(what, c, want, 1e-6);
    let ours: Vec<f32> = c.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
    let off = ours.iter().zip(want_bf16).filter(|(a, b)| a != b).count();
    let worst = ours.iter().zip(want_bf16).map(|(&a, &b)| ulp_distance(a, b) >> 16).max().unwrap_or(0);
    println!("{what} bf16: {off} of {} differ from c_bf16, worst {worst} bf16 ulp", ours.len());
    assert!(worst <= 1, "{what}: bf16 rounding more than one bf16 ulp from c_bf16");
}

#[test]
fn fp8_gemm_matches() {
    let g = golden();
    let (m, k) = (shape(&g, "fp8_gemm.a_e4m3")[0], shape(&g, "fp8_gemm.a_e4m3")[1]);
    let n = shape(&g, "fp8_gemm.b_e4m3")[0];
    let a = act_dequant(bytes(&g, "fp8_gemm.a_e4m3"), bytes(&g, "fp8_gemm.a_scale_e8m0"), 128);
    let b = dequant_fp8_block128(bytes(&g, "fp8_gemm.b_e4m3"), bytes(&g, "fp8_gemm.b_scale_e8m0"), 1, n, k);
    let mut c = vec![0.0; m * n];
    matmul(&a, &b, k, n, &mut c);
    check_gemm("fp8_gemm", &c, &f32s(&g, "fp8_gemm.c"), &f32s(&g, "fp8_gemm.c_bf16"));
}

#[test]
fn fp4_gemm_matches() {
    let g = golden();
    let (m, k) = (shape(&g, "fp4_gemm.a_e4m3")[0], shape(&g, "fp4_gemm.a_e4m3")[1]);
    let n = shape(&g, "fp4_gemm.b_packed")[0];
    let a = act_dequant(bytes(&g, "fp4_gemm.a_e4m3"), bytes(&g, "fp4_gemm.a_scale_e8m0"), 128);
    let b = dequant_fp4_group32(bytes(&g, "fp4_gemm.b_packed"), bytes(&g, "fp4_gemm.b_scale_e8m0"), 1, n, k);
    let mut c = vec![0.0; m * n];
    matmul(&a, &b, k, n, &mut c);
    check_gemm("fp4_gemm", &c, &f32s(&g, "fp4_gemm.c"), &f32s(&g, "fp4_gemm.c_bf16"));
}

#[test]
fn hadamard128_matches() {
    let g = golden();
    let mut y = f32s(&g, "hadamard128.x");
    for row in y.chunks_mut(128) {
        hadamard(row);
    }
    let want = f32s(&g, "hadamard128.y");
    assert_rel("hadamard128", &y, &want, 1e-6 * peak(&want), 1e-6);
    let ours: Vec<f32> = y.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
    let want_bf16 = f32s(&g, "hadamard128.y_bf16");
    let worst = ours.iter().zip(&want_bf16).map(|(&a, &b)| ulp_distance(a, b) >> 16).max().unwrap_or(0);
    println!("hadamard128 bf16: worst {worst} bf16 ulp");
    assert!(worst <= 1);
}

#[test]
fn hc_split_sinkhorn_matches() {
    let g = golden();
    let mixes = f32s(&g, "hc_split_sinkhorn.mixes");
    let (scale, base) = (f32s(&g, "hc_split_sinkhorn.hc_scale"), f32s(&g, "hc_split_sinkhorn.hc_base"));
    let (mut pre, mut post, mut comb) = (Vec::new(), Vec::new(), Vec::new());
    for row in mixes.chunks(24) {
        let (p, q, c) = hc_split_sinkhorn(row, &scale, &base, 4, 20, 1e-6);
        pre.extend(p);
        post.extend(q);
        comb.extend(c);
    }
    // Probabilities: relative error with a floor at eps (values below it are eps-dominated).
    assert_rel("hc pre", &pre, &f32s(&g, "hc_split_sinkhorn.pre"), 1e-6, 1e-6);
    assert_rel("hc post", &post, &f32s(&g, "hc_split_sinkhorn.post"), 1e-6, 1e-6);
    assert_rel("hc comb", &comb, &f32s(&g, "hc_split_sinkhorn.comb"), 1e-6, 1e-6);
}

/// `ω_i = 1 / θ^(2i/dim)` in f32, then YaRN's frequency interpolation as the reference's
/// `precompute_freqs_cis` does it (spec §3.4): ramp between the correction dims of β_fast and
/// β_slow, `ω' = ω/factor·(1 − smooth) + ω·smooth` with `smooth = 1 − ramp`, all in f32.
fn rope_freqs(theta: f64, dim: usize, yarn: Option<(f32, f64, f64, f64)>) -> Vec<f32> {
    let half = dim / 2;
    let mut freqs: Vec<f32> =
        (0..half).map(|i| 1.0 / (theta.powf(((2 * i) as f32 / dim as f32) as f64) as f32)).collect();
    if let Some((factor, original, beta_fast, beta_slow)) = yarn {
        let corr = |rot: f64| dim as f64 * (original / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
        let low = corr(beta_fast).floor().max(0.0);
        let high = corr(beta_slow).ceil().min(dim as f64 - 1.0);
        assert_eq!((low, high), if theta == 160000.0 { (15.0, 25.0) } else { (low, high) });
        let span = if low == high { 0.001 } else { (high - low) as f32 };
        for (i, f) in freqs.iter_mut().enumerate() {
            let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
            let smooth = 1.0 - ramp;
            *f = *f / factor * (1.0 - smooth) + *f * smooth;
        }
    }
    freqs
}

fn check_rope_table(g: &SafeTensors, group: &str, freqs: &[f32]) {
    let (want_cos, want_sin) = (f32s(g, &format!("{group}.cos")), f32s(g, &format!("{group}.sin")));
    let n = freqs.len();
    let (mut worst_ulp, mut worst_abs) = (0u32, 0f32);
    for (idx, (&wc, &ws)) in want_cos.iter().zip(&want_sin).enumerate() {
        let (c, s) = cos_sin((idx / n) as f32, freqs[idx % n]);
        worst_ulp = worst_ulp.max(ulp_distance(c, wc)).max(ulp_distance(s, ws));
        worst_abs = worst_abs.max((c - wc).abs()).max((s - ws).abs());
    }
    println!("{group}: worst {worst_ulp} ulp, max abs {worst_abs:.3e}");
    // A few ulps of the value, or of 1 for values near zero (cos/sin of large angles).
    assert!(worst_abs <= 4.0 * f32::EPSILON, "{group}: max abs error {worst_abs:e}");
}

#[test]
fn rope_tables_match() {
    let g = golden();
    check_rope_table(&g, "rope_theta10000", &rope_freqs(10000.0, 64, None));
    check_rope_table(&g, "rope_theta160000_yarn16", &rope_freqs(160000.0, 64, Some((16.0, 65536.0, 32.0, 1.0))));
}

fn check_sparse_attn(group: &str) {
    let g = golden();
    let qs = shape(&g, &format!("{group}.q"));
    let (b, m, h, d) = (qs[0], qs[1], qs[2], qs[3]);
    let n = shape(&g, &format!("{group}.kv"))[1];
    let k = shape(&g, &format!("{group}.topk_idxs"))[2];
    let (q, kv) = (f32s(&g, &format!("{group}.q")), f32s(&g, &format!("{group}.kv")));
    let sink = f32s(&g, &format!("{group}.attn_sink"));
    let scale = f32s(&g, &format!("{group}.softmax_scale"))[0];
    let idx = g.i64(&format!("{group}.topk_idxs")).unwrap_or_else(|e| panic!("{e}"));
    let mut o = vec![0.0; b * m * h * d];
    for bi in 0..b {
        for mi in 0..m {
            let list = &idx[(bi * m + mi) * k..(bi * m + mi + 1) * k];
            for (hi, &sk) in sink.iter().enumerate() {
                let keys = list.iter().filter(|&&j| j >= 0).map(|&j| {
                    let j = j as usize;
                    assert!(j < n);
                    &kv[(bi * n + j) * d..(bi * n + j + 1) * d]
                });
                let at = ((bi * m + mi) * h + hi) * d;
                sparse_attn_row(&q[at..at + d], keys, sk, scale, &mut o[at..at + d]);
            }
        }
    }
    let want = f32s(&g, &format!("{group}.o"));
    assert_rel_to_peak(group, &o, &want, 1e-6);
    // o_bf16 comes from the bf16 kernel's numerics (bf16 probabilities before P·V, bf16
    // output): only a sanity bound for an f32 implementation.
    let want_bf16 = f32s(&g, &format!("{group}.o_bf16"));
    let e = compare(&o, &want_bf16, 1e-3 * peak(&want_bf16));
    println!("{group} vs o_bf16: max error / peak {:.3e}, nmse {:.3e}", max_rel_to_peak(&o, &want_bf16), e.nmse);
    assert!(e.nmse < 1e-4, "{group}: far from o_bf16 (nmse {:.3e})", e.nmse);
}

#[test]
fn sparse_attn_matches() {
    check_sparse_attn("sparse_attn");
}

#[test]
fn sparse_attn_k100_matches() {
    check_sparse_attn("sparse_attn_k100");
}

#[test]
fn every_golden_group_is_covered() {
    let covered = [
        "act_quant",
        "act_quant_sim64",
        "fp4_act_quant_sim32",
        "fp4_gemm",
        "fp8_gemm",
        "hadamard128",
        "hc_split_sinkhorn",
        "rope_theta10000",
        "rope_theta160000_yarn16",
        "sparse_attn",
        "sparse_attn_k100",
    ];
    let g = golden();
    for name in g.names() {
        let group = name.split('.').next().unwrap_or(name);
        assert!(covered.contains(&group), "golden group {group} ({name}) has no test");
    }
}
