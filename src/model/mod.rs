//! The BitNet b1.58 model: its parameters, the inference forward pass, and the Hugging Face files.

pub mod bitnet;
pub mod hf;
pub mod init;
mod pth;
pub mod ternary;

pub use bitnet::{BitNet, KvCache};

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::ModelConfig;

/// Loads a Hugging Face checkpoint directory for inference on `device` in its compute dtype: latent weights,
/// or a packed ternary export (`config.json` says which; see `ternary`). Checkpoints with a checksum
/// manifest are verified first (`manifest`). NaN or infinite weights are warned about, not refused:
/// inference still shows what the model does.
pub fn load(dir: &Path, device: &Device) -> Result<BitNet> {
    crate::manifest::verify(dir)?;
    let (cfg, vb) = hf::open_with(dir, crate::device::compute_dtype(device), device, hf::NonFinite::Warn)?;
    BitNet::load(vb, &cfg).with_context(|| format!("loading the model in {}", dir.display()))
}

/// Every parameter of the Hugging Face layout with its shape, in file order. This list is the one source
/// of parameter names: random initialisation and saving use it, and the loader checks the file against it.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.inner_attn_ln.weight"), vec![h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.ffn_layernorm.weight"), vec![i]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// The seven projections of each block are BitLinear layers; the embedding, norms and lm_head are not.
pub fn is_bitlinear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// Norm weights start at one; everything else is a matrix.
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight") || name.ends_with("_ln.weight")
}
