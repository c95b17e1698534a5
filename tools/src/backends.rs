//! The backend registry of this binary, and model loading shared by the subcommands.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hal::{Backend, DType, Registry};
use model::config::ModelConfig;
use model::forward::Model;

/// Every backend compiled in, probed.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("cpu-ref", cpu_ref::probe());
    r.register("cuda", cuda::probe());
    r.register("ascend", ascend::probe());
    r
}

/// The named backend, or an error saying why it cannot be used.
pub fn backend(name: &str) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(Arc::from(registry().take(name)?))
}

/// `v4rt backends`.
pub fn list() -> anyhow::Result<()> {
    for (name, status) in registry().status() {
        match status {
            Ok(device) => println!("{name}: available ({device})"),
            Err(reason) => println!("{name}: unavailable ({reason})"),
        }
    }
    Ok(())
}

/// Seed of the embedded default model's weights.
pub const EMBEDDED_SEED: u64 = 20260501;

/// Loads `dir`, or builds the embedded default model (tiny-flash geometry, deterministic
/// random weights in the real checkpoint format) when `dir` is `None`.
pub fn load_model(dir: Option<&Path>, backend: Arc<dyn Backend>) -> anyhow::Result<Model> {
    match dir {
        Some(d) => Model::load(d, backend).with_context(|| format!("loading model from {}", d.display())),
        None => {
            let cfg = ModelConfig::embedded("tiny-flash").context("embedded config")?;
            let ck = model::synthetic::generate(&cfg, EMBEDDED_SEED);
            Model::from_checkpoint(cfg, &ck, backend).context("building the embedded model")
        }
    }
}

/// The KV cache dtype a `--kv-dtype` flag names (`bf16` or `f32`); without the flag, the
/// backend's preferred one (`model::cache::preferred_kv_dtype`: bf16 where it runs the cache ops).
pub fn kv_dtype(flag: Option<&str>, model: &Model) -> anyhow::Result<DType> {
    match flag {
        None => Ok(model::cache::preferred_kv_dtype(&model.cfg, model.backend())),
        Some("bf16") => Ok(DType::BF16),
        Some("f32") => Ok(DType::F32),
        Some(other) => anyhow::bail!("--kv-dtype {other}: use bf16 or f32"),
    }
}
