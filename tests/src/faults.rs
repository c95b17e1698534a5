//! A deliberately broken backend, for testing the conformance suite itself.
//!
//! [`FaultyBackend`] wraps cpu-ref and delegates every op to it. It has its own storage, so it
//! controls memory and timing, and it plants one [`Fault`] at a time. Each fault is a mistake a
//! real device backend can make; the suite must report each one as a failure that names the op
//! and the kind of failure.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cpu_ref::device::CpuStorage;
use cpu_ref::CpuBackend;
use hal::ops::WeightFormat;
use hal::{Backend, BackendInfo, DType, Error, Op, Result, Storage, Support, Tensor};

/// The one fault a [`FaultyBackend`] plants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault: a faithful wrapper (guards the wrapper itself).
    None,
    /// Off by one: RoPE runs at `position + 1`.
    OffByOne,
    /// Missing sync: `run` only queues the op; `synchronize` executes the queue, but `download`
    /// deliberately does not flush it first, so a download right after a run sees stale data.
    MissingSync,
    /// Wrong scale: FP8/FP4 `Linear` reads every e8m0 scale one exponent too high (outputs ×2).
    WrongScale,
    /// Out-of-bounds write: after each op, garbage lands in the tensor allocated right after
    /// each output (allocation order is tracked in `alloc`).
    OutOfBounds,
    /// Refuses one op kind (by `Op::name()`) in `supports`.
    Refuses(&'static str),
}

/// Storage of a [`FaultyBackend`]: cpu-ref bytes behind a shared cell, so that queued work and
/// the out-of-bounds fault can reach tensors the caller owns.
struct FaultStorage {
    id: u64,
    cell: Arc<Mutex<CpuStorage>>,
    len: usize,
}

impl Storage for FaultStorage {
    fn backend(&self) -> &'static str {
        NAME
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

const NAME: &str = "faulty";

type Cell = Arc<Mutex<CpuStorage>>;

/// One op whose execution is pending (the tensors as cells, with their shapes and dtypes;
/// outputs also with their allocation id).
struct Pending {
    op: Op,
    inputs: Vec<(Cell, Vec<usize>, DType)>,
    outputs: Vec<(u64, Cell, Vec<usize>, DType)>,
}

/// cpu-ref with one planted [`Fault`].
pub struct FaultyBackend {
    inner: CpuBackend,
    fault: Fault,
    info: BackendInfo,
    next_id: AtomicU64,
    /// Tensors made by `alloc`, in allocation order.
    allocs: Mutex<Vec<(u64, Weak<Mutex<CpuStorage>>)>>,
    queue: Mutex<Vec<Pending>>,
}

impl FaultyBackend {
    pub fn new(fault: Fault) -> Self {
        let device = format!("cpu-ref with planted fault {fault:?}");
        FaultyBackend {
            inner: CpuBackend::new(),
            fault,
            info: BackendInfo { name: NAME, device },
            next_id: AtomicU64::new(1),
            allocs: Mutex::new(Vec::new()),
            queue: Mutex::new(Vec::new()),
        }
    }

    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    fn wrap(&self, storage: CpuStorage, shape: &[usize], dtype: DType, track: bool) -> Tensor {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let len = storage.bytes().len();
        let cell = Arc::new(Mutex::new(storage));
        if track {
            let mut a = self.allocs.lock().expect("allocs");
            a.retain(|(_, w)| w.strong_count() > 0);
            a.push((id, Arc::downgrade(&cell)));
        }
        Tensor::from_storage(Box::new(FaultStorage { id, cell, len }), shape.to_vec(), dtype)
    }

    fn storage<'t>(&self, t: &'t Tensor, what: impl FnOnce() -> String) -> Result<&'t FaultStorage> {
        t.storage().as_any().downcast_ref::<FaultStorage>().ok_or_else(|| {
            Error::invalid(what(), format!("tensor belongs to backend '{}', not {NAME}", t.storage().backend()))
        })
    }

    /// Runs a pending op on cpu-ref (copying bytes in and out), with the planted fault.
    fn execute(&self, p: Pending) -> Result<()> {
        let b = &self.inner;
        let mut ins = Vec::with_capacity(p.inputs.len());
        for (k, (cell, shape, dtype)) in p.inputs.iter().enumerate() {
            let mut bytes = cell.lock().expect("cell").bytes().to_vec();
            match (&self.fault, &p.op, k) {
                (Fault::OffByOne, Op::Rope(_), 1) => {
                    let pos: Vec<i32> = hal::dtype::bytes_i32(&bytes).into_iter().map(|v| v + 1).collect();
                    bytes = hal::dtype::i32_bytes(&pos);
                }
                (Fault::WrongScale, Op::Linear(l), 2)
                    if matches!(l.format, WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32) =>
                {
                    bytes.iter_mut().for_each(|s| *s = s.saturating_add(1).min(254));
                }
                _ => {}
            }
            ins.push(b.upload(shape, *dtype, &bytes)?);
        }
        let mut outs = Vec::with_capacity(p.outputs.len());
        for (_, cell, shape, dtype) in &p.outputs {
            let bytes = cell.lock().expect("cell").bytes().to_vec();
            outs.push(b.upload(shape, *dtype, &bytes)?);
        }
        {
            let in_refs: Vec<&Tensor> = ins.iter().collect();
            let mut out_refs: Vec<&mut Tensor> = outs.iter_mut().collect();
            b.run(&p.op, &in_refs, &mut out_refs)?;
        }
        for ((_, cell, _, _), t) in p.outputs.iter().zip(&outs) {
            let bytes = b.download(t)?;
            cell.lock().expect("cell").bytes_mut().copy_from_slice(&bytes);
        }
        if self.fault == Fault::OutOfBounds {
            let allocs = self.allocs.lock().expect("allocs");
            for (id, _, _, _) in &p.outputs {
                let Some(at) = allocs.iter().position(|(a, _)| a == id) else { continue };
                if let Some(next) = allocs.get(at + 1).and_then(|(_, w)| w.upgrade()) {
                    let mut s = next.lock().expect("cell");
                    let bytes = s.bytes_mut();
                    let n = bytes.len().min(16);
                    bytes[..n].fill(0xAB);
                }
            }
        }
        Ok(())
    }
}

impl Backend for FaultyBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn prepare(&self, op: &Op, weights: &[Option<&Tensor>]) -> hal::Result<hal::backend::Prepared> {
        self.inner.prepare(op, weights)
    }

    fn numerics(&self, op: &Op) -> hal::Numerics {
        self.inner.numerics(op)
    }

    fn supports(&self, op: &Op) -> Support {
        match &self.fault {
            Fault::Refuses(name) if op.name() == *name => Support::No(format!("{name} is not implemented (planted)")),
            _ => self.inner.supports(op),
        }
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid("alloc", "size overflows"))?;
        Ok(self.wrap(CpuStorage::zeroed(bytes), shape, dtype, true))
    }

    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if bytes.len() != want {
            return Err(Error::invalid("upload", format!("{dtype} {shape:?} needs {want} bytes, got {}", bytes.len())));
        }
        Ok(self.wrap(CpuStorage::from_bytes(bytes), shape, dtype, false))
    }

    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        let s = self.storage(t, || "write".into())?;
        let start = offset * t.dtype().size();
        if start + bytes.len() > s.len {
            return Err(Error::invalid(
                "write",
                format!("{} bytes at element {offset} overrun the {}-byte tensor", bytes.len(), s.len),
            ));
        }
        s.cell.lock().expect("cell").bytes_mut()[start..start + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn download(&self, t: &Tensor) -> Result<Vec<u8>> {
        // Deliberately no flush of the queue, even with MissingSync (that is the fault).
        Ok(self.storage(t, || "download".into())?.cell.lock().expect("cell").bytes().to_vec())
    }

    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        op.validate(inputs, outputs)?;
        if let Support::No(reason) = self.supports(op) {
            return Err(Error::Unsupported { backend: NAME.into(), op: op.name().into(), reason });
        }
        let sig = op.signature();
        let mut p = Pending { op: op.clone(), inputs: Vec::new(), outputs: Vec::new() };
        for (t, spec) in inputs.iter().zip(&sig.inputs) {
            let s = self.storage(t, || format!("{} input '{}'", op.name(), spec.name))?;
            p.inputs.push((s.cell.clone(), t.shape().to_vec(), t.dtype()));
        }
        for (t, spec) in outputs.iter().zip(&sig.outputs) {
            let s = self.storage(t, || format!("{} output '{}'", op.name(), spec.name))?;
            p.outputs.push((s.id, s.cell.clone(), t.shape().to_vec(), t.dtype()));
        }
        if self.fault == Fault::MissingSync {
            self.queue.lock().expect("queue").push(p);
            Ok(())
        } else {
            self.execute(p)
        }
    }

    fn synchronize(&self) -> Result<()> {
        let pending: Vec<Pending> = std::mem::take(&mut *self.queue.lock().expect("queue"));
        for p in pending {
            self.execute(p)?;
        }
        Ok(())
    }
}
