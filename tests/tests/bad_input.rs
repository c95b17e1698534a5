//! Broken checkpoints and configs give a `LoadError` that names the file and the tensor or config
//! field at fault — never a panic.
//!
//! Each case writes the synthetic tiny-flash checkpoint in the real layout (config.json, index,
//! two shards) into its own temporary directory, damages one thing, and checks the message.

use std::path::{Path, PathBuf};

use hal::DType;
use model::checkpoint::{Checkpoint, OwnedTensor};
use model::config::{embedded_json, ModelConfig};
use model::synthetic::{generate, write_dir};
use model::LoadError;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Ends the name of either shard.
const SHARD_SUFFIX: &str = "-of-00002.safetensors";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(case: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("v4rt-bad-input-{case}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_cfg() -> ModelConfig {
    ModelConfig::embedded("tiny-flash").unwrap()
}

fn tiny_json() -> &'static str {
    embedded_json("tiny-flash").unwrap()
}

/// The synthetic tiny-flash tensors, to be edited before writing.
fn tensors() -> Vec<OwnedTensor> {
    let ck = generate(&tiny_cfg(), 3);
    ck.names()
        .map(|n| {
            let (dtype, shape) = ck.info(n).unwrap();
            OwnedTensor { name: n.into(), dtype, shape: shape.to_vec(), data: ck.raw(n).unwrap().to_vec() }
        })
        .collect()
}

/// Writes `tensors` with the tiny-flash config into a new temp dir (2 shards).
fn write(case: &str, tensors: Vec<OwnedTensor>) -> TempDir {
    let dir = TempDir::new(case);
    write_dir(&Checkpoint::from_tensors(tensors).unwrap(), tiny_json(), &dir.0, 2).unwrap();
    dir
}

/// The error of opening and validating `dir` against the tiny-flash config, as displayed.
fn load_error(dir: &Path) -> String {
    let result = Checkpoint::open(dir).and_then(|ck| ck.validate(&tiny_cfg()));
    match result {
        Err(e) => e.to_string(),
        Ok(()) => panic!("{} loaded without error", dir.display()),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "'{message}' does not mention '{p}'");
    }
}

/// The shard `write` put `tensor` in.
fn shard_of(dir: &TempDir, tensor: &str) -> String {
    let ck = Checkpoint::open(&dir.0).unwrap();
    ck.source_of(tensor).file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn the_unmodified_checkpoint_loads() {
    let dir = write("ok", tensors());
    let ck = Checkpoint::open(&dir.0).unwrap();
    ck.validate(&ModelConfig::from_file(&dir.path("config.json")).unwrap()).unwrap();
    assert_eq!(ck.files().count(), 2);
}

#[test]
fn truncated_shard() {
    let dir = write("truncated", tensors());
    let path = dir.path(SHARD2);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 2).unwrap();
    assert_mentions(&load_error(&dir.0), &[SHARD2, "tensor '", "truncated"]);
}

#[test]
fn header_length_larger_than_the_file() {
    let dir = write("header-len", tensors());
    let path = dir.path(SHARD1);
    let mut bytes = std::fs::read(&path).unwrap();
    let huge = bytes.len() as u64 * 4;
    bytes[..8].copy_from_slice(&huge.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(&load_error(&dir.0), &[SHARD1, "header length", "exceeds the file size"]);
}

#[test]
fn header_is_not_json() {
    let dir = write("not-json", tensors());
    let path = dir.path(SHARD1);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8..8 + n].fill(b'#');
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(&load_error(&dir.0), &[SHARD1, "not valid JSON"]);
}

#[test]
fn index_is_not_json() {
    let dir = write("index-json", tensors());
    std::fs::write(dir.path(INDEX), "{\"weight_map\": ").unwrap();
    assert_mentions(&load_error(&dir.0), &[INDEX, "not valid JSON"]);
}

#[test]
fn missing_tensor() {
    let gone = "layers.1.attn.wkv.scale";
    let dir = write("missing", tensors().into_iter().filter(|t| t.name != gone).collect());
    // removed from shard and index alike; the error points at the shard holding layer 1
    let shard = shard_of(&dir, "layers.1.attn.wkv.weight");
    assert_mentions(&load_error(&dir.0), &[&shard, gone, "missing", "expected F8_E8M0 [4, 2]"]);
}

#[test]
fn index_points_at_a_missing_shard() {
    let dir = write("missing-shard", tensors());
    std::fs::remove_file(dir.path(SHARD2)).unwrap();
    assert_mentions(&load_error(&dir.0), &[SHARD2, "tensor '", "does not exist"]);
}

#[test]
fn index_maps_a_tensor_to_the_wrong_shard() {
    let dir = write("wrong-shard", tensors());
    let name = "mtp.0.norm.weight";
    let from = format!("\"{name}\": \"{}\"", shard_of(&dir, name));
    let to = format!("\"{name}\": \"{SHARD1}\"");
    let index = std::fs::read_to_string(dir.path(INDEX)).unwrap();
    assert!(index.contains(&from));
    std::fs::write(dir.path(INDEX), index.replace(&from, &to)).unwrap();
    // the named shard lacks it (and the other shard holds a tensor the index does not give it)
    assert_mentions(&load_error(&dir.0), &[SHARD_SUFFIX, name]);
}

#[test]
fn misshapen_tensor() {
    let name = "layers.2.attn.kv_norm.weight";
    let mut ts = tensors();
    let t = ts.iter_mut().find(|t| t.name == name).unwrap();
    t.shape = vec![384];
    t.data.truncate(384 * 2);
    let dir = write("misshapen", ts);
    let shard = shard_of(&dir, name);
    assert_mentions(&load_error(&dir.0), &[&shard, name, "expected BF16 [512]", "found BF16 [384]"]);
}

#[test]
fn wrong_dtype() {
    let name = "layers.0.attn.attn_sink";
    let mut ts = tensors();
    let t = ts.iter_mut().find(|t| t.name == name).unwrap();
    t.dtype = DType::BF16;
    t.data.truncate(4 * 2);
    let dir = write("dtype", ts);
    let shard = shard_of(&dir, name);
    assert_mentions(&load_error(&dir.0), &[&shard, name, "expected F32 [4]", "found BF16 [4]"]);
    // the per-access check says the same
    let ck = Checkpoint::open(&dir.0).unwrap();
    let e = ck.get(name, DType::F32, &[4]).unwrap_err().to_string();
    assert_mentions(&e, &[&shard, name, "expected F32 [4], found BF16 [4]"]);
}

#[test]
fn unexpected_tensor() {
    // an indexer tensor on the HCA layer 2
    let name = "layers.2.attn.indexer.weights_proj.weight";
    let mut ts = tensors();
    ts.push(OwnedTensor { name: name.into(), dtype: DType::BF16, shape: vec![4, 256], data: vec![0; 4 * 256 * 2] });
    let dir = write("unexpected", ts);
    let shard = shard_of(&dir, name);
    assert_mentions(&load_error(&dir.0), &[&shard, name, "not expected", "compress ratio 128"]);
}

#[test]
fn checkpoint_and_config_disagree() {
    // FP4 experts on disk, config says FP8
    let dir = write("fp8-config", tensors());
    let cfg = ModelConfig::from_json(
        &tiny_json().replace("\"expert_dtype\": \"fp4\"", "\"expert_dtype\": \"fp8\""),
        Path::new("x"),
    )
    .unwrap();
    let e = Checkpoint::open(&dir.0).unwrap().validate(&cfg).unwrap_err().to_string();
    assert_mentions(&e, &[SHARD_SUFFIX, "ffn.experts.", "expected F8_E4M3", "found I8"]);
}

/// Writes the tiny-flash config with `from` replaced by `to` next to a checkpoint and loads it.
fn config_error(case: &str, from: &str, to: &str) -> (LoadError, String) {
    let text = tiny_json();
    assert!(text.contains(from), "fixture lacks {from}");
    let dir = TempDir::new(case);
    std::fs::write(dir.path("config.json"), text.replace(from, to)).unwrap();
    match ModelConfig::from_file(&dir.path("config.json")) {
        Err(e) => {
            let shown = e.to_string();
            assert_mentions(&shown, &["config.json"]);
            (e, shown)
        }
        Ok(_) => panic!("{case}: config accepted"),
    }
}

#[test]
fn inconsistent_configs() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("ratios-len", "[0, 4, 128, 4, 0]", "[0, 4, 128, 4]", "compress_ratios"),
        ("ratio-1", "[0, 4, 128, 4, 0]", "[0, 4, 1, 4, 0]", "compress_ratios[2]"),
        ("groups", "\"o_groups\": 2", "\"o_groups\": 3", "o_groups"),
        ("rope-odd", "\"qk_rope_head_dim\": 64", "\"qk_rope_head_dim\": 63", "qk_rope_head_dim"),
        ("rope-big", "\"qk_rope_head_dim\": 64", "\"qk_rope_head_dim\": 512", "qk_rope_head_dim"),
        ("nope-64", "\"head_dim\": 512", "\"head_dim\": 480", "head_dim"),
        ("index-pow2", "\"index_head_dim\": 128", "\"index_head_dim\": 96", "index_head_dim"),
        ("dim-128", "\"hidden_size\": 256", "\"hidden_size\": 320", "hidden_size"),
        ("inter-128", "\"moe_intermediate_size\": 256", "\"moe_intermediate_size\": 200", "moe_intermediate_size"),
        ("topk", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9", "num_experts_per_tok"),
        ("hash", "\"num_hash_layers\": 1", "\"num_hash_layers\": 5", "num_hash_layers"),
        ("kv-heads", "\"num_key_value_heads\": 1", "\"num_key_value_heads\": 8", "num_key_value_heads"),
        ("shared", "\"n_shared_experts\": 1", "\"n_shared_experts\": 2", "n_shared_experts"),
        ("act", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "hidden_act"),
        ("block", "128,\n      128\n    ]", "64,\n      64\n    ]", "quantization_config.weight_block_size"),
        ("fmt", "\"fmt\": \"e4m3\"", "\"fmt\": \"e5m2\"", "quantization_config.fmt"),
        ("scale-fmt", "\"scale_fmt\": \"ue8m0\"", "\"scale_fmt\": \"fp32\"", "quantization_config.scale_fmt"),
        ("experts", "\"expert_dtype\": \"fp4\"", "\"expert_dtype\": \"nf4\"", "expert_dtype"),
        ("vocab", "\"vocab_size\": 1024", "\"vocab_size\": 0", "vocab_size"),
        ("type", "\"hidden_size\": 256", "\"hidden_size\": \"256\"", "hidden_size"),
        ("negative", "\"sliding_window\": 16", "\"sliding_window\": -16", "sliding_window"),
        ("yarn", "\"type\": \"yarn\"", "\"type\": \"dynamic\"", "rope_scaling.type"),
        ("json", "{", "{{", "<document>"),
    ];
    for &(case, from, to, field) in cases {
        let (e, shown) = config_error(case, from, to);
        assert!(matches!(&e, LoadError::Config { field: f, .. } if f == field), "{case}: {shown}");
        assert_mentions(&shown, &[&format!("'{field}'")]);
    }
}

#[test]
fn unknown_scoring_func() {
    let (e, shown) = config_error("scoring", "\"scoring_func\": \"sqrtsoftplus\"", "\"scoring_func\": \"sigmoid\"");
    assert!(matches!(e, LoadError::Config { .. }));
    assert_mentions(&shown, &["'scoring_func'", "unsupported value 'sigmoid'", "sqrtsoftplus"]);
}

#[test]
fn missing_config_file() {
    let dir = TempDir::new("no-config");
    let e = ModelConfig::from_file(&dir.path("config.json")).unwrap_err().to_string();
    assert_mentions(&e, &["config.json"]);
    let e = Checkpoint::open(&dir.0).err().map(|e| e.to_string()).unwrap_or_default();
    assert_mentions(&e, &["neither", INDEX]);
}
