//! The CUDA C++ kernel sources, their NVRTC compilation, the on-disk PTX cache and the loaded
//! modules.
//!
//! Each family (`kernels/<family>.cu`, the same names as `hal::ops`) is compiled as one NVRTC
//! program: the shared prelude `kernels/common.cuh` (codecs, reductions, the row checks, block
//! quantization) followed by the family's source. Options: `--gpu-architecture=sm_XY` for the
//! device's compute capability, `-default-device`, `--std=c++17`, `--fmad=false` (the reference
//! rounds every product; a contracted `a·b + c` would not match it).
//!
//! PTX is cached on disk under `$V4RT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/v4rt/kernels`, else
//! `$HOME/.cache/v4rt/kernels`, in files named by family, arch and a 64-bit FNV-1a hash of
//! (prelude + source, arch, options, NVRTC version); a failed cache read or write only costs a
//! recompilation. In a process, each family is compiled at most once per arch and loaded once per
//! backend, at its first use.
//!
//! ## Where libnvrtc comes from
//! cudarc (feature `dynamic-loading`) opens NVRTC with `dlopen` by bare file name, trying
//! `libnvrtc.so`, `libnvrtc.so.12`, `libnvrtc.so.11`, … (`cudarc::get_lib_name_candidates`), so
//! the dynamic loader's search path decides: `LD_LIBRARY_PATH`, the ld.so cache, system
//! directories. glibc also matches a bare name against the SONAME of an already-loaded library,
//! so [`preload_nvrtc`] (dlopen of `<dir>/libnvrtc.so*` by full path, kept loaded) makes a
//! folder usable without touching `LD_LIBRARY_PATH` — that is how `tests/kernels_compile.rs`
//! uses `$V4RT_NVRTC_DIR` (e.g. the `nvidia/cuda_nvrtc/lib` folder of the
//! `nvidia-cuda-nvrtc-cu12` wheel, whose RUNPATH `$ORIGIN` finds `libnvrtc-builtins` beside it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The prelude prepended to every family.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// `(family, source)` of every kernel family, without the prelude (see [`full_source`]).
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("embed", include_str!("../kernels/embed.cu")),
    ("hc", include_str!("../kernels/hc.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("linear", include_str!("../kernels/linear.cu")),
    ("rope", include_str!("../kernels/rope.cu")),
    ("quant", include_str!("../kernels/quant.cu")),
    ("attention", include_str!("../kernels/attention.cu")),
    ("compressor", include_str!("../kernels/compressor.cu")),
    ("indexer", include_str!("../kernels/indexer.cu")),
    ("moe", include_str!("../kernels/moe.cu")),
    ("sample", include_str!("../kernels/sample.cu")),
    ("calibrate", include_str!("../kernels/calibrate.cu")),
];

/// The program NVRTC compiles for `family`: the prelude, then the family's source.
pub fn full_source(family: &str) -> Option<String> {
    let (_, src) = KERNEL_SOURCES.iter().find(|(n, _)| *n == family)?;
    Some(format!("{COMMON}\n#line 1 \"{family}.cu\"\n{src}"))
}

/// NVRTC options for an arch such as `sm_90`.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-default-device".into(), "--std=c++17".into(), "--fmad=false".into()]
}

/// 64-bit FNV-1a.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether libnvrtc can be opened by the dynamic loader (never panics).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen candidate names; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// `major.minor` of the loaded NVRTC, if it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let r = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present; nvrtcVersion writes two ints.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r, major, minor)
    });
    match r {
        Ok((cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS, major, minor)) => Some((major, minor)),
        _ => None,
    }
}

/// Loads `<dir>/libnvrtc.so*` by full path and keeps it loaded for the life of the process, so
/// that cudarc's later `dlopen("libnvrtc.so.12")` (by SONAME) finds it. Returns the file loaded.
pub fn preload_nvrtc(dir: &Path) -> Result<PathBuf, String> {
    static KEPT: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("libnvrtc.so") || (n.starts_with("libnvrtc.") && n.ends_with(".so"))
        })
        .filter(|p| !p.to_string_lossy().contains(".alt."))
        .collect();
    names.sort();
    let Some(path) = names.first().cloned() else {
        return Err(format!("no libnvrtc.so* in {}", dir.display()));
    };
    // SAFETY: loading NVRTC runs its (trusted) initializers only.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("dlopen {}: {e}", path.display()))?;
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(lib);
    Ok(path)
}

fn cache_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    nonempty("V4RT_KERNEL_CACHE")
        .or_else(|| nonempty("XDG_CACHE_HOME").map(|d| d.join("v4rt").join("kernels")))
        .or_else(|| nonempty("HOME").map(|d| d.join(".cache").join("v4rt").join("kernels")))
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Compiles one program with NVRTC (no cache). Errors carry NVRTC's log.
pub fn compile_source(name: &str, source: &str, arch: &str) -> Result<String, String> {
    if !nvrtc_present() {
        return Err("libnvrtc not found (looked for libnvrtc.so / libnvrtc.so.12 via the dynamic loader)".into());
    }
    let opts = CompileOptions { options: nvrtc_options(arch), name: Some(format!("{name}.cu")), ..Default::default() };
    let src = source.to_string();
    let out = std::panic::catch_unwind(move || cudarc::nvrtc::compile_ptx_with_opts(src, opts))
        .map_err(|p| format!("NVRTC panicked compiling {name}: {}", panic_text(p)))?;
    match out {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. }) => {
            Err(format!("{name}.cu for {arch}: {nvrtc:?}\n{}", log.to_string_lossy()))
        }
        Err(e) => Err(format!("{name}.cu for {arch}: {e:?}")),
    }
}

/// PTX of one family for `arch`: from this process's memory, the disk cache, or NVRTC.
pub fn family_ptx(family: &str, arch: &str) -> Result<String, String> {
    static MEM: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let mem = MEM.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (family.to_string(), arch.to_string());
    if let Some(p) = mem.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    let source = full_source(family).ok_or_else(|| format!("unknown kernel family '{family}'"))?;
    let version = nvrtc_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_default();
    let opts = nvrtc_options(arch).join(" ");
    let hash = fnv1a64(&[source.as_bytes(), arch.as_bytes(), opts.as_bytes(), version.as_bytes()]);
    let file = cache_dir().map(|d| d.join(format!("{family}-{arch}-{hash:016x}.ptx")));
    let cached = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).filter(|s| s.contains(".entry"));
    let ptx = match cached {
        Some(p) => p,
        None => {
            let p = compile_source(family, &source, arch)?;
            if let Some(f) = &file {
                // Best effort: write to a temporary name, then rename into place.
                if let Some(dir) = f.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let tmp = f.with_extension(format!("ptx.tmp{}", std::process::id()));
                if std::fs::write(&tmp, &p).is_ok() && std::fs::rename(&tmp, f).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            p
        }
    };
    mem.lock().unwrap_or_else(|p| p.into_inner()).insert(key, ptx.clone());
    Ok(ptx)
}

/// NVRTC-compiles every kernel family for `arch` (e.g. `"sm_90"`). Needs libnvrtc, not a GPU.
/// Bypasses the disk cache. The error lists every family that failed, with NVRTC's log.
pub fn compile_all_for_check(arch: &str) -> Result<(), String> {
    let mut failures = Vec::new();
    for (family, _) in KERNEL_SOURCES {
        let source = full_source(family).expect("listed family");
        if let Err(e) = compile_source(family, &source, arch) {
            failures.push(e);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n\n"))
    }
}

/// Modules and functions loaded into one backend's context.
pub(crate) struct Loaded {
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl Loaded {
    pub(crate) fn new(arch: String) -> Self {
        Loaded { arch, modules: Mutex::new(HashMap::new()), functions: Mutex::new(HashMap::new()) }
    }

    /// Kernel `name` of `family`, compiling and loading the family on first use.
    pub(crate) fn function(
        &self,
        ctx: &Arc<CudaContext>,
        family: &'static str,
        name: &'static str,
    ) -> Result<CudaFunction, String> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|p| p.into_inner()).get(&(family, name)) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(family) {
                Some(m) => m.clone(),
                None => {
                    let ptx = family_ptx(family, &self.arch)?;
                    let m = ctx
                        .load_module(Ptx::from_src(ptx))
                        .map_err(|e| format!("loading the {family} kernels for {}: {e:?}", self.arch))?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).map_err(|e| format!("kernel {family}::{name}: {e:?}"))?;
        self.functions.lock().unwrap_or_else(|p| p.into_inner()).insert((family, name), f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_separates_parts() {
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        assert_eq!(fnv1a64(&[b"x"]), fnv1a64(&[b"x"]));
    }

    #[test]
    fn every_family_has_a_source() {
        for (name, src) in KERNEL_SOURCES {
            let full = full_source(name).unwrap();
            assert!(full.starts_with(COMMON) && full.ends_with(src));
            assert!(src.contains("extern \"C\" __global__"), "{name}");
        }
    }

    /// Whether a kernel `body` in `src` calls `grid_dep_wait()`, itself or in a `*_impl` device
    /// function of the same source that it calls.
    fn waits(src: &str, body: &str) -> bool {
        const WAIT: &str = "grid_dep_wait();";
        body.contains(WAIT)
            || body.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|t| t.ends_with("_impl")).any(|f| {
                src.find(&format!("void {f}(")).is_some_and(|at| {
                    let def = &src[at..];
                    def[..def.find("extern \"C\"").unwrap_or(def.len())].contains(WAIT)
                })
            })
    }

    /// The kernels are launched with programmatic stream serialization (ops::launch), so each
    /// must wait for its predecessor before touching memory other than FP8/FP4 weights: its first
    /// statement is `grid_dep_begin()`, or `grid_dep_trigger()` with `grid_dep_wait()` in its body
    /// or in the `*_impl` function it calls (common.cuh).
    #[test]
    fn every_kernel_starts_with_grid_dep() {
        let families = KERNEL_SOURCES.iter().copied().chain([("common", COMMON)]);
        let (mut kernels, mut names) = (0, Vec::new());
        for (family, src) in families {
            let starts: Vec<usize> = src.match_indices("extern \"C\" __global__").map(|(at, _)| at).collect();
            for (i, &at) in starts.iter().enumerate() {
                let body = &src[at..][src[at..].find('{').expect("kernel body") + 1..];
                let body_end = starts.get(i + 1).map_or(body.len(), |&next| next - (src.len() - body.len()));
                let first = body.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                let head = src[at..].split(['(', ')', ' ', '\n']).filter(|t| !t.is_empty());
                let name =
                    head.skip(4).find(|t| *t != "__launch_bounds__" && !t.starts_with(char::is_numeric)).unwrap_or("?");
                let split = first.starts_with("grid_dep_trigger();") && waits(src, &body[..body_end]);
                assert!(
                    first.starts_with("grid_dep_begin();") || split,
                    "{family}: kernel {name} does not start with grid_dep_begin() (or grid_dep_trigger() and a later grid_dep_wait())"
                );
                assert_eq!(
                    split,
                    crate::ops::EARLY_WORK_KERNELS.contains(&name),
                    "{family}: kernel {name} works before its wait exactly when ops::EARLY_WORK_KERNELS lists it"
                );
                names.push(name);
                kernels += 1;
            }
        }
        assert!(kernels >= 40, "found only {kernels} kernels");
        for listed in crate::ops::EARLY_WORK_KERNELS {
            assert!(names.contains(listed), "ops::EARLY_WORK_KERNELS lists {listed}, which no kernel source defines");
        }
    }

    /// The host sizes grids and buffers with constants that the kernels define again.
    #[test]
    fn host_constants_match_the_kernels() {
        use crate::ops::attention::COMBINE_COLS;
        use crate::ops::indexer::{IS_HEADS_PER_THREAD, IS_KEYS};
        use crate::ops::linear::{FEATURES_PER_STEP, MMA_ROWS, TC_FEATURES, TC_K, TC_ROWS};
        let define = |name: &str| -> usize {
            let pattern = format!("#define {name} ");
            let sources = std::iter::once(COMMON).chain(KERNEL_SOURCES.iter().map(|(_, src)| *src));
            let (src, at) = sources
                .filter_map(|src| src.find(&pattern).map(|at| (src, at)))
                .next()
                .unwrap_or_else(|| panic!("no #define {name}"));
            let value = src[at + pattern.len()..].split_whitespace().next();
            value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("#define {name}: not a number"))
        };
        assert_eq!(define("LIN_OT"), FEATURES_PER_STEP);
        assert_eq!(define("TC_BM"), TC_ROWS);
        assert_eq!(define("TC_BN"), TC_FEATURES);
        assert_eq!(define("TC_BK"), TC_K);
        assert_eq!(define("MMA_ROWS"), MMA_ROWS);
        assert_eq!(define("IS_KEYS"), IS_KEYS);
        assert_eq!(define("IS_HEADS_PER_THREAD"), IS_HEADS_PER_THREAD);
        assert_eq!(define("COMBINE_COLS"), COMBINE_COLS);
        assert_eq!(IS_KEYS * (64 / IS_HEADS_PER_THREAD), crate::ops::BLOCK as usize, "index_scores_t's threads");
    }
}
