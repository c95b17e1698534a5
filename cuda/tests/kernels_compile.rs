//! NVRTC-compiles every kernel family for sm_90 — no GPU needed, only libnvrtc.
//!
//! Where libnvrtc comes from: if `V4RT_NVRTC_DIR` names a folder holding `libnvrtc.so*` (for
//! example `<dir>/nvidia/cuda_nvrtc/lib` after
//! `pip install --target <dir> nvidia-cuda-nvrtc-cu12==12.8.*`), that library is loaded by full
//! path first (`v4rt_cuda::kernels::preload_nvrtc`); cudarc's later `dlopen("libnvrtc.so.12")`
//! then finds it by SONAME. Otherwise the dynamic loader's search path is used (LD_LIBRARY_PATH,
//! ld.so cache). Built without `V4RT_NVRTC_DIR` the test is marked ignored (`build.rs`), so a
//! machine without CUDA reports it as not run rather than passed; CI provides NVRTC to make it
//! run. Run with `--ignored`, it needs NVRTC on the loader path and fails without it.
//! `V4RT_KERNEL_ARCH` overrides the arch (default sm_90).

use v4rt_cuda::kernels;

#[test]
#[cfg_attr(
    not(v4rt_nvrtc_dir),
    ignore = "needs NVRTC: build and run with V4RT_NVRTC_DIR set (.ci/run does), or --ignored with libnvrtc on the loader path"
)]
fn every_kernel_family_compiles_with_nvrtc() {
    if let Some(dir) = std::env::var_os("V4RT_NVRTC_DIR").filter(|d| !d.is_empty()) {
        match kernels::preload_nvrtc(std::path::Path::new(&dir)) {
            Ok(path) => eprintln!("using {}", path.display()),
            Err(e) => panic!("V4RT_NVRTC_DIR is set but NVRTC cannot be loaded from it: {e}"),
        }
    }
    assert!(
        kernels::nvrtc_present(),
        "libnvrtc not found (set V4RT_NVRTC_DIR to a folder holding libnvrtc.so*, or add it to LD_LIBRARY_PATH)"
    );
    let arch = std::env::var("V4RT_KERNEL_ARCH").unwrap_or_else(|_| "sm_90".into());
    eprintln!("NVRTC {:?}, arch {arch}", kernels::nvrtc_version());
    if let Err(log) = kernels::compile_all_for_check(&arch) {
        panic!("kernels failed to compile:\n{log}");
    }
    eprintln!("compiled {} kernel families for {arch}", kernels::KERNEL_SOURCES.len());
}
