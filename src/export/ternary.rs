//! Bessie's packed ternary checkpoint: the Hugging Face directory layout (`config.json`, one
//! `model.safetensors`, the tokenizer files) with every BitLinear weight as 2-bit codes plus an f32 scale
//! (`model::ternary` documents the codes and their order) and the other tensors in bf16 or f32.
//! `config.json` gains `quantization_config = {"quant_method": "bessie_ternary", "format": "ternary-2bit",
//! "version": 1}` and `torch_dtype` (the dense tensors' dtype); `model::load` reads it like any checkpoint.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{Param, Source};
use crate::config::ModelConfig;
use crate::model::hf;

/// Writes the packed checkpoint of `src` into the existing directory `dir`, dense tensors as `dtype`.
pub fn write(dir: &Path, src: &Source, dtype: DType) -> Result<()> {
    let mut tensors = Vec::with_capacity(src.params.len() * 2);
    for (name, param) in &src.params {
        match param {
            Param::Ternary { codes, scale } => {
                let (rows, cols) = codes.dims();
                let bytes = crate::model::ternary::PackedTernary::row_bytes(cols);
                tensors.push((name.clone(), Tensor::from_slice(codes.codes(), (rows, bytes), &Device::Cpu)?));
                tensors.push((format!("{name}_scale"), Tensor::from_slice(&[*scale], 1, &Device::Cpu)?));
            }
            Param::Dense(t) => tensors.push((name.clone(), t.to_dtype(dtype)?.contiguous()?)),
        }
    }
    hf::write_safetensors(&dir.join(hf::SAFETENSORS_FILE), &tensors)?;
    let mut cfg: ModelConfig = src.cfg.clone();
    cfg.extra.insert("quantization_config".into(), ModelConfig::packed_quantization_config());
    cfg.extra.insert("torch_dtype".into(), hf::dtype_name(dtype)?.into());
    hf::write_json(&dir.join(hf::CONFIG_FILE), &cfg)?;
    hf::copy_files(dir, src.tokenizer.files())
}
