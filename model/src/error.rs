//! Errors of the model crate. Every variant names the file, tensor or config field at fault.

use std::path::PathBuf;

use thiserror::Error;

/// A checkpoint or config could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{}: {err}", file.display())]
    Io { file: PathBuf, err: std::io::Error },
    #[error("{}: corrupt safetensors file: {message}", file.display())]
    Corrupt { file: PathBuf, message: String },
    #[error("{}: tensor '{tensor}': {message}", file.display())]
    Tensor { file: PathBuf, tensor: String, message: String },
    #[error("{}: config field '{field}': {message}", file.display())]
    Config { file: PathBuf, field: String, message: String },
    #[error("{}: {message}", file.display())]
    Index { file: PathBuf, message: String },
}

/// Errors while running the model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Backend(#[from] hal::Error),
    /// The caller asked for something the model or its cache cannot do (token id out of range,
    /// sequence past the cache's capacity, unknown slot, ...).
    #[error("{0}")]
    Request(String),
}
