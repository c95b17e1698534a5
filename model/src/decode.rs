//! Decode steps recorded once and replayed ([`Backend::record`](hal::Backend::record)).
//!
//! A decode step of one token per sequence issues the same ops every time; only the token ids
//! and positions change, and those live in device tensors. [`DecodeStep`] keeps those tensors
//! and the logits for a fixed set of cache slots, records the step's ops on its second call
//! (the first warms up the backend: kernels are compiled and loaded before capture), and from
//! then on writes the new ids and positions and replays the recording. On a backend that does
//! not record (cpu-ref, Ascend today) every call runs the ops as [`Model::forward`] would.
//!
//! The logits are bit-identical to [`Model::forward`] with [`LogitsAt::Last`] on the same
//! backend: the same ops run in the same order on the same values (checked end to end by the
//! conformance suite, `tests/src/conformance.rs`).
//!
//! A step made [`with_sampling`](DecodeStep::with_sampling) also picks each slot's next token.
//! Where the backend runs [`SampleTokens`] the pick is recorded as the step's last op and
//! writes the step's own token input, so [`issue_sampled`](DecodeStep::issue_sampled) can
//! queue the next step before the host has seen the token; the host reads the tokens with
//! [`Sampled::wait`] while the device runs on. Elsewhere the step downloads the logits and
//! samples on the host, with the same math and generator, so the tokens are the same.
//!
//! [`LogitsAt::Last`]: crate::forward::LogitsAt::Last

use hal::backend::{PendingDownload, Recording};
use hal::ops::sample::{sample_row, Rng};
use hal::ops::{Op, SampleTokens};
use hal::{DType, Support, Tensor};

use crate::cache::KvCache;
use crate::error::ModelError;
use crate::exec::{Exec, Rows};
use crate::forward::{Chunk, Model};

type Result<T> = std::result::Result<T, ModelError>;

/// One token for each of a fixed list of cache slots per call, replayed where the backend records.
pub struct DecodeStep<'m> {
    model: &'m Model,
    slots: Vec<usize>,
    cache_id: u64,
    rows: Rows,
    logits: Tensor,
    state: State,
    sampler: Option<Sampler>,
}

/// How a sampling step picks its tokens (see [`DecodeStep::with_sampling`]).
struct Sampler {
    op: SampleTokens,
    picker: Picker,
    /// Whether a step has picked tokens that the next one can be fed.
    chained: bool,
}

enum Picker {
    /// The backend runs `op`: each slot's generator state (`I64 [slots]`); the picked tokens
    /// stay in the step's token input.
    Device(Tensor),
    /// The host samples downloaded logits: each slot's generator and the last tokens picked.
    Host(Vec<Rng>, Vec<u32>),
}

/// The tokens a sampling step picked, one per slot: ready, or still being copied to the host.
pub enum Sampled<'m> {
    Ready(Vec<u32>),
    Pending(Box<dyn PendingDownload + 'm>),
}

impl Sampled<'_> {
    /// The tokens in slot order, once the device has finished the step. Deferred device-side
    /// errors of the work issued before surface here.
    pub fn wait(self) -> Result<Vec<u32>> {
        match self {
            Sampled::Ready(t) => Ok(t),
            Sampled::Pending(p) => Ok(hal::dtype::bytes_i32(&p.wait()?).into_iter().map(|t| t as u32).collect()),
        }
    }
}

enum State {
    /// No call yet: the next one runs the ops directly.
    Fresh,
    /// One direct call ran: the next one records.
    Warm,
    Recorded(Box<dyn Recording>),
    /// The backend does not record: every call runs the ops.
    Direct,
}

impl Model {
    /// A decode step for `slots` of `cache` (each must be allocated when a step runs). The
    /// step may only be used with this cache.
    pub fn decode_step(&self, cache: &KvCache, slots: &[usize]) -> Result<DecodeStep<'_>> {
        if slots.is_empty() {
            return Err(ModelError::Request("decode step with no slots".into()));
        }
        for (k, &s) in slots.iter().enumerate() {
            if s >= cache.slots() {
                return Err(ModelError::Request(format!(
                    "decode step: slot {s} outside the cache's {} slots",
                    cache.slots()
                )));
            }
            if slots[..k].contains(&s) {
                return Err(ModelError::Request(format!("decode step: slot {s} listed twice")));
            }
        }
        let n = slots.len();
        let zeros = vec![0i32; n];
        let slot_ids: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        let b = self.backend();
        Ok(DecodeStep {
            model: self,
            slots: slots.to_vec(),
            cache_id: cache.id(),
            rows: Exec { b }.rows(&slot_ids, &zeros, &zeros)?,
            logits: b.alloc(&[n, self.cfg.vocab_size], DType::F32)?,
            state: State::Fresh,
            sampler: None,
        })
    }
}

impl std::fmt::Debug for DecodeStep<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStep").field("slots", &self.slots).field("recorded", &self.is_recorded()).finish()
    }
}

impl<'m> DecodeStep<'m> {
    /// Feeds `tokens[i]` to `slots[i]` at its next position, advances every slot by one and
    /// returns the logits `[slots, vocab]` (slot order). Errors (cache not the one this step
    /// was made for, a free slot, a token outside the vocabulary, a full slot) are returned
    /// before anything runs, with the cache untouched. The same as [`issue`](Self::issue), then
    /// [`logits`](Self::logits).
    pub fn run(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        self.issue(cache, tokens)?;
        self.logits()
    }

    /// The logits `[slots, vocab]` of the last issued step, once the device has finished it.
    /// Deferred device-side errors of the steps issued since the last download surface here.
    pub fn logits(&self) -> Result<Vec<f32>> {
        Ok(hal::dtype::bytes_f32(&self.model.backend().download(&self.logits)?))
    }

    /// [`run`](Self::run) without waiting: issues the step and returns while the device may
    /// still run it (the backend's stream keeps steps in order, so steps can be queued back to
    /// back). The checks that `run` makes before anything runs are made here.
    pub fn issue(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<()> {
        self.issue_with(cache, Some(tokens))
    }

    /// Makes this step pick each slot's next token after its logits, by [`SampleTokens`] at
    /// `temperature` (0 = greedy), slot `i` drawing from `rngs[i]`. Only before the first call.
    /// The device samples where the backend supports the op; otherwise the host does, with
    /// the same result.
    pub fn with_sampling(mut self, temperature: f32, rngs: &[Rng]) -> Result<Self> {
        if !matches!(self.state, State::Fresh) {
            return Err(ModelError::Request("decode step: sampling must be set before the first call".into()));
        }
        let n = self.slots.len();
        if rngs.len() != n {
            return Err(ModelError::Request(format!("decode step: {} generators for {} slots", rngs.len(), n)));
        }
        let op = SampleTokens { rows: n, vocab: self.model.cfg.vocab_size, temperature };
        let desc = Op::SampleTokens(op.clone());
        desc.check_params().map_err(|e| ModelError::Request(format!("sampling: {e}")))?;
        let b = self.model.backend();
        let picker = match b.supports(&desc) {
            Support::Yes => {
                let states: Vec<u8> = rngs.iter().flat_map(|r| r.0.to_le_bytes()).collect();
                Picker::Device(b.upload(&[n], DType::I64, &states)?)
            }
            Support::No(_) => Picker::Host(rngs.to_vec(), Vec::new()),
        };
        self.sampler = Some(Sampler { op, picker, chained: false });
        Ok(self)
    }

    /// Whether the device picks the tokens (false: the host samples from downloaded logits).
    pub fn samples_on_device(&self) -> bool {
        self.sampler.as_ref().is_some_and(|s| matches!(s.picker, Picker::Device(_)))
    }

    /// Issues one step of a sampling step ([`with_sampling`](Self::with_sampling)) and returns
    /// the tokens it picks. It feeds `tokens`, or with `None` the tokens the previous call
    /// picked. On the device that input never leaves it: the step is queued at once, and the
    /// returned [`Sampled`] can be waited for after the next step is issued. The checks of
    /// [`issue`](Self::issue) are made here.
    pub fn issue_sampled(&mut self, cache: &mut KvCache, tokens: Option<&[u32]>) -> Result<Sampled<'m>> {
        let Some(sampler) = self.sampler.as_ref() else {
            return Err(ModelError::Request("decode step: issue_sampled on a step made without sampling".into()));
        };
        let fed = match (tokens, &sampler.picker) {
            (Some(t), _) => Some(t.to_vec()),
            (None, _) if !sampler.chained => {
                return Err(ModelError::Request(
                    "decode step: no tokens given and no earlier sampled step to feed".into(),
                ));
            }
            (None, Picker::Device(_)) => None,
            (None, Picker::Host(_, last)) => Some(last.clone()),
        };
        self.issue_with(cache, fed.as_deref())?;
        let model: &'m Model = self.model;
        let b = model.backend();
        let sampler = self.sampler.as_mut().expect("checked above");
        sampler.chained = true;
        match &mut sampler.picker {
            Picker::Device(_) => Ok(Sampled::Pending(b.download_later(&self.rows.ids)?)),
            Picker::Host(rngs, last) => {
                let logits = hal::dtype::bytes_f32(&b.download(&self.logits)?);
                let (vocab, t) = (sampler.op.vocab, sampler.op.temperature);
                *last = rngs
                    .iter_mut()
                    .zip(logits.chunks_exact(vocab))
                    .map(|(rng, l)| sample_row(l, t, rng) as u32)
                    .collect();
                Ok(Sampled::Ready(last.clone()))
            }
        }
    }

    /// Generates with a sampling step ([`with_sampling`](Self::with_sampling)): up to `steps`
    /// steps, the first fed `first`, each later one the tokens of the step before, with one
    /// step always queued ahead of the one whose tokens the host is reading (so the device
    /// never waits for the host). `on_tokens` gets each step's tokens in order and says
    /// whether to go on; when it stops the run, the step queued ahead has still run (its slots
    /// stand one position further). Returns the number of steps issued.
    pub fn run_chained(
        &mut self,
        cache: &mut KvCache,
        first: &[u32],
        steps: usize,
        mut on_tokens: impl FnMut(&[u32]) -> bool,
    ) -> Result<usize> {
        if steps == 0 {
            return Ok(0);
        }
        let mut ahead = Some(self.issue_sampled(cache, Some(first))?);
        let mut issued = 1;
        while let Some(behind) = ahead.take() {
            if issued < steps {
                ahead = Some(self.issue_sampled(cache, None)?);
                issued += 1;
            }
            if !on_tokens(&behind.wait()?) {
                break;
            }
        }
        Ok(issued)
    }

    /// The body of `issue` and `issue_sampled`: `tokens` are written as the step's input, or
    /// with `None` the input is what the device's previous sampling left in it.
    fn issue_with(&mut self, cache: &mut KvCache, tokens: Option<&[u32]>) -> Result<()> {
        if cache.id() != self.cache_id {
            return Err(ModelError::Request(
                "decode step used with another KV cache than the one it was made for".into(),
            ));
        }
        if let Some(t) = tokens.filter(|t| t.len() != self.slots.len()) {
            return Err(ModelError::Request(format!("decode step: {} tokens for {} slots", t.len(), self.slots.len())));
        }
        // Positions are checked with stand-in tokens when the input stays on the device.
        let stand_in = vec![0u32; self.slots.len()];
        let given = tokens.unwrap_or(&stand_in);
        let chunks: Vec<Chunk> =
            self.slots.iter().zip(given).map(|(&slot, t)| Chunk { slot, tokens: std::slice::from_ref(t) }).collect();
        let (_, positions, ids) = self.model.row_values(cache, &chunks)?;
        let b = self.model.backend();
        b.write(&mut self.rows.positions, 0, &hal::dtype::i32_bytes(&positions))?;
        if tokens.is_some() {
            b.write(&mut self.rows.ids, 0, &hal::dtype::i32_bytes(&ids))?;
        }
        let (model, rows, logits) = (self.model, &mut self.rows, &mut self.logits);
        let mut sample = self.sampler.as_mut().and_then(|s| match &mut s.picker {
            Picker::Device(rng) => Some((Op::SampleTokens(s.op.clone()), rng)),
            Picker::Host(..) => None,
        });
        // The HAL's closure returns HAL errors; a model-level one is kept aside and returned as is.
        let mut model_err = None;
        let mut ops = || {
            model.logits_into(cache, rows, logits).map_err(|e| match e {
                ModelError::Backend(h) => h,
                other => {
                    let text = other.to_string();
                    model_err = Some(other);
                    hal::Error::invalid("decode step", text)
                }
            })?;
            match &mut sample {
                // The picked tokens overwrite this step's input, which the embedding has read.
                Some((op, rng)) => b.run(op, &[&*logits], &mut [&mut rows.ids, &mut **rng]),
                None => Ok(()),
            }
        };
        let issued = issue(&mut self.state, b, &mut ops);
        if let Err(e) = issued {
            return Err(model_err.unwrap_or(e.into()));
        }
        for &s in &self.slots {
            cache.advance(s, 1);
        }
        Ok(())
    }

    /// Whether calls now replay a recording (false before the second call and on backends that
    /// do not record).
    pub fn is_recorded(&self) -> bool {
        matches!(self.state, State::Recorded(_))
    }

    /// The backend's description of the recording, once there is one.
    pub fn recording(&self) -> Option<String> {
        match &self.state {
            State::Recorded(r) => Some(r.describe()),
            _ => None,
        }
    }

    /// The cache slots this step decodes, in logits order.
    pub fn slots(&self) -> &[usize] {
        &self.slots
    }
}

/// Runs, records or replays the step's ops, by `state`, and moves the state on (an error
/// leaves it as it was).
fn issue(state: &mut State, b: &dyn hal::Backend, ops: &mut dyn FnMut() -> hal::Result<()>) -> hal::Result<()> {
    match state {
        State::Fresh => {
            ops()?;
            *state = State::Warm;
        }
        State::Warm => {
            *state = match b.record(ops)? {
                Some(r) => State::Recorded(r),
                None => State::Direct,
            }
        }
        State::Recorded(r) => r.replay()?,
        State::Direct => ops()?,
    }
    Ok(())
}
