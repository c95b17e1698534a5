//! Without CANN the backend must say why it is unavailable, and the loader must name what it
//! looked for where. (Its own process: the only test here that touches the environment is
//! `probe_without_cann`; the rest pass explicit search roots.)

mod common;

use std::path::PathBuf;

use common::{fake_toolkit, fake_toolkit_with, Layout};
use v4rt_ascend::loader::{self, LoadError, OpapiMode, SearchConfig};

#[test]
fn probe_without_cann_is_unavailable_with_a_reason() {
    let empty = common::scratch("empty-root");
    std::env::set_var("ASCEND_TOOLKIT_HOME", &empty);
    std::env::set_var("ASCEND_HOME_PATH", &empty);
    match v4rt_ascend::probe() {
        hal::Probe::Available(b) => panic!("unexpectedly available: {}", b.info().device),
        hal::Probe::Unavailable(reason) => {
            println!("reason: {reason}");
            // The registry prefixes the backend name ("ascend: unavailable (…)"); the reason itself does not.
            assert!(!reason.starts_with("ascend:"), "{reason}");
            assert!(reason.contains("libascendcl.so"), "{reason}");
            assert!(reason.contains(&empty.join("lib64").display().to_string()), "{reason}");
            assert!(reason.contains("/usr/local/Ascend/cann/lib64"), "{reason}");
            assert!(reason.contains("/usr/local/Ascend/ascend-toolkit/latest/lib64"), "{reason}");
            assert!(reason.contains("LD_LIBRARY_PATH"), "{reason}");
        }
    }
}

#[test]
fn missing_companion_library_is_named() {
    let root = fake_toolkit("acl-only", Layout::AclOnly);
    let e = loader::load(&SearchConfig::roots([root.clone()])).unwrap_err();
    assert!(matches!(e, LoadError::MissingLibrary { lib: "libnnopbase.so", .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&root.join("lib64").display().to_string()), "{msg}");

    let root = fake_toolkit("no-opapi", Layout::NoOpapi);
    let msg = loader::load(&SearchConfig::roots([root])).unwrap_err().to_string();
    assert!(msg.contains("libopapi.so") && msg.contains("libopapi_math.so"), "{msg}");
}

#[test]
fn a_library_without_the_symbols_is_rejected() {
    // Any shared library that is not CANN: the C library itself.
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let Some(libc) = libc else {
        println!("SKIPPED: no libc.so.6 found at the usual paths");
        return;
    };
    let root = fake_toolkit_with("not-cann", Layout::Monolithic, &libc);
    let e = loader::load(&SearchConfig::roots([root])).unwrap_err();
    match &e {
        LoadError::MissingSymbol { symbol, .. } => assert_eq!(symbol, "aclInit"),
        other => panic!("expected a missing symbol, got {other}"),
    }
}

#[test]
fn op_library_layouts() {
    let split = loader::load(&SearchConfig::roots([fake_toolkit("split", Layout::Split)])).unwrap();
    match &split.opapi {
        OpapiMode::Split(libs) => {
            let names: Vec<_> = libs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
            assert_eq!(names, ["libopapi_math.so", "libopapi_nn.so"]);
        }
        other => panic!("expected the split layout, got {other}"),
    }
    assert!(split.ops.missing().is_empty(), "{:?}", split.ops.missing());
    assert!(split.hccl.is_some(), "libhcomm.so alone provides the HCCL symbols");

    let both = loader::load(&SearchConfig::roots([fake_toolkit("both", Layout::Both)])).unwrap();
    assert!(matches!(both.opapi, OpapiMode::Monolithic(_)), "never load both layouts: {}", both.opapi);
    assert!(both.hccl.is_none());

    let mono = loader::load(&SearchConfig::roots([fake_toolkit("mono", Layout::Monolithic)])).unwrap();
    assert_eq!(mono.opapi.to_string(), "libopapi.so");
    // Optional symbols the emulator does not export stay None; required ones resolved.
    assert!(mono.acl_opt.aclrtGetVersion.is_none());
    assert!(mono.acl_opt.aclrtSynchronizeDevice.is_some());
}

#[test]
fn arch_lib_dir_is_searched() {
    let root = common::scratch("arch-root");
    let dir = root.join(format!("{}-linux", std::env::consts::ARCH)).join("lib64");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for lib in ["libascendcl.so", "libnnopbase.so", "libopapi.so"] {
        std::os::unix::fs::symlink(common::emu_lib(), dir.join(lib)).unwrap();
    }
    let api = loader::load(&SearchConfig::roots([root])).unwrap();
    assert_eq!(api.lib_dir.as_deref(), Some(dir.as_path()));
}
