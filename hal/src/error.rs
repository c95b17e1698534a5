//! The one error type every backend returns.
//!
//! Only failures a caller cannot rule out in advance get a variant; each message names the op,
//! tensor or backend it is about, so that an error printed at the binary's edge is enough to act on.

use thiserror::Error;

/// Result alias used across the HAL and every backend.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// The backend cannot run on this machine (library missing, no device, ...).
    #[error("{backend}: unavailable ({reason})")]
    Unavailable { backend: String, reason: String },
    /// The backend does not implement this op (or this variant of it).
    #[error("{backend}: op {op} is not supported ({reason})")]
    Unsupported { backend: String, op: String, reason: String },
    /// An allocation failed.
    #[error("{backend}: out of memory allocating {bytes} bytes")]
    OutOfMemory { backend: String, bytes: usize },
    /// The device or its runtime library reported a failure.
    #[error("{backend}: device error {code}: {message}")]
    Device { backend: String, code: i64, message: String },
    /// A tensor or parameter does not satisfy an op's contract (shape, dtype, index range).
    #[error("{context}: {message}")]
    InvalidArgument { context: String, message: String },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(context: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument { context: context.into(), message: message.into() }
    }
}
