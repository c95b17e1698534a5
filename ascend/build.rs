//! Marks whether `V4RT_TORCH_NPU_HEADERS` was set at build time, so that
//! `tests/abi_headers.rs` is run where the real headers were provided (CI) and reported as
//! ignored, not passed, where they were not.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(v4rt_npu_headers)");
    println!("cargo::rerun-if-env-changed=V4RT_TORCH_NPU_HEADERS");
    if std::env::var_os("V4RT_TORCH_NPU_HEADERS").is_some_and(|d| !d.is_empty()) {
        println!("cargo::rustc-cfg=v4rt_npu_headers");
    }
}
