//! Finding and loading CANN at run time.
//!
//! Nothing is linked at build time: the toolkit root is searched in the documented order
//! (`ASCEND_TOOLKIT_HOME`, `ASCEND_HOME_PATH`, `/usr/local/Ascend/cann`,
//! `/usr/local/Ascend/ascend-toolkit/latest`, then the same two under `$HOME/Ascend`), each
//! root's `lib64/` and `<arch>-linux/lib64/` are tried, and as a last resort the bare library
//! name goes through the dynamic loader's own search (`LD_LIBRARY_PATH` from `set_env.sh`).
//!
//! Libraries are opened by absolute path with `RTLD_NOW | RTLD_GLOBAL`, in dependency order
//! (`libascendcl` → `libnnopbase` → `libopapi*` → `libhcomm` → `libhccl`), and every symbol is
//! resolved once into the tables of [`crate::sys`]. A missing library or required symbol is a
//! [`LoadError`] that says what was looked for where; it never panics.
//!
//! Op libraries: `libopapi.so` (the all-in-one library) when it exists, otherwise the split
//! set `libopapi_{math,nn,transformer,cv}.so`. The ops-nn docs say the two must never be
//! loaded together, so if both are present only `libopapi.so` is opened ([`OpapiMode`]).
//!
//! The libraries are never unloaded: CANN keeps process-wide state (threads, device contexts)
//! that does not survive `dlclose`, so each [`Api`] leaks its handles on purpose.

use std::fmt;
use std::path::{Path, PathBuf};

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

use crate::sys::{AclFns, AclOptFns, AclnnOps, FusedOps, HcclFns, NnopFns, NnopOptFns};

/// Why CANN could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `libascendcl.so` was not found under any candidate directory nor via the loader path.
    #[error("libascendcl.so not found; looked for it in [{}] and via the dynamic loader search path (LD_LIBRARY_PATH); install CANN and `source set_env.sh`, or set ASCEND_TOOLKIT_HOME", .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoToolkit { searched: Vec<PathBuf> },
    /// A required library next to `libascendcl.so` is missing or failed to open.
    #[error("{lib} could not be loaded; looked for it in [{}]: {reason}", .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    MissingLibrary { lib: &'static str, searched: Vec<PathBuf>, reason: String },
    /// A library opened but lacks a required symbol.
    #[error("{} does not export required symbol {symbol} (CANN too old, or not a CANN library)", .lib.display())]
    MissingSymbol { lib: PathBuf, symbol: String },
}

/// Which op library layout was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpapiMode {
    /// The all-in-one `libopapi.so` (used even when split libraries are present too).
    Monolithic(PathBuf),
    /// The split set, as found (e.g. `libopapi_math.so`, `libopapi_nn.so`).
    Split(Vec<PathBuf>),
}

impl fmt::Display for OpapiMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpapiMode::Monolithic(_) => f.write_str("libopapi.so"),
            OpapiMode::Split(libs) => {
                let names: Vec<_> =
                    libs.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
                write!(f, "split {}", names.join("+"))
            }
        }
    }
}

/// Where to look for the toolkit. [`SearchConfig::from_env`] is what `probe()` uses; tests of
/// the loader's failure paths build one by hand so they do not have to touch the environment.
#[derive(Clone, Debug)]
pub struct SearchConfig {
    /// Toolkit roots, in priority order.
    pub roots: Vec<PathBuf>,
    /// Whether to fall back to `dlopen("libascendcl.so")` (the loader's own search path).
    pub use_loader_path: bool,
}

impl SearchConfig {
    /// The documented resolution order (spec §1.3), plus the per-user install under `$HOME`.
    pub fn from_env() -> Self {
        let mut roots = Vec::new();
        for var in ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"] {
            if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                roots.push(PathBuf::from(v));
            }
        }
        roots.push(PathBuf::from("/usr/local/Ascend/cann"));
        roots.push(PathBuf::from("/usr/local/Ascend/ascend-toolkit/latest"));
        if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            let home = PathBuf::from(home);
            roots.push(home.join("Ascend/cann"));
            roots.push(home.join("Ascend/ascend-toolkit/latest"));
        }
        roots.dedup();
        SearchConfig { roots, use_loader_path: true }
    }

    /// Only these roots; no loader-path fallback.
    pub fn roots(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        SearchConfig { roots: roots.into_iter().collect(), use_loader_path: false }
    }

    /// The library directories of one root: `lib64/`, then `<arch>-linux/lib64/`.
    pub fn lib_dirs(root: &Path) -> Vec<PathBuf> {
        vec![root.join("lib64"), root.join(format!("{}-linux", std::env::consts::ARCH)).join("lib64")]
    }

    fn candidate_dirs(&self) -> Vec<PathBuf> {
        self.roots.iter().flat_map(|r| Self::lib_dirs(r)).collect()
    }
}

/// One opened library; kept alive for the life of the process.
pub struct Lib {
    lib: Library,
    path: PathBuf,
}

impl Lib {
    fn open(path: &Path) -> Result<Lib, String> {
        // SAFETY: opening a shared object runs its initializers. These are the CANN libraries
        // (or the emulator standing in for them) found at the documented locations; loading
        // them is the whole point of this backend.
        let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
        Ok(Lib { lib, path: path.to_path_buf() })
    }

    /// The library's path (or bare name, when found through the loader's search path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The symbol `name` as a `T` (a function pointer type), or `None` if it is not exported.
    ///
    /// # Safety
    /// `T` must be the symbol's real type.
    pub(crate) unsafe fn get<T: Copy>(&self, name: &str) -> Option<T> {
        // SAFETY: forwarded to the caller: `T` is the symbol's type. The returned value
        // outlives the `Symbol` guard only because the library is never unloaded.
        unsafe { self.lib.get::<T>(name.as_bytes()).ok().map(|s| *s) }
    }
}

/// Everything resolved from CANN: the function tables and where they came from.
pub struct Api {
    /// Required `libascendcl` runtime functions.
    pub acl: AclFns,
    /// Optional `libascendcl` functions.
    pub acl_opt: AclOptFns,
    /// Required `libnnopbase` functions.
    pub nnop: NnopFns,
    /// Optional `libnnopbase` functions.
    pub nnop_opt: NnopOptFns,
    /// aclnn op pairs; `None` where a pair is missing from the loaded op libraries.
    pub ops: AclnnOps,
    /// CANN's fused DeepSeek-V4 ops (`docs/ascend-fused.md`); `None` where not exported.
    pub fused: FusedOps,
    /// HCCL, when `libhccl.so` (and, in newer layouts, `libhcomm.so`) is present.
    pub hccl: Option<HcclFns>,
    /// The directory `libascendcl.so` was found in (`None`: found through the loader path).
    pub lib_dir: Option<PathBuf>,
    /// Which op library layout was loaded.
    pub opapi: OpapiMode,
    /// Paths of the HCCL libraries loaded (empty when HCCL is absent).
    pub hccl_libs: Vec<PathBuf>,
    _libs: Vec<&'static Lib>,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("lib_dir", &self.lib_dir)
            .field("opapi", &self.opapi)
            .field("hccl_libs", &self.hccl_libs)
            .field("missing_ops", &self.ops.missing())
            .finish()
    }
}

const ASCENDCL: &str = "libascendcl.so";
const NNOPBASE: &str = "libnnopbase.so";
const OPAPI: &str = "libopapi.so";
const OPAPI_SPLIT: [&str; 4] = ["libopapi_math.so", "libopapi_nn.so", "libopapi_transformer.so", "libopapi_cv.so"];
const HCCL: &str = "libhccl.so";
const HCOMM: &str = "libhcomm.so";

/// Opens a library and leaks it (see the module doc: CANN is never unloaded).
fn open_leaked(path: &Path) -> Result<&'static Lib, String> {
    Lib::open(path).map(|l| &*Box::leak(Box::new(l)))
}

/// Finds `name` in `dirs` (first hit).
fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
}

/// Loads CANN from the first root that has `libascendcl.so`.
pub fn load(cfg: &SearchConfig) -> Result<Api, LoadError> {
    let candidates = cfg.candidate_dirs();
    // The root whose lib dir holds libascendcl decides where every other library is searched:
    // mixing libraries from two installs is a recipe for ABI mismatches.
    let found = candidates.iter().find(|d| d.join(ASCENDCL).exists()).cloned();
    let (acl_path, lib_dirs) = match &found {
        Some(dir) => {
            let root_dirs: Vec<PathBuf> = cfg
                .roots
                .iter()
                .map(|r| SearchConfig::lib_dirs(r))
                .find(|ds| ds.contains(dir))
                .unwrap_or_else(|| vec![dir.clone()]);
            // The directory that has libascendcl first, then its sibling lib dirs.
            let mut dirs = vec![dir.clone()];
            dirs.extend(root_dirs.into_iter().filter(|d| d != dir));
            (dir.join(ASCENDCL), dirs)
        }
        None if cfg.use_loader_path => (PathBuf::from(ASCENDCL), Vec::new()),
        None => return Err(LoadError::NoToolkit { searched: candidates }),
    };

    let acl_lib = match open_leaked(&acl_path) {
        Ok(l) => l,
        Err(_) if found.is_none() => return Err(LoadError::NoToolkit { searched: candidates }),
        Err(reason) => {
            return Err(LoadError::MissingLibrary { lib: ASCENDCL, searched: lib_dirs, reason });
        }
    };
    let searched_or_loader = |dirs: &[PathBuf]| -> Vec<PathBuf> {
        if dirs.is_empty() {
            vec![PathBuf::from("<dynamic loader search path>")]
        } else {
            dirs.to_vec()
        }
    };
    // Locates a companion library: in the chosen dirs, or through the loader path when
    // libascendcl itself came from there.
    let locate = |name: &str| -> Option<PathBuf> {
        if lib_dirs.is_empty() {
            Some(PathBuf::from(name))
        } else {
            find_in(&lib_dirs, name)
        }
    };
    let open_required = |name: &'static str| -> Result<&'static Lib, LoadError> {
        let path = locate(name).ok_or_else(|| LoadError::MissingLibrary {
            lib: name,
            searched: searched_or_loader(&lib_dirs),
            reason: "file not found".into(),
        })?;
        open_leaked(&path).map_err(|reason| LoadError::MissingLibrary {
            lib: name,
            searched: searched_or_loader(&lib_dirs),
            reason,
        })
    };

    let nnop_lib = open_required(NNOPBASE)?;

    // Op libraries: never both layouts.
    let (opapi, op_libs): (OpapiMode, Vec<&'static Lib>) = match locate(OPAPI).map(|p| open_leaked(&p).map(|l| (p, l)))
    {
        Some(Ok((path, lib))) => (OpapiMode::Monolithic(path), vec![lib]),
        mono_err => {
            let split: Vec<PathBuf> = OPAPI_SPLIT.iter().filter_map(|n| find_in(&lib_dirs, n)).collect();
            if split.is_empty() {
                let reason = match mono_err {
                    Some(Err(e)) => e,
                    _ => format!("neither {OPAPI} nor any of {} exists", OPAPI_SPLIT.join(", ")),
                };
                return Err(LoadError::MissingLibrary {
                    lib: "libopapi.so (or the split libopapi_*.so)",
                    searched: searched_or_loader(&lib_dirs),
                    reason,
                });
            }
            let mut libs = Vec::new();
            for p in &split {
                let lib = open_leaked(p).map_err(|reason| LoadError::MissingLibrary {
                    lib: "libopapi_*.so",
                    searched: vec![p.clone()],
                    reason,
                })?;
                libs.push(lib);
            }
            (OpapiMode::Split(split), libs)
        }
    };

    // HCCL is optional: its absence only disables multi-device work. The communicator API is
    // looked up in libhccl first, then libhcomm (the 2026 split), both opened when present.
    let mut hccl_libs: Vec<&'static Lib> = Vec::new();
    for name in [HCOMM, HCCL] {
        if let Some(path) = locate(name) {
            if let Ok(lib) = open_leaked(&path) {
                hccl_libs.push(lib);
            }
        }
    }
    // Search order for symbols: libhccl before libhcomm.
    hccl_libs.reverse();

    fn missing(lib: &Lib) -> impl FnOnce(String) -> LoadError + '_ {
        move |symbol| LoadError::MissingSymbol { lib: lib.path().to_path_buf(), symbol }
    }
    // SAFETY (all resolves below): each table is resolved from the library the spec says
    // exports it, with the prototypes transcribed from the spec (and checked against the real
    // headers by tests/abi_headers.rs where headers are available).
    let acl = unsafe { AclFns::resolve(acl_lib) }.map_err(missing(acl_lib))?;
    let acl_opt = unsafe { AclOptFns::resolve(&[acl_lib]) };
    let nnop = unsafe { NnopFns::resolve(nnop_lib) }.map_err(missing(nnop_lib))?;
    let nnop_opt = unsafe { NnopOptFns::resolve(&[nnop_lib]) };
    let ops = unsafe { AclnnOps::resolve(&op_libs) };
    let fused = unsafe { FusedOps::resolve(&op_libs) };
    let hccl = if hccl_libs.is_empty() { None } else { Some(unsafe { HcclFns::resolve(&hccl_libs) }) };

    let mut libs = vec![acl_lib, nnop_lib];
    libs.extend(&op_libs);
    libs.extend(&hccl_libs);
    Ok(Api {
        acl,
        acl_opt,
        nnop,
        nnop_opt,
        ops,
        fused,
        hccl,
        lib_dir: found,
        opapi,
        hccl_libs: hccl_libs.iter().map(|l| l.path().to_path_buf()).collect(),
        _libs: libs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_order_puts_overrides_first() {
        let cfg = SearchConfig::from_env();
        let i_cann = cfg.roots.iter().position(|r| r == Path::new("/usr/local/Ascend/cann")).unwrap();
        let i_tk = cfg.roots.iter().position(|r| r == Path::new("/usr/local/Ascend/ascend-toolkit/latest")).unwrap();
        assert!(i_cann < i_tk);
        assert!(cfg.use_loader_path);
    }

    #[test]
    fn lib_dirs_include_the_arch_dir() {
        let d = SearchConfig::lib_dirs(Path::new("/x"));
        assert_eq!(d[0], Path::new("/x/lib64"));
        assert!(d[1].to_string_lossy().ends_with("-linux/lib64"));
    }

    #[test]
    fn empty_roots_fail_cleanly() {
        let e = load(&SearchConfig::roots([PathBuf::from("/nonexistent/v4rt")])).unwrap_err().to_string();
        assert!(e.contains("libascendcl.so") && e.contains("/nonexistent/v4rt/lib64"), "{e}");
    }
}
