//! # v4rt-model — the DeepSeek-V4 model
//!
//! * [`config`] — `config.json` (Hugging Face keys) → validated [`config::ModelConfig`].
//! * [`safetensors`] / [`checkpoint`] — memory-mapped, validated checkpoint access.
//! * [`synthetic`] — deterministic random checkpoints in the real format (embedded default
//!   model, benchmarks).
//! * the forward pass (weights, cache, block, session, MTP) issues HAL ops on any backend;
//!   [`decode`] records a decode step once and replays it where the backend can.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod exec;
pub mod forward;
pub mod kv_layout;
pub mod rope;
pub mod safetensors;
pub mod sample;
pub mod synthetic;
pub mod weights;

pub use error::{LoadError, ModelError};
