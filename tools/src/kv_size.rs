//! `v4rt kv-size`: KV-cache memory of one sequence, per token and in total, for the reference's
//! bf16 layout and the FP8/FP4 production layout (main layers; MTP excluded, as in the published
//! figures).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use model::config::ModelConfig;
use model::kv_layout::{kv_footprint, KvLayout};

/// Arguments of `v4rt kv-size`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `flash`, `pro`, `tiny` (embedded configs), or a config.json file or checkpoint directory.
    #[arg(long)]
    pub config: String,
    /// Context length in tokens.
    #[arg(long, default_value_t = 1 << 20)]
    pub context: u64,
}

/// Resolves `--config`: an embedded name (`flash`/`v4-flash`, `pro`/`v4-pro`, `tiny`/`tiny-flash`)
/// or a path (a directory means its `config.json`). Returns a display name and the config.
pub fn load_config(spec: &str) -> anyhow::Result<(String, ModelConfig)> {
    let embedded = match spec {
        "flash" | "v4-flash" => Some("v4-flash"),
        "pro" | "v4-pro" => Some("v4-pro"),
        "tiny" | "tiny-flash" => Some("tiny-flash"),
        _ => None,
    };
    if let Some(name) = embedded {
        return Ok((name.to_string(), ModelConfig::embedded(name)?));
    }
    let path = Path::new(spec);
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let cfg = ModelConfig::from_file(&file)
        .with_context(|| format!("--config {spec}: not flash, pro or tiny, and not a readable config"))?;
    Ok((file.display().to_string(), cfg))
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// Bytes as MiB with two decimals.
pub fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1u64 << 20) as f64)
}

/// The report `run` prints.
pub fn render(args: &Args) -> anyhow::Result<String> {
    let (name, cfg) = load_config(&args.config)?;
    let mut out = String::new();
    let kinds = kv_footprint(&cfg, KvLayout::Bf16Reference, args.context).by_kind;
    let summary: Vec<String> = kinds
        .iter()
        .map(|k| match k.ratio {
            0 => format!("{} {}", k.layers, k.kind.label()),
            r => format!("{} {} r={r}", k.layers, k.kind.label()),
        })
        .collect();
    writeln!(out, "config: {name} — {} main layers ({}); MTP excluded", cfg.n_layers, summary.join(", "))?;
    writeln!(out, "context: {} tokens", args.context)?;
    for layout in KvLayout::ALL {
        let f = kv_footprint(&cfg, layout, args.context);
        writeln!(out)?;
        writeln!(
            out,
            "{}: {:.2} B/token (entry {} B, indexer key {} B)",
            layout.label(),
            f.bytes_per_token,
            layout.entry_bytes(&cfg),
            layout.index_key_bytes(&cfg)
        )?;
        for k in &f.by_kind {
            let label = match k.ratio {
                0 => k.kind.label().to_string(),
                r => format!("{} r={r}", k.kind.label()),
            };
            writeln!(
                out,
                "  {label:<12} {:>3} layers  {:>10.2} B/token  window {}",
                k.layers,
                k.bytes_per_token,
                mib(k.window_bytes as f64)
            )?;
        }
        writeln!(
            out,
            "  total {} = {} per-token growth + {} window (compressor state {} not included)",
            gib(f.total_bytes),
            gib(f.growth_bytes),
            mib(f.window_bytes as f64),
            mib(f.state_bytes as f64)
        )?;
    }
    Ok(out)
}

/// Prints the KV-cache report for `args`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    print!("{}", render(args)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pro_at_one_million_tokens() {
        let text = render(&Args { config: "pro".into(), context: 1 << 20 }).unwrap();
        assert!(text.contains("bf16 (reference): 9848.00 B/token"), "{text}");
        assert!(text.contains("total 9.62 GiB = 9.62 GiB per-token growth"), "{text}");
        assert!(text.contains("fp8/fp4 (production): 5031.44 B/token"), "{text}");
        assert!(text.contains("4.91 GiB per-token growth"), "{text}");
    }

    #[test]
    fn flash_and_bad_config() {
        let text = render(&Args { config: "flash".into(), context: 1 << 20 }).unwrap();
        assert!(text.contains("total 6.72 GiB"), "{text}");
        let err = render(&Args { config: "/nonexistent/v4.json".into(), context: 1 }).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/v4.json"), "{err:#}");
    }
}
