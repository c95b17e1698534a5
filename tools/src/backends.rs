//! The backend registry of this binary, and model loading shared by the subcommands.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hal::{Backend, Registry};
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
