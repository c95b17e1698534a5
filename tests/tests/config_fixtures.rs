//! The embedded config fixtures (`tiny-flash`, `v4-flash`, `v4-pro`) parse to the values of spec
//! §2.1/§2.2 and the golden tiny-flash checkpoint validates against its config.

use std::path::{Path, PathBuf};

use model::checkpoint::{expected_tensors, Checkpoint};
use model::config::{embedded_json, ExpertFormat, LayerKind, ModelConfig};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/golden/tiny-flash")
}

/// Top-level keys of a fixture, in file order (fixtures are 2-space indented JSON).
fn top_level_keys(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("  \"")).filter_map(|l| l.split_once("\":")).map(|(k, _)| k).collect()
}

/// The values §2.1 lists identically for Flash and Pro.
fn assert_common(c: &ModelConfig) {
    assert_eq!(c.vocab_size, 129_280);
    assert_eq!((c.n_hash_layers, c.n_mtp_layers), (3, 1));
    assert_eq!((c.head_dim, c.rope_head_dim, c.o_lora_rank, c.window_size), (512, 64, 1024, 128));
    assert_eq!((c.n_shared_experts, c.n_activated_experts), (1, 6));
    assert_eq!(c.swiglu_limit, 10.0);
    assert_eq!((c.rope_theta, c.compress_rope_theta, c.rope_factor), (10_000.0, 160_000.0, 16.0));
    assert_eq!((c.original_seq_len, c.beta_fast, c.beta_slow), (65_536, 32.0, 1.0));
    assert_eq!((c.index_n_heads, c.index_head_dim), (64, 128));
    assert_eq!((c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps), (4, 20, 1e-6, 1e-6));
    assert_eq!(c.expert_format, ExpertFormat::Fp4);
    assert_eq!((c.bos_token_id, c.eos_token_id), (0, 1));
    assert_eq!(*c.compress_ratios.last().unwrap(), 0, "the MTP block is window-only");
    assert!((0..3).all(|i| c.is_hash_layer(i)) && !c.is_hash_layer(3) && !c.is_hash_layer(c.n_layers));
}

fn kinds(c: &ModelConfig) -> [usize; 3] {
    let count = |k| (0..c.n_layers).filter(|&i| c.layer_kind(i) == k).count();
    [count(LayerKind::Window), count(LayerKind::Csa), count(LayerKind::Hca)]
}

#[test]
fn flash_matches_the_spec() {
    let c = ModelConfig::embedded("v4-flash").unwrap();
    assert_common(&c);
    assert_eq!((c.dim, c.n_layers, c.n_heads, c.q_lora_rank, c.o_groups), (4096, 43, 64, 1024, 8));
    assert_eq!((c.n_routed_experts, c.moe_inter_dim, c.index_topk, c.route_scale), (256, 2048, 512, 1.5));
    assert_eq!(c.compress_ratios.len(), 44);
    assert_eq!(kinds(&c), [2, 21, 20]);
    assert_eq!(&c.compress_ratios[..4], &[0, 0, 4, 128]);
    assert!((2..43).all(|i| c.layer_ratio(i) == if i % 2 == 0 { 4 } else { 128 }));
}

#[test]
fn pro_matches_the_spec() {
    let c = ModelConfig::embedded("v4-pro").unwrap();
    assert_common(&c);
    assert_eq!((c.dim, c.n_layers, c.n_heads, c.q_lora_rank, c.o_groups), (7168, 61, 128, 1536, 16));
    assert_eq!((c.n_routed_experts, c.moe_inter_dim, c.index_topk, c.route_scale), (384, 3072, 1024, 2.5));
    assert_eq!(c.compress_ratios.len(), 62);
    assert_eq!(kinds(&c), [0, 30, 31]);
    assert_eq!(&c.compress_ratios[..3], &[128, 128, 4]);
    assert!((2..61).all(|i| c.layer_ratio(i) == if i % 2 == 0 { 4 } else { 128 }));
    assert_eq!(expected_tensors(&c).len(), 145_116);
}

#[test]
fn tiny_flash_matches_its_manifest() {
    let text = embedded_json("tiny-flash").unwrap();
    let golden = std::fs::read_to_string(golden_dir().join("config.json")).unwrap();
    assert_eq!(text, golden, "the fixture is a copy of the golden config.json");
    let c = ModelConfig::embedded("tiny-flash").unwrap();
    assert_eq!((c.vocab_size, c.dim, c.n_layers, c.n_hash_layers, c.n_mtp_layers), (1024, 256, 4, 1, 1));
    assert_eq!(
        (c.n_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank, c.window_size),
        (4, 512, 256, 2, 128, 16)
    );
    assert_eq!((c.n_routed_experts, c.n_activated_experts, c.moe_inter_dim), (8, 2, 256));
    assert_eq!((c.index_n_heads, c.index_head_dim, c.index_topk), (4, 128, 8));
    assert_eq!(c.compress_ratios, vec![0, 4, 128, 4, 0]);
    assert_eq!(c.expert_format, ExpertFormat::Fp4);
}

#[test]
fn fixtures_carry_every_root_config_key() {
    // tiny-flash has the key set and order of the released Pro config (its MANIFEST §2)
    let reference = top_level_keys(embedded_json("tiny-flash").unwrap());
    assert_eq!(reference.len(), 48);
    for name in ["v4-flash", "v4-pro"] {
        assert_eq!(top_level_keys(embedded_json(name).unwrap()), reference, "{name}");
    }
}

#[test]
fn golden_tiny_flash_checkpoint_validates() {
    let dir = golden_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    ck.validate(&cfg).unwrap();
    assert_eq!(ck.len(), 427);
    assert_eq!(ck.files().count(), 2);
}
