//! transformers' own packed BitNet checkpoint (`quantization_config.quant_method = "bitnet"`), which
//! `AutoModelForCausalLM.from_pretrained` loads without remote code:
//! - family `bitnet` (2B4T): `BitNetForCausalLM` with `linear_class = "autobitlinear"`, `quantization_mode =
//!   "offline"` (as microsoft/bitnet-b1.58-2B-4T's config): `y = ActQuant(x) Wq^T * weight_scale`, so
//!   `weight_scale` = absmean;
//! - families `llama-bitnet` and `llama`: `LlamaForCausalLM` with `linear_class = "bitlinear"` (as
//!   Falcon3's 1.58-bit configs): `y = (xq Wq^T) / (weight_scale * input_scale)`, so `weight_scale` =
//!   1 / absmean. transformers leaves the output embedding (`lm_head`) unconverted by default.
//!
//! Each projection is U8 `[out / 4, in]` (`model::bitnet_packed`) plus `weight_scale` `[1]`; everything else
//! and the scales are in the dense dtype (bf16 by default), which is also `torch_dtype`. The model is read
//! and written one tensor at a time. The 1bitLLM family (`BitnetForCausalLM`) has no transformers class and
//! is refused. Bessie reads the result back (`model::hf` turns the codes into latent weights).

use std::path::Path;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::{Param, Source};
use crate::config::model::Quantization;
use crate::config::ModelConfig;
use crate::model::arch::{self, Family};
use crate::model::{bitnet_packed, hf, is_bitlinear};

/// The `config.json` of the export of `cfg` (a checkpoint of `family`): transformers' class and its offline
/// `bitnet` quantization_config, or an error for a family transformers has no class for.
fn output_config(cfg: &ModelConfig, family: &Family, src: &Path) -> Result<ModelConfig> {
    let (class, linear_class) = match family.saves_as {
        "bitnet" => (&arch::BITNET_2B4T, "autobitlinear"),
        "llama-bitnet" => (&arch::LLAMA_BITNET, "bitlinear"),
        _ => bail!(
            "{}: the {} family ({}) has no transformers class, so -f hf-bitnet cannot write it; export it with -f \
             gguf (llama.cpp, bitnet.cpp) or -f ternary (Bessie's packed checkpoint), or load the latent checkpoint \
             with its own modeling code",
            src.join(hf::CONFIG_FILE).display(),
            family.name,
            family.architecture
        ),
    };
    let quantization =
        serde_json::json!({"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"});
    Ok(cfg.as_family(class, Some(quantization)))
}

/// The `config.json` of `src`'s export, or an error where `src` cannot be written in this layout (checked
/// before anything is written).
pub fn check(src: &Source) -> Result<ModelConfig> {
    let out_cfg = output_config(&src.cfg, src.cfg.family()?, &src.dir)?;
    for (name, shape) in src.shapes() {
        // transformers' BitLinear holds out / 4 packed rows, and its loader unpacks only rows x 4 = out.
        ensure!(
            !is_bitlinear(&name) || shape[0] % bitnet_packed::VALUES_PER_BYTE == 0,
            "{}: tensor `{name}` has {} rows (config.json), not a multiple of 4, which transformers' packed bitnet \
             layout needs",
            src.dir.display(),
            shape[0]
        );
    }
    Ok(out_cfg)
}

/// Writes the export of the checkpoint `src` into the existing directory `dir`, dense tensors and scales
/// as `dense`, one tensor at a time.
pub fn write(dir: &Path, src: &Source, dense: DType) -> Result<()> {
    let mut out_cfg = check(src)?;
    let Quantization::Bitnet { scale: kind } = out_cfg.quantization()? else {
        unreachable!("output_config writes an offline bitnet quantization_config")
    };
    let mut entries = Vec::new();
    for (name, shape) in src.shapes() {
        if is_bitlinear(&name) {
            entries.push((name.clone(), DType::U8, vec![bitnet_packed::packed_rows(shape[0]), shape[1]]));
            entries.push((format!("{name}_scale"), dense, vec![1]));
        } else {
            entries.push((name, dense, shape));
        }
    }
    hf::write_atomic(&dir.join(hf::SAFETENSORS_FILE), |tmp| {
        let mut file = hf::StreamedSafetensors::create(tmp, entries)?;
        src.for_each_param(|name, param| match param {
            Param::Ternary { codes, scale } => {
                let (rows, cols) = codes.dims();
                let bytes = bitnet_packed::pack(&codes.values(), rows, cols)?;
                file.push(name, &Tensor::from_vec(bytes, (bitnet_packed::packed_rows(rows), cols), &Device::Cpu)?)?;
                let stored = kind.stored(f64::from(scale)) as f32;
                file.push(&format!("{name}_scale"), &Tensor::new(&[stored], &Device::Cpu)?.to_dtype(dense)?)
            }
            Param::Dense(t) => file.push(name, &t.to_dtype(dense)?),
        })?;
        file.finish()
    })?;
    out_cfg.extra.insert("torch_dtype".into(), hf::dtype_name(dense)?.into());
    hf::write_json(&dir.join(hf::CONFIG_FILE), &out_cfg)?;
    hf::copy_files(dir, src.tokenizer.files())
}
