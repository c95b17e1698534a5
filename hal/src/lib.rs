//! # v4rt-hal — the hardware abstraction layer
//!
//! Everything a backend must know, and nothing about DeepSeek-V4 beyond the math of its ops:
//!
//! * [`dtype`] — element types and their exact encodings (bf16, FP8 e4m3, e8m0, packed FP4 e2m1).
//! * [`tensor`] — a backend-owned [`Storage`] behind a shape and a dtype.
//! * [`ops`] — the fused-op vocabulary. One descriptor per op, whose doc comment is the op's
//!   exact math and whose `signature()` lists its tensors. `cpu-ref` implements them literally.
//! * [`backend`] — the [`Backend`] trait (alloc, upload, run, synchronize, `supports`,
//!   `record` for replayable [`Recording`]s, `concurrently` for two independent op sequences
//!   that may overlap) and the [`Registry`] that probes backends and keeps the reason one is
//!   unavailable.
//! * [`error`] — the one error enum.
//!
//! Each backend crate repeats one layout: `lib.rs` (the `Backend` impl and its probe),
//! `device.rs` (memory), and `ops/<family>.rs` with the same family names as [`ops`] here.

pub mod backend;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod tensor;

pub use backend::{Backend, BackendInfo, Calibration, Numerics, PendingDownload, Probe, Recording, Registry, Support};
pub use dtype::DType;
pub use error::{Error, Result};
pub use ops::Op;
pub use tensor::{Storage, Tensor};
