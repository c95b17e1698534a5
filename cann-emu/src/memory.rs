//! Emulated device memory and pinned host memory.
//!
//! Device addresses come from a range reserved with `mmap(PROT_NONE)`: they are real, unique
//! addresses that the host cannot touch (a host read is a SIGSEGV). Each allocation's bytes
//! live in a host `Vec` found by address. Allocations are separated by unmapped guard gaps,
//! poisoned with 0xFF (NaN for every float type) and their addresses are not reused until the
//! reserve runs out, so stale device pointers keep failing loudly.
//!
//! Pinned host memory (`aclrtMallocHost`) is ordinary heap memory recorded in a registry, so
//! that queued copies can check, when they finally run, that their host buffer still exists.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;

use crate::dtype::Dt;

/// Reserved device address space.
const RESERVE: usize = 64 << 30;
/// Gap left unmapped after every allocation.
const GUARD: usize = 64 << 10;
/// Alignment of device addresses.
const ALIGN: usize = 4096;

/// One device allocation.
pub struct Alloc {
    /// Bytes requested.
    pub size: usize,
    /// Device that allocated it.
    pub device: i32,
    /// The contents (requested size rounded to 32 plus 32 bytes of padding, as ACL does).
    pub data: Vec<u8>,
}

/// A strided tensor view: what kernels read and write.
#[derive(Clone, Debug)]
pub struct TView {
    pub addr: usize,
    pub dt: Dt,
    pub dims: Vec<i64>,
    pub strides: Vec<i64>,
    pub offset: i64,
}

impl TView {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<i64>().max(0) as usize
    }

    /// Largest element index the view touches (None for an empty view).
    pub fn max_index(&self) -> Option<i64> {
        if self.numel() == 0 {
            return None;
        }
        Some(self.offset + self.dims.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<i64>())
    }
}

/// Row-major iteration over `dims`, calling `f` with each element offset under `strides`.
pub fn for_each_offset(dims: &[i64], strides: &[i64], base: i64, mut f: impl FnMut(i64)) {
    let n: i64 = dims.iter().product();
    if n <= 0 {
        return;
    }
    let mut idx = vec![0i64; dims.len()];
    let mut off = base;
    for _ in 0..n {
        f(off);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// Row-major element strides of a contiguous tensor of `dims`.
pub fn contiguous_strides(dims: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Strides of `v` broadcast to `out` (right-aligned; size-1 dims get stride 0).
pub fn broadcast_strides(v: &TView, out: &[i64]) -> Option<Vec<i64>> {
    if v.dims.len() > out.len() {
        return None;
    }
    let lead = out.len() - v.dims.len();
    let mut s = vec![0i64; out.len()];
    for (i, (&d, &st)) in v.dims.iter().zip(&v.strides).enumerate() {
        let o = out[lead + i];
        if d == o {
            s[lead + i] = st;
        } else if d != 1 {
            return None;
        }
    }
    Some(s)
}

/// Device memory plus the pinned-host registry.
pub struct Memory {
    base: usize,
    bump: usize,
    allocs: BTreeMap<usize, Alloc>,
    used: usize,
    /// Bytes the device claims to have.
    pub capacity: usize,
    host: BTreeMap<usize, (usize, Layout)>,
}

impl Memory {
    /// Reserves the device address range.
    pub fn new(capacity: usize) -> Result<Memory, String> {
        // SAFETY: an anonymous PROT_NONE reservation: no memory is committed and nothing can
        // read or write it; it only makes the addresses unusable on the host.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RESERVE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("cannot reserve {} GiB of address space for device memory", RESERVE >> 30));
        }
        Ok(Memory { base: p as usize, bump: 0, allocs: BTreeMap::new(), used: 0, capacity, host: BTreeMap::new() })
    }

    /// Whether `addr` lies in the reserved device range.
    pub fn is_device_addr(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.base + RESERVE
    }

    /// Bytes currently allocated.
    pub fn used(&self) -> usize {
        self.used
    }

    fn place(&mut self, span: usize) -> Option<usize> {
        if self.bump + span <= RESERVE {
            let off = self.bump;
            self.bump += span;
            return Some(self.base + off);
        }
        // Reserve exhausted: first fit between live allocations.
        let mut cursor = self.base;
        for (&start, a) in &self.allocs {
            if start >= cursor + span {
                return Some(cursor);
            }
            cursor = start + (a.data.len() + GUARD).div_ceil(ALIGN) * ALIGN;
        }
        (cursor + span <= self.base + RESERVE).then_some(cursor)
    }

    /// Allocates `size` bytes on `device`; `None` when over capacity or out of addresses.
    pub fn malloc(&mut self, size: usize, device: i32) -> Option<usize> {
        if size == 0 || self.used + size > self.capacity {
            return None;
        }
        let padded = size.div_ceil(32) * 32 + 32;
        let span = (padded + GUARD).div_ceil(ALIGN) * ALIGN;
        let addr = self.place(span)?;
        self.allocs.insert(addr, Alloc { size, device, data: vec![0xFF; padded] });
        self.used += size;
        Some(addr)
    }

    /// Frees the allocation starting at `addr`.
    pub fn free(&mut self, addr: usize) -> Result<(), String> {
        match self.allocs.remove(&addr) {
            Some(a) => {
                self.used -= a.size;
                Ok(())
            }
            None if self.is_device_addr(addr) => {
                Err(format!("{addr:#x} is not the start of a live device allocation (double free?)"))
            }
            None => Err(format!("{addr:#x} is not a device address")),
        }
    }

    /// The allocation containing `[addr, addr + len)`: `(start, alloc)`.
    pub fn find(&self, addr: usize, len: usize) -> Result<(usize, &Alloc), String> {
        let (&start, a) = self
            .allocs
            .range(..=addr)
            .next_back()
            .ok_or_else(|| format!("device address {addr:#x} is not in any live allocation"))?;
        if addr + len > start + a.size {
            if addr >= start + a.size {
                return Err(format!(
                    "device address {addr:#x} is not in any live allocation (freed, or past an allocation's end)"
                ));
            }
            return Err(format!(
                "{len} bytes at {addr:#x} overrun the {}-byte allocation at {start:#x} by {} bytes",
                a.size,
                addr + len - start - a.size
            ));
        }
        Ok((start, a))
    }

    /// Device bytes `[addr, addr + len)`.
    pub fn bytes(&self, addr: usize, len: usize) -> Result<&[u8], String> {
        let (start, a) = self.find(addr, len)?;
        Ok(&a.data[addr - start..addr - start + len])
    }

    /// Device bytes `[addr, addr + len)`, writable.
    pub fn bytes_mut(&mut self, addr: usize, len: usize) -> Result<&mut [u8], String> {
        let (start, _) = self.find(addr, len)?;
        let a = self.allocs.get_mut(&start).ok_or("allocation vanished")?;
        Ok(&mut a.data[addr - start..addr - start + len])
    }

    /// The byte range a view touches: `(first byte address, length)`, `None` when empty.
    pub fn view_span(v: &TView) -> Option<(usize, usize)> {
        let max = v.max_index()?;
        let size = v.dt.size();
        Some((v.addr + v.offset as usize * size, (max - v.offset) as usize * size + size))
    }

    /// Whether the view is row-major contiguous (its span holds exactly its elements, in order).
    fn is_dense(v: &TView) -> bool {
        v.strides == contiguous_strides(&v.dims)
    }

    /// Checks the view lies inside one live allocation.
    pub fn check_view(&self, v: &TView) -> Result<(), String> {
        if let Some((start, len)) = Self::view_span(v) {
            self.find(start, len)?;
        }
        Ok(())
    }

    /// The view's elements as f64, row-major, broadcast to `out_dims` (its own dims if `None`).
    pub fn load(&self, v: &TView, out_dims: Option<&[i64]>) -> Result<Vec<f64>, String> {
        if !v.dt.has_codec() {
            return Err(format!("dtype {:?} cannot be read by emulated kernels", v.dt));
        }
        let dims = out_dims.unwrap_or(&v.dims);
        let strides = match out_dims {
            Some(o) => {
                broadcast_strides(v, o).ok_or_else(|| format!("shape {:?} does not broadcast to {o:?}", v.dims))?
            }
            None => v.strides.clone(),
        };
        let n: i64 = dims.iter().product();
        let mut out = Vec::with_capacity(n.max(0) as usize);
        let Some((first, len)) = Self::view_span(v) else {
            return Ok(out);
        };
        let bytes = self.bytes(first, len)?;
        let size = v.dt.size();
        if out_dims.is_none() && Self::is_dense(v) {
            // The common case, kept off the per-element index walk (the emulator's hot path).
            match v.dt {
                Dt::F32 => {
                    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64))
                }
                dt => out.extend(bytes.chunks_exact(size).map(|c| dt.load(c))),
            }
            return Ok(out);
        }
        for_each_offset(dims, &strides, 0, |off| {
            let b = off as usize * size;
            out.push(v.dt.load(&bytes[b..b + size]));
        });
        Ok(out)
    }

    /// Stores `vals` (row-major over the view's dims) into the view.
    pub fn store(&mut self, v: &TView, vals: &[f64]) -> Result<(), String> {
        if !v.dt.has_codec() {
            return Err(format!("dtype {:?} cannot be written by emulated kernels", v.dt));
        }
        let Some((first, len)) = Self::view_span(v) else {
            return Ok(());
        };
        if vals.len() != v.numel() {
            return Err(format!("internal: {} values for a view of {} elements", vals.len(), v.numel()));
        }
        let bytes = self.bytes_mut(first, len)?;
        let size = v.dt.size();
        if Self::is_dense(v) {
            match v.dt {
                Dt::F32 => {
                    bytes.chunks_exact_mut(4).zip(vals).for_each(|(c, &x)| c.copy_from_slice(&(x as f32).to_le_bytes()))
                }
                dt => bytes.chunks_exact_mut(size).zip(vals).for_each(|(c, &x)| dt.store(x, c)),
            }
            return Ok(());
        }
        let mut it = vals.iter();
        for_each_offset(&v.dims, &v.strides, 0, |off| {
            let b = off as usize * size;
            if let Some(&x) = it.next() {
                v.dt.store(x, &mut bytes[b..b + size]);
            }
        });
        Ok(())
    }

    /// Allocates `size` bytes of "pinned" host memory.
    pub fn malloc_host(&mut self, size: usize) -> Option<usize> {
        let layout = Layout::from_size_align(size.max(1), 64).ok()?;
        // SAFETY: non-zero size, valid layout; freed with the same layout in `free_host`.
        let p = unsafe { alloc(layout) };
        if p.is_null() {
            return None;
        }
        self.host.insert(p as usize, (size, layout));
        Some(p as usize)
    }

    /// Frees pinned host memory from [`Memory::malloc_host`].
    pub fn free_host(&mut self, addr: usize) -> Result<(), String> {
        let (_, layout) =
            self.host.remove(&addr).ok_or_else(|| format!("{addr:#x} was not allocated by aclrtMallocHost"))?;
        // SAFETY: allocated by `malloc_host` with this layout, removed from the registry so it
        // is freed once.
        unsafe { dealloc(addr as *mut u8, layout) };
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies in one live pinned host allocation.
    pub fn is_pinned(&self, addr: usize, len: usize) -> bool {
        self.host.range(..=addr).next_back().is_some_and(|(&s, &(n, _))| addr + len <= s + n)
    }

    /// Copies pinned host bytes into device memory (both checked now, at execution time).
    pub fn h2d(&mut self, dst: usize, src: usize, len: usize) -> Result<(), String> {
        if !self.is_pinned(src, len) {
            return Err(format!("host buffer {src:#x} ({len} bytes) was freed before the copy ran"));
        }
        let d = self.bytes_mut(dst, len)?;
        // SAFETY: `src..src+len` is inside a live registered host allocation (checked above,
        // under the emulator lock, which `aclrtFreeHost` also takes).
        let s = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
        d.copy_from_slice(s);
        Ok(())
    }

    /// Copies device bytes into pinned host memory (checked at execution time).
    pub fn d2h(&mut self, dst: usize, src: usize, len: usize) -> Result<(), String> {
        if !self.is_pinned(dst, len) {
            return Err(format!("host buffer {dst:#x} ({len} bytes) was freed before the copy ran"));
        }
        let s = self.bytes(src, len)?;
        // SAFETY: as for `h2d`; host and device bytes never overlap (device bytes are Vecs
        // owned by the emulator).
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), dst as *mut u8, len) };
        Ok(())
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, RESERVE) };
        for (&addr, &(_, layout)) in &self.host {
            // SAFETY: still-registered host allocations, each freed once.
            unsafe { dealloc(addr as *mut u8, layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_guarded_and_not_reused() {
        let mut m = Memory::new(1 << 20).unwrap();
        let a = m.malloc(10, 0).unwrap();
        assert!(m.bytes(a, 10).unwrap().iter().all(|&b| b == 0xFF));
        assert!(m.bytes(a, 11).is_err(), "reading past the requested size must fail");
        m.free(a).unwrap();
        assert!(m.free(a).is_err());
        let b = m.malloc(10, 0).unwrap();
        assert_ne!(a, b);
        assert!(m.bytes(a, 1).is_err());
        assert!(m.malloc(2 << 20, 0).is_none(), "over capacity");
    }

    #[test]
    fn strided_load_store_and_broadcast() {
        let mut m = Memory::new(1 << 20).unwrap();
        let a = m.malloc(6 * 4, 0).unwrap();
        let v = TView { addr: a, dt: Dt::F32, dims: vec![2, 3], strides: vec![3, 1], offset: 0 };
        m.store(&v, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let t = TView { dims: vec![3, 2], strides: vec![1, 3], ..v.clone() };
        assert_eq!(m.load(&t, None).unwrap(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let row = TView { dims: vec![1, 3], ..v.clone() };
        assert_eq!(m.load(&row, Some(&[2, 3])).unwrap(), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }
}
