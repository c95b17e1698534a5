//! # v4rt-model — the DeepSeek-V4 model
//!
//! * [`config`] — `config.json` (Hugging Face keys) → validated [`config::ModelConfig`].
//! * [`safetensors`] / [`checkpoint`] — memory-mapped, validated checkpoint access.
//! * [`synthetic`] — deterministic random checkpoints in the real format (embedded default
//!   model, benchmarks).
//! * the forward pass (weights, cache, block, session, MTP) issues HAL ops on any backend.

pub mod error;
pub mod safetensors;

pub use error::{LoadError, ModelError};
