//! Host memory for the CPU reference backend.
//!
//! A [`CpuStorage`] is a byte buffer backed by `u32` words, so that its f32 and i32 views are
//! always aligned (the casts go through `bytemuck`, which checks size and alignment instead of
//! trusting them). Quantized and bf16 weights also carry a lazily built f32 copy, decoded once
//! and reused by every later matmul with the same scales.

use std::any::Any;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use hal::dtype::{decode_to_f32, f32_to_bf16};
use hal::ops::WeightFormat;
use hal::{DType, Storage};

/// Name every cpu-ref storage reports as its owner.
pub const BACKEND_NAME: &str = "cpu-ref";

/// Source of [`CpuStorage::version`] numbers: unique across all storages of the process.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

fn next_version() -> u64 {
    NEXT_VERSION.fetch_add(1, Ordering::Relaxed)
}

/// What a cached dequantized copy was decoded from, besides the storage's own bytes.
///
/// A weight tensor is normally always used with the same scale tensor. The key records the
/// format and the scale storage's [`CpuStorage::version`], so using the weight with other scales
/// (or after the scales were rewritten) is still correct: it decodes a temporary copy instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DequantKey {
    pub format: WeightFormat,
    /// Version of the scale storage (`None` for formats without scales).
    pub scale_version: Option<u64>,
    /// Number of stacked matrices, `[batch, out, in]` (MoE experts) or 1.
    pub batch: usize,
    pub out: usize,
    pub inp: usize,
}

struct Dequantized {
    key: DequantKey,
    values: Vec<f32>,
}

/// A cpu-ref tensor's bytes.
pub struct CpuStorage {
    words: Vec<u32>,
    len: usize,
    /// Changes on every mutable access; unique across storages, so it identifies both "which
    /// buffer" and "which contents" for cache keys.
    version: u64,
    dequant: OnceLock<Dequantized>,
}

impl CpuStorage {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        CpuStorage { words: vec![0; len.div_ceil(4)], len, version: next_version(), dequant: OnceLock::new() }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut s = Self::zeroed(bytes.len());
        s.bytes_mut().copy_from_slice(bytes);
        s
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The raw bytes, writable. Drops any cached dequantized copy.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.touch();
        let len = self.len;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    /// The bytes viewed as f32 values (meaningful for `F32` tensors).
    pub fn f32s(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.words)[..self.len / 4]
    }

    /// The bytes viewed as writable f32 values. Drops any cached dequantized copy.
    pub fn f32s_mut(&mut self) -> &mut [f32] {
        self.touch();
        let n = self.len / 4;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..n]
    }

    /// A KV cache tensor's values (dtype `F32` or `BF16`, `hal::ops` conventions) as f32: the
    /// f32 view itself, or every bf16 value widened (exactly).
    pub fn cache_values(&self, dtype: DType) -> Cow<'_, [f32]> {
        match dtype {
            DType::BF16 => Cow::Owned(decode_to_f32(DType::BF16, self.bytes())),
            _ => Cow::Borrowed(self.f32s()),
        }
    }

    /// Stores `values` at element `at` of a KV cache tensor of dtype `F32` or `BF16`; a BF16
    /// cache keeps each value's nearest-even bf16.
    pub fn cache_store(&mut self, dtype: DType, at: usize, values: &[f32]) {
        match dtype {
            DType::BF16 => {
                self.touch();
                let n = self.len / 2;
                let halves: &mut [u16] = &mut bytemuck::cast_slice_mut(&mut self.words)[..n];
                for (h, &v) in halves[at..at + values.len()].iter_mut().zip(values) {
                    *h = f32_to_bf16(v);
                }
            }
            _ => self.f32s_mut()[at..at + values.len()].copy_from_slice(values),
        }
    }

    /// The bytes viewed as i32 values (meaningful for `I32` tensors).
    pub fn i32s(&self) -> &[i32] {
        &bytemuck::cast_slice(&self.words)[..self.len / 4]
    }

    /// The bytes viewed as writable i32 values. Drops any cached dequantized copy.
    pub fn i32s_mut(&mut self) -> &mut [i32] {
        self.touch();
        let n = self.len / 4;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..n]
    }

    /// Identifies this buffer and its current contents (see [`DequantKey`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The f32 decoding of this weight described by `key`, built by `decode` on first use and
    /// kept. A later call with a different key gets a freshly decoded temporary copy, so a
    /// weight used with two scale tensors is slow, never wrong.
    pub fn dequantized(&self, key: DequantKey, decode: impl Fn(&[u8]) -> Vec<f32>) -> Cow<'_, [f32]> {
        let cached = self.dequant.get_or_init(|| Dequantized { key, values: decode(self.bytes()) });
        if cached.key == key {
            Cow::Borrowed(&cached.values)
        } else {
            Cow::Owned(decode(self.bytes()))
        }
    }

    fn touch(&mut self) {
        self.version = next_version();
        self.dequant = OnceLock::new();
    }
}

impl Storage for CpuStorage {
    fn backend(&self) -> &'static str {
        BACKEND_NAME
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_lengths_and_views() {
        let s = CpuStorage::from_bytes(&[1, 2, 3, 4, 5]);
        assert_eq!(s.bytes(), &[1, 2, 3, 4, 5]);
        assert_eq!(s.i32s(), &[i32::from_le_bytes([1, 2, 3, 4])]);
    }

    #[test]
    fn cache_is_keyed_and_dropped_on_write() {
        let mut s = CpuStorage::from_bytes(&hal::dtype::f32_bytes(&[1.0, 2.0]));
        let key = DequantKey { format: WeightFormat::Bf16, scale_version: None, batch: 1, out: 1, inp: 2 };
        let other = DequantKey { scale_version: Some(7), ..key };
        assert!(matches!(s.dequantized(key, hal::dtype::bytes_f32), Cow::Borrowed(_)));
        assert!(matches!(s.dequantized(other, hal::dtype::bytes_f32), Cow::Owned(_)));
        let v0 = s.version();
        s.f32s_mut()[0] = 5.0;
        assert_ne!(s.version(), v0);
        assert_eq!(&*s.dequantized(other, hal::dtype::bytes_f32), &[5.0, 2.0]);
    }
}
