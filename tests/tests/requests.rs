//! Bad requests to `Model::forward` and `KvCache` return `ModelError::Request` naming the slot,
//! position or token at fault — never a panic, never a silently wrong result. Also the positive
//! side of slot management: a freed slot, reallocated, behaves exactly like a fresh one.
//!
//! Every test uses the embedded tiny-flash model (synthetic weights, seed 1) on the CPU
//! reference backend.

use std::sync::{Arc, OnceLock};

use model::config::ModelConfig;
use model::forward::{Chunk, ForwardOptions, ForwardOutput, LogitsAt, Model};
use model::sample::{sample, Rng};
use model::{cache::KvCache, ModelError};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let cfg = ModelConfig::embedded("tiny-flash").expect("embedded tiny-flash config");
        let ck = model::synthetic::generate(&cfg, 1);
        Model::from_checkpoint(cfg, &ck, Arc::new(cpu_ref::CpuBackend::new())).expect("the embedded model builds")
    })
}

/// A cache of `slots` slots × `capacity` tokens with its first `allocated` slots allocated.
fn cache(slots: usize, capacity: usize, allocated: usize) -> KvCache {
    let m = model();
    let mut c = m.new_cache(slots, capacity).unwrap();
    for want in 0..allocated {
        assert_eq!(c.alloc_slot(m.backend()).unwrap(), want);
    }
    c
}

fn opts() -> ForwardOptions<'static> {
    ForwardOptions { logits: LogitsAt::All, decisions: false, mtp_ids: None }
}

fn forward(cache: &mut KvCache, chunks: &[Chunk], opts: &ForwardOptions) -> Result<ForwardOutput, ModelError> {
    model().forward(cache, chunks, opts)
}

/// The call must fail with a request error whose message contains every one of `parts`.
fn expect_request_error<T: std::fmt::Debug>(result: Result<T, ModelError>, parts: &[&str]) -> String {
    let err = match result {
        Err(e) => e,
        Ok(v) => panic!("expected an error mentioning {parts:?}, got Ok({v:?})"),
    };
    assert!(matches!(err, ModelError::Request(_)), "not a request error: {err:?}");
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "'{msg}' does not mention '{p}'");
    }
    msg
}

#[test]
fn token_id_outside_vocabulary() {
    let mut c = cache(1, 8, 1);
    let r = forward(&mut c, &[Chunk { slot: 0, tokens: &[5, 6, 1024] }], &opts());
    expect_request_error(r, &["token id 1024", "position 2", "slot 0", "1024)"]);
    assert_eq!(c.position(0).unwrap(), 0, "a rejected call moved the slot");
}

#[test]
fn chunk_longer_than_capacity() {
    let mut c = cache(1, 8, 1);
    let tokens: Vec<u32> = (1..=9).collect();
    let r = forward(&mut c, &[Chunk { slot: 0, tokens: &tokens }], &opts());
    expect_request_error(r, &["slot 0", "9 tokens", "position 9", "capacity of 8"]);
    assert_eq!(c.position(0).unwrap(), 0);
}

#[test]
fn continuation_past_capacity() {
    let mut c = cache(1, 8, 1);
    forward(&mut c, &[Chunk { slot: 0, tokens: &[1, 2, 3, 4, 5] }], &opts()).unwrap();
    let r = forward(&mut c, &[Chunk { slot: 0, tokens: &[6, 7, 8, 9] }], &opts());
    expect_request_error(r, &["slot 0", "4 tokens at position 5", "position 9", "capacity of 8"]);
    assert_eq!(c.position(0).unwrap(), 5, "a rejected call moved the slot");
    // Exactly filling the cache is allowed.
    forward(&mut c, &[Chunk { slot: 0, tokens: &[6, 7, 8] }], &opts()).unwrap();
    assert_eq!(c.position(0).unwrap(), 8);
}

#[test]
fn unallocated_slot() {
    let mut c = cache(2, 8, 1);
    let r = forward(&mut c, &[Chunk { slot: 1, tokens: &[1, 2] }], &opts());
    expect_request_error(r, &["slot 1", "not allocated"]);
    // A slot index past the cache's slots.
    let r = forward(&mut c, &[Chunk { slot: 7, tokens: &[1] }], &opts());
    expect_request_error(r, &["slot 7", "not allocated", "slots: 2"]);
}

#[test]
fn same_slot_twice_in_one_call() {
    let mut c = cache(2, 8, 2);
    let chunks =
        [Chunk { slot: 1, tokens: &[1, 2][..] }, Chunk { slot: 0, tokens: &[3] }, Chunk { slot: 1, tokens: &[4] }];
    expect_request_error(forward(&mut c, &chunks, &opts()), &["slot 1", "twice"]);
    assert_eq!((c.position(0).unwrap(), c.position(1).unwrap()), (0, 0), "a rejected call moved a slot");
}

#[test]
fn empty_chunk() {
    let mut c = cache(2, 8, 2);
    let chunks = [Chunk { slot: 0, tokens: &[1, 2][..] }, Chunk { slot: 1, tokens: &[] }];
    expect_request_error(forward(&mut c, &chunks, &opts()), &["slot 1", "no tokens"]);
}

#[test]
fn no_chunks() {
    let mut c = cache(1, 8, 1);
    expect_request_error(forward(&mut c, &[], &opts()), &["no sequences"]);
}

#[test]
fn all_slots_in_use() {
    let m = model();
    let mut c = cache(2, 8, 2);
    expect_request_error(c.alloc_slot(m.backend()), &["all 2 cache slots are in use"]);
}

#[test]
fn mtp_ids_count_differs_from_rows() {
    let mut c = cache(2, 8, 2);
    let chunks = [Chunk { slot: 0, tokens: &[1, 2, 3][..] }, Chunk { slot: 1, tokens: &[4] }];
    let ids = [2, 3, 0];
    let o = ForwardOptions { mtp_ids: Some(&ids), ..opts() };
    expect_request_error(forward(&mut c, &chunks, &o), &["3 MTP ids", "4 rows"]);
    assert_eq!((c.position(0).unwrap(), c.position(1).unwrap()), (0, 0), "a rejected call moved a slot");
}

/// A prefill of `prefill` tokens with MTP, then one-token decode steps for the rest: every
/// output, concatenated.
fn run_sequence(c: &mut KvCache, slot: usize, tokens: &[u32], prefill: usize) -> Vec<f32> {
    let (prompt, rest) = tokens.split_at(prefill);
    let next: Vec<u32> = tokens[1..=prefill].to_vec();
    let o = ForwardOptions { mtp_ids: Some(&next), ..opts() };
    let out = forward(c, &[Chunk { slot, tokens: prompt }], &o).unwrap();
    let mut all = out.logits;
    all.extend(out.mtp_logits.expect("MTP logits"));
    for t in rest {
        all.extend(forward(c, &[Chunk { slot, tokens: std::slice::from_ref(t) }], &opts()).unwrap().logits);
    }
    all
}

#[test]
fn freed_slot_restarts_clean() {
    let m = model();
    let first: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 1024).collect();
    let second: Vec<u32> = (0..24).map(|i| (i * 101 + 500) % 1024).collect();

    // The second sequence starts with a 2-token prefill: its first compressor blocks are then
    // built in the decode path from the slot's compressor state, which must have been reset.
    let mut fresh = cache(1, 24, 1);
    let want = run_sequence(&mut fresh, 0, &second, 2);

    let mut reused = cache(1, 24, 1);
    run_sequence(&mut reused, 0, &first, 20);
    assert_eq!(reused.position(0).unwrap(), 24);
    reused.free_slot(0);
    expect_request_error(reused.position(0), &["slot 0", "not allocated"]);
    let slot = reused.alloc_slot(m.backend()).unwrap();
    assert_eq!(slot, 0);
    assert_eq!(reused.position(slot).unwrap(), 0, "a reallocated slot must start at position 0");
    let got = run_sequence(&mut reused, slot, &second, 2);

    assert_eq!(got.len(), want.len());
    let differing = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} values differ from a fresh cache: state of the freed sequence leaked",
        want.len()
    );
}

/// The cache dtype: bf16 by default on cpu-ref (it runs every cache op with it), half the entry
/// bytes of f32 with the f32 compressor state unchanged, and a dtype no cache op defines is a
/// request error naming it.
#[test]
fn kv_cache_dtypes() {
    let m = model();
    let (bf16, f32) = (m.new_cache(2, 300).unwrap(), m.new_cache_with(2, 300, hal::DType::F32).unwrap());
    assert_eq!(bf16.dtype(), hal::DType::BF16);
    assert_eq!(f32.dtype(), hal::DType::F32);
    assert!(
        bf16.bytes() < f32.bytes() && 2 * bf16.bytes() > f32.bytes(),
        "bf16 {} vs f32 {} bytes",
        bf16.bytes(),
        f32.bytes()
    );
    let e = m.new_cache_with(1, 8, hal::DType::F16).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains("f32 or bf16"), "{e}");
}

/// `KvCache::save` then `load` into a fresh cache continues a sequence exactly as the original
/// cache does; a file for another cache shape or dtype is refused naming the file and tensor.
#[test]
fn kv_cache_save_and_load() {
    let m = model();
    let path = std::env::temp_dir().join(format!("v4rt-kv-save-{}.safetensors", std::process::id()));
    let toks: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % m.cfg.vocab_size as u32).collect();
    for kv in [hal::DType::BF16, hal::DType::F32] {
        let mut a = m.new_cache_with(2, 64, kv).unwrap();
        let (_, s) = (a.alloc_slot(m.backend()).unwrap(), a.alloc_slot(m.backend()).unwrap());
        forward(&mut a, &[Chunk { slot: s, tokens: &toks[..30] }], &opts()).unwrap();
        a.save(m.backend(), &path).unwrap();
        let mut b = m.new_cache_with(2, 64, kv).unwrap();
        b.load(m.backend(), &path).unwrap();
        assert_eq!(b.position(s).unwrap(), 30);
        let rest = &[Chunk { slot: s, tokens: &toks[30..] }];
        let (x, y) = (forward(&mut a, rest, &opts()).unwrap().logits, forward(&mut b, rest, &opts()).unwrap().logits);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{kv}: resumed logits differ");
    }
    // The file now holds an f32 cache of 2 slots × 64 tokens.
    let name = path.display().to_string();
    let e = m.new_cache_with(2, 64, hal::DType::BF16).unwrap().load(m.backend(), &path).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("layers.0.ring") && e.contains("bf16"), "{e}");
    let e = m.new_cache_with(3, 64, hal::DType::F32).unwrap().load(m.backend(), &path).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("2 slots"), "{e}");
    std::fs::write(&path, b"not a cache").unwrap();
    let e = m.new_cache_with(2, 64, hal::DType::F32).unwrap().load(m.backend(), &path).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(e.contains(&name), "{e}");
}

/// `Model::decode_step` gives, step by step, the logits of one-token `Model::forward` calls bit
/// for bit, for a batch of slots at different positions (a gap left at slot 1). On cpu-ref it
/// never records (the backend runs the ops directly); the recorded path is checked against
/// `forward` the same way on CUDA by the conformance suite's end-to-end "decode step" check.
#[test]
fn decode_step_matches_forward() {
    let m = model();
    let prompts: [Vec<u32>; 2] =
        [(0..9).map(|i| (i * 13 + 5) % 1024).collect(), (0..4).map(|i| (i * 71 + 2) % 1024).collect()];
    let prefill = |c: &mut KvCache| {
        forward(c, &[Chunk { slot: 0, tokens: &prompts[0] }, Chunk { slot: 2, tokens: &prompts[1] }], &opts()).unwrap();
    };
    let (mut a, mut b) = (cache(3, 20, 3), cache(3, 20, 3));
    prefill(&mut a);
    prefill(&mut b);
    let mut step = m.decode_step(&b, &[2, 0]).unwrap();
    assert_eq!(step.slots(), &[2, 0]);
    let v = m.cfg.vocab_size;
    for k in 0..6u32 {
        let tokens = [(k * 29 + 3) % 1024, (k * 7 + 900) % 1024];
        let want = forward(
            &mut a,
            &[Chunk { slot: 2, tokens: &tokens[..1] }, Chunk { slot: 0, tokens: &tokens[1..] }],
            &opts(),
        )
        .unwrap()
        .logits;
        let got = step.run(&mut b, &tokens).unwrap();
        assert_eq!(got.len(), 2 * v);
        assert!(got.iter().all(|x| x.is_finite()), "step {k}: non-finite logits");
        let differing = got.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differing, 0, "step {k}: {differing} of {} logits differ from Model::forward", got.len());
    }
    assert!(!step.is_recorded(), "cpu-ref does not record");
    assert_eq!((b.position(0).unwrap(), b.position(2).unwrap()), (15, 10));
}

/// `DecodeStep::issue` queues steps without downloading: after several issued steps, `logits`
/// returns the last one's logits, bit for bit those of `run` doing the same steps one by one,
/// and the slots stand where `run` leaves them.
#[test]
fn decode_step_issued_steps_match_run() {
    let m = model();
    let prompt: Vec<u32> = (0..7).map(|i| (i * 37 + 11) % 1024).collect();
    let (mut a, mut b) = (cache(1, 16, 1), cache(1, 16, 1));
    for c in [&mut a, &mut b] {
        forward(c, &[Chunk { slot: 0, tokens: &prompt }], &opts()).unwrap();
    }
    let (mut run, mut queued) = (m.decode_step(&a, &[0]).unwrap(), m.decode_step(&b, &[0]).unwrap());
    let mut want = Vec::new();
    for k in 0..5u32 {
        let token = [(k * 101 + 7) % 1024];
        want = run.run(&mut a, &token).unwrap();
        queued.issue(&mut b, &token).unwrap();
    }
    let got = queued.logits().unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite logits");
    let differing = got.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} logits differ between issued and run steps", got.len());
    assert_eq!((a.position(0).unwrap(), b.position(0).unwrap()), (12, 12));
    expect_request_error(queued.issue(&mut b, &[1024]), &["token id 1024", "slot 0"]);
    assert_eq!(b.position(0).unwrap(), 12, "a rejected issue moved the slot");
}

/// Bad decode-step requests are request errors naming what is wrong, and leave the cache as it was.
#[test]
fn decode_step_bad_requests() {
    let m = model();
    let mut c = cache(2, 3, 1);
    let other = cache(2, 3, 1);
    expect_request_error(m.decode_step(&c, &[]), &["no slots"]);
    expect_request_error(m.decode_step(&c, &[0, 2]), &["slot 2", "2 slots"]);
    expect_request_error(m.decode_step(&c, &[0, 0]), &["slot 0", "twice"]);
    let mut free = m.decode_step(&c, &[1]).unwrap();
    expect_request_error(free.run(&mut c, &[1]), &["slot 1", "not allocated"]);
    let mut step = m.decode_step(&c, &[0]).unwrap();
    expect_request_error(step.run(&mut c, &[1, 2]), &["2 tokens for 1 slots"]);
    expect_request_error(step.run(&mut c, &[1024]), &["token id 1024", "slot 0"]);
    let mut o = other;
    expect_request_error(step.run(&mut o, &[1]), &["another KV cache"]);
    assert_eq!(c.position(0).unwrap(), 0, "a rejected step moved the slot");
    for t in 0..3 {
        step.run(&mut c, &[t]).unwrap();
    }
    expect_request_error(step.run(&mut c, &[4]), &["slot 0", "position 3", "capacity of 3"]);
    assert_eq!(c.position(0).unwrap(), 3);
}

/// cpu-ref without `SampleTokens`, so that a sampling decode step takes its host path.
struct NoDeviceSampling(cpu_ref::CpuBackend);

impl hal::Backend for NoDeviceSampling {
    fn info(&self) -> &hal::BackendInfo {
        self.0.info()
    }
    fn supports(&self, op: &hal::Op) -> hal::Support {
        match op {
            hal::Op::SampleTokens(_) => hal::Support::No("test: sampling left to the host".into()),
            _ => self.0.supports(op),
        }
    }
    fn alloc(&self, shape: &[usize], dtype: hal::DType) -> hal::Result<hal::Tensor> {
        self.0.alloc(shape, dtype)
    }
    fn upload(&self, shape: &[usize], dtype: hal::DType, bytes: &[u8]) -> hal::Result<hal::Tensor> {
        self.0.upload(shape, dtype, bytes)
    }
    fn write(&self, t: &mut hal::Tensor, offset: usize, bytes: &[u8]) -> hal::Result<()> {
        self.0.write(t, offset, bytes)
    }
    fn download(&self, t: &hal::Tensor) -> hal::Result<Vec<u8>> {
        self.0.download(t)
    }
    fn run(&self, op: &hal::Op, inputs: &[&hal::Tensor], outputs: &mut [&mut hal::Tensor]) -> hal::Result<()> {
        if let hal::Support::No(reason) = self.supports(op) {
            return Err(hal::Error::Unsupported { backend: "test".into(), op: op.name().into(), reason });
        }
        self.0.run(op, inputs, outputs)
    }
    fn synchronize(&self) -> hal::Result<()> {
        self.0.synchronize()
    }
}

/// Generates `n` tokens per slot after `prompts`: with `chained`, through a sampling decode step
/// (`run_chained`, as `v4rt generate` does); otherwise by sampling
/// `DecodeStep::run`'s logits on the host. Returns the tokens in slot order.
fn generate(m: &Model, prompts: &[Vec<u32>], n: usize, temperature: f32, chained: bool) -> Vec<Vec<u32>> {
    let b = prompts.len();
    let mut c = m.new_cache(b, 32).unwrap();
    let slots: Vec<usize> = (0..b).map(|_| c.alloc_slot(m.backend()).unwrap()).collect();
    let chunks: Vec<Chunk> = slots.iter().zip(prompts).map(|(&slot, p)| Chunk { slot, tokens: p }).collect();
    let last = ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None };
    let logits = m.forward(&mut c, &chunks, &last).unwrap().logits;
    let v = m.cfg.vocab_size;
    let mut rngs: Vec<Rng> = (0..b as u64).map(|s| Rng::new(1000 + s)).collect();
    let mut out: Vec<Vec<u32>> =
        (0..b).map(|s| vec![sample(&logits[s * v..(s + 1) * v], temperature, &mut rngs[s]) as u32]).collect();
    let firsts: Vec<u32> = out.iter().map(|t| t[0]).collect();
    if !chained {
        let mut step = m.decode_step(&c, &slots).unwrap();
        let mut fed = firsts;
        for _ in 1..n {
            let logits = step.run(&mut c, &fed).unwrap();
            fed = (0..b).map(|s| sample(&logits[s * v..(s + 1) * v], temperature, &mut rngs[s]) as u32).collect();
            out.iter_mut().zip(&fed).for_each(|(o, &t)| o.push(t));
        }
        return out;
    }
    let mut step = m.decode_step(&c, &slots).unwrap().with_sampling(temperature, &rngs).unwrap();
    let issued = step.run_chained(&mut c, &firsts, n - 1, |picked| {
        out.iter_mut().zip(picked).for_each(|(o, &t)| o.push(t));
        true
    });
    assert_eq!(issued.unwrap(), n - 1);
    out
}

/// A decode step that samples its own tokens and feeds them to the next step picks, slot by
/// slot, the tokens the host picks from the same logits with the same generators: through
/// `SampleTokens` (cpu-ref runs it) and through the host path of a backend that does not.
#[test]
fn sampled_decode_steps_pick_the_host_tokens() {
    let m = model();
    let cfg = ModelConfig::embedded("tiny-flash").unwrap();
    let ck = model::synthetic::generate(&cfg, 1);
    let host_only = Model::from_checkpoint(cfg, &ck, Arc::new(NoDeviceSampling(cpu_ref::CpuBackend::new()))).unwrap();
    let prompts =
        vec![(0..6).map(|i| (i * 31 + 9) % 1024).collect::<Vec<u32>>(), (0..3).map(|i| (i * 57 + 4) % 1024).collect()];
    for temperature in [0.0, 0.7] {
        let want = generate(m, &prompts, 10, temperature, false);
        assert_eq!(generate(m, &prompts, 10, temperature, true), want, "SampleTokens at temperature {temperature}");
        assert_eq!(
            generate(&host_only, &prompts, 10, temperature, true),
            want,
            "host path at temperature {temperature}"
        );
        assert!(want.iter().all(|t| t.len() == 10));
    }
    let c = host_only.new_cache(1, 4).unwrap();
    assert!(!host_only.decode_step(&c, &[0]).unwrap().with_sampling(0.0, &[Rng::new(0)]).unwrap().samples_on_device());
    let c = m.new_cache(1, 4).unwrap();
    assert!(m.decode_step(&c, &[0]).unwrap().with_sampling(0.0, &[Rng::new(0)]).unwrap().samples_on_device());
    // Stopping after the second step's tokens: the third was already queued and ran.
    let mut c = cache(1, 8, 1);
    let mut step = m.decode_step(&c, &[0]).unwrap().with_sampling(0.0, &[Rng::new(0)]).unwrap();
    let mut seen = 0;
    let issued = step.run_chained(&mut c, &[5], 6, |_| {
        seen += 1;
        seen < 2
    });
    assert_eq!((issued.unwrap(), seen, c.position(0).unwrap()), (3, 2, 3));
}

/// Bad sampling requests are request errors, and leave the cache as it was.
#[test]
fn sampled_decode_step_bad_requests() {
    let m = model();
    let mut c = cache(1, 4, 1);
    expect_request_error(m.decode_step(&c, &[0]).unwrap().with_sampling(-1.0, &[Rng::new(0)]), &["temperature -1"]);
    expect_request_error(
        m.decode_step(&c, &[0]).unwrap().with_sampling(f32::NAN, &[Rng::new(0)]),
        &["temperature NaN"],
    );
    expect_request_error(m.decode_step(&c, &[0]).unwrap().with_sampling(0.5, &[]), &["0 generators for 1 slots"]);
    let mut plain = m.decode_step(&c, &[0]).unwrap();
    expect_request_error(plain.issue_sampled(&mut c, Some(&[1])).map(|_| ()), &["without sampling"]);
    plain.run(&mut c, &[1]).unwrap();
    expect_request_error(plain.with_sampling(0.0, &[Rng::new(0)]), &["before the first call"]);
    let mut step = m.decode_step(&c, &[0]).unwrap().with_sampling(0.0, &[Rng::new(0)]).unwrap();
    expect_request_error(step.issue_sampled(&mut c, None).map(|_| ()), &["no tokens given", "no earlier sampled step"]);
    expect_request_error(step.issue_sampled(&mut c, Some(&[1024])).map(|_| ()), &["token id 1024"]);
    expect_request_error(step.issue_sampled(&mut c, Some(&[1, 2])).map(|_| ()), &["2 tokens for 1 slots"]);
    assert_eq!(c.position(0).unwrap(), 1, "a rejected step moved the slot");
    step.issue_sampled(&mut c, Some(&[3])).unwrap().wait().unwrap();
    step.issue_sampled(&mut c, None).unwrap().wait().unwrap();
    step.issue_sampled(&mut c, None).unwrap().wait().unwrap();
    expect_request_error(step.issue_sampled(&mut c, None).map(|_| ()), &["slot 0", "capacity of 4"]);
    assert_eq!(c.position(0).unwrap(), 4);
}
