//! Token sampling: [`SampleTokens`] row by row with the host sampler that defines it.

use hal::ops::sample::{sample_row, Rng};
use hal::ops::SampleTokens;
use hal::Result;

use crate::device::CpuStorage;

/// Op entry: [`SampleTokens`].
pub fn run_sample_tokens(op: &SampleTokens, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let [tokens, rng] = outs else { return Err(super::arity("sample_tokens")) };
    let logits = ins[0].f32s();
    let states = rng.bytes_mut();
    for (r, token) in tokens.i32s_mut().iter_mut().enumerate() {
        let word = &mut states[r * 8..(r + 1) * 8];
        let mut g = Rng(u64::from_le_bytes((&*word).try_into().expect("8 bytes")));
        *token = sample_row(&logits[r * op.vocab..(r + 1) * op.vocab], op.temperature, &mut g) as i32;
        word.copy_from_slice(&g.0.to_le_bytes());
    }
    Ok(())
}
