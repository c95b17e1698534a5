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
//! [`LogitsAt::Last`]: crate::forward::LogitsAt::Last

use hal::backend::Recording;
use hal::{DType, Tensor};

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
                return Err(ModelError::Request(format!("decode step: slot {s} outside the cache's {} slots", cache.slots())));
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
        })
    }
}

impl std::fmt::Debug for DecodeStep<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStep").field("slots", &self.slots).field("recorded", &self.is_recorded()).finish()
    }
}

impl DecodeStep<'_> {
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
        if cache.id() != self.cache_id {
            return Err(ModelError::Request("decode step used with another KV cache than the one it was made for".into()));
        }
        if tokens.len() != self.slots.len() {
            return Err(ModelError::Request(format!("decode step: {} tokens for {} slots", tokens.len(), self.slots.len())));
        }
        let chunks: Vec<Chunk> =
            self.slots.iter().zip(tokens).map(|(&slot, t)| Chunk { slot, tokens: std::slice::from_ref(t) }).collect();
        let (_, positions, ids) = self.model.row_values(cache, &chunks)?;
        let b = self.model.backend();
        b.write(&mut self.rows.positions, 0, &hal::dtype::i32_bytes(&positions))?;
        b.write(&mut self.rows.ids, 0, &hal::dtype::i32_bytes(&ids))?;
        let (model, rows, logits) = (self.model, &self.rows, &mut self.logits);
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
            })
        };
        let issued = issue(&mut self.state, b, &mut ops);
        drop(ops);
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
