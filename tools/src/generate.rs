//! `v4rt generate`: prefill a prompt, then decode token by token, reporting speed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use model::forward::{Chunk, ForwardOptions, LogitsAt};
use model::sample::{sample, Rng};

use crate::backends;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors). Default: the embedded tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,17,42,99,7,311,5,64")]
    prompt_tokens: Vec<u32>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend to run on.
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
    /// Stop at this token id (default: the config's eos_token_id).
    #[arg(long)]
    eos: Option<u32>,
    /// KV cache entry dtype: `bf16` (the reference's layout) or `f32`. Default: bf16 where the
    /// backend runs the cache ops with it.
    #[arg(long)]
    kv_dtype: Option<String>,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let backend = backends::backend(&a.backend)?;
    let t0 = Instant::now();
    let model = backends::load_model(a.model.as_deref(), backend)?;
    let load_s = t0.elapsed().as_secs_f64();
    if a.prompt_tokens.is_empty() {
        anyhow::bail!("--prompt-tokens: at least one token is needed");
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        anyhow::bail!("--temperature {}: must be finite and ≥ 0 (0 = greedy)", a.temperature);
    }
    let capacity = a.prompt_tokens.len() + a.max_new;
    let kv_dtype = backends::kv_dtype(a.kv_dtype.as_deref(), &model)?;
    let mut cache = model.new_cache_with(1, capacity, kv_dtype).context("allocating the KV cache")?;
    let slot = cache.alloc_slot(model.backend())?;
    let eos = a.eos.unwrap_or(model.cfg.eos_token_id as u32);
    let opts = ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None };
    let mut rng = Rng::new(a.seed);
    println!(
        "model: {} ({} layers, dim {}, {} experts) on {}; loaded in {load_s:.2} s",
        a.model.as_ref().map_or("embedded tiny-flash (random weights)".to_string(), |p| p.display().to_string()),
        model.cfg.n_layers,
        model.cfg.dim,
        model.cfg.n_routed_experts,
        model.backend().info().device
    );
    println!("prompt: {:?}; KV cache: {kv_dtype} entries; temperature {}", a.prompt_tokens, a.temperature);

    let t = Instant::now();
    let out = model.forward(&mut cache, &[Chunk { slot, tokens: &a.prompt_tokens }], &opts)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let first = sample(&out.logits, a.temperature, &mut rng) as u32;
    let mut generated = vec![first];
    let t = Instant::now();
    // One decode step, recorded once and replayed where the backend records (CUDA graphs). It
    // picks its own next token (on the device where the backend samples) and feeds it to the
    // step after, which is queued before the host reads the token.
    let mut step = model.decode_step(&cache, &[slot])?.with_sampling(a.temperature, &[rng])?;
    let steps = if first == eos { 0 } else { a.max_new.saturating_sub(1) };
    step.run_chained(&mut cache, &[first], steps, |t| {
        generated.push(t[0]);
        t[0] != eos
    })?;
    let decode_s = t.elapsed().as_secs_f64();
    let decoded = generated.len() - 1;
    println!("generated: {generated:?}");
    println!(
        "prefill: {} tokens in {:.1} ms ({:.1} tokens/s); decode: {decoded} tokens in {:.1} ms ({:.1} tokens/s)",
        a.prompt_tokens.len(),
        prefill_s * 1e3,
        a.prompt_tokens.len() as f64 / prefill_s,
        decode_s * 1e3,
        if decoded > 0 { decoded as f64 / decode_s } else { 0.0 }
    );
    Ok(())
}
