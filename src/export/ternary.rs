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
use crate::model::ternary::PackedTernary;

/// Writes the packed checkpoint of `src` into the existing directory `dir`, dense tensors as `dtype`, one
/// tensor at a time.
pub fn write(dir: &Path, src: &Source, dtype: DType) -> Result<()> {
    let mut entries = Vec::new();
    for (name, shape) in src.shapes() {
        if crate::model::is_bitlinear(&name) {
            entries.push((name.clone(), DType::U8, vec![shape[0], PackedTernary::row_bytes(shape[1])]));
            entries.push((format!("{name}_scale"), DType::F32, vec![1]));
        } else {
            entries.push((name, dtype, shape));
        }
    }
    hf::write_atomic(&dir.join(hf::SAFETENSORS_FILE), |tmp| {
        let mut file = hf::StreamedSafetensors::create(tmp, entries)?;
        src.for_each_param(|name, param| match param {
            Param::Ternary { codes, scale } => {
                let (rows, cols) = codes.dims();
                file.push(
                    name,
                    &Tensor::from_slice(codes.codes(), (rows, PackedTernary::row_bytes(cols)), &Device::Cpu)?,
                )?;
                file.push(&format!("{name}_scale"), &Tensor::from_slice(&[scale], 1, &Device::Cpu)?)
            }
            Param::Dense(t) => file.push(name, &t.to_dtype(dtype)?),
        })?;
        file.finish()
    })?;
    let mut cfg: ModelConfig = src.cfg.clone();
    cfg.extra.insert("quantization_config".into(), ModelConfig::packed_quantization_config());
    cfg.extra.insert("torch_dtype".into(), hf::dtype_name(dtype)?.into());
    hf::write_json(&dir.join(hf::CONFIG_FILE), &cfg)?;
    hf::copy_files(dir, src.tokenizer.files())
}
