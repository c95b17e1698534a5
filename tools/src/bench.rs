//! `v4rt bench`: prefill and decode throughput on one backend, measured in one run, next to the
//! backend's own calibration (copy bandwidth, dense GEMM rate) measured in the same process.
//!
//! Two model sources:
//! * `--model DIR` or nothing: a checkpoint directory, or the embedded tiny model;
//! * `--preset v4-flash|v4-pro --layers N`: the preset's real block geometry (dim, heads, LoRA
//!   ranks, 256/384 experts with their real inter dim, FP8 128×128 block linears, packed FP4
//!   experts, indexer, compressors) with only N main blocks, random weights in the real formats
//!   ([`pick_blocks`] says which blocks; `--vocab` cuts the vocabulary; no MTP block).
//!
//! The byte and FLOP arithmetic of the report is in [`step_bytes`], [`cache_read_bytes`] and
//! [`prefill_gemm_flops`] (unit-tested below).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use hal::DType;
use model::checkpoint::expected_tensors;
use model::config::{LayerKind, ModelConfig};
use model::forward::{Chunk, ForwardOptions, LogitsAt, Model};
use model::kv_layout::{kv_footprint, KvLayout};
use model::sample::{argmax, Rng};

use crate::backends;
use crate::profile::{self, Profiled};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory. Default: the embedded tiny model (unless --preset is given).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Geometry preset with random weights: v4-flash, v4-pro (or tiny-flash).
    #[arg(long)]
    preset: Option<String>,
    /// Main blocks of the preset model (see `pick_blocks`). Default: 4.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Vocabulary of the preset model (embedding and head rows). Default 16384 (cut from 129280
    /// to save memory and to keep the head from dominating a few-layer step).
    #[arg(long, default_value_t = 16384)]
    vocab: usize,
    /// Preset weights: `fast` (synthetic::generate_fast, Irwin–Hall normals) or `exact`
    /// (synthetic::generate, Box–Muller; about 2× slower).
    #[arg(long, default_value = "fast")]
    weights: String,
    /// Prompt length per sequence (the measured prefill when --context is 0).
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens of context prefilled (in --chunk sized pieces) before decode is timed; replaces
    /// --prompt when positive.
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Tokens of context put in the cache synthetically before the prefill (`KvCache::
    /// fill_synthetic`: random entries, no forward pass), so that prefill chunks and decode steps
    /// are timed at that context length without prefilling it.
    #[arg(long, default_value_t = 0)]
    fill: usize,
    /// Prefill chunk (tokens per sequence per forward call).
    #[arg(long, default_value_t = 4096)]
    chunk: usize,
    /// Decode steps, timed twice: with every op issued by the host, then replaying a recorded
    /// decode step (a CUDA graph on CUDA).
    #[arg(long, default_value_t = 256)]
    decode: usize,
    /// Independent sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
    /// KV cache entry dtype: `bf16` (the reference's layout) or `f32`. Default: the backend's
    /// preferred one (`model::cache::preferred_kv_dtype`: bf16 where it runs the cache ops).
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Tokens of cache capacity per sequence. Default: exactly what the run needs. A run that
    /// saves its cache for another to `--load-cache` must give both the same capacity.
    #[arg(long)]
    capacity: Option<usize>,
    /// Start from a cache written by `--save-cache` (same preset, layers, batch, capacity and
    /// KV dtype) instead of an empty one: the prefill continues at the saved position.
    #[arg(long, conflicts_with = "fill")]
    load_cache: Option<PathBuf>,
    /// After the prefill, write the cache to this file (`KvCache::save`), so that a later run
    /// can continue from it. A prefill longer than one process may run is split this way.
    #[arg(long)]
    save_cache: Option<PathBuf>,
    /// Skip the backend calibration.
    #[arg(long)]
    no_calibrate: bool,
    /// After the timed runs, time every op of this many more decode steps and of one more
    /// prefill chunk (on a fresh cache), synchronizing around each op (see `profile.rs`).
    #[arg(long, default_value_t = 0)]
    profile: usize,
}

/// Indices into the preset's `compress_ratios` (main blocks, then MTP) used as the N blocks of
/// the bench model, in this order: for N ≥ 3 the first window block, the first CSA block and the
/// first HCA block, then the earliest remaining main blocks, sorted by index. So V4-Flash with
/// N = 4 is blocks 0, 1, 2, 3 (window, window, CSA, HCA) and N = 3 is 0, 2, 3; V4-Pro has no
/// window-only main block, so its window block is the MTP block's geometry (index 61), placed
/// last: N = 4 is 0, 1, 2, 61 (HCA, HCA, CSA, window). For N < 3 the first N main blocks.
pub fn pick_blocks(cfg: &ModelConfig, n: usize) -> Vec<usize> {
    let kind = |i: usize| cfg.layer_kind(i);
    let mut picked: Vec<usize> = Vec::new();
    if n >= 3 {
        for k in [LayerKind::Window, LayerKind::Csa, LayerKind::Hca] {
            if let Some(i) = (0..cfg.n_blocks()).find(|&i| kind(i) == k) {
                picked.push(i);
            }
        }
    }
    for i in 0..cfg.n_layers {
        if picked.len() >= n {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked.truncate(n);
    picked.sort_unstable();
    picked
}

/// The bench model's config: `base` with blocks `blocks` (from [`pick_blocks`]) as its main
/// blocks, no MTP block, `vocab` rows, and hash routing on the blocks that have it in `base`.
pub fn preset_config(base: &ModelConfig, blocks: &[usize], vocab: usize) -> ModelConfig {
    let mut cfg = base.clone();
    cfg.compress_ratios = blocks.iter().map(|&i| base.layer_ratio(i)).collect();
    cfg.n_layers = blocks.len();
    cfg.n_mtp_layers = 0;
    // Hash blocks are a prefix; keep the ones picked from that prefix.
    cfg.n_hash_layers = blocks.iter().take_while(|&&i| i < base.n_layers && base.is_hash_layer(i)).count();
    cfg.vocab_size = vocab;
    cfg.bos_token_id = cfg.bos_token_id.min(vocab - 1);
    cfg.eos_token_id = cfg.eos_token_id.min(vocab - 1);
    cfg
}

/// Weight bytes one decode step must read, at their stored formats (FP8/FP4 codes plus their
/// e8m0 scales, bf16, f32), main blocks only (MTP excluded).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepBytes {
    /// Every `attn.*` tensor of every block (projections, norms, sink, compressors, indexer).
    pub attention: f64,
    /// Routed experts touched: the expected number of distinct experts the batch selects,
    /// `E·(1 − (1 − k/E)^B)` per block (exactly k for B = 1), all three matrices each.
    pub routed_experts: f64,
    /// The shared expert of every block.
    pub shared_expert: f64,
    /// Gate weight and bias, `tid2eid` rows of the batch, hyper-connection tensors, block norms.
    pub other: f64,
    /// Final norm, hc_head, and the whole head matrix.
    pub head: f64,
    /// The B embedding rows.
    pub embed: f64,
}

impl StepBytes {
    pub fn total(&self) -> f64 {
        self.attention + self.routed_experts + self.shared_expert + self.other + self.head + self.embed
    }
}

fn tensor_bytes(dtype: DType, shape: &[usize]) -> f64 {
    (shape.iter().product::<usize>() * dtype.size()) as f64
}

/// Weight bytes of one decode step of `batch` tokens (one per sequence); see [`StepBytes`].
pub fn step_bytes(cfg: &ModelConfig, batch: usize) -> StepBytes {
    let (e, k) = (cfg.n_routed_experts as f64, cfg.n_activated_experts as f64);
    let touched = e * (1.0 - (1.0 - k / e).powi(batch as i32));
    let mut s = StepBytes::default();
    for t in expected_tensors(cfg).iter().filter(|t| !t.name.starts_with("mtp.")) {
        let bytes = tensor_bytes(t.dtype, &t.shape);
        let n = &t.name;
        if n == "embed.weight" {
            s.embed += (batch.min(cfg.vocab_size) * t.shape[1] * t.dtype.size()) as f64;
        } else if n == "head.weight" || n == "norm.weight" || n.starts_with("hc_head") {
            s.head += bytes;
        } else if n.contains(".ffn.experts.") {
            s.routed_experts += bytes * touched / e;
        } else if n.contains(".ffn.shared_experts.") {
            s.shared_expert += bytes;
        } else if n.contains(".attn.") {
            s.attention += bytes;
        } else if n.ends_with(".tid2eid") {
            s.other += (batch * t.shape[1] * t.dtype.size()) as f64;
        } else {
            s.other += bytes;
        }
    }
    s
}

/// Cache bytes one decode step reads for one sequence at position `pos`, with `elem` bytes per
/// stored element (4 today: the cache is f32), as the CUDA kernels read it: every block its
/// window ring (min(pos, window) entries of head_dim); a CSA block all pos/4 indexer keys
/// (index_head_dim) plus the min(topk, pos/4) selected entries; an HCA block all pos/ratio
/// entries; compressed blocks also read and write their fp32 compressor state
/// (2 tensors of [c·ratio, c·width], c = 2 when overlapping; twice for CSA: main + indexer).
pub fn cache_read_bytes(cfg: &ModelConfig, pos: usize, elem: usize) -> f64 {
    let (hd, id) = (cfg.head_dim, cfg.index_head_dim);
    let state = |ratio: usize, width: usize| {
        let c = if ratio == 4 { 2 } else { 1 };
        2 * 2 * (c * ratio * c * width * 4)
    };
    let mut total = 0usize;
    for i in 0..cfg.n_layers {
        let ratio = cfg.layer_ratio(i);
        total += pos.min(cfg.window_size) * hd * elem;
        total += match cfg.layer_kind(i) {
            LayerKind::Window => 0,
            LayerKind::Csa => {
                let n = pos / ratio;
                n * id * elem + n.min(cfg.index_topk) * hd * elem + state(ratio, hd) + state(ratio, id)
            }
            LayerKind::Hca => (pos / ratio) * hd * elem + state(ratio, hd),
        };
    }
    total as f64
}

/// Multiply-add FLOPs (2 per MAC) of the linear layers of a prefill of `tokens` tokens in total
/// whose logits are taken for `logit_rows` rows: per token every attention and shared-expert
/// matrix, k routed experts, the gate; the head only for `logit_rows`. Attention scores, the
/// indexer scores and the compressors' pooling are not counted.
pub fn prefill_gemm_flops(cfg: &ModelConfig, tokens: usize, logit_rows: usize) -> f64 {
    let (e, k) = (cfg.n_routed_experts as f64, cfg.n_activated_experts as f64);
    let (mut per_token, mut head) = (0.0f64, 0.0f64);
    for t in expected_tensors(cfg).iter().filter(|t| !t.name.starts_with("mtp.") && t.shape.len() == 2) {
        let params = match t.dtype {
            DType::F8E4M3 | DType::BF16 => (t.shape[0] * t.shape[1]) as f64,
            DType::I8 => (t.shape[0] * t.shape[1] * 2) as f64,
            _ => continue,
        };
        let n = &t.name;
        if n == "embed.weight" {
            continue;
        } else if n == "head.weight" {
            head += params;
        } else if n.contains(".ffn.experts.") {
            per_token += params * k / e;
        } else {
            per_token += params;
        }
    }
    2.0 * (per_token * tokens as f64 + head * logit_rows as f64)
}

fn gib(b: f64) -> String {
    format!("{:.3} GiB", b / (1u64 << 30) as f64)
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1u64 << 20) as f64)
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let profiler = Arc::new(Profiled::new(backends::backend(&a.backend)?));
    let backend: Arc<dyn hal::Backend> = profiler.clone();
    let t_build = Instant::now();
    let (model, weights_bytes, gen_note) = match &a.preset {
        None => {
            let m = backends::load_model(a.model.as_deref(), backend)?;
            (m, None, String::new())
        }
        Some(p) => {
            if a.layers == 0 || a.vocab < 2 {
                bail!("--layers must be at least 1 and --vocab at least 2");
            }
            let base = ModelConfig::embedded(p).with_context(|| format!("preset '{p}'"))?;
            let blocks = pick_blocks(&base, a.layers);
            let cfg = preset_config(&base, &blocks, a.vocab.min(base.vocab_size));
            let kinds: Vec<String> = blocks.iter().map(|&i| format!("{i}:{}", base.layer_kind(i).label())).collect();
            let t = Instant::now();
            let ck = match a.weights.as_str() {
                "fast" => model::synthetic::generate_fast(&cfg, backends::EMBEDDED_SEED),
                "exact" => model::synthetic::generate(&cfg, backends::EMBEDDED_SEED),
                w => bail!("--weights must be fast or exact, not '{w}'"),
            };
            let gen_s = t.elapsed().as_secs_f64();
            let bytes = ck.total_bytes() as f64;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let t = Instant::now();
            let m = Model::from_checkpoint(cfg, &ck, backend).context("building the preset model")?;
            m.backend().synchronize()?;
            let up_s = t.elapsed().as_secs_f64();
            let note = format!(
                "preset {p}: blocks {} of {} (index:type), vocab {} (of {}), no MTP, hash-routed blocks {}\n\
                 weights: synthetic::generate{} in {gen_s:.1} s on {threads} threads ({:.0} MB/s), upload {up_s:.1} s",
                kinds.join(" "),
                base.n_blocks(),
                m.cfg.vocab_size,
                base.vocab_size,
                m.cfg.n_hash_layers,
                if a.weights == "fast" { "_fast" } else { "" },
                bytes / gen_s / 1e6
            );
            (m, Some(bytes), note)
        }
    };
    let build_s = t_build.elapsed().as_secs_f64();
    let cfg = model.cfg.clone();
    let (b, v) = (a.batch.max(1), cfg.vocab_size as u32);
    let prefill = if a.context > 0 { a.context } else { a.prompt };
    if prefill == 0 {
        bail!("nothing to prefill: --prompt or --context must be positive");
    }

    println!("backend: {}", model.backend().info().device);
    if !gen_note.is_empty() {
        println!("{gen_note}");
    }
    println!(
        "model: {} layers, dim {}, heads {}, experts {} (k {}, inter {}), vocab {}; built in {build_s:.1} s",
        cfg.n_layers,
        cfg.dim,
        cfg.n_heads,
        cfg.n_routed_experts,
        cfg.n_activated_experts,
        cfg.moe_inter_dim,
        cfg.vocab_size
    );
    let cal = if a.no_calibrate {
        None
    } else {
        match model.backend().calibrate() {
            Ok(c) => {
                println!(
                    "calibration: copy {:.1} GB/s ({}); dense GEMM {:.3} TFLOP/s ({})",
                    c.copy_bytes_per_s / 1e9,
                    c.copy_method,
                    c.dense_flops_per_s / 1e12,
                    c.gemm_method
                );
                match c.vendor_flops_per_s {
                    Some(f) => println!(
                        "calibration: vendor dense GEMM {:.3} TFLOP/s ({}); ours is {:.1}% of it",
                        f / 1e12,
                        c.vendor_method,
                        100.0 * c.dense_flops_per_s / f
                    ),
                    None => println!("calibration: vendor dense GEMM: {}", c.vendor_method),
                }
                Some(c)
            }
            Err(e) => {
                println!("calibration: unavailable ({e})");
                None
            }
        }
    };

    // With --profile: a.profile more decode steps and one more chunk timed block by block.
    let extra = if a.profile > 0 { a.profile + a.chunk.max(1).min(prefill) } else { 0 };
    let kv_dtype = backends::kv_dtype(a.kv_dtype.as_deref(), &model)?;
    // Decode runs four times: host-issued, the recorded step with its two untimed first calls,
    // the recorded step queued back to back, and the greedy step chained on the device with its
    // two untimed first calls.
    let decode_tokens = if a.decode > 0 { 4 * a.decode + 4 } else { 0 };
    let needed = a.fill + prefill + decode_tokens + extra + 1;
    let mut cache = model.new_cache_with(b, a.capacity.unwrap_or(needed), kv_dtype)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(model.backend())).collect::<Result<_, _>>()?;
    if let Some(path) = &a.load_cache {
        let t = Instant::now();
        cache.load(model.backend(), path)?;
        model.backend().synchronize()?;
        println!(
            "loaded cache {} in {:.1} s: {}",
            path.display(),
            t.elapsed().as_secs_f64(),
            slots
                .iter()
                .map(|&s| cache.position(s).map(|p| format!("slot {s} at {p}")))
                .collect::<Result<Vec<_>, _>>()?
                .join(", ")
        );
    }
    // Where the run starts (0, or the loaded cache's position), the same for every slot.
    let start = cache.position(slots[0])?;
    if let Some(&s) = slots.iter().find(|&&s| cache.position(s).ok() != Some(start)) {
        bail!(
            "slot {s} does not stand at slot {}'s position {start}: the bench runs every slot at one position",
            slots[0]
        );
    }
    if start + needed > cache.capacity() {
        bail!("the run needs {needed} tokens of capacity per sequence from position {start}, the cache has {} (--capacity)", cache.capacity());
    }
    if a.fill > 0 {
        let t = Instant::now();
        for &s in &slots {
            cache.fill_synthetic(model.backend(), s, a.fill, 0x5EED + s as u64)?;
        }
        model.backend().synchronize()?;
        println!(
            "synthetic context: {} token(s) per slot filled in {:.1} s (random cache entries, no forward pass)",
            a.fill,
            t.elapsed().as_secs_f64()
        );
    }
    // Where the prefill starts: after the fill or the loaded cache.
    let base = start + a.fill;
    // A fixed pseudo-random prompt, a function of the absolute position so that a prefill split
    // across runs (--save-cache / --load-cache) feeds the same ids as one run would (the speed
    // of this model does not depend on the ids).
    let prompts: Vec<Vec<u32>> =
        (0..b).map(|s| (base..base + prefill).map(|i| ((i * 7919 + s * 104_729) as u32) % v).collect()).collect();
    let opts = ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None };

    // Warm-up on a scratch cache: backends prepare weights on first use (cpu-ref decodes each
    // FP8/FP4 matrix once, CUDA compiles its kernels), which is load time, not prefill time.
    let load = Instant::now();
    let mut scratch = model.new_cache_with(1, 8, kv_dtype)?;
    let s0 = scratch.alloc_slot(model.backend())?;
    model.forward(&mut scratch, &[Chunk { slot: s0, tokens: &[0, 1] }], &opts)?;
    model.forward(&mut scratch, &[Chunk { slot: s0, tokens: &[2] }], &opts)?;
    model.backend().synchronize()?;
    let warmup_s = load.elapsed().as_secs_f64();
    drop(scratch);

    let chunk = a.chunk.max(1);
    let t = Instant::now();
    let mut chunk_s = Vec::new();
    let mut out = None;
    for start in (0..prefill).step_by(chunk) {
        let end = (start + chunk).min(prefill);
        let tc = Instant::now();
        let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &prompts[s][start..end] }).collect();
        out = Some(model.forward(&mut cache, &chunks, &opts)?);
        model.backend().synchronize()?;
        chunk_s.push(tc.elapsed().as_secs_f64());
        eprintln!("  prefill chunk {}..{}: {:.1} ms", base + start, base + end, chunk_s[chunk_s.len() - 1] * 1e3);
    }
    let prefill_s = t.elapsed().as_secs_f64();
    if let Some(path) = &a.save_cache {
        let t = Instant::now();
        cache.save(model.backend(), path)?;
        println!(
            "saved cache to {} in {:.1} s (after the prefill, before decode)",
            path.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let out = out.context("no prefill chunk ran")?;
    let mut next: Vec<u32> = out.logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();

    // Decode, two ways in the same run: --decode steps with every op issued by the host
    // (`Model::forward`), then --decode steps of a recorded decode step (`Model::decode_step`:
    // replayed as one CUDA graph where the backend records; its first two calls, a warm-up and
    // the recording, are not timed).
    let start_decode = cache.position(slots[0])?;
    let mut issued_ms = Vec::with_capacity(a.decode);
    for _ in 0..a.decode {
        let t = Instant::now();
        let chunks: Vec<Chunk> =
            slots.iter().zip(&next).map(|(&s, tok)| Chunk { slot: s, tokens: std::slice::from_ref(tok) }).collect();
        let out = model.forward(&mut cache, &chunks, &opts)?;
        next = out.logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();
        issued_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut step_ms = Vec::with_capacity(a.decode);
    let mut recorded = false;
    let mut queued_ms = 0.0;
    let (mut chained_ms, mut chained_on_device) = (0.0, false);
    // Where the timed steps ended (the queued steps after them are not in the reported context).
    let mut end_decode = start_decode;
    if a.decode > 0 {
        let mut step = model.decode_step(&cache, &slots)?;
        for k in 0..a.decode + 2 {
            let t = Instant::now();
            let logits = step.run(&mut cache, &next)?;
            next = logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();
            if k >= 2 {
                step_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        recorded = step.is_recorded();
        if let Some(d) = step.recording() {
            println!("decode step recording: {d}");
        }
        end_decode = cache.position(slots[0])?;
        // The same steps queued back to back, one download at the end: the device's own time per
        // step, without the host's round trip (download, next token, writes, launch) between
        // steps that the timed loop above pays. Every step is fed the same tokens.
        let t = Instant::now();
        for _ in 0..a.decode {
            step.issue(&mut cache, &next)?;
        }
        step.logits()?;
        queued_ms = t.elapsed().as_secs_f64() * 1e3 / a.decode as f64;
        // Greedy decode chained on the device, as `v4rt generate` runs it: the step picks its
        // tokens itself (`SampleTokens` at temperature 0, where the backend runs it) and feeds
        // them to the next step, which is issued before the host reads them.
        let mut chain = model.decode_step(&cache, &slots)?.with_sampling(0.0, &vec![Rng::new(0); b])?;
        chained_on_device = chain.samples_on_device();
        // The first two calls (a warm-up and the recording) are not timed.
        let mut picked = next.clone();
        chain.run_chained(&mut cache, &next, 2, |t| {
            picked = t.to_vec();
            true
        })?;
        let t = Instant::now();
        chain.run_chained(&mut cache, &picked.clone(), a.decode, |t| {
            picked = t.to_vec();
            true
        })?;
        chained_ms = t.elapsed().as_secs_f64() * 1e3 / a.decode as f64;
    }
    let total_decode_s: f64 = step_ms.iter().sum::<f64>() / 1e3;
    let median_of = |ms: &[f64]| {
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    };
    let median = median_of(&step_ms);
    let median_issued = median_of(&issued_ms);

    println!("warm-up (first forwards: weight preparation, kernel compilation): {:.1} ms", warmup_s * 1e3);
    // Prefill.
    let tokens = b * prefill;
    let flops = prefill_gemm_flops(&cfg, tokens, b * chunk_s.len());
    let tflops = flops / prefill_s / 1e12;
    println!(
        "prefill: {b} × {prefill} tokens from position {} in {} chunk(s) of ≤ {chunk}: {:.1} ms = {:.0} tokens/s; first chunk {:.0} tokens/s, last {:.0} tokens/s",
        base,
        chunk_s.len(),
        prefill_s * 1e3,
        tokens as f64 / prefill_s,
        (b * chunk.min(prefill)) as f64 / chunk_s[0],
        (b * (prefill - (chunk_s.len() - 1) * chunk)) as f64 / chunk_s[chunk_s.len() - 1],
    );
    print!(
        "prefill GEMM work: {:.3} TFLOP (linear layers only) → {tflops:.3} TFLOP/s over the whole prefill time",
        flops / 1e12
    );
    println!("{}", cal.as_ref().map_or(String::new(), |c| profile::shares_of_dense(tflops * 1e12, c)));
    // Decode.
    if a.decode > 0 {
        let sb = step_bytes(&cfg, b);
        let pos = (start_decode + end_decode) / 2;
        let cache_rd = b as f64 * cache_read_bytes(&cfg, pos, kv_dtype.size());
        let cache_rd_fp8 = b as f64 * cache_read_bytes(&cfg, pos, 1);
        let moved = sb.total() + cache_rd;
        let gbs = moved / (median / 1e3) / 1e9;
        println!(
            "decode, ops issued by the host (Model::forward): {} steps × batch {b} from context {start_decode}: median step {median_issued:.3} ms",
            a.decode,
        );
        println!(
            "decode, {} (Model::decode_step): {} steps × batch {b} up to context {end_decode}: median step {median:.3} ms ({:.3} ms per layer = step / {} layers, head included), {:.1} tokens/s (all steps), {:.1} tokens/s (median); {:.2}× the host-issued step",
            if recorded { "recorded once, replayed" } else { "not recorded (the backend runs the ops directly)" },
            a.decode,
            median / cfg.n_layers as f64,
            cfg.n_layers,
            (a.decode * b) as f64 / total_decode_s,
            b as f64 * 1e3 / median,
            median_issued / median
        );
        print!(
            "decode, the same step queued back to back ({} steps, one download at the end): {queued_ms:.3} ms per step",
            a.decode
        );
        if recorded {
            // Where the backend ran the ops as they were issued, the host is inside both figures.
            print!(", so the host's round trip between steps (download, next token, writes, launch) costs about {:.3} ms of the median step", median - queued_ms);
        }
        println!();
        println!(
            "decode, greedy chained ({} steps; {}; each step's tokens read while the next one runs, as `v4rt generate` does): {chained_ms:.3} ms per step",
            a.decode,
            if chained_on_device { "the recorded step picks its tokens on the device and feeds them to the next" } else { "the host samples from downloaded logits: the backend does not run sample_tokens" },
        );
        println!(
            "decode bytes per step: {} = weights {} (attention {}, routed experts {}, shared expert {}, other {}, head {}, embed {}) + cache read {} ({kv_dtype} cache; {} if stored 1 byte/element)",
            mib(moved),
            mib(sb.total()),
            mib(sb.attention),
            mib(sb.routed_experts),
            mib(sb.shared_expert),
            mib(sb.other),
            mib(sb.head),
            mib(sb.embed),
            mib(cache_rd),
            mib(cache_rd_fp8)
        );
        print!("decode achieved: {gbs:.1} GB/s");
        match &cal {
            Some(c) => println!(
                " = {:.1}% of the calibrated copy bandwidth (roofline step {:.3} ms vs measured {median:.3} ms)",
                100.0 * gbs * 1e9 / c.copy_bytes_per_s,
                moved / c.copy_bytes_per_s * 1e3
            ),
            None => println!(),
        }
        let chained_gbs = moved / (chained_ms / 1e3) / 1e9;
        print!("decode achieved, greedy chained: {chained_gbs:.1} GB/s");
        match &cal {
            Some(c) => {
                println!(" = {:.1}% of the calibrated copy bandwidth", 100.0 * chained_gbs * 1e9 / c.copy_bytes_per_s)
            }
            None => println!(),
        }
    }
    if a.profile > 0 {
        let cal = cal.as_ref();
        profiler.set_profiling(true);
        for _ in 0..a.profile {
            let chunks: Vec<Chunk> =
                slots.iter().zip(&next).map(|(&s, tok)| Chunk { slot: s, tokens: std::slice::from_ref(tok) }).collect();
            let out = model.forward(&mut cache, &chunks, &opts)?;
            next = out.logits.chunks(v as usize).map(|l| argmax(l) as u32).collect();
        }
        profiler.set_profiling(false);
        profile::print(&format!("decode, {} steps", a.profile), &profiler.report(), a.profile, cal, false);
        let n = chunk.min(prefill);
        let at = cache.position(slots[0])?;
        let chunks: Vec<Chunk> = slots.iter().zip(&prompts).map(|(&s, p)| Chunk { slot: s, tokens: &p[..n] }).collect();
        let times = block_times(&model, &mut cache, &chunks)?;
        print!("prefill by block, one chunk of {b} × {n} tokens at position {at} (synchronized per block):");
        for (i, t) in times.iter().enumerate() {
            print!(" {i}:{} {:.1} ms", cfg.layer_kind(i).label(), t * 1e3);
        }
        println!();
        let n = chunk.min(prefill);
        let mut fresh = model.new_cache_with(b, n + 1, kv_dtype)?;
        let fs: Vec<usize> = (0..b).map(|_| fresh.alloc_slot(model.backend())).collect::<Result<_, _>>()?;
        let chunks: Vec<Chunk> = fs.iter().zip(&prompts).map(|(&s, p)| Chunk { slot: s, tokens: &p[..n] }).collect();
        profiler.set_profiling(true);
        model.forward(&mut fresh, &chunks, &opts)?;
        profiler.set_profiling(false);
        profile::print(
            &format!("prefill, one chunk of {b} × {n} tokens at position 0"),
            &profiler.report(),
            1,
            cal,
            true,
        );
    }
    // Memory.
    let cap = cache.capacity() as u64;
    let alloc = cache.bytes() as f64;
    print!(
        "kv cache: {} allocated for {b} slot(s) × {cap} tokens ({} entries, f32 compressor state)",
        mib(alloc),
        cache.dtype()
    );
    for layout in KvLayout::ALL {
        let f = kv_footprint(&cfg, layout, cap);
        let formula = b as f64 * (f.total_bytes + f.state_bytes as f64);
        print!("; formula {} {} (incl. compressor state) = {:.2}×", layout.label(), mib(formula), alloc / formula);
    }
    println!();
    if let Some(w) = weights_bytes {
        println!("weights: {} in checkpoint format (FP8/FP4 codes + e8m0 scales, bf16, f32)", gib(w));
    }
    Ok(())
}

/// Runs one forward call's blocks one at a time (no head), waiting for the device after each:
/// each block's wall time, and the cache advanced as `Model::forward` would.
fn block_times(model: &Model, cache: &mut model::cache::KvCache, chunks: &[Chunk]) -> anyhow::Result<Vec<f64>> {
    let rows = model.rows(cache, chunks)?;
    let be = model.backend();
    let mut x = model.embed_streams(&rows)?;
    be.synchronize()?;
    let mut times = Vec::with_capacity(model.cfg.n_layers);
    for layer in 0..model.cfg.n_layers {
        let t = Instant::now();
        let (next, _) = model.block(layer, model.layer_cache(cache, layer)?, &rows, x, false)?;
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
        x = next;
    }
    for c in chunks {
        cache.advance(c.slot, c.tokens.len());
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flash() -> ModelConfig {
        ModelConfig::embedded("v4-flash").unwrap()
    }

    #[test]
    fn blocks_cover_every_attention_type() {
        let f = flash();
        assert_eq!(pick_blocks(&f, 4), vec![0, 1, 2, 3]);
        assert_eq!(pick_blocks(&f, 3), vec![0, 2, 3]);
        assert_eq!(pick_blocks(&f, 2), vec![0, 1]);
        let p = ModelConfig::embedded("v4-pro").unwrap();
        assert_eq!(pick_blocks(&p, 4), vec![0, 1, 2, 61]);
        let cfg = preset_config(&p, &pick_blocks(&p, 4), 1000);
        assert_eq!(cfg.compress_ratios, vec![128, 128, 4, 0]);
        assert_eq!((cfg.n_layers, cfg.n_mtp_layers, cfg.n_hash_layers, cfg.vocab_size), (4, 0, 3, 1000));
        let cfg = preset_config(&f, &pick_blocks(&f, 3), 1000);
        assert_eq!((cfg.compress_ratios.clone(), cfg.n_hash_layers), (vec![0, 4, 128], 2));
    }

    #[test]
    fn step_bytes_by_hand_for_flash() {
        let f = flash();
        let s = step_bytes(&f, 1);
        // One FP4 expert: w1, w3 [2048, 4096] and w2 [4096, 2048] as packed bytes (half a byte
        // per weight) + one e8m0 per 32 weights; 6 of them in each of 43 blocks.
        let expert: u64 = 3 * (2048 * 4096 / 2 + 2048 * 4096 / 32);
        assert_eq!(s.routed_experts, (43 * 6 * expert) as f64);
        // Shared expert: the same matrices in FP8 (1 byte per weight) + 128×128 block scales.
        let shared: u64 = 3 * (2048 * 4096 + 16 * 32);
        assert_eq!(s.shared_expert, (43 * shared) as f64);
        // Head: bf16 [129280, 4096] + final norm (bf16 [4096]) + hc_head (f32 [4, 16384] + [4] + [1]).
        assert_eq!(s.head, (129_280u64 * 4096 * 2 + 4096 * 2 + (4 * 16384 + 4 + 1) * 4) as f64);
        assert_eq!(s.embed, 4096.0 * 2.0);
        // Every expert touched: the step reads every main weight but the embedding once.
        let all = step_bytes(&f, 1 << 20);
        let main: f64 = expected_tensors(&f)
            .iter()
            .filter(|t| !t.name.starts_with("mtp.") && t.name != "embed.weight" && !t.name.ends_with("tid2eid"))
            .map(|t| tensor_bytes(t.dtype, &t.shape))
            .sum();
        let tid_rows = (1 << 20) as f64 * 6.0 * 8.0 * 3.0;
        assert!((all.total() - all.embed - tid_rows - main).abs() < 1e-3 * main, "{} vs {main}", all.total());
        // The attention share is the published order of magnitude: about 126 MB per block.
        assert!(s.attention / 43.0 > 20e6 && s.attention / 43.0 < 200e6, "{}", s.attention / 43.0);
    }

    #[test]
    fn cache_read_by_hand() {
        let f = flash();
        let cfg = preset_config(&f, &pick_blocks(&f, 4), 1000); // window, window, CSA, HCA
        let pos = 4096;
        let window = 128 * 512 * 4;
        let csa = 1024 * 128 * 4 + 512 * 512 * 4 + 2 * 2 * (8 * 1024 * 4) + 2 * 2 * (8 * 256 * 4);
        let hca = 32 * 512 * 4 + 2 * 2 * (128 * 512 * 4);
        assert_eq!(cache_read_bytes(&cfg, pos, 4), (4 * window + csa + hca) as f64);
    }

    #[test]
    fn prefill_flops_by_hand() {
        let f = flash();
        let cfg = preset_config(&f, &pick_blocks(&f, 4), 1000);
        let head = 2.0 * 1000.0 * 4096.0;
        let one = prefill_gemm_flops(&cfg, 1, 0);
        assert_eq!(prefill_gemm_flops(&cfg, 10, 2), 10.0 * one + 2.0 * head);
        // Routed share per token: 6 experts × 3 × 2048 × 4096 weights per block, 4 blocks.
        let routed = 2.0 * 4.0 * 6.0 * 3.0 * 2048.0 * 4096.0;
        assert!(one > routed && one < 4.0 * routed, "{one}");
    }
}
