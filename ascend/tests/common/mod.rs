//! Test support: where the emulator's shared library is, fake toolkit layouts built from it,
//! a child-process runner, and small numeric helpers.
//!
//! How the emulator gets built: `v4rt-cann-emu` is a dev-dependency of this crate with
//! `crate-type = ["cdylib", "rlib"]`, so any `cargo test` that builds these tests (`-p
//! v4rt-ascend` or `--workspace`) also produces `libv4rt_cann_emu.so` in `target/<profile>/deps`,
//! next to the test binary. The tests never link the rlib (that would put a second copy of the
//! emulator in the test binary); they find the `.so` next to `current_exe()`, or take
//! `V4RT_CANN_EMU_LIB=/path/to/libv4rt_cann_emu.so`.
//!
//! A fake toolkit is a directory `$T/lib64/` of symlinks (`libascendcl.so`, `libnnopbase.so`,
//! `libopapi.so`, `libhccl.so`) to that one file; glibc opens one inode once, so they share one
//! emulator. Tests point `ASCEND_TOOLKIT_HOME` at it and the production loader does the rest.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The emulator's shared library.
pub fn emu_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("V4RT_CANN_EMU_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a directory");
    for dir in [deps, deps.parent().unwrap_or(deps)] {
        let p = dir.join("libv4rt_cann_emu.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libv4rt_cann_emu.so not found next to {} (build v4rt-cann-emu, or set V4RT_CANN_EMU_LIB)", exe.display());
}

/// Which libraries a fake toolkit provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// libascendcl, libnnopbase, libopapi, libhccl.
    Monolithic,
    /// libascendcl, libnnopbase, libopapi_math, libopapi_nn (no libopapi.so), libhcomm.
    Split,
    /// Both op layouts (the loader must pick libopapi.so only).
    Both,
    /// libascendcl only.
    AclOnly,
    /// libascendcl + libnnopbase, no op library.
    NoOpapi,
}

impl Layout {
    fn libs(self) -> &'static [&'static str] {
        match self {
            Layout::Monolithic => &["libascendcl.so", "libnnopbase.so", "libopapi.so", "libhccl.so"],
            Layout::Split => &["libascendcl.so", "libnnopbase.so", "libopapi_math.so", "libopapi_nn.so", "libhcomm.so"],
            Layout::Both => &["libascendcl.so", "libnnopbase.so", "libopapi.so", "libopapi_math.so", "libopapi_nn.so"],
            Layout::AclOnly => &["libascendcl.so"],
            Layout::NoOpapi => &["libascendcl.so", "libnnopbase.so"],
        }
    }
}

/// Scratch directory for this test binary.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("v4rt-ascend-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Lays out a fake toolkit root whose `lib64/` links every library of `layout` to `target`.
pub fn fake_toolkit_with(name: &str, layout: Layout, target: &Path) -> PathBuf {
    let root = scratch(name);
    let lib64 = root.join("lib64");
    let _ = std::fs::remove_dir_all(&lib64);
    std::fs::create_dir_all(&lib64).expect("create lib64");
    for lib in layout.libs() {
        std::os::unix::fs::symlink(target, lib64.join(lib)).expect("symlink");
    }
    root
}

/// A fake toolkit of the emulator.
pub fn fake_toolkit(name: &str, layout: Layout) -> PathBuf {
    fake_toolkit_with(name, layout, &emu_lib())
}

/// Makes this process use the emulator through the production path: a monolithic fake
/// toolkit and `ASCEND_TOOLKIT_HOME` (set once, before any test reads the environment).
pub fn use_emulator() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = fake_toolkit("toolkit", Layout::Monolithic);
        std::env::set_var("ASCEND_TOOLKIT_HOME", &root);
        root
    })
}

/// Env var that tells a re-invoked test binary which scenario to run.
pub const CHILD_ENV: &str = "V4RT_ASCEND_TEST_CHILD";

/// Runs this test binary's `child_entry` test in a new process with `scenario` and extra
/// environment, and returns its output.
pub fn run_child(scenario: &str, envs: &[(&str, &str)]) -> Output {
    let root = use_emulator();
    let exe = std::env::current_exe().expect("current_exe");
    Command::new(exe)
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .env("ASCEND_TOOLKIT_HOME", root)
        .envs(envs.iter().copied())
        .output()
        .expect("spawn child test process")
}

/// Fails the test unless a child process from [`run_child`] exited cleanly and printed
/// `CHILD-OK` (its output is shown on failure).
pub fn assert_child_ok(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `Σ(g−w)² / Σw²`; infinite on a length mismatch or any non-finite value.
/// NMSE of `got` against `want`; non-finite values or a length mismatch give infinity.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    v4rt_tests::metrics::compare(got, want, 0.0).nmse
}

/// Test-data draws on top of the model's deterministic generator (splitmix64).
pub struct Rng(model::sample::Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(model::sample::Rng::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

// Shared by several test binaries; not every one uses these.
#[allow(unused_imports)]
pub use hal::dtype::{bytes_f32, f32_bytes, i32_bytes};
