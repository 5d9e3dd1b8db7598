//! The BitNet b1.58 model: its parameters, the inference forward pass, and the Hugging Face files.

pub mod arch;
mod bf16_head;
pub mod bitnet;
pub mod bitnet_packed;
mod cpu_attention;
pub mod hf;
pub mod init;
pub mod kv_cache;
mod pth;
mod step_graph;
pub mod ternary;

pub use bitnet::BitNet;
pub use kv_cache::KvCache;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

/// Loads a Hugging Face checkpoint directory for inference on `device` in its compute dtype: latent weights,
/// or a packed ternary export (`config.json` says which; see `ternary`). Checkpoints with a checksum
/// manifest are verified first (`manifest`). NaN or infinite weights are warned about, not refused:
/// inference still shows what the model does. On a GPU the model is warmed up ([`BitNet::warm_up`]).
pub fn load(dir: &Path, device: &Device) -> Result<BitNet> {
    crate::manifest::verify(dir)?;
    let (cfg, vb) = hf::open_with(dir, crate::device::compute_dtype(device), device, hf::NonFinite::Warn)?;
    let model = BitNet::load(vb, &cfg).with_context(|| format!("loading the model in {}", dir.display()))?;
    model.warm_up().context("warming the model up on the GPU")?;
    Ok(model)
}

/// The seven projections of each block are BitLinear layers; the embedding, norms and lm_head are not.
pub fn is_bitlinear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// Norm weights start at one; everything else is a matrix.
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight") || name.ends_with("_ln.weight")
}
