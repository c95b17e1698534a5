//! `v4rt` — the command line of the v4rt runtime.
//!
//! One module per subcommand. Errors are reported once, here, with their full context chain,
//! and turn into exit status 1; nothing on a user's path panics.

mod backends;
mod bench;
mod conformance;
mod generate;
mod inspect;
mod kv_size;
mod logits;
mod profile;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "v4rt",
    version,
    about = "DeepSeek-V4 inference runtime (Ascend-first; CUDA and CPU reference backends)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens (the embedded tiny model unless --model is given).
    Generate(generate::Args),
    /// Write prefill + decode logits of a token file (parity tool).
    Logits(logits::Args),
    /// Summarize a checkpoint directory: config, tensor census, parameters, KV bytes.
    Inspect(inspect::Args),
    /// KV-cache size for a config and context length.
    KvSize(kv_size::Args),
    /// Measure prefill and decode speed.
    Bench(bench::Args),
    /// List the backends this binary knows and whether each is usable here.
    Backends,
    /// Check every op on every backend against cpu-ref, plus the end-to-end golden tiers.
    Conformance(conformance::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::KvSize(a) => kv_size::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Backends => backends::list(),
        Command::Conformance(a) => conformance::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
