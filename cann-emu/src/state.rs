//! The emulator's global state: configuration, handles, streams (deferred queues), events,
//! nnopbase objects and executors.
//!
//! Streams are FIFO queues of tasks that run only when someone waits: `aclrtSynchronizeStream`
//! drains the stream, `aclrtSynchronizeEvent` drains up to the record, and a stream waiting on
//! an event drains the recording stream up to it when the wait itself runs. A task that fails
//! (a kernel error, a freed buffer, an injected fault) puts its stream in a sticky fault state:
//! the rest of its queue is dropped and every later synchronize reports the same 507015 error.
//!
//! HCCL collectives ([`Task::Collective`]) are the one kind of task that cannot run under the
//! emulator lock: executing one means waiting for the other ranks' threads, which need that
//! lock to enqueue and drain their own streams. So [`Emu::drain`] stops in front of a
//! collective and hands it back ([`Drained::Blocked`]), and the free functions
//! [`sync_stream`] / [`advance_stream`] run it with the lock released, then pop it.

use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use crate::dtype::Dt;
use crate::memory::{Memory, TView};
use crate::{bail, codes, Fail};

/// When to inject a failure: the Nth call (1-based), optionally every later one too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    pub nth: u64,
    pub and_later: bool,
}

impl Trigger {
    /// Parses `N` or `N+`.
    pub fn parse(s: &str) -> Option<Trigger> {
        let s = s.trim();
        let (num, and_later) = match s.strip_suffix('+') {
            Some(n) => (n, true),
            None => (s, false),
        };
        num.parse::<u64>().ok().filter(|&n| n > 0).map(|nth| Trigger { nth, and_later })
    }

    /// Whether call number `count` (1-based) fails.
    pub fn fires(&self, count: u64) -> bool {
        count == self.nth || (self.and_later && count > self.nth)
    }
}

/// Emulator configuration, from the environment at `aclInit`.
#[derive(Clone, Debug)]
pub struct Config {
    pub soc: &'static CStr,
    pub fail_alloc: Option<Trigger>,
    pub fail_launch: Option<Trigger>,
    pub capacity: usize,
    pub devices: u32,
    pub eager: bool,
    /// How long an HCCL rendezvous (communicator init, one collective) waits for the other
    /// ranks before failing with `HCCL_E_TIMEOUT` (`V4RT_EMU_HCCL_TIMEOUT_MS`, default 10 s).
    pub hccl_timeout: Duration,
    /// What `aclsysGetVersionStr` reports for every package (`V4RT_EMU_CANN_VERSION`, default
    /// "9.1.0", the first release whose docs have every fused op the backend binds).
    pub cann_version: String,
}

impl Config {
    /// Reads `V4RT_EMU_*`.
    pub fn from_env() -> Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let soc = var("V4RT_EMU_SOC").unwrap_or_else(|| "Ascend910B".into());
        // Leaked on purpose: `aclrtGetSocName` hands out pointers that must stay valid.
        let soc: &'static CStr =
            Box::leak(std::ffi::CString::new(soc.replace('\0', "")).unwrap_or_default().into_boxed_c_str());
        Config {
            soc,
            fail_alloc: var("V4RT_EMU_FAIL_ALLOC").and_then(|v| Trigger::parse(&v)),
            fail_launch: var("V4RT_EMU_FAIL_LAUNCH").and_then(|v| Trigger::parse(&v)),
            capacity: var("V4RT_EMU_MEM_MB").and_then(|v| v.parse::<usize>().ok()).unwrap_or(32 << 10) << 20,
            devices: var("V4RT_EMU_DEVICES").and_then(|v| v.parse().ok()).unwrap_or(1),
            eager: var("V4RT_EMU_EAGER").is_some_and(|v| v == "1"),
            hccl_timeout: Duration::from_millis(
                var("V4RT_EMU_HCCL_TIMEOUT_MS").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(10_000),
            ),
            cann_version: var("V4RT_EMU_CANN_VERSION").unwrap_or_else(|| "9.1.0".into()),
        }
    }

    /// The SoC name as a string.
    pub fn soc_name(&self) -> String {
        self.soc.to_string_lossy().into_owned()
    }

    /// Whether this SoC computes with FP8/FP4/HiF8 (the 950 family only).
    pub fn low_precision(&self) -> bool {
        self.soc_name().starts_with("Ascend950")
    }
}

/// Work queued on a stream.
pub type Work = Box<dyn FnOnce(&mut Memory) -> Result<(), String> + Send>;
/// A kernel an executor launches (callable again when the executor is repeatable).
pub type Kernel = Arc<dyn Fn(&mut Memory) -> Result<(), String> + Send + Sync>;

pub enum Task {
    Work {
        name: String,
        run: Work,
    },
    /// Marks a point events can refer to.
    Marker,
    /// Runs `stream` through `seq` first.
    Wait {
        stream: usize,
        seq: u64,
    },
    /// An HCCL collective of one rank: a rendezvous with the other ranks, then their data
    /// movement. Run outside the emulator lock (see the module docs).
    Collective(Arc<crate::hccl::Call>),
}

/// How far [`Emu::drain`] got.
pub enum Drained {
    /// Everything up to the requested sequence number ran.
    Done,
    /// `stream` (the one drained, or one it waits on) has a collective at its front.
    Blocked { stream: usize, seq: u64, call: Arc<crate::hccl::Call> },
}

pub struct Stream {
    pub device: i32,
    queue: VecDeque<(u64, Task)>,
    next_seq: u64,
    pub fault: Option<Fail>,
}

pub struct Event {
    pub device: i32,
    /// Stream and sequence number of the last record.
    pub last: Option<(usize, u64)>,
}

/// An `aclTensor`.
#[derive(Clone, Debug)]
pub struct TensorObj {
    pub view: TView,
    pub format: i32,
    pub storage_elems: i64,
}

/// An `aclOpExecutor`.
pub struct Executor {
    pub op: &'static str,
    pub workspace: u64,
    pub used: bool,
    pub repeatable: bool,
    pub tensors: Vec<usize>,
    pub kernel: Kernel,
}

/// Everything the emulator knows.
pub struct Emu {
    pub initialized: bool,
    pub config: Config,
    pub mem: Memory,
    pub streams: HashMap<usize, Stream>,
    pub default_streams: HashMap<i32, usize>,
    pub events: HashMap<usize, Event>,
    pub tensors: HashMap<usize, TensorObj>,
    pub scalars: HashMap<usize, (Dt, f64)>,
    pub int_arrays: HashMap<usize, Vec<i64>>,
    pub tensor_lists: HashMap<usize, Vec<usize>>,
    pub executors: HashMap<usize, Executor>,
    pub malloc_count: u64,
    pub launch_count: u64,
    handle_base: usize,
    next_handle: usize,
}

/// Handle address space (PROT_NONE: handles are opaque, dereferencing one faults).
const HANDLE_SPACE: usize = 1 << 30;

impl Emu {
    pub fn new() -> Result<Emu, Fail> {
        let config = Config::from_env();
        let mem = Memory::new(config.capacity).map_err(|m| Fail::new(codes::INTERNAL_ERROR, m))?;
        // SAFETY: an anonymous PROT_NONE reservation used only for its addresses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HANDLE_SPACE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(codes::INTERNAL_ERROR, "cannot reserve handle address space");
        }
        Ok(Emu {
            initialized: false,
            config,
            mem,
            streams: HashMap::new(),
            default_streams: HashMap::new(),
            events: HashMap::new(),
            tensors: HashMap::new(),
            scalars: HashMap::new(),
            int_arrays: HashMap::new(),
            tensor_lists: HashMap::new(),
            executors: HashMap::new(),
            malloc_count: 0,
            launch_count: 0,
            handle_base: p as usize,
            next_handle: 0,
        })
    }

    /// A fresh opaque handle (never reused).
    pub fn handle(&mut self) -> usize {
        self.next_handle += 64;
        self.handle_base + (self.next_handle % HANDLE_SPACE)
    }

    /// Whether `h` is a handle this emulator issued (live or not). Handles only grow, so a
    /// consumed executor is recognised without keeping a record of it.
    pub fn issued(&self, h: usize) -> bool {
        self.next_handle < HANDLE_SPACE && h > self.handle_base && h <= self.handle_base + self.next_handle
    }

    /// Fails unless `aclInit` has run.
    pub fn need_init(&self) -> Result<(), Fail> {
        if !self.initialized {
            bail!(codes::UNINITIALIZE, "ACL is not initialized (call aclInit first)");
        }
        Ok(())
    }

    /// The calling thread's device; fails when `aclInit` or `aclrtSetDevice` is missing.
    pub fn need_device(&self) -> Result<i32, Fail> {
        self.need_init()?;
        crate::thread_device().ok_or_else(|| {
            Fail::new(codes::RT_CONTEXT_NULL, "no device is bound to this thread (call aclrtSetDevice first)")
        })
    }

    /// The stream a handle names (NULL → the bound device's default stream).
    pub fn stream_id(&mut self, handle: usize) -> Result<usize, Fail> {
        let dev = self.need_device()?;
        if handle == 0 {
            if let Some(&s) = self.default_streams.get(&dev) {
                return Ok(s);
            }
            let s = self.new_stream(dev);
            self.default_streams.insert(dev, s);
            return Ok(s);
        }
        match self.streams.get(&handle) {
            Some(s) if s.device == dev => Ok(handle),
            Some(s) => {
                bail!(codes::RT_PARAM_INVALID, "stream belongs to device {}, thread is bound to device {dev}", s.device)
            }
            None => bail!(codes::RT_PARAM_INVALID, "{handle:#x} is not a live stream"),
        }
    }

    /// Creates a stream on `device`.
    pub fn new_stream(&mut self, device: i32) -> usize {
        let h = self.handle();
        self.streams.insert(h, Stream { device, queue: VecDeque::new(), next_seq: 1, fault: None });
        h
    }

    /// Appends a task; returns its sequence number. Eager mode runs it at once.
    pub fn enqueue(&mut self, stream: usize, task: Task) -> Result<u64, Fail> {
        let s = self.streams.get_mut(&stream).ok_or_else(|| Fail::new(codes::RT_PARAM_INVALID, "stream vanished"))?;
        let seq = s.next_seq;
        s.next_seq += 1;
        s.queue.push_back((seq, task));
        if self.config.eager {
            // Errors surface at the next synchronize, as they would on a device.
            let _ = self.drain(stream, seq, 0);
        }
        Ok(seq)
    }

    /// Enqueues work.
    pub fn enqueue_work(&mut self, stream: usize, name: impl Into<String>, run: Work) -> Result<u64, Fail> {
        self.enqueue(stream, Task::Work { name: name.into(), run })
    }

    /// The sequence number of the last task queued on `stream` (0 when none ever was).
    pub fn last_seq(&self, stream: usize) -> u64 {
        self.streams.get(&stream).map_or(0, |s| s.next_seq - 1)
    }

    /// Runs `stream`'s tasks through `upto`; a fault is returned (and kept on the stream). Stops
    /// in front of a collective (its own or one on a stream it waits on) and reports it as
    /// [`Drained::Blocked`], leaving it queued: only [`sync_stream`] / [`advance_stream`] run
    /// collectives, because they can release the lock.
    pub fn drain(&mut self, stream: usize, upto: u64, depth: u32) -> Result<Drained, Fail> {
        if depth > 64 {
            bail!(codes::RT_AICORE_EXCEPTION, "event wait cycle between streams");
        }
        loop {
            // Peek first: waits and collectives stay queued until they have completed.
            let (seq, wait) = {
                let Some(s) = self.streams.get_mut(&stream) else {
                    // A destroyed stream was drained when it was destroyed.
                    return Ok(Drained::Done);
                };
                if let Some(f) = &s.fault {
                    return Err(f.clone());
                }
                match s.queue.front() {
                    Some((seq, Task::Collective(call))) if *seq <= upto => {
                        return Ok(Drained::Blocked { stream, seq: *seq, call: call.clone() });
                    }
                    Some((seq, Task::Wait { stream: other, seq: until })) if *seq <= upto => {
                        (*seq, Some((*other, *until)))
                    }
                    Some((seq, _)) if *seq <= upto => (*seq, None),
                    _ => return Ok(Drained::Done),
                }
            };
            let result = match wait {
                Some((other, until)) => match self.drain(other, until, depth + 1) {
                    Ok(Drained::Done) => {
                        self.pop_if_front(stream, seq);
                        Ok(())
                    }
                    Ok(blocked @ Drained::Blocked { .. }) => return Ok(blocked),
                    Err(f) => Err(Fail::new(
                        codes::RT_AICORE_EXCEPTION,
                        format!("a stream this one waited on faulted: {}", f.msg),
                    )),
                },
                None => match self.streams.get_mut(&stream).and_then(|s| s.queue.pop_front()) {
                    Some((_, Task::Work { name, run })) => {
                        run(&mut self.mem).map_err(|m| Fail::new(codes::RT_AICORE_EXCEPTION, format!("{name}: {m}")))
                    }
                    _ => Ok(()),
                },
            };
            if let Err(f) = result {
                self.fault(stream, f.clone());
                return Err(f);
            }
        }
    }

    /// Removes the task at the front of `stream` if it is number `seq`.
    fn pop_if_front(&mut self, stream: usize, seq: u64) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.queue.front().is_some_and(|(q, _)| *q == seq) {
                s.queue.pop_front();
            }
        }
    }

    /// Puts `stream` into the sticky fault state (its remaining work is dropped).
    fn fault(&mut self, stream: usize, f: Fail) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.fault = Some(f);
            s.queue.clear();
        }
    }

    /// Records the outcome of collective `seq` at the front of `stream`: popped on success, a
    /// sticky fault otherwise. Another thread may have recorded it already (two threads
    /// synchronizing one stream); then the stream's own state is the answer.
    pub fn finish_collective(&mut self, stream: usize, seq: u64, outcome: Result<(), Fail>) -> Result<(), Fail> {
        let Some(s) = self.streams.get_mut(&stream) else { return Ok(()) };
        if let Some(f) = &s.fault {
            return Err(f.clone());
        }
        if s.queue.front().is_none_or(|(q, _)| *q != seq) {
            return Ok(());
        }
        match outcome {
            Ok(()) => {
                s.queue.pop_front();
                Ok(())
            }
            Err(f) => {
                self.fault(stream, f.clone());
                Err(f)
            }
        }
    }

    /// A live tensor's record, or the matching aclnn error.
    pub fn tensor(&self, p: usize, name: &str) -> Result<TensorObj, Fail> {
        if p == 0 {
            bail!(codes::ACLNN_PARAM_NULLPTR, "{name} is nullptr");
        }
        self.tensors.get(&p).cloned().ok_or_else(|| {
            Fail::new(codes::ACLNN_PARAM_INVALID, format!("{name} ({p:#x}) is not a live aclTensor (destroyed?)"))
        })
    }

    /// A live scalar (NULL → `None`).
    pub fn scalar(&self, p: usize, name: &str) -> Result<Option<(Dt, f64)>, Fail> {
        if p == 0 {
            return Ok(None);
        }
        match self.scalars.get(&p) {
            Some(&s) => Ok(Some(s)),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{name} ({p:#x}) is not a live aclScalar"),
        }
    }
}

/// Runs everything queued on `stream` up to `upto` (everything queued now when `None`),
/// collectives included. Called without the emulator lock: a collective waits for the other
/// ranks, whose threads need the lock meanwhile.
pub fn sync_stream(stream: usize, upto: Option<u64>) -> Result<(), Fail> {
    let upto = match upto {
        Some(u) => u,
        None => crate::with_emu(|e| Ok(e.last_seq(stream)))?,
    };
    loop {
        match crate::with_emu(|e| e.drain(stream, upto, 0))? {
            Drained::Done => return Ok(()),
            Drained::Blocked { stream: s, seq, call } => {
                let outcome = call.execute();
                crate::with_emu(|e| e.finish_collective(s, seq, outcome))?;
            }
        }
    }
}

/// Runs `stream` as far as it goes without waiting for another rank: its work runs, and a
/// collective at its front is joined (arrival recorded, data moved if this was the last rank
/// missing) but not waited for. One rank's wait calls this for the streams of the ranks it
/// waits for, which stands in for their devices running queued work on their own; without it,
/// one host thread driving several ranks (`HcclCommInitAll`) would wait forever on the first
/// synchronize.
pub fn advance_stream(stream: usize) {
    let Ok(upto) = crate::with_emu(|e| Ok(e.last_seq(stream))) else { return };
    // Each round either completes a collective (and goes on) or stops.
    loop {
        match crate::with_emu(|e| e.drain(stream, upto, 0)) {
            Ok(Drained::Blocked { stream: s, seq, call }) => match call.arrive_only() {
                Some(outcome) => {
                    if crate::with_emu(|e| e.finish_collective(s, seq, outcome)).is_err() {
                        return;
                    }
                }
                None => return,
            },
            // Faults are reported to whoever synchronizes that stream.
            Ok(Drained::Done) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers() {
        assert_eq!(Trigger::parse("3"), Some(Trigger { nth: 3, and_later: false }));
        let t = Trigger::parse(" 2+ ").unwrap();
        assert!(!t.fires(1) && t.fires(2) && t.fires(9));
        assert!(!Trigger::parse("3").unwrap().fires(4));
        assert_eq!(Trigger::parse("0"), None);
        assert_eq!(Trigger::parse("x"), None);
    }
}
