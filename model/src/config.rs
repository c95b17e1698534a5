//! `config.json` (the Hugging Face root config DeepSeek ships with V4) → a validated
//! [`ModelConfig`] with the reference's `ModelArgs` field names.
//!
//! Keys follow spec §2.2 (HF names, e.g. `hidden_size`, `num_attention_heads`), mapped to the
//! `ModelArgs` names of §2.1 (`dim`, `n_heads`). A key that is absent takes the `ModelArgs`
//! default of §2.1, because that is what `model.py` would run with. Every value is then checked
//! for what the reference code and its FP8/FP4 kernels silently assume (divisibility, block
//! sizes, a single KV head, the one supported gate score function, ...), so a wrong config fails
//! here with the offending key named instead of producing garbage later.
//!
//! Three configs are embedded ([`EMBEDDED_CONFIGS`]): the golden `tiny-flash` test model and full
//! root configs for V4-Flash and V4-Pro written from spec §2.1/§2.2.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::LoadError;

/// Names accepted by [`ModelConfig::embedded`] and [`embedded_json`].
pub const EMBEDDED_CONFIGS: [&str; 3] = ["tiny-flash", "v4-flash", "v4-pro"];

/// The text of an embedded config fixture (`tiny-flash`, `v4-flash`, `v4-pro`), e.g. to write it
/// next to a synthetic checkpoint.
pub fn embedded_json(name: &str) -> Option<&'static str> {
    match name {
        "tiny-flash" => Some(include_str!("../configs/tiny-flash.json")),
        "v4-flash" => Some(include_str!("../configs/v4-flash.json")),
        "v4-pro" => Some(include_str!("../configs/v4-pro.json")),
        _ => None,
    }
}

/// How the routed experts are stored (`expert_dtype` in config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertFormat {
    /// `expert_dtype: "fp4"`: e2m1 packed two per byte (`I8 [out, in/2]`) with one e8m0 scale
    /// per 32 inputs (`[out, in/32]`) — the released V4 checkpoints.
    Fp4,
    /// `expert_dtype` absent or `"fp8"`: e4m3 with 128×128 e8m0 block scales, like every other
    /// linear (the `ModelArgs` default, and what `convert.py --expert-dtype fp8` produces).
    Fp8,
}

/// The attention type of a block, from its compress ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Ratio 0: sliding window only.
    Window,
    /// Ratio 4: compressed sparse attention — overlapping compressor plus the lightning indexer.
    Csa,
    /// Any other ratio (128 in the released models): heavily compressed attention — one
    /// non-overlapping compressor, every entry attended, no indexer.
    Hca,
}

impl LayerKind {
    /// Short name used in reports ("window", "CSA", "HCA").
    pub fn label(self) -> &'static str {
        match self {
            LayerKind::Window => "window",
            LayerKind::Csa => "CSA",
            LayerKind::Hca => "HCA",
        }
    }
}

/// A validated DeepSeek-V4 configuration (field names as in the reference's `ModelArgs`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// Hidden size `d` (`hidden_size`).
    pub dim: usize,
    /// Main transformer blocks (`num_hidden_layers`).
    pub n_layers: usize,
    /// Blocks `0..n_hash_layers` route experts by token id (`num_hash_layers`).
    pub n_hash_layers: usize,
    /// MTP blocks `mtp.0..` (`num_nextn_predict_layers`).
    pub n_mtp_layers: usize,
    /// Query heads (`num_attention_heads`).
    pub n_heads: usize,
    /// Width of the single shared K=V head and of every query head.
    pub head_dim: usize,
    /// Trailing dims of each head that get RoPE (`qk_rope_head_dim`).
    pub rope_head_dim: usize,
    pub q_lora_rank: usize,
    /// Head groups of the low-rank output projection `wo_a`.
    pub o_groups: usize,
    pub o_lora_rank: usize,
    /// Raw KV entries each query sees (`sliding_window`).
    pub window_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub n_activated_experts: usize,
    /// Expert hidden width (`moe_intermediate_size`).
    pub moe_inter_dim: usize,
    /// Routing weight multiplier (`routed_scaling_factor`).
    pub route_scale: f32,
    /// SwiGLU clamp `L` (0 = no clamp).
    pub swiglu_limit: f32,
    /// RoPE base of window-only blocks.
    pub rope_theta: f32,
    /// RoPE base (with YaRN) of compressed blocks.
    pub compress_rope_theta: f32,
    /// YaRN factor (`rope_scaling.factor`).
    pub rope_factor: f32,
    /// YaRN original context (`rope_scaling.original_max_position_embeddings`); 0 disables YaRN.
    pub original_seq_len: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    /// Compressed entries the indexer selects per query on CSA blocks.
    pub index_topk: usize,
    /// Residual streams of the hyper-connections (`n` in the spec).
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub norm_eps: f32,
    pub expert_format: ExpertFormat,
    /// One ratio per block: `n_layers` main blocks, then `n_mtp_layers` MTP blocks.
    pub compress_ratios: Vec<usize>,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
}

/// `ModelArgs` default of `compress_ratios` (spec §2.1): 7 layers + 1 MTP block.
const DEFAULT_RATIOS: [usize; 8] = [0, 0, 4, 128, 4, 128, 4, 0];

impl ModelConfig {
    /// Reads and validates `path` (a root `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io { file: path.to_path_buf(), err: e })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config text; `path` is only used to name the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, LoadError> {
        let root: Value = serde_json::from_str(text).map_err(|e| LoadError::Config {
            file: path.to_path_buf(),
            field: "<document>".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        let obj = root.as_object().ok_or_else(|| LoadError::Config {
            file: path.to_path_buf(),
            field: "<document>".into(),
            message: "the top level must be a JSON object".into(),
        })?;
        let f = Fields { obj, file: path, prefix: String::new() };
        let cfg = f.parse()?;
        cfg.validate(path, &f)?;
        Ok(cfg)
    }

    /// One of the embedded configs ([`EMBEDDED_CONFIGS`]).
    pub fn embedded(name: &str) -> Result<Self, LoadError> {
        let path = PathBuf::from(format!("<embedded {name}.json>"));
        let text = embedded_json(name).ok_or_else(|| LoadError::Config {
            file: path.clone(),
            field: "<name>".into(),
            message: format!("no embedded config '{name}'; known: {}", EMBEDDED_CONFIGS.join(", ")),
        })?;
        Self::from_json(text, &path)
    }

    /// Main plus MTP blocks (the length of `compress_ratios`).
    pub fn n_blocks(&self) -> usize {
        self.n_layers + self.n_mtp_layers
    }

    /// Compress ratio of block `i` (`i < n_blocks()`; MTP block `k` is `n_layers + k`).
    pub fn layer_ratio(&self, i: usize) -> usize {
        self.compress_ratios[i]
    }

    /// Attention type of block `i` (`i < n_blocks()`).
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        match self.layer_ratio(i) {
            0 => LayerKind::Window,
            4 => LayerKind::Csa,
            _ => LayerKind::Hca,
        }
    }

    /// Whether block `i` routes experts through `tid2eid` (only main blocks `< n_hash_layers`;
    /// MTP blocks never are).
    pub fn is_hash_layer(&self, i: usize) -> bool {
        i < self.n_hash_layers
    }

    /// Checks every invariant the reference or its kernels rely on; see the module docs.
    fn validate(&self, file: &Path, f: &Fields<'_>) -> Result<(), LoadError> {
        let err = |field: &str, message: String| {
            Err(LoadError::Config { file: file.to_path_buf(), field: field.into(), message })
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.dim),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("qk_rope_head_dim", self.rope_head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("sliding_window", self.window_size),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.n_activated_experts),
            ("moe_intermediate_size", self.moe_inter_dim),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("index_topk", self.index_topk),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
        ] {
            if v == 0 {
                return err(key, "must be positive".into());
            }
        }
        for (key, v) in [
            ("rope_theta", self.rope_theta),
            ("compress_rope_theta", self.compress_rope_theta),
            ("rms_norm_eps", self.norm_eps),
            ("routed_scaling_factor", self.route_scale),
            ("rope_scaling.factor", self.rope_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return err(key, format!("must be a positive finite number, found {v}"));
            }
        }
        for (key, v) in [
            ("hc_eps", self.hc_eps),
            ("swiglu_limit", self.swiglu_limit),
            ("rope_scaling.beta_fast", self.beta_fast),
            ("rope_scaling.beta_slow", self.beta_slow),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(key, format!("must be a non-negative finite number, found {v}"));
            }
        }
        if f.usize("num_key_value_heads", 1)? != 1 {
            return err("num_key_value_heads", "V4 attention has exactly one shared K=V head; must be 1".into());
        }
        if self.n_shared_experts != 1 {
            return err(
                "n_shared_experts",
                format!("must be 1 (the reference asserts it), found {}", self.n_shared_experts),
            );
        }
        f.require_str("scoring_func", "sqrtsoftplus")?;
        f.require_str("hidden_act", "silu")?;
        if let Some(q) = f.object("quantization_config")? {
            q.require_str("quant_method", "fp8")?;
            q.require_str("fmt", "e4m3")?;
            q.require_str("scale_fmt", "ue8m0")?;
            q.require_str("activation_scheme", "dynamic")?;
            if let Some(v) = q.obj.get("weight_block_size") {
                if v.as_array().map(|a| a.len() == 2 && a.iter().all(|x| x.as_u64() == Some(128))) != Some(true) {
                    return err(
                        "quantization_config.weight_block_size",
                        format!("unsupported value {v}: must be [128, 128]"),
                    );
                }
            }
        }
        let n_blocks = self.n_blocks();
        if self.compress_ratios.len() != n_blocks {
            return err(
                "compress_ratios",
                format!(
                    "has {} entries but num_hidden_layers + num_nextn_predict_layers = {} + {} = {n_blocks}",
                    self.compress_ratios.len(),
                    self.n_layers,
                    self.n_mtp_layers
                ),
            );
        }
        if let Some((i, r)) = self.compress_ratios.iter().enumerate().find(|(_, &r)| r == 1) {
            return err(
                &format!("compress_ratios[{i}]"),
                format!("ratio {r} is not supported: must be 0 (window only) or at least 2"),
            );
        }
        if !self.n_heads.is_multiple_of(self.o_groups) {
            return err(
                "o_groups",
                format!(
                    "num_attention_heads (n_heads) = {} is not divisible by o_groups = {}",
                    self.n_heads, self.o_groups
                ),
            );
        }
        if !self.rope_head_dim.is_multiple_of(2) || self.rope_head_dim >= self.head_dim {
            return err(
                "qk_rope_head_dim",
                format!("must be even and smaller than head_dim = {}, found {}", self.head_dim, self.rope_head_dim),
            );
        }
        if !(self.head_dim - self.rope_head_dim).is_multiple_of(64) {
            return err(
                "head_dim",
                format!(
                    "head_dim − qk_rope_head_dim = {} must be a multiple of 64 (the FP8 KV simulation blocks)",
                    self.head_dim - self.rope_head_dim
                ),
            );
        }
        let idx = self.index_head_dim;
        if !idx.is_power_of_two() || !idx.is_multiple_of(32) || idx <= self.rope_head_dim {
            return err(
                "index_head_dim",
                format!(
                    "must be a power of two (Hadamard), a multiple of 32 (FP4 blocks) and larger than qk_rope_head_dim = {}, found {idx}",
                    self.rope_head_dim
                ),
            );
        }
        let wo_a_in = self.head_dim * self.n_heads / self.o_groups;
        for (key, what, v) in [
            ("hidden_size", "hidden_size", self.dim),
            ("q_lora_rank", "q_lora_rank", self.q_lora_rank),
            ("o_groups", "head_dim × num_attention_heads / o_groups (input of wo_a)", wo_a_in),
            ("o_lora_rank", "o_lora_rank × o_groups (input of wo_b)", self.o_lora_rank * self.o_groups),
            ("moe_intermediate_size", "moe_intermediate_size", self.moe_inter_dim),
        ] {
            if v % 128 != 0 {
                return err(key, format!("{what} = {v} must be a multiple of 128 (FP8 weights use 128×128 blocks)"));
            }
        }
        if self.n_activated_experts > self.n_routed_experts {
            return err(
                "num_experts_per_tok",
                format!(
                    "{} experts per token but only n_routed_experts = {}",
                    self.n_activated_experts, self.n_routed_experts
                ),
            );
        }
        if self.n_hash_layers > self.n_layers {
            return err(
                "num_hash_layers",
                format!("{} hash layers but only num_hidden_layers = {}", self.n_hash_layers, self.n_layers),
            );
        }
        for (key, v) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if v >= self.vocab_size {
                return err(key, format!("token id {v} is outside the vocabulary of {}", self.vocab_size));
            }
        }
        Ok(())
    }
}

/// Typed access to one JSON object of the config, with errors naming the key.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    /// `"rope_scaling."` etc. for nested objects, so errors name the full key.
    prefix: String,
}

impl<'a> Fields<'a> {
    fn error(&self, key: &str, message: String) -> LoadError {
        LoadError::Config { file: self.file.to_path_buf(), field: format!("{}{key}", self.prefix), message }
    }

    /// The value of `key`, treating JSON `null` as absent.
    fn value(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize, LoadError> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| self.error(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn f32(&self, key: &str, default: f32) -> Result<f32, LoadError> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().map(|x| x as f32).ok_or_else(|| self.error(key, format!("expected a number, found {v}")))
            }
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, LoadError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.error(key, format!("expected a string, found {v}"))),
        }
    }

    /// `key` must be absent or equal to `want` (the only value v4rt implements).
    fn require_str(&self, key: &str, want: &str) -> Result<(), LoadError> {
        match self.str(key)? {
            Some(s) if s != want => {
                Err(self.error(key, format!("unsupported value '{s}': v4rt implements only '{want}'")))
            }
            _ => Ok(()),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, LoadError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_object()
                .map(|obj| Some(Fields { obj, file: self.file, prefix: format!("{}{key}.", self.prefix) }))
                .ok_or_else(|| self.error(key, format!("expected an object, found {v}"))),
        }
    }

    /// Maps the HF keys (spec §2.2) onto `ModelArgs` fields with the §2.1 defaults.
    fn parse(&self) -> Result<ModelConfig, LoadError> {
        let rope = self.object("rope_scaling")?;
        let (rope_factor, original_seq_len, beta_fast, beta_slow) = match &rope {
            Some(r) => {
                let kind = match r.str("type")? {
                    Some(t) => Some(("type", t)),
                    None => r.str("rope_type")?.map(|t| ("rope_type", t)),
                };
                if let Some((key, t)) = kind {
                    if t != "yarn" {
                        return Err(r.error(key, format!("unsupported value '{t}': v4rt implements only 'yarn'")));
                    }
                }
                (
                    r.f32("factor", 40.0)?,
                    r.usize("original_max_position_embeddings", 0)?,
                    r.f32("beta_fast", 32.0)?,
                    r.f32("beta_slow", 1.0)?,
                )
            }
            None => (40.0, 0, 32.0, 1.0),
        };
        let expert_format = match self.str("expert_dtype")? {
            None | Some("fp8") => ExpertFormat::Fp8,
            Some("fp4") => ExpertFormat::Fp4,
            Some(other) => {
                return Err(
                    self.error("expert_dtype", format!("unsupported value '{other}': must be 'fp4', 'fp8' or absent"))
                )
            }
        };
        let compress_ratios = match self.value("compress_ratios") {
            None => DEFAULT_RATIOS.to_vec(),
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    self.error("compress_ratios", format!("expected an array of integers, found {v}"))
                })?;
                arr.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.as_u64().and_then(|r| usize::try_from(r).ok()).ok_or_else(|| {
                            self.error(
                                &format!("compress_ratios[{i}]"),
                                format!("expected a non-negative integer, found {x}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(ModelConfig {
            vocab_size: self.usize("vocab_size", 129280)?,
            dim: self.usize("hidden_size", 4096)?,
            n_layers: self.usize("num_hidden_layers", 7)?,
            n_hash_layers: self.usize("num_hash_layers", 0)?,
            n_mtp_layers: self.usize("num_nextn_predict_layers", 1)?,
            n_heads: self.usize("num_attention_heads", 64)?,
            head_dim: self.usize("head_dim", 512)?,
            rope_head_dim: self.usize("qk_rope_head_dim", 64)?,
            q_lora_rank: self.usize("q_lora_rank", 1024)?,
            o_groups: self.usize("o_groups", 8)?,
            o_lora_rank: self.usize("o_lora_rank", 1024)?,
            window_size: self.usize("sliding_window", 128)?,
            n_routed_experts: self.usize("n_routed_experts", 8)?,
            n_shared_experts: self.usize("n_shared_experts", 1)?,
            n_activated_experts: self.usize("num_experts_per_tok", 2)?,
            moe_inter_dim: self.usize("moe_intermediate_size", 4096)?,
            route_scale: self.f32("routed_scaling_factor", 1.0)?,
            swiglu_limit: self.f32("swiglu_limit", 0.0)?,
            rope_theta: self.f32("rope_theta", 10000.0)?,
            compress_rope_theta: self.f32("compress_rope_theta", 40000.0)?,
            rope_factor,
            original_seq_len,
            beta_fast,
            beta_slow,
            index_n_heads: self.usize("index_n_heads", 64)?,
            index_head_dim: self.usize("index_head_dim", 128)?,
            index_topk: self.usize("index_topk", 512)?,
            hc_mult: self.usize("hc_mult", 4)?,
            hc_sinkhorn_iters: self.usize("hc_sinkhorn_iters", 20)?,
            hc_eps: self.f32("hc_eps", 1e-6)?,
            norm_eps: self.f32("rms_norm_eps", 1e-6)?,
            expert_format,
            compress_ratios,
            bos_token_id: self.usize("bos_token_id", 0)?,
            eos_token_id: self.usize("eos_token_id", 1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_with(from: &str, to: &str) -> Result<ModelConfig, LoadError> {
        let text = embedded_json("tiny-flash").expect("embedded");
        assert!(text.contains(from), "fixture lacks {from}");
        ModelConfig::from_json(&text.replace(from, to), Path::new("cfg.json"))
    }

    fn field_of(r: Result<ModelConfig, LoadError>) -> String {
        match r {
            Err(LoadError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_fixtures_parse() {
        let tiny = ModelConfig::embedded("tiny-flash").unwrap();
        assert_eq!((tiny.dim, tiny.n_layers, tiny.n_heads, tiny.window_size), (256, 4, 4, 16));
        assert_eq!(tiny.layer_kind(1), LayerKind::Csa);
        assert_eq!(tiny.layer_kind(2), LayerKind::Hca);
        assert_eq!(tiny.layer_kind(4), LayerKind::Window);
        assert!(tiny.is_hash_layer(0) && !tiny.is_hash_layer(1));
        assert_eq!(tiny.expert_format, ExpertFormat::Fp4);
        assert_eq!((tiny.rope_factor, tiny.original_seq_len), (16.0, 65536));
        let flash = ModelConfig::embedded("v4-flash").unwrap();
        assert_eq!(flash.compress_ratios.len(), 44);
        let pro = ModelConfig::embedded("v4-pro").unwrap();
        assert_eq!(pro.compress_ratios.len(), 62);
        assert!(ModelConfig::embedded("v5").is_err());
    }

    #[test]
    fn absent_keys_take_model_args_defaults() {
        let cfg = ModelConfig::from_json("{}", Path::new("empty.json")).unwrap();
        assert_eq!(cfg.n_layers, 7);
        assert_eq!(cfg.compress_ratios, DEFAULT_RATIOS.to_vec());
        assert_eq!(cfg.expert_format, ExpertFormat::Fp8);
        assert_eq!((cfg.rope_factor, cfg.original_seq_len, cfg.compress_rope_theta), (40.0, 0, 40000.0));
        assert_eq!((cfg.moe_inter_dim, cfg.n_routed_experts, cfg.n_activated_experts), (4096, 8, 2));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(tiny_with("\"hidden_size\": 256", "\"hidden_size\": \"x\"")), "hidden_size");
        assert_eq!(field_of(tiny_with("\"factor\": 16", "\"factor\": []")), "rope_scaling.factor");
        assert_eq!(field_of(tiny_with("\"type\": \"yarn\"", "\"type\": \"linear\"")), "rope_scaling.type");
        assert_eq!(field_of(tiny_with("[0, 4, 128, 4, 0]", "[0, 4, 1, 4, 0]")), "compress_ratios[2]");
        assert_eq!(field_of(tiny_with("[0, 4, 128, 4, 0]", "[0, 4, -4, 4, 0]")), "compress_ratios[2]");
        assert_eq!(field_of(tiny_with("\"fmt\": \"e4m3\"", "\"fmt\": \"e5m2\"")), "quantization_config.fmt");
        assert_eq!(field_of(tiny_with("\"expert_dtype\": \"fp4\"", "\"expert_dtype\": \"int4\"")), "expert_dtype");
        assert_eq!(field_of(tiny_with("\"o_groups\": 2", "\"o_groups\": 0")), "o_groups");
        assert_eq!(field_of(tiny_with("\"eos_token_id\": 1", "\"eos_token_id\": 5000")), "eos_token_id");
        assert_eq!(field_of(ModelConfig::from_json("[1]", Path::new("x"))), "<document>");
        assert!(tiny_with("\"expert_dtype\": \"fp4\"", "\"expert_dtype\": \"fp8\"").is_ok());
        assert!(tiny_with("\"expert_dtype\": \"fp4\"", "\"expert_dtype\": null").is_ok());
    }
}
