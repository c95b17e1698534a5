//! `v4rt conformance`: every op × every registered backend against cpu-ref, plus the
//! end-to-end golden tiers (see `v4rt_tests::conformance` for what is checked and why).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use hal::Backend;
use serde_json::json;
use v4rt_tests::conformance::{self, SuiteOptions};

use crate::backends;

#[derive(clap::Args)]
pub struct Args {
    /// Backend to test against cpu-ref (a registered name), or `all`.
    #[arg(long, default_value = "all")]
    backend: String,
    /// Also write the full report (every case and check) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the end-to-end checks on the tiny-flash goldens.
    #[arg(long)]
    no_e2e: bool,
    /// Seed of the random op descriptors and inputs.
    #[arg(long, default_value_t = conformance::DEFAULT_SEED)]
    seed: u64,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let mut registry = backends::registry();
    let status = registry.status();
    let names: Vec<&'static str> = if a.backend == "all" {
        status.iter().map(|(n, _)| *n).collect()
    } else {
        match status.iter().find(|(n, _)| *n == a.backend) {
            Some((n, _)) => vec![*n],
            None => bail!(
                "unknown backend '{}' (known: {}, or all)",
                a.backend,
                status.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        }
    };
    let reference: Arc<dyn Backend> = Arc::new(cpu_ref::CpuBackend::new());
    let golden = v4rt_tests::tiers::golden_dir().join("tiny-flash");
    let opts = SuiteOptions { seed: a.seed, ..SuiteOptions::default() };

    let mut reports = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut passed: Vec<&str> = Vec::new();
    for name in names {
        let reason = status.iter().find(|(n, _)| *n == name).and_then(|(_, s)| s.as_ref().err().cloned());
        if let Some(reason) = reason {
            println!("{name}: unavailable ({reason})\n");
            reports.push(json!({"backend": name, "available": false, "reason": reason, "passed": false}));
            if a.backend != "all" {
                failed.push(format!("{name} is unavailable ({reason})"));
            }
            continue;
        }
        let backend: Arc<dyn Backend> =
            Arc::from(registry.take(name).with_context(|| format!("taking backend {name}"))?);
        println!("{name}: available ({})", backend.info().device);
        let suite = conformance::run_suite(backend.as_ref(), reference.as_ref(), &opts);
        print!("{}", suite.table());
        let checks = if a.no_e2e {
            Vec::new()
        } else {
            let checks = conformance::end_to_end(backend.clone(), reference.clone(), &golden);
            println!("\nend to end (tiny-flash goldens, {}):", golden.display());
            print!("{}", conformance::checks_table(&checks));
            checks
        };
        let ok = suite.passed() && (a.no_e2e || conformance::checks_passed(&checks));
        println!("{name}: {}\n", if ok { "PASS" } else { "FAIL" });
        if ok {
            passed.push(name);
        } else {
            failed.push(format!("{name} failed"));
        }
        reports.push(json!({
            "backend": name,
            "available": true,
            "device": backend.info().device,
            "passed": ok,
            "suite": suite.to_json(),
            "end_to_end": if a.no_e2e { serde_json::Value::Null } else { conformance::checks_json(&checks) },
        }));
    }
    if let Some(path) = &a.json {
        let doc = json!({"seed": a.seed, "reference": reference.info().name, "backends": reports});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    println!("passed: {}", if passed.is_empty() { "none".to_string() } else { passed.join(", ") });
    if !failed.is_empty() {
        bail!("conformance: {}", failed.join("; "));
    }
    if passed.is_empty() {
        bail!("conformance: no backend was tested");
    }
    Ok(())
}
