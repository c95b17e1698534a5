//! `v4rt inspect DIR`: what a checkpoint directory holds — config summary, tensor census by
//! dtype, parameter counts and KV-cache cost — after validating it against its `config.json`
//! (the command fails, naming the file and tensor, if the two disagree).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use model::checkpoint::{param_counts, Checkpoint};
use model::config::{ExpertFormat, LayerKind, ModelConfig};
use model::kv_layout::{kv_footprint, KvLayout};

use crate::kv_size::mib;

/// Arguments of `v4rt inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory: config.json plus model.safetensors.index.json and its shards (or a
    /// single model.safetensors).
    pub dir: PathBuf,
}

/// `1,572,997,201,763 (1.573 T)`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let x = n as f64;
    let short = if x >= 1e12 {
        format!("{:.3} T", x / 1e12)
    } else if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        return grouped;
    };
    format!("{grouped} ({short})")
}

/// `"0-2, 5"`: sorted indices as ranges.
fn ranges(ix: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ix.len() {
        let mut j = i;
        while j + 1 < ix.len() && ix[j + 1] == ix[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { ix[i].to_string() } else { format!("{}-{}", ix[i], ix[j]) });
        i = j + 1;
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn describe_config(out: &mut String, cfg: &ModelConfig) -> std::fmt::Result {
    writeln!(
        out,
        "config: dim {}, vocab {}, {} layers + {} MTP",
        cfg.dim, cfg.vocab_size, cfg.n_layers, cfg.n_mtp_layers
    )?;
    let mut by_kind: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for i in 0..cfg.n_layers {
        by_kind.entry((cfg.layer_ratio(i), cfg.layer_kind(i).label())).or_default().push(i);
    }
    for ((ratio, label), layers) in &by_kind {
        writeln!(out, "  {label:<6} ratio {ratio:<3}  {:>2} layers: {}", layers.len(), ranges(layers))?;
    }
    let hash: Vec<usize> = (0..cfg.n_layers).filter(|&i| cfg.is_hash_layer(i)).collect();
    writeln!(out, "  hash-routed MoE layers: {}", ranges(&hash))?;
    let mtp: Vec<String> = (0..cfg.n_mtp_layers)
        .map(|k| {
            let b = cfg.n_layers + k;
            format!("mtp.{k} {} ratio {}", cfg.layer_kind(b).label(), cfg.layer_ratio(b))
        })
        .collect();
    writeln!(out, "  MTP blocks: {}", if mtp.is_empty() { "none".into() } else { mtp.join(", ") })?;
    writeln!(
        out,
        "  attention: {} query heads × {} (rope {}), one shared K=V head, q_lora {}, {} output groups × o_lora {}, window {}",
        cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.window_size
    )?;
    if (0..cfg.n_blocks()).any(|b| cfg.layer_kind(b) == LayerKind::Csa) {
        writeln!(out, "  indexer: {} heads × {}, top-{}", cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk)?;
    }
    let format = match cfg.expert_format {
        ExpertFormat::Fp4 => "fp4",
        ExpertFormat::Fp8 => "fp8",
    };
    writeln!(
        out,
        "  experts: {} routed ({format}) + {} shared, {} active per token, hidden {}, route scale {}, swiglu limit {}",
        cfg.n_routed_experts,
        cfg.n_shared_experts,
        cfg.n_activated_experts,
        cfg.moe_inter_dim,
        cfg.route_scale,
        cfg.swiglu_limit
    )
}

/// The report `run` prints; fails if the checkpoint does not match its config.
pub fn render(args: &Args) -> anyhow::Result<String> {
    let dir = &args.dir;
    let cfg_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&cfg_path).context("invalid config.json")?;
    let ck = Checkpoint::open(dir).with_context(|| format!("cannot open the checkpoint in {}", dir.display()))?;
    ck.validate(&cfg).with_context(|| format!("the checkpoint in {} does not match its config.json", dir.display()))?;

    let mut out = String::new();
    let files = ck.files().count();
    writeln!(
        out,
        "checkpoint: {} — {} file{}, {} tensors, {} bytes of data; matches config.json",
        dir.display(),
        files,
        if files == 1 { "" } else { "s" },
        ck.len(),
        count(ck.total_bytes())
    )?;
    describe_config(&mut out, &cfg)?;

    let mut census: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for name in ck.names() {
        if let Some((dtype, shape)) = ck.info(name) {
            let e = census.entry(dtype.safetensors_name()).or_default();
            e.0 += 1;
            e.1 += (shape.iter().product::<usize>() * dtype.size()) as u64;
        }
    }
    writeln!(out, "tensors by dtype:")?;
    for (dtype, (n, bytes)) in &census {
        writeln!(out, "  {dtype:<8} {n:>7} tensors  {:>14}", mib(*bytes as f64))?;
    }

    let p = param_counts(&cfg);
    writeln!(out, "parameters (packed FP4 = 2 per byte; scales and tid2eid excluded):")?;
    writeln!(out, "  main model        {}", count(p.total_main))?;
    writeln!(out, "  routed experts    {}", count(p.routed_experts))?;
    writeln!(out, "  active per token  {}", count(p.active_per_token))?;
    writeln!(out, "  MTP               {}", count(p.mtp))?;

    writeln!(out, "KV cache per sequence (main layers, MTP excluded):")?;
    for layout in KvLayout::ALL {
        let f = kv_footprint(&cfg, layout, 0);
        writeln!(
            out,
            "  {:<22} {:>10.2} B/token + {} window + {} compressor state",
            layout.label(),
            f.bytes_per_token,
            mib(f.window_bytes as f64),
            mib(f.state_bytes as f64)
        )?;
    }
    Ok(out)
}

/// Validates and describes the checkpoint in `args.dir`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    print!("{}", render(args)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn golden_tiny_flash() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/tiny-flash");
        let text = render(&Args { dir }).unwrap();
        assert!(text.contains("2 files, 427 tensors, 16,371,396 (16.37 M) bytes"), "{text}");
        assert!(text.contains("CSA    ratio 4     2 layers: 1, 3"), "{text}");
        assert!(text.contains("hash-routed MoE layers: 0"), "{text}");
        assert!(text.contains("F8_E8M0      164 tensors"), "{text}");
        assert!(text.contains("I8           120 tensors"), "{text}");
    }

    #[test]
    fn mismatch_is_an_error() {
        // the golden checkpoint against a config with a different expert count
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/tiny-flash");
        let dir = std::env::temp_dir().join(format!("v4rt-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in
            ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let cfg = model::config::embedded_json("tiny-flash")
            .unwrap()
            .replace("\"n_routed_experts\": 8", "\"n_routed_experts\": 16");
        std::fs::write(dir.join("config.json"), cfg).unwrap();
        let err = format!("{:#}", render(&Args { dir: dir.clone() }).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("does not match its config.json") && err.contains("layers.0.ffn.gate.weight"), "{err}");
    }

    #[test]
    fn helpers() {
        assert_eq!(count(1_572_997_201_763), "1,572,997,201,763 (1.573 T)");
        assert_eq!(count(999), "999");
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(ranges(&[]), "none");
    }
}
