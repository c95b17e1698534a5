//! The model beyond tiny-flash's geometry, and the invariances the cache machinery promises.
//!
//! Configs: dims that are not powers of two, head_dim 256, a window of 8, two hash layers, a
//! layer pattern starting with HCA, a non-overlapping ratio of 16, 16 experts with top-4, and
//! FP8 (instead of FP4) routed experts. Random weights in the real checkpoint format.
//!
//! For cpu-ref every op is row-wise with a fixed accumulation order, so these must hold bit
//! for bit (exact equality is the point here, not a float comparison shortcut):
//! * one-token decode after a prefill == one prefill of the whole sequence;
//! * a prefill split into chunks at arbitrary points == one prefill;
//! * sequences batched in one call (prefill and decode) == each run alone.

use std::sync::Arc;

use hal::DType;
use model::config::ModelConfig;
use model::forward::{Chunk, ForwardOptions, LogitsAt, Model};
use proptest::prelude::*;

fn config(name: &str) -> ModelConfig {
    let mut v: serde_json::Value = serde_json::from_str(model::config::embedded_json("tiny-flash").unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    let mut set = |k: &str, val: serde_json::Value| {
        o.insert(k.to_string(), val);
    };
    match name {
        "wide" => {
            set("hidden_size", 384.into());
            set("num_attention_heads", 6.into());
            set("head_dim", 256.into());
            set("o_groups", 3.into());
            set("o_lora_rank", 128.into());
            set("q_lora_rank", 384.into());
            set("sliding_window", 8.into());
            set("n_routed_experts", 16.into());
            set("num_experts_per_tok", 4.into());
            set("moe_intermediate_size", 384.into());
            set("num_hash_layers", 2.into());
            set("index_topk", 16.into());
            set("index_n_heads", 2.into());
            set("vocab_size", 500.into());
            set("num_hidden_layers", 5.into());
            set("compress_ratios", serde_json::json!([128, 4, 0, 4, 16, 0]));
        }
        "fp8-experts" => {
            set("expert_dtype", "fp8".into());
            set("sliding_window", 5.into());
            set("index_topk", 3.into());
        }
        other => panic!("unknown test config {other}"),
    }
    ModelConfig::from_json(&v.to_string(), std::path::Path::new(name)).expect("test config is valid")
}

fn model(name: &str) -> Model {
    let cfg = config(name);
    let ck = model::synthetic::generate(&cfg, 99);
    Model::from_checkpoint(cfg, &ck, Arc::new(cpu_ref::CpuBackend::new())).expect("model builds")
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 13) % vocab) as u32).collect()
}

const ALL: ForwardOptions = ForwardOptions { logits: LogitsAt::All, decisions: false, mtp_ids: None };

/// Logits of every position of `toks` processed as chunks of the given lengths.
fn run_chunked(m: &Model, toks: &[u32], splits: &[usize]) -> Vec<f32> {
    run_chunked_kv(m, toks, splits, m.new_cache(1, toks.len()).unwrap().dtype())
}

/// [`run_chunked`] with a KV cache of dtype `kv`.
fn run_chunked_kv(m: &Model, toks: &[u32], splits: &[usize], kv: DType) -> Vec<f32> {
    let mut cache = m.new_cache_with(1, toks.len(), kv).unwrap();
    let slot = cache.alloc_slot(m.backend()).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &len in splits.iter().chain(std::iter::once(&(toks.len() - splits.iter().sum::<usize>()))) {
        if len == 0 {
            continue;
        }
        out.extend(m.forward(&mut cache, &[Chunk { slot, tokens: &toks[at..at + len] }], &ALL).unwrap().logits);
        at += len;
    }
    out
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite logits");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        panic!("{what}: first difference at element {i}: {} vs {}", a[i], b[i]);
    }
}

#[test]
fn wide_config_decode_equals_prefill() {
    let m = model("wide");
    // 140 tokens: past the window (8) and both compressed ratios (16, 128), and the CSA
    // top-k (16 entries visible from position 63 on).
    let toks = tokens(140, m.cfg.vocab_size, 1);
    let whole = run_chunked(&m, &toks, &[]);
    let spread = whole.iter().map(|&x| x as f64).fold((0f64, 0f64), |(s, q), x| (s + x, q + x * x));
    let var = spread.1 / whole.len() as f64 - (spread.0 / whole.len() as f64).powi(2);
    assert!(var > 1e-6, "logits are (nearly) constant: variance {var}");
    let mut one_by_one = vec![5];
    one_by_one.extend(std::iter::repeat_n(1, 134));
    assert_bits_eq(&run_chunked(&m, &toks, &one_by_one), &whole, "prefill 5 + 135 decode steps");
    // Both cache dtypes: a bf16 cache rounds this call's fresh keys as it rounds stored ones,
    // so a key's value does not depend on which call wrote it.
    for kv in [DType::F32, DType::BF16] {
        let whole = run_chunked_kv(&m, &toks, &[], kv);
        assert_bits_eq(
            &run_chunked_kv(&m, &toks, &one_by_one, kv),
            &whole,
            &format!("{kv} cache: prefill 5 + 135 decode steps"),
        );
    }
    // The two dtypes differ (the bf16 cache does round).
    let (f, h) = (run_chunked_kv(&m, &toks, &[], DType::F32), run_chunked_kv(&m, &toks, &[], DType::BF16));
    assert!(f.iter().zip(&h).any(|(a, b)| a.to_bits() != b.to_bits()), "bf16 and f32 caches gave identical logits");
}

#[test]
fn fp8_experts_decode_equals_prefill() {
    let m = model("fp8-experts");
    let toks = tokens(40, m.cfg.vocab_size, 2);
    let whole = run_chunked(&m, &toks, &[]);
    let steps: Vec<usize> = std::iter::repeat_n(1, 39).collect();
    assert_bits_eq(&run_chunked(&m, &toks, &steps), &whole, "40 one-token calls");
}

#[test]
fn batched_sequences_equal_each_alone() {
    let m = model("wide");
    let (a, b) = (tokens(37, m.cfg.vocab_size, 3), tokens(21, m.cfg.vocab_size, 4));
    let alone_a = run_chunked(&m, &a, &[30]);
    let alone_b = run_chunked(&m, &b, &[9]);
    // One cache, two slots: a prefill call with both, then decode calls with both (b ends first).
    let mut cache = m.new_cache(2, 40).unwrap();
    let (sa, sb) = (cache.alloc_slot(m.backend()).unwrap(), cache.alloc_slot(m.backend()).unwrap());
    let v = m.cfg.vocab_size;
    let out = m
        .forward(&mut cache, &[Chunk { slot: sb, tokens: &b[..9] }, Chunk { slot: sa, tokens: &a[..30] }], &ALL)
        .unwrap();
    let (mut got_a, mut got_b) = (out.logits[9 * v..].to_vec(), out.logits[..9 * v].to_vec());
    for pos in 30..37 {
        let (pb, pb_end) = (pos - 21, pos - 20); // b advances from 9 too: positions 9..16
        let out = m
            .forward(
                &mut cache,
                &[Chunk { slot: sa, tokens: &a[pos..pos + 1] }, Chunk { slot: sb, tokens: &b[pb..pb_end] }],
                &ALL,
            )
            .unwrap();
        got_a.extend(&out.logits[..v]);
        got_b.extend(&out.logits[v..]);
    }
    // b's remaining tokens alone in the shared cache.
    let out = m.forward(&mut cache, &[Chunk { slot: sb, tokens: &b[16..] }], &ALL).unwrap();
    got_b.extend(out.logits);
    assert_bits_eq(&got_a, &alone_a, "sequence a batched");
    assert_bits_eq(&got_b, &alone_b, "sequence b batched");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    /// Chunked prefill at arbitrary split points (crossing the window, the 4- and 16-token
    /// compressor blocks) equals one prefill.
    #[test]
    fn chunked_prefill_equals_whole(splits in proptest::collection::vec(1usize..24, 1..5)) {
        let m = model_cached();
        let toks = tokens(70, m.cfg.vocab_size, 5);
        let splits: Vec<usize> = splits.into_iter().scan(0, |sum, s| { *sum += s; (*sum < 70).then_some(s) }).collect();
        let whole = run_chunked(m, &toks, &[]);
        assert_bits_eq(&run_chunked(m, &toks, &splits), &whole, &format!("chunks {splits:?}"));
    }
}

fn model_cached() -> &'static Model {
    static M: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
    M.get_or_init(|| model("wide"))
}
