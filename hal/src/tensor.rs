//! Tensors: a backend-owned storage plus a row-major shape and an element type.
//!
//! The HAL never looks inside a storage; only the backend that made it does (by downcasting).
//! A tensor is moved, not shared: weights are borrowed by every op that reads them, and an op's
//! outputs are `&mut`, so the borrow checker enforces what a stream would otherwise have to.

use std::any::Any;
use std::fmt;

use crate::dtype::DType;

/// Memory that belongs to one backend.
pub trait Storage: Any + Send + Sync {
    /// Name of the backend that owns this storage (for error messages).
    fn backend(&self) -> &'static str;
    /// Size in bytes.
    fn len_bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A row-major tensor living in some backend's memory.
pub struct Tensor {
    storage: Box<dyn Storage>,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    /// Wraps a storage; for backends. The storage must hold exactly `numel × dtype.size()` bytes.
    pub fn from_storage(storage: Box<dyn Storage>, shape: Vec<usize>, dtype: DType) -> Self {
        debug_assert_eq!(storage.len_bytes(), shape.iter().product::<usize>() * dtype.size());
        Tensor { storage, shape, dtype }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn len_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    pub fn storage_mut(&mut self) -> &mut dyn Storage {
        self.storage.as_mut()
    }
    /// Reinterprets the shape (same number of elements, same dtype). Free: no data moves.
    pub fn reshape(mut self, shape: Vec<usize>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), self.numel(), "reshape must keep the element count");
        self.shape = shape;
        self
    }
    /// Reinterprets the bytes as another dtype of the same element size (e.g. I8 → packed FP4).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        assert_eq!(dtype.size(), self.dtype.size(), "with_dtype must keep the element size");
        self.dtype = dtype;
        self
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {:?}, {})", self.dtype, self.shape, self.storage.backend())
    }
}
