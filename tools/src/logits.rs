//! `v4rt logits`: the parity tool. One batched prefill of the first P tokens of every
//! sequence, then one-token decode steps for P..T−1 (all sequences per step), logits written
//! as `[B, T, V]` f32 — the protocol of DeepSeek's reference goldens.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use hal::DType;
use model::forward::{Chunk, ForwardOptions, LayerDecisions, LogitsAt};
use model::safetensors::{self, SafeTensors, WriteTensor};

use crate::backends;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file holding `tokens`, I64 (or I32) [B, T].
    #[arg(long)]
    tokens: PathBuf,
    /// Tokens of every sequence processed by the one prefill call (1 ≤ P ≤ T).
    #[arg(long)]
    prefill: usize,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
    /// Also write each layer's routed experts, their weights and the indexer's selections:
    /// `layer{i}_experts` I32 [B, T, k], `layer{i}_expert_weights` F32 [B, T, k],
    /// `layer{i}_topk` I32 [B, T, index_topk] (CSA layers; −1 = none).
    #[arg(long)]
    decisions: bool,
    /// Also write `mtp_logits` [B, P, V]: MTP block 0 run on the prefill's final streams with
    /// input ids = the next tokens (tokens shifted left by one, last id 0).
    #[arg(long)]
    mtp: bool,
    /// KV cache entry dtype: `f32` (default: the reference's float32 mode, which its goldens
    /// use) or `bf16` (the reference's bf16-mode layout).
    #[arg(long, default_value = "f32")]
    kv_dtype: String,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let file = SafeTensors::open(&a.tokens)?;
    let info = file.info("tokens").with_context(|| format!("{}: no tensor named 'tokens'", a.tokens.display()))?;
    if info.shape.len() != 2 {
        bail!("{}: 'tokens' must be [B, T], found shape {:?}", a.tokens.display(), info.shape);
    }
    let (b, t) = (info.shape[0], info.shape[1]);
    let raw = file.i64("tokens")?;
    let tokens: Vec<u32> = raw
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            u32::try_from(v).map_err(|_| {
                anyhow::anyhow!("{}: tokens[{}, {}] = {v} is negative or too large", a.tokens.display(), k / t, k % t)
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if a.prefill == 0 || a.prefill > t {
        bail!("--prefill {} must be between 1 and the sequence length {t}", a.prefill);
    }
    let p = a.prefill;
    let model = backends::load_model(Some(&a.model), backends::backend(&a.backend)?)?;
    let v = model.cfg.vocab_size;
    let mut cache = model.new_cache_with(b, t, backends::kv_dtype(Some(&a.kv_dtype), &model)?)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(model.backend())).collect::<Result<_, _>>()?;

    let mut logits = vec![0f32; b * t * v];
    let mut decisions: Vec<Vec<LayerDecisions>> = Vec::new(); // per call, per layer
    let mtp_ids: Vec<u32> = (0..b)
        .flat_map(|s| (0..p).map(move |i| (s, i)))
        .map(|(s, i)| if i + 1 < t { tokens[s * t + i + 1] } else { 0 })
        .collect();

    // Prefill: one call, every sequence's first P tokens.
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &tokens[s * t..s * t + p] }).collect();
    let opts = ForwardOptions { logits: LogitsAt::All, decisions: a.decisions, mtp_ids: a.mtp.then_some(&mtp_ids[..]) };
    let out = model.forward(&mut cache, &chunks, &opts)?;
    for s in 0..b {
        logits[s * t * v..(s * t + p) * v].copy_from_slice(&out.logits[s * p * v..(s + 1) * p * v]);
    }
    let mtp_logits = out.mtp_logits;
    decisions.push(out.decisions.into_iter().take(model.cfg.n_layers).collect());

    // Decode: one token per sequence per call.
    let opts = ForwardOptions { logits: LogitsAt::All, decisions: a.decisions, mtp_ids: None };
    for pos in p..t {
        let chunks: Vec<Chunk> =
            slots.iter().map(|&s| Chunk { slot: s, tokens: &tokens[s * t + pos..s * t + pos + 1] }).collect();
        let out = model.forward(&mut cache, &chunks, &opts)?;
        for s in 0..b {
            logits[(s * t + pos) * v..(s * t + pos + 1) * v].copy_from_slice(&out.logits[s * v..(s + 1) * v]);
        }
        decisions.push(out.decisions);
    }

    let mut owned: Vec<(String, DType, Vec<usize>, Vec<u8>)> =
        vec![("logits".into(), DType::F32, vec![b, t, v], hal::dtype::f32_bytes(&logits))];
    if let Some(m) = mtp_logits {
        owned.push(("mtp_logits".into(), DType::F32, vec![b, p, v], hal::dtype::f32_bytes(&m)));
    }
    if a.decisions {
        for layer in 0..model.cfg.n_layers {
            let k = model.cfg.n_activated_experts;
            let (experts, weights) = (
                gather(&decisions, layer, b, p, t, k, |d| &d.experts),
                gather(&decisions, layer, b, p, t, k, |d| &d.expert_weights),
            );
            owned.push((format!("layer{layer}_experts"), DType::I32, vec![b, t, k], hal::dtype::i32_bytes(&experts)));
            owned.push((
                format!("layer{layer}_expert_weights"),
                DType::F32,
                vec![b, t, k],
                hal::dtype::f32_bytes(&weights),
            ));
            if decisions[0][layer].topk.is_some() {
                let kk = model.cfg.index_topk;
                let topk = gather(&decisions, layer, b, p, t, kk, |d| d.topk.as_deref().unwrap_or(&[]));
                owned.push((format!("layer{layer}_topk"), DType::I32, vec![b, t, kk], hal::dtype::i32_bytes(&topk)));
            }
        }
    }
    let tensors: Vec<WriteTensor> = owned
        .iter()
        .map(|(n, d, s, bytes)| WriteTensor { name: n, dtype: *d, shape: s.clone(), data: bytes })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("prefill".to_string(), p.to_string());
    meta.insert("backend".to_string(), model.backend().info().name.to_string());
    safetensors::write(&a.out, &tensors, &meta)?;
    println!(
        "wrote {} ([{b}, {t}, {v}] logits; prefill {p}, {} decode steps) on {}",
        a.out.display(),
        t - p,
        model.backend().info().device
    );
    Ok(())
}

/// Reassembles one layer's per-row decision values `[B, T, k]` from the prefill call (rows
/// ordered sequence-major, P each) and the decode calls (one row per sequence each).
fn gather<T: Copy + Default>(
    calls: &[Vec<LayerDecisions>],
    layer: usize,
    b: usize,
    p: usize,
    t: usize,
    k: usize,
    field: impl Fn(&LayerDecisions) -> &[T],
) -> Vec<T> {
    let mut out = vec![T::default(); b * t * k];
    let prefill = field(&calls[0][layer]);
    for s in 0..b {
        out[s * t * k..(s * t + p) * k].copy_from_slice(&prefill[s * p * k..(s + 1) * p * k]);
    }
    for (step, call) in calls[1..].iter().enumerate() {
        let vals = field(&call[layer]);
        for s in 0..b {
            let pos = p + step;
            out[(s * t + pos) * k..(s * t + pos + 1) * k].copy_from_slice(&vals[s * k..(s + 1) * k]);
        }
    }
    out
}
