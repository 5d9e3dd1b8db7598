//! Exporting a trained BitNet as real ternary weights instead of f32 latent ones:
//! - `ternary`: Bessie's packed checkpoint (2 bits per BitLinear weight plus one f32 scale per matrix; the
//!   rest in bf16 or f32), which `bessie-prompt` and `bessie-eval` load like any checkpoint;
//! - `gguf`: a GGUF file for llama.cpp's `bitnet` architecture (ggml type TQ2_0), also read by bitnet.cpp;
//! - `hf_bitnet`: transformers' own packed `bitnet` checkpoint, which `from_pretrained` loads.
//!
//! All start from the same ternary values and scales: `ops::quantize_weight` of the latent
//! weights, or the stored codes when the source is already packed.

pub mod gguf;
pub mod hf_bitnet;
pub mod ternary;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::model::hf;
use crate::model::ternary::PackedTernary;
use crate::ops::quantize_weight;
use crate::tokenizer::Tokenizer;

/// What `bessie-export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A checkpoint directory with packed ternary weights (README.md documents the layout).
    Ternary,
    /// One GGUF file for llama.cpp / bitnet.cpp.
    Gguf,
    /// A checkpoint directory in transformers' packed `bitnet` layout (families bitnet, llama-bitnet, llama).
    HfBitnet,
}

/// The dtype of a packed checkpoint's dense tensors (embedding, norms, an untied lm_head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DenseDtype {
    /// Half the size; logits then match a latent checkpoint stored in bf16 exactly.
    Bf16,
    /// Logits match an f32 latent checkpoint exactly.
    F32,
}

impl DenseDtype {
    pub fn dtype(self) -> DType {
        match self {
            DenseDtype::Bf16 => DType::BF16,
            DenseDtype::F32 => DType::F32,
        }
    }
}

/// One parameter on its way out.
pub enum Param {
    /// A BitLinear weight: its ternary values and absmean scale (`W ≈ values * scale`).
    Ternary { codes: PackedTernary, scale: f32 },
    /// Everything else (embedding, norms, an untied lm_head), f32 on the CPU.
    Dense(Tensor),
}

impl Param {
    /// Parameter `name` of `shape` from a checkpoint's `VarBuilder`: a BitLinear weight as `quantize_weight`
    /// makes it (or as stored, from Bessie's packed checkpoint when `packed`), anything else dense.
    pub fn read(vb: &VarBuilder, packed: bool, name: &str, shape: &[usize]) -> Result<Self> {
        if !crate::model::is_bitlinear(name) {
            return Ok(Param::Dense(vb.get(shape, name)?));
        }
        let (codes, scale) = if packed {
            let prefix = name.strip_suffix(".weight").expect("BitLinear names end in .weight");
            PackedTernary::load(&vb.pp(prefix), shape[0], shape[1])?
        } else {
            let (ternary, scale) = quantize_weight(&vb.get(shape, name)?)?;
            (PackedTernary::pack(&ternary)?, scale.to_scalar::<f32>()?)
        };
        Ok(Param::Ternary { codes, scale })
    }
}

/// A checkpoint read for export: its config, every parameter in `model::parameter_shapes` order, and its
/// tokenizer.
pub struct Source {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub params: Vec<(String, Param)>,
    pub tokenizer: Tokenizer,
}

impl Source {
    /// Reads a BitNet checkpoint directory, latent or packed. Refuses a full-precision model (its family is
    /// not ternary as it stands: quantizing it to ternary would destroy it);
    /// `ModelConfig::from_file` has already refused `weight_bits`/`input_bits` other than 1/8.
    pub fn read(dir: &Path) -> Result<Self> {
        crate::manifest::verify(dir)?;
        let (cfg, vb) = hf::open(dir, DType::F32, &Device::Cpu)?;
        let family = cfg.family()?;
        ensure!(
            family.ternary,
            "{}: field `architectures` is {} without a `bitnet` quantization_config: a full-precision {} model, \
             which only fine-tuning turns into BitNet b1.58 (train it, with train.quant_warmup_steps, then export)",
            dir.join(hf::CONFIG_FILE).display(),
            cfg.extra.get("architectures").map_or("missing".to_string(), |a| a.to_string()),
            family.name
        );
        let packed = cfg.is_packed_ternary();
        let params = cfg
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), Param::read(&vb, packed, &name, &shape)?)))
            .collect::<Result<_>>()?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf(), cfg, params, tokenizer })
    }
}

/// Exports the checkpoint in `src` to `out` as `format`; `dense` is the dtype of the packed checkpoints'
/// dense tensors (GGUF has its own). An existing `out` is an error unless `force`, and it is only replaced once the new output
/// is complete.
pub fn export(src: &Path, out: &Path, format: Format, dense: DenseDtype, force: bool) -> Result<()> {
    if out.exists() || out.is_symlink() {
        ensure!(force, "{} already exists; pass --force to replace it", out.display());
        // Replacing the checkpoint, one of its files or a folder holding it would destroy the input.
        if let (Ok(src), Ok(out_real)) = (src.canonicalize(), out.canonicalize()) {
            let relation = match () {
                _ if src == out_real => Some("is"),
                _ if out_real.starts_with(&src) => Some("is a file of"),
                _ if src.starts_with(&out_real) => Some("holds"),
                _ => None,
            };
            if let Some(relation) = relation {
                bail!(
                    "the output {} {relation} the checkpoint being exported ({}); choose another path (--force \
                     never replaces the export's own input)",
                    out.display(),
                    src.display()
                );
            }
        }
    }
    match format {
        Format::Ternary => {
            let source = Source::read(src)?;
            replace_dir(out, |dir| ternary::write(dir, &source, dense.dtype()))
        }
        Format::Gguf => {
            let source = Source::read(src)?;
            hf::write_atomic(out, |tmp| gguf::write(tmp, &source))
        }
        // Streams tensor by tensor instead of reading the whole model first.
        Format::HfBitnet => replace_dir(out, |dir| hf_bitnet::write(dir, src, dense.dtype())),
    }
}

/// Writes a directory by letting `write` fill a temporary sibling, then swaps it in for `path` (removing
/// what was there), so that an interrupted export never leaves a half-written checkpoint under `path`.
fn replace_dir(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().context("output path without a name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result: Result<()> = (|| {
        std::fs::create_dir_all(&tmp)?;
        write(&tmp)?;
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(path)?;
        } else if path.exists() || path.is_symlink() {
            std::fs::remove_file(path)?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Bytes of a file or of all files in a directory (for the size report).
pub fn disk_size(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += disk_size(&entry?.path())?;
    }
    Ok(total)
}
