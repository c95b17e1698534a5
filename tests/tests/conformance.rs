//! The conformance suite on itself: cpu-ref against cpu-ref must pass with zero failures (this
//! guards the harness: inputs, metrics, poison and canaries), and every fault planted in
//! `FaultyBackend` must be reported as a failure naming the op and the kind.

use std::collections::BTreeSet;
use std::sync::Arc;

use cpu_ref::CpuBackend;
use hal::Backend;
use v4rt_tests::conformance::{self, cases, kind_index, run_suite, FailureKind, SuiteOptions, SuiteReport, N_KINDS};
use v4rt_tests::faults::{Fault, FaultyBackend};

/// A quick subset for the fault tests: small shapes, two cases per op variant.
fn subset() -> SuiteOptions {
    SuiteOptions { include_large: false, max_cases_per_variant: Some(2), ..SuiteOptions::default() }
}

fn run_fault(fault: Fault) -> SuiteReport {
    let report = run_suite(&FaultyBackend::new(fault), &CpuBackend::new(), &subset());
    println!("{}", report.table());
    report
}

/// (op name, failure kind) of every failure.
fn failing(report: &SuiteReport) -> BTreeSet<(&'static str, FailureKind)> {
    report.failures().iter().map(|(c, f)| (c.op, f.kind)).collect()
}

fn op_names() -> BTreeSet<&'static str> {
    subset().select().iter().map(|c| c.op.name()).collect()
}

#[test]
fn every_op_kind_has_cases() {
    let all = cases(conformance::DEFAULT_SEED);
    let kinds: BTreeSet<usize> = all.iter().map(|c| kind_index(&c.op)).collect();
    assert_eq!(kinds.len(), N_KINDS, "kinds covered: {kinds:?}");
    // Deterministic in the seed, different across seeds.
    let again = cases(conformance::DEFAULT_SEED);
    assert_eq!(
        format!("{:?}", all.iter().map(|c| &c.op).collect::<Vec<_>>()),
        format!("{:?}", again.iter().map(|c| &c.op).collect::<Vec<_>>())
    );
    let other = cases(1);
    assert_ne!(
        format!("{:?}", all.iter().map(|c| &c.op).collect::<Vec<_>>()),
        format!("{:?}", other.iter().map(|c| &c.op).collect::<Vec<_>>())
    );
    println!("{} cases ({} large)", all.len(), all.iter().filter(|c| c.large).count());
}

/// No op writes a tensor of a one-byte dtype (FP8/FP4 codes, e8m0 scales, i8): those tensors
/// change only through `upload`/`write`. The CUDA backend relies on it to load FP8 weights
/// before a kernel's dependency wait (cuda/kernels/common.cuh, `grid_dep_trigger`); an op with
/// such an output would make those early loads race with it.
#[test]
fn no_op_writes_a_one_byte_dtype() {
    let all = cases(conformance::DEFAULT_SEED);
    let kinds: BTreeSet<usize> = all.iter().map(|c| kind_index(&c.op)).collect();
    assert_eq!(kinds.len(), N_KINDS, "every op kind is looked at");
    for c in &all {
        for spec in c.op.signature().outputs {
            assert!(spec.dtype.size() > 1, "{} ({}) writes '{}' as {}", c.op.name(), c.label, spec.name, spec.dtype);
        }
    }
}

#[test]
fn cpu_ref_passes_against_itself() {
    let b = CpuBackend::new();
    let report = run_suite(&b, &CpuBackend::new(), &SuiteOptions::default());
    println!("{}", report.table());
    assert!(report.passed(), "cpu-ref vs cpu-ref must have zero failures:\n{}", report.table());
    // The JSON report round-trips and agrees.
    let j = report.to_json();
    assert_eq!(j["passed"], true);
    assert_eq!(j["cases"].as_array().map(Vec::len), Some(report.cases.len()));
}

#[test]
fn faithful_wrapper_passes() {
    let report = run_fault(Fault::None);
    assert!(report.passed(), "the fault-free wrapper must pass:\n{}", report.table());
}

#[test]
fn off_by_one_is_caught() {
    let report = run_fault(Fault::OffByOne);
    let f = failing(&report);
    assert_eq!(f, BTreeSet::from([("rope", FailureKind::Nmse)]), "{}", report.table());
    // Every rope case fails, nothing else does.
    assert!(report.cases.iter().filter(|c| c.op == "rope").all(|c| !c.passed()));
}

#[test]
fn missing_sync_is_caught() {
    let report = run_fault(Fault::MissingSync);
    let f = failing(&report);
    let ops: BTreeSet<&str> = f.iter().map(|(o, _)| *o).collect();
    assert_eq!(ops, op_names(), "every op must fail when downloads do not wait for the work:\n{}", report.table());
    // Write-only outputs stay poisoned; read-write ones keep their pre-fill.
    for op in ["linear", "embed", "sparse_attention", "moe_experts", "indexer_topk", "moe_gate"] {
        assert!(f.contains(&(op, FailureKind::Poisoned)), "{op} not reported as poisoned");
    }
    for op in ["window_store", "compressor", "quant_sim", "rope", "hadamard"] {
        assert!(
            f.iter().any(|(o, k)| *o == op && matches!(k, FailureKind::Mismatch | FailureKind::Nmse)),
            "{op} stale output not caught"
        );
    }
    assert!(report.cases.iter().all(|c| !c.passed()));
}

#[test]
fn wrong_scale_is_caught() {
    let report = run_fault(Fault::WrongScale);
    let f = failing(&report);
    assert_eq!(f, BTreeSet::from([("linear", FailureKind::Nmse)]), "{}", report.table());
    for c in report.cases.iter().filter(|c| c.op == "linear") {
        let quantized = c.variant.contains("fp8") || c.variant.contains("fp4");
        assert_eq!(c.passed(), !quantized, "{} {}", c.variant, c.label);
    }
}

#[test]
fn out_of_bounds_write_is_caught() {
    let report = run_fault(Fault::OutOfBounds);
    let f = failing(&report);
    assert!(f.iter().all(|(_, k)| *k == FailureKind::Canary), "{}", report.table());
    let ops: BTreeSet<&str> = f.iter().map(|(o, _)| *o).collect();
    assert_eq!(ops, op_names());
    assert!(report.cases.iter().all(|c| !c.passed()));
}

#[test]
fn unsupported_op_fails_unless_allowed() {
    let b = FaultyBackend::new(Fault::Refuses("hadamard"));
    let report = run_suite(&b, &CpuBackend::new(), &subset());
    assert_eq!(failing(&report), BTreeSet::from([("hadamard", FailureKind::Unsupported)]));
    assert!(!report.passed());
    assert!(report.table().contains("FAIL: unsupported"));
    let allowed = run_suite(&b, &CpuBackend::new(), &SuiteOptions { allow_unsupported: true, ..subset() });
    assert!(allowed.passed() && allowed.unsupported() > 0, "{}", allowed.table());
}

#[test]
fn end_to_end_cpu_ref_against_itself() {
    let dir = v4rt_tests::tiers::golden_dir().join("tiny-flash");
    let b: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let checks = conformance::end_to_end(b, Arc::new(CpuBackend::new()), &dir);
    println!("{}", conformance::checks_table(&checks));
    assert!(conformance::checks_passed(&checks), "{}", conformance::checks_table(&checks));
    // cpu-ref against itself is bit-identical, so even the informational tight bound holds.
    assert!(checks.iter().all(|c| c.pass));
}

/// The full suite with one line per case on stderr (timings): `cargo test --release -p
/// v4rt-tests --test conformance -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_suite_with_progress() {
    let report =
        run_suite(&CpuBackend::new(), &CpuBackend::new(), &SuiteOptions { progress: true, ..SuiteOptions::default() });
    assert!(report.passed());
}
