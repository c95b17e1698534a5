//! The shared conformance suite (`v4rt_tests::conformance`) against cpu-ref, run on the
//! Ascend backend through the CANN emulator, once per SoC profile.
//!
//! The SoC profile is read by the emulator at `aclInit`, once per process, so each profile
//! runs in a child process (`V4RT_EMU_SOC`). Every case must pass; ops answering
//! `supports() == No` are printed, and since the emulator exports every aclnn op the backend
//! uses, none may be unsupported. `V4RT_ASCEND_CONFORMANCE_LARGE=1` adds the real V4 shapes,
//! `V4RT_ASCEND_CONFORMANCE_MAX_CASES=N` caps the cases per op variant.

mod common;

use common::{run_child, use_emulator, CHILD_ENV};
use hal::backend::Backend;
use v4rt_ascend::loader::SearchConfig;
use v4rt_ascend::AscendBackend;
use v4rt_tests::conformance::{run_suite, RowResult, SuiteOptions};

fn run_profile(soc: &str) {
    let out = run_child("conformance", &[("V4RT_EMU_SOC", soc)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("==== {soc} ====\n{stdout}");
    assert!(out.status.success() && stdout.contains("CHILD-OK"), "conformance on {soc} failed: {}\n{stdout}\n{stderr}", out.status);
}

#[test]
fn conformance_ascend910b() {
    run_profile("Ascend910B3");
}

#[test]
fn conformance_ascend950() {
    run_profile("Ascend950PR");
}

/// Entry point of the child processes above (does nothing in a normal run).
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    assert_eq!(scenario, "conformance");
    use_emulator();
    let be = AscendBackend::open(&SearchConfig::from_env(), 0).expect("emulated ascend backend");
    let reference = cpu_ref::CpuBackend::new();
    // The emulator runs every kernel in f64 on one host thread, so the real V4-Flash/V4-Pro
    // shapes are opt-in (`V4RT_ASCEND_CONFORMANCE_LARGE=1`); every small case runs (≈ 3 s).
    let max_cases = std::env::var("V4RT_ASCEND_CONFORMANCE_MAX_CASES").ok().and_then(|v| v.parse().ok());
    let include_large = std::env::var("V4RT_ASCEND_CONFORMANCE_LARGE").is_ok_and(|v| v == "1");
    let opts = SuiteOptions { allow_unsupported: true, include_large, max_cases_per_variant: max_cases, ..Default::default() };
    let report = run_suite(&be, &reference, &opts);
    println!("{}", report.table());
    let rows = report.rows();
    let unsupported: Vec<String> = rows.iter().filter(|r| r.result == RowResult::Unsupported).map(|r| r.op.clone()).collect();
    let passing: Vec<String> = rows
        .iter()
        .filter(|r| r.result == RowResult::Pass)
        .map(|r| format!("{} (worst nmse {})", r.op, r.worst_nmse.map_or("-".into(), |n| format!("{n:.2e}"))))
        .collect();
    println!("device: {}", be.info().device);
    println!("PASSING ({}): {}", passing.len(), passing.join(", "));
    println!("UNSUPPORTED ({}): {}", unsupported.len(), unsupported.join(", "));
    let failures = report.failures();
    for (c, f) in &failures {
        println!("FAIL {} [{}] {}: {} {}: {}", c.variant, c.label, c.descriptor, f.kind.name(), f.tensor, f.detail);
    }
    assert!(failures.is_empty(), "{} failing checks", failures.len());
    // The emulator exports every aclnn op the backend uses, so nothing may be unsupported here
    // (a real toolkit missing an op would legitimately list it).
    assert!(unsupported.is_empty(), "unsupported through the emulator: {unsupported:?}");
    println!("CHILD-OK conformance");
}
