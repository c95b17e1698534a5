//! `Backend::prepare` on the Ascend backend, through the CANN emulator: FP8/FP4 checkpoint
//! weights converted once to BF16 on the 910B profile (no FP8/FP4 compute), nothing on the 950.
//!
//! * Outputs are bit-identical with and without `prepare`, and the prepared path passes the
//!   shared conformance suite's FP8/FP4 `linear` and `moe_experts` cases against cpu-ref.
//! * After `prepare` no weight is decoded per call (`AscendBackend::weight_stats`).
//! * `write` to a weight or to its scale makes the next run use the new bytes.
//! * The 950 profile converts nothing; out of device memory, `prepare` keeps the per-call path.
//! * `Model::load` prepares every FP8/FP4 weight, and a forward pass then decodes none per call.
//!
//! Profile- and fault-dependent scenarios run in child processes (the emulator reads its
//! configuration once, at `aclInit`).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_child_ok, bytes_f32, run_child, CHILD_ENV};
use cpu_ref::CpuBackend;
use hal::backend::{Backend, BackendInfo, Prepared, Support};
use hal::ops::{Linear, MoeExperts, WeightFormat};
use hal::{DType, Error, Op, Tensor};
use v4rt_ascend::loader::SearchConfig;
use v4rt_ascend::AscendBackend;
use v4rt_tests::conformance::{cases, run_cases, Case, SuiteOptions, DEFAULT_SEED};

fn backend() -> AscendBackend {
    common::use_emulator();
    AscendBackend::open(&SearchConfig::from_env(), 0)
        .unwrap_or_else(|e| panic!("emulated backend did not come up: {e}"))
}

/// Inputs of `op` from position `first` on are persistent weights (the rest are per call).
fn first_weight(op: &Op) -> Option<usize> {
    match op {
        Op::Linear(l) if l.format.quantizes_input() => Some(1),
        Op::MoeExperts(m) if m.format.quantizes_input() => Some(3),
        _ => None,
    }
}

/// `prepare` for `op` with `inputs` (all of them; the per-call ones are passed as `None`).
fn prepare(b: &dyn Backend, op: &Op, inputs: &[&Tensor]) -> hal::Result<Prepared> {
    let first = first_weight(op).expect("an op with FP8/FP4 weights");
    let weights: Vec<Option<&Tensor>> = inputs.iter().enumerate().map(|(i, t)| (i >= first).then_some(*t)).collect();
    b.prepare(op, &weights)
}

/// The Ascend backend with `prepare` called on an op's weights right before its first run: the
/// suite uploads fresh weights for every case, so every FP8/FP4 case runs on converted weights.
struct Preparing {
    inner: AscendBackend,
}

impl Backend for Preparing {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }
    fn supports(&self, op: &Op) -> Support {
        self.inner.supports(op)
    }
    fn alloc(&self, shape: &[usize], dtype: DType) -> hal::Result<Tensor> {
        self.inner.alloc(shape, dtype)
    }
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> hal::Result<Tensor> {
        self.inner.upload(shape, dtype, bytes)
    }
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> hal::Result<()> {
        self.inner.write(t, offset, bytes)
    }
    fn download(&self, t: &Tensor) -> hal::Result<Vec<u8>> {
        self.inner.download(t)
    }
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> hal::Result<()> {
        if first_weight(op).is_some() && inputs.len() == op.signature().inputs.len() {
            prepare(&self.inner, op, inputs)?;
        }
        self.inner.run(op, inputs, outputs)
    }
    fn synchronize(&self) -> hal::Result<()> {
        self.inner.synchronize()
    }
}

/// The suite's small FP8/FP4 `linear` and `moe_experts` cases.
fn lowp_cases() -> Vec<Case> {
    cases(DEFAULT_SEED).into_iter().filter(|c| !c.large && first_weight(&c.op).is_some()).collect()
}

/// Uploads a case's inputs to `b`.
fn upload(b: &dyn Backend, case: &Case) -> Vec<Tensor> {
    case.build().inputs.iter().map(|h| b.upload(&h.shape, h.dtype, &h.bytes).expect("upload")).collect()
}

/// Runs `op` on uploaded inputs; the f32 output's bits.
fn run_bits(b: &dyn Backend, op: &Op, inputs: &[Tensor]) -> Vec<u32> {
    let spec = &op.signature().outputs[0];
    let mut y = b.alloc(&spec.shape, spec.dtype).expect("alloc");
    let refs: Vec<&Tensor> = inputs.iter().collect();
    b.run(op, &refs, &mut [&mut y]).unwrap_or_else(|e| panic!("{} run: {e}", op.name()));
    bytes_f32(&b.download(&y).expect("download")).iter().map(|v| v.to_bits()).collect()
}

/// Number of FP8/FP4 weight matrices a run of `op` decodes on the per-call path.
fn matrices_per_run(op: &Op, inputs: &[Tensor], b: &dyn Backend) -> u64 {
    match op {
        Op::Linear(l) if l.rows * l.out_features * l.in_features > 0 => 1,
        Op::MoeExperts(m) if m.rows * m.dim * m.inter > 0 && m.topk > 0 => {
            // Three matrices per expert used by at least one row.
            let mut ids = hal::dtype::bytes_i32(&b.download(&inputs[1]).expect("experts"));
            ids.sort_unstable();
            ids.dedup();
            3 * ids.len() as u64
        }
        _ => 0,
    }
}

#[test]
fn prepared_runs_are_bit_identical_and_decode_nothing_per_call() {
    let be = backend();
    assert!(!be.profile().fp8_compute);
    let d = &be.info().device;
    assert!(d.contains("FP8/FP4 weights → BF16 at load (no FP8/FP4 compute)"), "{d}");
    let picked = lowp_cases();
    let kinds = |f: WeightFormat, moe: bool| {
        picked
            .iter()
            .filter(|c| {
                matches!(&c.op, Op::MoeExperts(m) if moe && m.format == f)
                    || matches!(&c.op, Op::Linear(l) if !moe && l.format == f)
            })
            .count()
    };
    for (f, moe) in [
        (WeightFormat::Fp8Block128, false),
        (WeightFormat::Fp4Group32, false),
        (WeightFormat::Fp8Block128, true),
        (WeightFormat::Fp4Group32, true),
    ] {
        assert!(kinds(f, moe) > 0, "the suite has no {f:?} {} case", if moe { "moe_experts" } else { "linear" });
    }
    let mut checked = 0;
    for case in &picked {
        let op = &case.op;
        let inputs = upload(&be, case);
        let per_run = matrices_per_run(op, &inputs, &be);
        let s0 = be.weight_stats();
        let plain = run_bits(&be, op, &inputs);
        let s1 = be.weight_stats();
        assert_eq!(
            s1.call_decodes - s0.call_decodes,
            per_run,
            "{} [{}]: per-call decodes without prepare",
            case.variant(),
            case.label
        );
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let done = prepare(&be, op, &refs).unwrap_or_else(|e| panic!("prepare {op:?}: {e}"));
        let slots = if matches!(op, Op::MoeExperts(_)) { 3 } else { 1 };
        let sig = op.signature();
        let empty = sig.inputs[first_weight(op).unwrap()].shape.iter().product::<usize>() == 0;
        if !empty {
            assert_eq!((done.converted, done.kept), (slots, 0), "{op:?}");
            assert!(done.note.contains("BF16") && done.note.contains("no FP8/FP4 compute"), "{}", done.note);
            // BF16 copies: 2 bytes per weight element (the suite's scales are in bf16's exact range).
            let elems: usize = sig
                .inputs
                .iter()
                .filter(|s| matches!(s.name, "weight" | "w1" | "w2" | "w3"))
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            // A packed FP4 element holds two values.
            let values = if matches!(
                op,
                Op::Linear(Linear { format: WeightFormat::Fp4Group32, .. })
                    | Op::MoeExperts(MoeExperts { format: WeightFormat::Fp4Group32, .. })
            ) {
                2
            } else {
                1
            };
            assert_eq!(done.bytes, 2 * values * elems, "{op:?}");
        }
        // A second prepare finds the copies current and does nothing.
        assert_eq!(prepare(&be, op, &refs).unwrap().converted, 0);
        let prepared = run_bits(&be, op, &inputs);
        let s2 = be.weight_stats();
        assert_eq!(
            s2.call_decodes,
            s1.call_decodes,
            "{} [{}]: decoded per call after prepare",
            case.variant(),
            case.label
        );
        assert_eq!(s2.f32_copies, 0);
        assert!(prepared == plain, "{} [{}]: outputs differ with prepare", case.variant(), case.label);
        checked += 1;
    }
    println!("{checked} FP8/FP4 cases bit-identical with and without prepare; {:?}", be.weight_stats());
}

#[test]
fn prepared_path_passes_the_suite_against_cpu_ref() {
    let under_test = Preparing { inner: backend() };
    let reference = CpuBackend::new();
    let picked = lowp_cases();
    let report = run_cases(&under_test, &reference, &picked, &SuiteOptions::default());
    println!("{}", report.table());
    for (c, f) in report.failures() {
        println!("FAIL {} [{}] {}: {} {}: {}", c.variant, c.label, c.descriptor, f.kind.name(), f.tensor, f.detail);
    }
    assert!(report.passed(), "{} failing checks", report.failures().len());
    let stats = under_test.inner.weight_stats();
    println!("{} cases; {stats:?}", picked.len());
    assert!(stats.converted > 0);
    assert_eq!(stats.call_decodes, 0, "every FP8/FP4 weight of the suite ran from its load-time copy");
}

#[test]
fn writes_after_prepare_are_seen() {
    let be = backend();
    let cpu = CpuBackend::new();
    for format in [WeightFormat::Fp8Block128, WeightFormat::Fp4Group32] {
        let case = lowp_cases()
            .into_iter()
            .find(|c| matches!(&c.op, Op::Linear(l) if l.format == format && l.rows > 0 && l.out_features > 0))
            .expect("a linear case");
        let op = &case.op;
        let data = case.build();
        let mut inputs = upload(&be, &case);
        let refs: Vec<&Tensor> = inputs.iter().collect();
        assert_eq!(prepare(&be, op, &refs).unwrap().converted, 1);
        let before = run_bits(&be, op, &inputs);
        // New weight codes (each byte + 1: other values, scales unchanged).
        let new_w: Vec<u8> = data.inputs[1]
            .bytes
            .iter()
            .map(|b| b.wrapping_add(1) & if format == WeightFormat::Fp8Block128 { 0x7E } else { 0xFF })
            .collect();
        be.write(&mut inputs[1], 0, &new_w).unwrap();
        assert_eq!(be.download(&inputs[1]).unwrap(), new_w, "download returns the written bytes");
        let s0 = be.weight_stats();
        let after_w = run_bits(&be, op, &inputs);
        assert_eq!(be.weight_stats().call_decodes, s0.call_decodes + 1, "the written weight is decoded per call again");
        assert!(after_w != before, "the write changed nothing");
        let fresh: Vec<Tensor> = [&data.inputs[0].bytes, &new_w, &data.inputs[2].bytes]
            .iter()
            .zip(&op.signature().inputs)
            .map(|(b, s)| cpu.upload(&s.shape, s.dtype, b).unwrap())
            .collect();
        let want = run_bits(&cpu, op, &fresh);
        let nmse = common::nmse(
            &after_w.iter().map(|b| f32::from_bits(*b)).collect::<Vec<_>>(),
            &want.iter().map(|b| f32::from_bits(*b)).collect::<Vec<_>>(),
        );
        assert!(nmse <= 1e-7, "{format:?}: after a weight write, nmse {nmse:e} vs cpu-ref");
        // Prepared again: back on the copy, same bits as the per-call path.
        let refs: Vec<&Tensor> = inputs.iter().collect();
        assert_eq!(prepare(&be, op, &refs).unwrap().converted, 1);
        assert_eq!(run_bits(&be, op, &inputs), after_w);
        // A write to the scale (block 0 one step larger) makes the copy stale too.
        let mut new_s = data.inputs[2].bytes.clone();
        new_s[0] += 1;
        be.write(&mut inputs[2], 0, &new_s[..1]).unwrap();
        let s1 = be.weight_stats();
        let after_s = run_bits(&be, op, &inputs);
        assert_eq!(be.weight_stats().call_decodes, s1.call_decodes + 1, "a written scale is decoded per call again");
        let fresh: Vec<Tensor> = [&data.inputs[0].bytes, &new_w, &new_s]
            .iter()
            .zip(&op.signature().inputs)
            .map(|(b, s)| be.upload(&s.shape, s.dtype, b).unwrap())
            .collect();
        assert_eq!(after_s, run_bits(&be, op, &fresh), "{format:?}: after a scale write");
        assert!(after_s != after_w);
    }
}

#[test]
fn prepare_checks_its_arguments() {
    let be = backend();
    let cpu = CpuBackend::new();
    let op = Op::Linear(Linear { rows: 0, in_features: 128, out_features: 64, format: WeightFormat::Fp8Block128 });
    let w = be.upload(&[64, 128], DType::F8E4M3, &vec![0x38; 64 * 128]).unwrap();
    let s = be.upload(&[1, 1], DType::F8E8M0, &[127]).unwrap();
    let e = be.prepare(&op, &[Some(&w), Some(&s)]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("expected 3 inputs"), "{e}");
    let e = be.prepare(&op, &[None, Some(&s), Some(&w)]).unwrap_err().to_string();
    assert!(e.contains("linear prepare input 'weight'"), "{e}");
    let foreign = cpu.upload(&[1, 1], DType::F8E8M0, &[127]).unwrap();
    let e = be.prepare(&op, &[None, Some(&w), Some(&foreign)]).unwrap_err().to_string();
    assert!(e.contains("linear prepare input 'scale'") && e.contains("cpu-ref"), "{e}");
    // Ops without FP8/FP4 weights, and a weight given without its scale: nothing to do.
    let f32_op = Op::Linear(Linear { rows: 0, in_features: 8, out_features: 4, format: WeightFormat::F32 });
    let wf = be.upload(&[4, 8], DType::F32, &[0; 128]).unwrap();
    assert_eq!(be.prepare(&f32_op, &[None, Some(&wf)]).unwrap(), Prepared::default());
    assert_eq!(be.prepare(&op, &[None, Some(&w), None]).unwrap(), Prepared::default());
    // A scale outside bf16's exact range: an F32 copy (same numbers as the per-call decode).
    let big = be.upload(&[1, 1], DType::F8E8M0, &[250]).unwrap();
    let done = be.prepare(&op, &[None, Some(&w), Some(&big)]).unwrap();
    assert_eq!((done.converted, done.bytes), (1, 64 * 128 * 4));
    assert!(done.note.contains("kept as F32"), "{}", done.note);
    assert_eq!(be.weight_stats().f32_copies, 1);
    let run = Op::Linear(Linear { rows: 2, in_features: 128, out_features: 64, format: WeightFormat::Fp8Block128 });
    let x = |b: &dyn Backend| b.upload(&[2, 128], DType::F32, &hal::dtype::f32_bytes(&[0.001; 256])).unwrap();
    let ours = run_bits(&be, &run, &[x(&be), w, big]);
    let s0 = be.weight_stats();
    // The same tensors uploaded again (not prepared): the per-call decode, same bits.
    let w2 = be.upload(&[64, 128], DType::F8E4M3, &vec![0x38; 64 * 128]).unwrap();
    let big2 = be.upload(&[1, 1], DType::F8E8M0, &[250]).unwrap();
    assert_eq!(ours, run_bits(&be, &run, &[x(&be), w2, big2]));
    assert_eq!(be.weight_stats().call_decodes, s0.call_decodes + 1);
    // cpu-ref keeps the default: validation only.
    let wc = cpu.upload(&[64, 128], DType::F8E4M3, &vec![0x38; 64 * 128]).unwrap();
    let sc = cpu.upload(&[1, 1], DType::F8E8M0, &[127]).unwrap();
    assert_eq!(cpu.prepare(&op, &[None, Some(&wc), Some(&sc)]).unwrap(), Prepared::default());
}

#[test]
fn model_load_prepares_every_lowp_weight() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/tiny-flash");
    let be = Arc::new(backend());
    let model = model::forward::Model::load(&dir, be.clone()).unwrap_or_else(|e| panic!("load on ascend: {e}"));
    let stats = be.weight_stats();
    let p = model.prepared();
    println!("prepared at load: {p:?}; {stats:?}");
    let c = &model.cfg;
    // Per block: wq_a, wq_b, wkv, wo_a (kept FP8: Ascend runs an FP8 GroupedLinear), wo_b,
    // 3 shared-expert linears, 3 routed-expert stacks, plus the indexer's wq_b in CSA layers;
    // the MTP head adds e_proj and h_proj.
    let blocks = c.n_layers + c.n_mtp_layers;
    let csa = (0..blocks).filter(|&i| c.layer_ratio(i) == 4).count();
    let want = blocks * 11 + csa + 2 * c.n_mtp_layers;
    assert_eq!(p.converted, want, "{p:?}");
    assert_eq!((p.kept, stats.converted, stats.converted_bytes), (0, want as u64, p.bytes as u64));
    assert!(p.note.contains("no FP8/FP4 compute"), "{}", p.note);
    // One short prefill: no FP8/FP4 weight decoded per call, and the same logits, bit for bit, as
    // the same backend with the weights left unprepared (which decodes them per call).
    let tokens = [3u32, 17, 42, 5];
    let logits = |m: &model::forward::Model| {
        let mut cache = m.new_cache(1, 16).expect("cache");
        let slot = cache.alloc_slot(m.backend()).expect("slot");
        let chunk = model::forward::Chunk { slot, tokens: &tokens };
        let opts =
            model::forward::ForwardOptions { logits: model::forward::LogitsAt::Last, decisions: false, mtp_ids: None };
        m.forward(&mut cache, &[chunk], &opts).expect("forward").logits
    };
    let ours = logits(&model);
    assert_eq!(be.weight_stats().call_decodes, 0, "a weight was decoded per call after load");
    let plain = model::forward::Model::load(&dir, Arc::new(Unprepared(be.clone()))).expect("load without prepare");
    assert_eq!(*plain.prepared(), Prepared::default());
    let theirs = logits(&plain);
    assert!(be.weight_stats().call_decodes > 0);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&ours) == bits(&theirs), "logits differ with prepare");
    let reference = model::forward::Model::load(&dir, Arc::new(CpuBackend::new())).expect("load on cpu-ref");
    assert_eq!(*reference.prepared(), Prepared::default(), "cpu-ref keeps the default prepare");
    println!(
        "tiny-flash last-token logits vs cpu-ref: nmse {:.3e} (informational)",
        common::nmse(&ours, &logits(&reference))
    );
}

/// The Ascend backend with the HAL's default `prepare` (nothing converted).
struct Unprepared(Arc<AscendBackend>);

impl Backend for Unprepared {
    fn info(&self) -> &BackendInfo {
        self.0.info()
    }
    fn supports(&self, op: &Op) -> Support {
        self.0.supports(op)
    }
    fn alloc(&self, shape: &[usize], dtype: DType) -> hal::Result<Tensor> {
        self.0.alloc(shape, dtype)
    }
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> hal::Result<Tensor> {
        self.0.upload(shape, dtype, bytes)
    }
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> hal::Result<()> {
        self.0.write(t, offset, bytes)
    }
    fn download(&self, t: &Tensor) -> hal::Result<Vec<u8>> {
        self.0.download(t)
    }
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> hal::Result<()> {
        self.0.run(op, inputs, outputs)
    }
    fn synchronize(&self) -> hal::Result<()> {
        self.0.synchronize()
    }
}

#[test]
fn ascend950_prepares_nothing() {
    assert_child_ok(&run_child("soc950", &[("V4RT_EMU_SOC", "Ascend950PR")]));
}

#[test]
fn out_of_memory_keeps_the_per_call_path() {
    // Allocations: x (1), weight (2), scale (3); the copy is the 4th.
    assert_child_ok(&run_child("oom", &[("V4RT_EMU_FAIL_ALLOC", "4")]));
}

/// Entry point of the child processes above (does nothing in a normal run).
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    let be = backend();
    match scenario.as_str() {
        "soc950" => {
            assert!(be.profile().fp8_compute && be.profile().fp4_compute);
            assert!(!be.info().device.contains("BF16 at load"), "{}", be.info().device);
            for case in lowp_cases() {
                let inputs = upload(&be, &case);
                let refs: Vec<&Tensor> = inputs.iter().collect();
                assert_eq!(prepare(&be, &case.op, &refs).unwrap(), Prepared::default(), "{:?}", case.op);
            }
            let stats = be.weight_stats();
            assert_eq!((stats.converted, stats.converted_bytes), (0, 0));
        }
        "oom" => {
            let case = lowp_cases()
                .into_iter()
                .find(|c| matches!(&c.op, Op::Linear(l) if l.format == WeightFormat::Fp8Block128 && l.rows > 0 && l.out_features > 0))
                .expect("an FP8 linear case");
            let inputs = upload(&be, &case);
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let done = prepare(&be, &case.op, &refs).expect("prepare survives the failed allocation");
            assert_eq!((done.converted, done.kept), (0, 1), "{done:?}");
            assert!(done.note.contains("left in checkpoint format"), "{}", done.note);
            let ours = run_bits(&be, &case.op, &inputs);
            assert_eq!(be.weight_stats().call_decodes, 1, "the kept weight is decoded per call");
            let cpu = CpuBackend::new();
            let want = run_bits(&cpu, &case.op, &upload(&cpu, &case));
            let f = |v: &[u32]| v.iter().map(|b| f32::from_bits(*b)).collect::<Vec<_>>();
            assert!(common::nmse(&f(&ours), &f(&want)) <= 1e-7);
        }
        other => panic!("unknown child scenario {other}"),
    }
    println!("CHILD-OK {scenario}");
}
