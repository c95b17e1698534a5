//! Parity with DeepSeek's official reference code on the tiny-flash checkpoint (float32 mode),
//! by the tiers of data/golden/tiny-flash/MANIFEST.md §8:
//! * T1 — each block teacher-forced on the golden input streams, prefill of all 300 tokens;
//!   also the head and the MTP block from the golden `layer3_out`;
//! * T1d — the same blocks as a prefill of P = 37 then one-token decode calls;
//! * T2 — end to end: prefill, decode and MTP logits and every routing/indexer decision.
//!
//! The checkpoint is loaded from its real files through the production loader.

use std::sync::{Arc, OnceLock};

use hal::{Backend, DType};
use model::forward::{Chunk, ForwardOptions, LogitsAt, Model};
use model::safetensors::SafeTensors;
use v4rt_tests::tiers::*;

const P: usize = 37;

struct Golden {
    model: Model,
    tokens: Vec<u32>, // [2, 300]
    t: usize,
    logits: SafeTensors,
    layers: SafeTensors,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let dir = golden_dir().join("tiny-flash");
        let backend: Arc<dyn Backend> = Arc::new(cpu_ref::CpuBackend::new());
        let model = Model::load(&dir, backend).expect("tiny-flash loads");
        let tok = SafeTensors::open(&dir.join("tokens.safetensors")).expect("tokens");
        let t = tok.info("tokens").expect("tokens tensor").shape[1];
        let tokens = tok.i64("tokens").expect("i64").into_iter().map(|x| x as u32).collect();
        let logits = SafeTensors::open(&dir.join("golden.safetensors")).expect("golden");
        let layers = SafeTensors::open(&dir.join("golden_layers.safetensors")).expect("golden layers");
        Golden { model, tokens, t, logits, layers }
    })
}

/// Golden block input streams for block `i` (block 0: the embedding copied into 4 streams).
fn block_input(g: &Golden, i: usize) -> Vec<f32> {
    if i == 0 {
        let e = g.layers.f32("embed_out").unwrap();
        let d = g.model.cfg.dim;
        e.chunks(d).flat_map(|row| std::iter::repeat_n(row, g.model.cfg.hc_mult).flatten().copied()).collect()
    } else {
        g.layers.f32(&format!("layer{}_out", i - 1)).unwrap()
    }
}

fn upload_streams(g: &Golden, v: &[f32], rows: usize) -> hal::Tensor {
    let (m, d) = (g.model.cfg.hc_mult, g.model.cfg.dim);
    g.model.backend().upload(&[rows, m, d], DType::F32, &hal::dtype::f32_bytes(v)).unwrap()
}

/// Block `i` run alone on golden inputs for tokens `[0, T)` of sequence 0, as one prefill
/// (`split = None`) or as a prefill of `split` tokens then one-token calls. Returns the output
/// streams of every position and the (experts, topk) decisions per position.
fn teacher_forced(g: &Golden, i: usize, split: Option<usize>) -> (Vec<f32>, Vec<i64>, Vec<i64>, Vec<f32>) {
    let (t, width) = (g.t, g.model.cfg.hc_mult * g.model.cfg.dim);
    let input = block_input(g, i);
    let mut cache = g.model.new_cache_with(1, t, DType::F32).unwrap();
    let slot = cache.alloc_slot(g.model.backend()).unwrap();
    let ids = &g.tokens[..t];
    let spans: Vec<(usize, usize)> = match split {
        None => vec![(0, t)],
        Some(p) => std::iter::once((0, p)).chain((p..t).map(|s| (s, s + 1))).collect(),
    };
    let (mut out, mut experts, mut topk, mut scores) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (a, b) in spans {
        let rows = g.model.rows(&cache, &[Chunk { slot, tokens: &ids[a..b] }]).unwrap();
        let x = upload_streams(g, &input[a * width..b * width], b - a);
        let (y, d) = g.model.block(i, g.model.layer_cache(&mut cache, i).unwrap(), &rows, x, true).unwrap();
        cache.advance(slot, b - a);
        out.extend(hal::dtype::bytes_f32(&g.model.backend().download(&y).unwrap()));
        let d = d.unwrap();
        experts.extend(d.experts.iter().map(|&e| e as i64));
        if let (Some(tk), Some(sc)) = (d.topk, d.topk_scores) {
            topk.extend(tk.iter().map(|&e| e as i64));
            scores.extend(sc);
        }
    }
    (out, experts, topk, scores)
}

fn first_seq(v: Vec<i64>, per_seq: usize) -> Vec<i64> {
    v[..per_seq].to_vec()
}

#[test]
fn t1_teacher_forced_blocks_prefill() {
    let g = golden();
    let (t, width, k, kk) =
        (g.t, g.model.cfg.hc_mult * g.model.cfg.dim, g.model.cfg.n_activated_experts, g.model.cfg.index_topk);
    for i in 0..g.model.cfg.n_layers {
        let (out, experts, topk, scores) = teacher_forced(g, i, None);
        let want = g.layers.f32(&format!("layer{i}_out")).unwrap();
        let rel = row_rel(&out, &want, width);
        let e_eq = sets_equal(&experts, &first_seq(g.logits.i64(&format!("layer{i}_experts")).unwrap(), t * k), k);
        println!("T1 layer{i}: {}; experts equal {e_eq:.3}", describe(&rel));
        assert!(median(&rel) <= 1e-5, "layer{i}: median rel {:.3e} > 1e-5", median(&rel));
        assert!(frac_le(&rel, 1e-3) >= 0.95, "layer{i}: only {:.3} of positions within 1e-3", frac_le(&rel, 1e-3));
        assert!(e_eq >= 0.99, "layer{i}: experts equal at {e_eq:.3} < 0.99");
        if g.model.cfg.layer_ratio(i) == 4 {
            let gt = first_seq(g.logits.i64(&format!("layer{i}_topk")).unwrap(), t * kk);
            // The reference breaks exact score ties in its sort routine's order, we by lower id;
            // the tier's 0.98 applies to the sets up to such ties (strict equality is printed).
            let strict = sets_equal(&topk, &gt, kk);
            let eq = sets_equal_up_to_ties(&topk, &scores, &gt, kk);
            println!(
                "T1 layer{i}: indexer sets equal {strict:.3} strictly, {eq:.3} up to exact ties; overlap {:.3}",
                sets_overlap(&topk, &gt, kk)
            );
            assert!(eq >= 0.98, "layer{i}: indexer sets equal (up to ties) at {eq:.3} < 0.98");
        }
    }
}

#[test]
fn t1d_teacher_forced_blocks_decode() {
    let g = golden();
    let (t, width, k, kk) =
        (g.t, g.model.cfg.hc_mult * g.model.cfg.dim, g.model.cfg.n_activated_experts, g.model.cfg.index_topk);
    for i in 0..g.model.cfg.n_layers {
        let (out, experts, topk, _) = teacher_forced(g, i, Some(P));
        let want = g.layers.f32(&format!("layer{i}_out")).unwrap();
        let rel = row_rel(&out[P * width..], &want[P * width..], width);
        let gexp = first_seq(g.logits.i64(&format!("layer{i}_experts")).unwrap(), t * k);
        let e_eq = sets_equal(&experts[P * k..], &gexp[P * k..], k);
        println!("T1d layer{i}: {}; experts equal {e_eq:.3}", describe(&rel));
        assert!(median(&rel) <= 1e-5, "layer{i}: median rel {:.3e}", median(&rel));
        assert!(frac_le(&rel, 1e-3) >= 0.70, "layer{i}: {:.3} within 1e-3", frac_le(&rel, 1e-3));
        assert!(e_eq >= 0.96, "layer{i}: experts equal {e_eq:.3} < 0.96");
        if g.model.cfg.layer_ratio(i) == 4 {
            let gt = first_seq(g.logits.i64(&format!("layer{i}_topk")).unwrap(), t * kk);
            let ov = sets_overlap(&topk[P * kk..], &gt[P * kk..], kk);
            println!("T1d layer{i}: indexer overlap {ov:.3}");
            assert!(ov >= 0.93, "layer{i}: indexer overlap {ov:.3} < 0.93");
        }
    }
}

#[test]
fn t1_teacher_forced_head_and_mtp() {
    let g = golden();
    let (t, v, k) = (g.t, g.model.cfg.vocab_size, g.model.cfg.n_activated_experts);
    let x_last = g.layers.f32(&format!("layer{}_out", g.model.cfg.n_layers - 1)).unwrap();
    let keep: Vec<usize> = (0..t).collect();
    let logits = g.model.head(upload_streams(g, &x_last, t), &keep).unwrap();
    let want = &g.logits.f32("prefill_logits").unwrap()[..t * v];
    let rel = row_rel(&logits, want, v);
    println!("T1 head logits: {}", describe(&rel));
    assert!(median(&rel) <= 1e-5 && frac_le(&rel, 1e-3) >= 0.95, "head: {}", describe(&rel));

    let mut cache = g.model.new_cache_with(1, t, DType::F32).unwrap();
    let slot = cache.alloc_slot(g.model.backend()).unwrap();
    let rows = g.model.rows(&cache, &[Chunk { slot, tokens: &g.tokens[..t] }]).unwrap();
    let next: Vec<u32> = (0..t).map(|i| if i + 1 < t { g.tokens[i + 1] } else { 0 }).collect();
    let (mtp, d) = g.model.mtp(0, &mut cache, &rows, upload_streams(g, &x_last, t), &next, true).unwrap();
    let want = &g.logits.f32("mtp_logits").unwrap()[..t * v];
    let rel = row_rel(&mtp, want, v);
    let experts: Vec<i64> = d.unwrap().experts.iter().map(|&e| e as i64).collect();
    let e_eq = sets_equal(&experts, &first_seq(g.logits.i64("mtp_experts").unwrap(), t * k), k);
    println!("T1 MTP logits: {}; experts equal {e_eq:.3}", describe(&rel));
    assert!(median(&rel) <= 1e-5 && frac_le(&rel, 1e-3) >= 0.95, "mtp: {}", describe(&rel));
    assert!(e_eq >= 0.99, "mtp experts equal {e_eq:.3}");
}

/// T2 bounds on one logits tensor.
fn check_t2(name: &str, ours: &[f32], want: &[f32], v: usize) {
    let (cos, rel, am) = (row_cos(ours, want, v), row_rel(ours, want, v), argmax_agreement(ours, want, v));
    println!("T2 {name}: cos mean {:.4}, argmax {am:.3}, {}", mean(&cos), describe(&rel));
    assert!(mean(&cos) >= 0.97, "{name}: cos mean {:.4} < 0.97", mean(&cos));
    assert!(am >= 0.70, "{name}: argmax agreement {am:.3} < 0.70");
    assert!(median(&rel) <= 0.15, "{name}: median rel {:.3} > 0.15", median(&rel));
}

fn check_t2_decisions(name: &str, ours: &[i64], want: &[i64], k: usize, overlap: bool) {
    let score = if overlap { sets_overlap(ours, want, k) } else { sets_equal(ours, want, k) };
    println!("T2 {name}: {} {score:.3}", if overlap { "overlap" } else { "sets equal" });
    assert!(score >= 0.80, "{name}: {score:.3} < 0.80");
}

#[test]
fn t2_end_to_end_prefill_and_mtp() {
    let g = golden();
    let (t, v, m) = (g.t, g.model.cfg.vocab_size, &g.model);
    let b = g.tokens.len() / t;
    let mut cache = m.new_cache_with(b, t, DType::F32).unwrap();
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(m.backend()).unwrap()).collect();
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t..(s + 1) * t] }).collect();
    let next: Vec<u32> = (0..b * t).map(|r| if r % t + 1 < t { g.tokens[r + 1] } else { 0 }).collect();
    let out = m
        .forward(&mut cache, &chunks, &ForwardOptions { logits: LogitsAt::All, decisions: true, mtp_ids: Some(&next) })
        .unwrap();
    check_t2("prefill logits", &out.logits, &g.logits.f32("prefill_logits").unwrap(), v);
    check_t2("mtp logits", out.mtp_logits.as_ref().unwrap(), &g.logits.f32("mtp_logits").unwrap(), v);
    let k = m.cfg.n_activated_experts;
    for (i, d) in out.decisions.iter().enumerate().take(m.cfg.n_layers) {
        let ours: Vec<i64> = d.experts.iter().map(|&e| e as i64).collect();
        check_t2_decisions(
            &format!("layer{i} experts"),
            &ours,
            &g.logits.i64(&format!("layer{i}_experts")).unwrap(),
            k,
            false,
        );
        if let Some(tk) = &d.topk {
            let ours: Vec<i64> = tk.iter().map(|&e| e as i64).collect();
            check_t2_decisions(
                &format!("layer{i} topk"),
                &ours,
                &g.logits.i64(&format!("layer{i}_topk")).unwrap(),
                m.cfg.index_topk,
                true,
            );
        }
    }
    let mtp_d = out.decisions.last().unwrap();
    let ours: Vec<i64> = mtp_d.experts.iter().map(|&e| e as i64).collect();
    check_t2_decisions("mtp experts", &ours, &g.logits.i64("mtp_experts").unwrap(), k, false);
}

#[test]
fn t2_end_to_end_decode() {
    let g = golden();
    let (t, v, m) = (g.t, g.model.cfg.vocab_size, &g.model);
    let b = g.tokens.len() / t;
    let mut cache = m.new_cache_with(b, t, DType::F32).unwrap();
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(m.backend()).unwrap()).collect();
    let opts = ForwardOptions { logits: LogitsAt::All, decisions: true, mtp_ids: None };
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t..s * t + P] }).collect();
    m.forward(&mut cache, &chunks, &opts).unwrap();
    let (k, kk) = (m.cfg.n_activated_experts, m.cfg.index_topk);
    let steps = t - P;
    let mut logits = vec![0f32; b * steps * v];
    let mut experts = vec![vec![0i64; b * steps * k]; m.cfg.n_layers];
    let mut topk = vec![vec![-1i64; b * steps * kk]; m.cfg.n_layers];
    for pos in P..t {
        let chunks: Vec<Chunk> =
            slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t + pos..s * t + pos + 1] }).collect();
        let out = m.forward(&mut cache, &chunks, &opts).unwrap();
        let j = pos - P;
        for s in 0..b {
            logits[(s * steps + j) * v..(s * steps + j + 1) * v].copy_from_slice(&out.logits[s * v..(s + 1) * v]);
            for (i, d) in out.decisions.iter().enumerate() {
                for e in 0..k {
                    experts[i][(s * steps + j) * k + e] = d.experts[s * k + e] as i64;
                }
                if let Some(tk) = &d.topk {
                    for e in 0..kk {
                        topk[i][(s * steps + j) * kk + e] = tk[s * kk + e] as i64;
                    }
                }
            }
        }
    }
    check_t2("decode logits", &logits, &g.logits.f32("decode_logits").unwrap(), v);
    for i in 0..m.cfg.n_layers {
        check_t2_decisions(
            &format!("decode layer{i} experts"),
            &experts[i],
            &g.logits.i64(&format!("decode_layer{i}_experts")).unwrap(),
            k,
            false,
        );
        if m.cfg.layer_ratio(i) == 4 {
            check_t2_decisions(
                &format!("decode layer{i} topk"),
                &topk[i],
                &g.logits.i64(&format!("decode_layer{i}_topk")).unwrap(),
                kk,
                true,
            );
        }
    }
}
