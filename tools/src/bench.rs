//! `v4rt bench`: prefill and decode throughput on one backend, measured in one run.

use std::path::PathBuf;
use std::time::Instant;

use model::forward::{Chunk, ForwardOptions, LogitsAt};
use model::sample::argmax;

use crate::backends;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory. Default: the embedded tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length per sequence.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 256)]
    decode: usize,
    /// Independent sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let model = backends::load_model(a.model.as_deref(), backends::backend(&a.backend)?)?;
    let (b, v) = (a.batch.max(1), model.cfg.vocab_size as u32);
    let mut cache = model.new_cache(b, a.prompt + a.decode + 1)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(model.backend())).collect::<Result<_, _>>()?;
    // A fixed pseudo-random prompt (the speed of this model does not depend on the ids).
    let prompts: Vec<Vec<u32>> = (0..b).map(|s| (0..a.prompt).map(|i| ((i * 7919 + s * 104_729) as u32) % v).collect()).collect();
    let opts = ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None };

    // Warm-up on a scratch cache: backends prepare weights on first use (cpu-ref decodes each
    // FP8/FP4 matrix once), which is load time, not prefill time.
    let load = Instant::now();
    let mut scratch = model.new_cache(1, 1)?;
    let s0 = scratch.alloc_slot(model.backend())?;
    model.forward(&mut scratch, &[Chunk { slot: s0, tokens: &[0] }], &opts)?;
    model.backend().synchronize()?;
    let warmup_s = load.elapsed().as_secs_f64();
    drop(scratch);

    let t = Instant::now();
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &prompts[s] }).collect();
    let out = model.forward(&mut cache, &chunks, &opts)?;
    model.backend().synchronize()?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next: Vec<u32> = out.logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();

    let mut step_ms = Vec::with_capacity(a.decode);
    for _ in 0..a.decode {
        let t = Instant::now();
        let chunks: Vec<Chunk> = slots.iter().zip(&next).map(|(&s, tok)| Chunk { slot: s, tokens: std::slice::from_ref(tok) }).collect();
        let out = model.forward(&mut cache, &chunks, &opts)?;
        next = out.logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total_decode_s: f64 = step_ms.iter().sum::<f64>() / 1e3;
    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    println!("backend: {}", model.backend().info().device);
    println!("warm-up (first forward, weight preparation): {:.1} ms", warmup_s * 1e3);
    println!("model: {} layers, dim {}, vocab {}", model.cfg.n_layers, model.cfg.dim, model.cfg.vocab_size);
    println!("prefill: {b} × {} tokens in {:.1} ms = {:.0} tokens/s", a.prompt, prefill_s * 1e3, (b * a.prompt) as f64 / prefill_s);
    println!(
        "decode: {} steps × batch {b}: median step {median:.3} ms, {:.1} tokens/s (all steps), {:.1} tokens/s (median)",
        a.decode, (a.decode * b) as f64 / total_decode_s, b as f64 * 1e3 / median
    );
    println!("kv cache: {} bytes for {b} slots × {} tokens", cache.bytes(), cache.capacity());
    Ok(())
}
