//! A DeepSeek-V4 checkpoint: the named tensors of a directory of safetensors shards (or of an
//! in-memory set), checked against the complete tensor list the config implies.
//!
//! * [`Checkpoint::open`] reads `model.safetensors.index.json` (HF sharded layout) or a single
//!   `model.safetensors`, and cross-checks index and shards in both directions.
//! * [`expected_tensors`] is spec §5.2 as code: every name, dtype and shape a config implies (no
//!   `model.` prefix; `layers.{i}.` and `mtp.{k}.` blocks).
//! * [`Checkpoint::validate`] compares the two, so a checkpoint that loads is known to be complete
//!   and exact before any byte is used; [`Checkpoint::get`] re-checks each access.
//! * [`param_counts`] derives the parameter counts of spec §2.3 from the same list.
//!
//! Every error names the file and the tensor at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hal::DType;

use crate::config::{ExpertFormat, ModelConfig};
use crate::error::LoadError;
use crate::safetensors::SafeTensors;

/// The HF index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// What errors name as the "file" of an in-memory checkpoint.
const IN_MEMORY: &str = "<in-memory checkpoint>";

/// A tensor held in memory (synthetic checkpoints, tests).
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian bytes, `shape.product() × dtype.size()` of them.
    pub data: Vec<u8>,
}

/// One entry of the tensor list a config implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    /// As stored in the file: packed FP4 experts are `I8`.
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Where a tensor's bytes live.
#[derive(Clone, Copy, Debug)]
enum Location {
    Shard(usize),
    Owned(usize),
}

/// The tensors of one checkpoint, by name.
pub struct Checkpoint {
    /// The directory (or the in-memory marker), for messages.
    origin: PathBuf,
    /// The index file when the checkpoint is sharded.
    index: Option<PathBuf>,
    shards: Vec<SafeTensors>,
    owned: Vec<OwnedTensor>,
    entries: BTreeMap<String, Location>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: every shard named by `model.safetensors.index.json`, or
    /// else `model.safetensors`.
    ///
    /// Errors: a shard the index names that does not exist, a tensor the index maps to a shard
    /// that does not hold it, a tensor a shard holds that the index does not map to it, and any
    /// malformed index or safetensors file.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_indexed(dir, index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(LoadError::Index {
                file: dir.to_path_buf(),
                message: format!("no checkpoint here: neither {INDEX_FILE} nor {SINGLE_FILE} exists"),
            });
        }
        let shard = SafeTensors::open(&single)?;
        let entries = shard.names().map(|n| (n.to_string(), Location::Shard(0))).collect();
        Ok(Checkpoint { origin: dir.to_path_buf(), index: None, shards: vec![shard], owned: Vec::new(), entries })
    }

    fn open_indexed(dir: &Path, index_path: PathBuf) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Index { file: index_path.clone(), message };
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| LoadError::Io { file: index_path.clone(), err: e })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map =
            json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no 'weight_map' object".into()))?;
        // shard file name → tensor names mapped to it
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map entry for tensor '{name}' is {file}, not a file name")))?;
            by_shard.entry(file).or_default().push(name);
        }
        let mut shards = Vec::with_capacity(by_shard.len());
        let mut entries = BTreeMap::new();
        for (file, names) in by_shard {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(LoadError::Tensor {
                    file: path,
                    tensor: names[0].to_string(),
                    message: format!(
                        "{INDEX_FILE} maps this tensor{} to this shard, but the file does not exist",
                        match names.len() {
                            1 => String::new(),
                            n => format!(" and {} others", n - 1),
                        }
                    ),
                });
            }
            let shard = SafeTensors::open(&path)?;
            for name in &names {
                if shard.info(name).is_none() {
                    return Err(LoadError::Tensor {
                        file: path,
                        tensor: name.to_string(),
                        message: format!(
                            "{INDEX_FILE} maps this tensor to this shard, but the shard does not contain it"
                        ),
                    });
                }
            }
            let listed: BTreeSet<&str> = names.iter().copied().collect();
            if let Some(extra) = shard.names().find(|n| !listed.contains(n)) {
                return Err(LoadError::Tensor {
                    file: path,
                    tensor: extra.to_string(),
                    message: format!("the shard holds this tensor, but {INDEX_FILE} does not map it to this shard"),
                });
            }
            for name in names {
                entries.insert(name.to_string(), Location::Shard(shards.len()));
            }
            shards.push(shard);
        }
        Ok(Checkpoint { origin: dir.to_path_buf(), index: Some(index_path), shards, owned: Vec::new(), entries })
    }

    /// A checkpoint over tensors already in memory. Errors on a duplicate name or a byte count
    /// that does not match dtype × shape.
    pub fn from_tensors(tensors: Vec<OwnedTensor>) -> Result<Self, LoadError> {
        let mut seen = BTreeSet::new();
        for t in &tensors {
            let bad = |message: String| LoadError::Tensor { file: IN_MEMORY.into(), tensor: t.name.clone(), message };
            let want = t.shape.iter().product::<usize>() * t.dtype.size();
            if t.data.len() != want {
                return Err(bad(format!(
                    "{} bytes given for {} {:?} ({want} expected)",
                    t.data.len(),
                    t.dtype.safetensors_name(),
                    t.shape
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(bad("given twice".into()));
            }
        }
        Ok(Self::from_owned(tensors))
    }

    /// In-memory tensors that are consistent by construction (unique names, sizes from their
    /// shapes), as [`crate::synthetic::generate`] builds them.
    pub(crate) fn from_owned(tensors: Vec<OwnedTensor>) -> Self {
        let entries = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), Location::Owned(i))).collect();
        Checkpoint { origin: IN_MEMORY.into(), index: None, shards: Vec::new(), owned: tensors, entries }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().map(String::as_str)
    }

    /// The safetensors files behind the checkpoint (none when in memory).
    pub fn files(&self) -> impl Iterator<Item = &Path> + '_ {
        self.shards.iter().map(SafeTensors::path)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint holds no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stored dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<(DType, &[usize])> {
        match *self.entries.get(name)? {
            Location::Shard(s) => self.shards[s].info(name).map(|i| (i.dtype, i.shape.as_slice())),
            Location::Owned(i) => Some((self.owned[i].dtype, self.owned[i].shape.as_slice())),
        }
    }

    /// The bytes of `name`, which must have exactly `dtype` and `shape`.
    pub fn get(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<&[u8], LoadError> {
        let want = describe(dtype, shape);
        let Some((found_dtype, found_shape)) = self.info(name) else {
            return Err(LoadError::Tensor {
                file: self.source_of(name),
                tensor: name.into(),
                message: format!("missing from the checkpoint (expected {want})"),
            });
        };
        if found_dtype != dtype || found_shape != shape {
            return Err(LoadError::Tensor {
                file: self.source_of(name),
                tensor: name.into(),
                message: format!("expected {want}, found {}", describe(found_dtype, found_shape)),
            });
        }
        self.raw(name)
    }

    /// The bytes of `name` whatever its dtype and shape (copying, inspecting).
    pub fn raw(&self, name: &str) -> Result<&[u8], LoadError> {
        match self.entries.get(name) {
            Some(Location::Shard(s)) => self.shards[*s].bytes(name),
            Some(Location::Owned(i)) => Ok(&self.owned[*i].data),
            None => Err(LoadError::Tensor {
                file: self.source_of(name),
                tensor: name.into(),
                message: "missing from the checkpoint".into(),
            }),
        }
    }

    /// The file holding `name`, for messages. For a tensor that is absent, the file that should
    /// hold it: the shard with the other tensors of its block, else the index (or single file).
    pub fn source_of(&self, name: &str) -> PathBuf {
        let shard_path = |loc: &Location| match *loc {
            Location::Shard(s) => self.shards[s].path().to_path_buf(),
            Location::Owned(_) => self.origin.clone(),
        };
        if let Some(loc) = self.entries.get(name) {
            return shard_path(loc);
        }
        if let Some(prefix) = block_prefix(name) {
            if let Some((_, loc)) =
                self.entries.range(prefix.to_string()..).next().filter(|(n, _)| n.starts_with(prefix))
            {
                return shard_path(loc);
            }
        }
        match (&self.index, self.shards.first()) {
            (Some(index), _) => index.clone(),
            (None, Some(single)) => single.path().to_path_buf(),
            (None, None) => self.origin.clone(),
        }
    }

    /// Sum of all tensor data in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.names()
            .filter_map(|n| self.info(n))
            .map(|(dt, shape)| (shape.iter().product::<usize>() * dt.size()) as u64)
            .sum()
    }

    /// Checks that the checkpoint holds exactly [`expected_tensors`]`(cfg)`: each with its dtype
    /// and shape, and nothing else. The error names the first offending tensor and its file, and
    /// says how many more problems of the same kind there are.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), LoadError> {
        let expected = expected_tensors(cfg);
        let mut missing = Vec::new();
        for e in &expected {
            match self.info(&e.name) {
                None => missing.push(e),
                Some((dt, shape)) if dt != e.dtype || shape != e.shape.as_slice() => {
                    return Err(LoadError::Tensor {
                        file: self.source_of(&e.name),
                        tensor: e.name.clone(),
                        message: format!(
                            "expected {} for this config, found {}",
                            describe(e.dtype, &e.shape),
                            describe(dt, shape)
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        if let Some(first) = missing.first() {
            return Err(LoadError::Tensor {
                file: self.source_of(&first.name),
                tensor: first.name.clone(),
                message: format!(
                    "missing from the checkpoint (expected {}){}",
                    describe(first.dtype, &first.shape),
                    match missing.len() {
                        1 => String::new(),
                        n => format!("; {} more expected tensors are missing", n - 1),
                    }
                ),
            });
        }
        let names: BTreeSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        let unexpected: Vec<&str> = self.names().filter(|n| !names.contains(n)).collect();
        if let Some(first) = unexpected.first() {
            return Err(LoadError::Tensor {
                file: self.source_of(first),
                tensor: first.to_string(),
                message: format!(
                    "present in the checkpoint but not expected for this config ({}){}",
                    block_context(cfg, first),
                    match unexpected.len() {
                        1 => String::new(),
                        n => format!("; {} more unexpected tensors", n - 1),
                    }
                ),
            });
        }
        Ok(())
    }
}

/// `"F8_E4M3 [512, 256]"`: dtypes as safetensors spells them, since that is what files show.
fn describe(dtype: DType, shape: &[usize]) -> String {
    format!("{} {shape:?}", dtype.safetensors_name())
}

/// `"layers.12."` / `"mtp.0."` for a block tensor, `None` for a global one.
fn block_prefix(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("layers.").or_else(|| name.strip_prefix("mtp."))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0 && rest.as_bytes().get(digits) == Some(&b'.')).then(|| &name[..name.len() - rest.len() + digits + 1])
}

/// What the config says about the block of `name`, to explain why a tensor is unexpected.
fn block_context(cfg: &ModelConfig, name: &str) -> String {
    let parsed = block_prefix(name).and_then(|p| {
        let (kind, num) = p.trim_end_matches('.').split_once('.')?;
        Some((kind == "mtp", num.parse::<usize>().ok()?))
    });
    match parsed {
        Some((false, i)) if i >= cfg.n_layers => format!("the config has {} layers", cfg.n_layers),
        Some((true, k)) if k >= cfg.n_mtp_layers => format!("the config has {} MTP blocks", cfg.n_mtp_layers),
        Some((mtp, i)) => {
            let b = if mtp { cfg.n_layers + i } else { i };
            format!(
                "this block has compress ratio {} ({}), {} routing, {} routed experts",
                cfg.layer_ratio(b),
                cfg.layer_kind(b).label(),
                if cfg.is_hash_layer(b) { "hash" } else { "score" },
                cfg.n_routed_experts
            )
        }
        None => "not a global tensor of DeepSeek-V4".into(),
    }
}

/// Appends the tensors of an e4m3 linear: weight `[out, in]` and its 128×128 block scales.
fn push_fp8(v: &mut Vec<ExpectedTensor>, prefix: &str, out: usize, inp: usize) {
    push(v, format!("{prefix}.weight"), DType::F8E4M3, &[out, inp]);
    push(v, format!("{prefix}.scale"), DType::F8E8M0, &[out.div_ceil(128), inp.div_ceil(128)]);
}

fn push(v: &mut Vec<ExpectedTensor>, name: String, dtype: DType, shape: &[usize]) {
    v.push(ExpectedTensor { name, dtype, shape: shape.to_vec() });
}

/// The compressor of a block or of its indexer (spec §3.5): width `width`, ratio `ratio`.
fn push_compressor(v: &mut Vec<ExpectedTensor>, prefix: &str, dim: usize, ratio: usize, width: usize) {
    let coff = if ratio == 4 { 2 } else { 1 };
    push(v, format!("{prefix}.ape"), DType::F32, &[ratio, coff * width]);
    push(v, format!("{prefix}.wkv.weight"), DType::BF16, &[coff * width, dim]);
    push(v, format!("{prefix}.wgate.weight"), DType::BF16, &[coff * width, dim]);
    push(v, format!("{prefix}.norm.weight"), DType::BF16, &[width]);
}

/// The tensors of block `b` (main layer, or MTP block `b − n_layers`) under `p` (`"layers.3."`).
fn push_block(v: &mut Vec<ExpectedTensor>, cfg: &ModelConfig, b: usize, p: &str) {
    let (d, h, hd, n) = (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.hc_mult);
    let mix = (2 + n) * n;
    push(v, format!("{p}attn_norm.weight"), DType::BF16, &[d]);
    push(v, format!("{p}ffn_norm.weight"), DType::BF16, &[d]);
    for site in ["attn", "ffn"] {
        push(v, format!("{p}hc_{site}_fn"), DType::F32, &[mix, n * d]);
        push(v, format!("{p}hc_{site}_base"), DType::F32, &[mix]);
        push(v, format!("{p}hc_{site}_scale"), DType::F32, &[3]);
    }
    push(v, format!("{p}attn.attn_sink"), DType::F32, &[h]);
    push_fp8(v, &format!("{p}attn.wq_a"), cfg.q_lora_rank, d);
    push(v, format!("{p}attn.q_norm.weight"), DType::BF16, &[cfg.q_lora_rank]);
    push_fp8(v, &format!("{p}attn.wq_b"), h * hd, cfg.q_lora_rank);
    push_fp8(v, &format!("{p}attn.wkv"), hd, d);
    push(v, format!("{p}attn.kv_norm.weight"), DType::BF16, &[hd]);
    push_fp8(v, &format!("{p}attn.wo_a"), cfg.o_groups * cfg.o_lora_rank, h * hd / cfg.o_groups);
    push_fp8(v, &format!("{p}attn.wo_b"), d, cfg.o_groups * cfg.o_lora_rank);
    let ratio = cfg.layer_ratio(b);
    if ratio > 0 {
        push_compressor(v, &format!("{p}attn.compressor"), d, ratio, hd);
    }
    if ratio == 4 {
        let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
        push_fp8(v, &format!("{p}attn.indexer.wq_b"), ih * id, cfg.q_lora_rank);
        push(v, format!("{p}attn.indexer.weights_proj.weight"), DType::BF16, &[ih, d]);
        push_compressor(v, &format!("{p}attn.indexer.compressor"), d, ratio, id);
    }
    let (e_count, inter) = (cfg.n_routed_experts, cfg.moe_inter_dim);
    push(v, format!("{p}ffn.gate.weight"), DType::BF16, &[e_count, d]);
    if cfg.is_hash_layer(b) {
        push(v, format!("{p}ffn.gate.tid2eid"), DType::I64, &[cfg.vocab_size, cfg.n_activated_experts]);
    } else {
        push(v, format!("{p}ffn.gate.bias"), DType::F32, &[e_count]);
    }
    for e in 0..e_count {
        for (w, out, inp) in [("w1", inter, d), ("w2", d, inter), ("w3", inter, d)] {
            let prefix = format!("{p}ffn.experts.{e}.{w}");
            match cfg.expert_format {
                ExpertFormat::Fp4 => {
                    push(v, format!("{prefix}.weight"), DType::I8, &[out, inp / 2]);
                    push(v, format!("{prefix}.scale"), DType::F8E8M0, &[out, inp / 32]);
                }
                ExpertFormat::Fp8 => push_fp8(v, &prefix, out, inp),
            }
        }
    }
    for (w, out, inp) in [("w1", inter, d), ("w2", d, inter), ("w3", inter, d)] {
        push_fp8(v, &format!("{p}ffn.shared_experts.{w}"), out, inp);
    }
}

/// `hc_head_{fn,base,scale}` under `p` (`""` for the model, `"mtp.0."` for an MTP block).
fn push_hc_head(v: &mut Vec<ExpectedTensor>, cfg: &ModelConfig, p: &str) {
    let n = cfg.hc_mult;
    push(v, format!("{p}hc_head_fn"), DType::F32, &[n, n * cfg.dim]);
    push(v, format!("{p}hc_head_base"), DType::F32, &[n]);
    push(v, format!("{p}hc_head_scale"), DType::F32, &[1]);
}

/// Every tensor a checkpoint for `cfg` must hold, per spec §5.2: globals, then `layers.{i}.*`,
/// then `mtp.{k}.*` (whose embedding and head are shared with the main model, so absent).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let mut v = Vec::new();
    let (vocab, d) = (cfg.vocab_size, cfg.dim);
    push(&mut v, "embed.weight".into(), DType::BF16, &[vocab, d]);
    push(&mut v, "head.weight".into(), DType::BF16, &[vocab, d]);
    push(&mut v, "norm.weight".into(), DType::BF16, &[d]);
    push_hc_head(&mut v, cfg, "");
    for i in 0..cfg.n_layers {
        push_block(&mut v, cfg, i, &format!("layers.{i}."));
    }
    for k in 0..cfg.n_mtp_layers {
        let p = format!("mtp.{k}.");
        push_block(&mut v, cfg, cfg.n_layers + k, &p);
        push_fp8(&mut v, &format!("{p}e_proj"), d, d);
        push_fp8(&mut v, &format!("{p}h_proj"), d, d);
        for norm in ["enorm", "hnorm", "norm"] {
            push(&mut v, format!("{p}{norm}.weight"), DType::BF16, &[d]);
        }
        push_hc_head(&mut v, cfg, &p);
    }
    v
}

/// Parameter counts of spec §2.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// Everything outside `mtp.*` (embedding and head included).
    pub total_main: u64,
    /// The routed experts of the main layers (part of `total_main`).
    pub routed_experts: u64,
    /// Parameters one token touches in the main model: all but the routed experts, plus
    /// `n_activated_experts` of them per layer (embedding and head included).
    pub active_per_token: u64,
    /// The MTP blocks, their routed experts included (embedding and head are shared, so not here).
    pub mtp: u64,
}

/// Counts parameters as elements of [`expected_tensors`]: a packed FP4 byte is 2 parameters;
/// quantization scales (`F8_E8M0`) and the `tid2eid` routing tables are not parameters.
pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let (mut total_main, mut routed, mut mtp) = (0u64, 0u64, 0u64);
    for t in expected_tensors(cfg) {
        let per_element = match t.dtype {
            DType::F8E8M0 | DType::I64 => continue,
            DType::I8 | DType::F4E2M1x2 => 2,
            _ => 1,
        };
        let n = t.shape.iter().product::<usize>() as u64 * per_element;
        if t.name.starts_with("mtp.") {
            mtp += n;
        } else {
            total_main += n;
            if t.name.contains(".ffn.experts.") {
                routed += n;
            }
        }
    }
    let active_routed = routed / cfg.n_routed_experts as u64 * cfg.n_activated_experts as u64;
    ParamCounts { total_main, routed_experts: routed, active_per_token: total_main - routed + active_routed, mtp }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/tiny-flash")
    }

    fn billions(x: u64) -> String {
        format!("{:.2}", x as f64 / 1e9)
    }

    #[test]
    fn pro_counts_match_the_spec() {
        let cfg = ModelConfig::embedded("v4-pro").unwrap();
        let list = expected_tensors(&cfg);
        assert_eq!(list.len(), 145_116);
        let census = |dt: DType| list.iter().filter(|t| t.dtype == dt).count();
        assert_eq!(
            [
                census(DType::I8),
                census(DType::F8E8M0),
                census(DType::F8E4M3),
                census(DType::BF16),
                census(DType::F32),
                census(DType::I64)
            ],
            [71_424, 71_952, 528, 619, 590, 3]
        );
        let p = param_counts(&cfg);
        assert_eq!(p.total_main, 1_572_997_201_763);
        assert_eq!(billions(p.routed_experts), "1547.40");
        assert_eq!(billions(p.active_per_token), "49.78");
        assert_eq!(billions(p.active_per_token - (cfg.vocab_size * cfg.dim) as u64), "48.85");
        assert_eq!(billions(p.mtp), "25.84");
    }

    #[test]
    fn flash_counts_match_the_spec() {
        let cfg = ModelConfig::embedded("v4-flash").unwrap();
        assert_eq!(expected_tensors(&cfg).len(), 69_187);
        let p = param_counts(&cfg);
        assert_eq!(billions(p.total_main), "284.33");
        assert_eq!(billions(p.routed_experts), "277.03");
        assert_eq!(billions(p.active_per_token), "13.80");
        assert_eq!(billions(p.active_per_token - (cfg.vocab_size * cfg.dim) as u64), "13.27");
        assert_eq!(billions(p.mtp), "6.61");
    }

    #[test]
    fn tiny_flash_golden_checkpoint_is_exactly_the_expected_list() {
        let dir = golden_dir();
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        ck.validate(&cfg).unwrap();
        let expected = expected_tensors(&cfg);
        assert_eq!(expected.len(), 427);
        assert_eq!(ck.len(), 427);
        for e in &expected {
            assert_eq!(ck.info(&e.name), Some((e.dtype, e.shape.as_slice())), "{}", e.name);
        }
        assert_eq!(ck.total_bytes(), 16_371_396);
        assert!(ck.source_of("layers.0.attn.wq_a.weight").ends_with("model-00001-of-00002.safetensors"));
        assert!(ck.source_of("mtp.0.absent").ends_with("model-00002-of-00002.safetensors"));
        assert!(ck.source_of("absent").ends_with(INDEX_FILE));
    }

    #[test]
    fn get_checks_dtype_and_shape() {
        let ck = Checkpoint::from_tensors(vec![OwnedTensor {
            name: "norm.weight".into(),
            dtype: DType::BF16,
            shape: vec![4],
            data: vec![0; 8],
        }])
        .unwrap();
        assert_eq!(ck.get("norm.weight", DType::BF16, &[4]).unwrap().len(), 8);
        let e = ck.get("norm.weight", DType::F32, &[4]).unwrap_err().to_string();
        assert!(e.contains("norm.weight") && e.contains("expected F32 [4], found BF16 [4]"), "{e}");
        let e = ck.get("head.weight", DType::BF16, &[4]).unwrap_err().to_string();
        assert!(e.contains("head.weight") && e.contains("missing"), "{e}");
        let dup = vec![
            OwnedTensor { name: "a".into(), dtype: DType::U8, shape: vec![1], data: vec![0] },
            OwnedTensor { name: "a".into(), dtype: DType::U8, shape: vec![1], data: vec![0] },
        ];
        assert!(Checkpoint::from_tensors(dup).is_err());
        let short = vec![OwnedTensor { name: "a".into(), dtype: DType::F32, shape: vec![2], data: vec![0; 4] }];
        assert!(Checkpoint::from_tensors(short).is_err());
    }

    #[test]
    fn block_prefixes() {
        assert_eq!(block_prefix("layers.12.attn.wq_a.weight"), Some("layers.12."));
        assert_eq!(block_prefix("mtp.0.norm.weight"), Some("mtp.0."));
        assert_eq!(block_prefix("layers.x.y"), None);
        assert_eq!(block_prefix("layers.3"), None);
        assert_eq!(block_prefix("norm.weight"), None);
    }
}
