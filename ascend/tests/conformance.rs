//! The whole conformance suite (`v4rt_tests::conformance`: every op case, the real V4 shapes
//! included, then the end-to-end golden tiers on tiny-flash) against cpu-ref, run on the
//! Ascend backend through the CANN emulator, for both SoC profiles × both op paths:
//!
//! | test | `V4RT_EMU_SOC` | `V4RT_ASCEND_OPS` |
//! |---|---|---|
//! | `conformance_910b_fused` | Ascend910B3 | fused (CANN's DeepSeek-V4 ops where they apply) |
//! | `conformance_910b_composed` | Ascend910B3 | composed (generic aclnn ops only) |
//! | `conformance_950_fused` | Ascend950PR | fused |
//! | `conformance_950_composed` | Ascend950PR | composed |
//!
//! The emulator reads its profile at `aclInit`, once per process, so each configuration runs in
//! a child process. Every case and every gating end-to-end check must pass, nothing may be
//! unsupported but token sampling (the emulator exports every aclnn op the backend uses; the
//! backend does not sample on the device yet), and the fused runs must
//! really have used fused kernels (cases reported in bf16 numerics) while the composed runs
//! must not. `V4RT_ASCEND_CONFORMANCE_QUICK=1` keeps the small op cases only (no real shapes,
//! no end to end) for a fast local loop.

mod common;

use std::sync::Arc;

use common::{assert_child_ok, run_child, use_emulator, CHILD_ENV};
use hal::backend::Backend;
use v4rt_ascend::loader::SearchConfig;
use v4rt_ascend::AscendBackend;
use v4rt_tests::conformance::{checks_passed, checks_table, end_to_end, run_suite, RowResult, SuiteOptions};

fn run_config(soc: &str, ops: &str) {
    let out = run_child("conformance", &[("V4RT_EMU_SOC", soc), ("V4RT_ASCEND_OPS", ops)]);
    println!("==== {soc}, {ops} ====\n{}", String::from_utf8_lossy(&out.stdout));
    assert_child_ok(&out);
}

#[test]
fn conformance_910b_fused() {
    run_config("Ascend910B3", "fused");
}

#[test]
fn conformance_910b_composed() {
    run_config("Ascend910B3", "composed");
}

#[test]
fn conformance_950_fused() {
    run_config("Ascend950PR", "fused");
}

#[test]
fn conformance_950_composed() {
    run_config("Ascend950PR", "composed");
}

/// Entry point of the child processes above (does nothing in a normal run).
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    assert_eq!(scenario, "conformance");
    use_emulator();
    let fused = std::env::var("V4RT_ASCEND_OPS").map_or(true, |v| v != "composed");
    let quick = std::env::var("V4RT_ASCEND_CONFORMANCE_QUICK").is_ok_and(|v| v == "1");
    let be = Arc::new(AscendBackend::open(&SearchConfig::from_env(), 0).expect("emulated ascend backend"));
    let reference = Arc::new(cpu_ref::CpuBackend::new());
    println!("device: {}", be.info().device);
    let opts = SuiteOptions { allow_unsupported: true, include_large: !quick, ..Default::default() };
    let report = run_suite(be.as_ref(), reference.as_ref(), &opts);
    println!("{}", report.table());
    let rows = report.rows();
    let unsupported: Vec<String> =
        rows.iter().filter(|r| r.result == RowResult::Unsupported).map(|r| r.op.clone()).collect();
    let bf16_cases = report.cases.iter().filter(|c| c.numerics.is_some()).count();
    println!("cases: {}, run through fused kernels (bf16 class): {bf16_cases}", report.cases.len());
    let failures = report.failures();
    for (c, f) in &failures {
        println!("FAIL {} [{}] {}: {} {}: {}", c.variant, c.label, c.descriptor, f.kind.name(), f.tensor, f.detail);
    }
    assert!(failures.is_empty(), "{} failing checks", failures.len());
    // The emulator exports every aclnn op the backend uses, so nothing may be unsupported here
    // (a real toolkit missing an op would legitimately list it) but token sampling, which this
    // backend does not compose yet: the model samples on the host there (`DecodeStep`).
    let sampling = ["sample_tokens[greedy]", "sample_tokens[temperature]"];
    assert_eq!(unsupported, sampling, "unsupported through the emulator");
    if fused {
        assert!(bf16_cases > 0, "the fused path ran no case through a fused kernel");
    } else {
        assert_eq!(bf16_cases, 0, "V4RT_ASCEND_OPS=composed still ran fused kernels");
    }
    if !quick {
        let golden = v4rt_tests::tiers::golden_dir().join("tiny-flash");
        let checks = end_to_end(be.clone(), reference, &golden);
        println!("end to end (tiny-flash goldens):\n{}", checks_table(&checks));
        assert!(checks_passed(&checks), "end-to-end tiers failed");
    }
    println!("CHILD-OK conformance");
}
