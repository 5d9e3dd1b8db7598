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
use indicatif::{ProgressBar, ProgressStyle};

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

/// A checkpoint opened for export: its config, its tokenizer, and its parameters read one at a time
/// ([`Source::for_each_param`]), so that an export holds one tensor, not the model.
pub struct Source {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub tokenizer: Tokenizer,
    vb: VarBuilder<'static>,
    /// Bessie's packed checkpoint: the codes are read as stored.
    packed: bool,
}

impl Source {
    /// Opens a BitNet checkpoint directory, latent or packed. Refuses a full-precision model (its family is
    /// not ternary as it stands: quantizing it to ternary would destroy it);
    /// `ModelConfig::from_file` has already refused `weight_bits`/`input_bits` other than 1/8.
    pub fn open(dir: &Path) -> Result<Self> {
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
        let tokenizer = Tokenizer::from_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf(), cfg, tokenizer, vb, packed })
    }

    /// Every parameter's name and shape, in `ModelConfig::parameter_shapes` order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.cfg.parameter_shapes()
    }

    /// Parameter `name` of `shape` (one of [`Source::shapes`]).
    pub fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        Param::read(&self.vb, self.packed, name, shape)
    }

    /// Hands every parameter to `f` in [`Source::shapes`] order, each read when its turn comes, behind a
    /// progress bar.
    pub fn for_each_param(&self, mut f: impl FnMut(&str, Param) -> Result<()>) -> Result<()> {
        let shapes = self.shapes();
        let bar = ProgressBar::new(shapes.len() as u64);
        bar.set_style(ProgressStyle::with_template("{bar:30.cyan/blue} tensor {pos}/{len} {msg} [{elapsed_precise}]")?);
        for (name, shape) in &shapes {
            bar.set_message(name.clone());
            f(name, self.param(name, shape)?)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// How to export: the format and its settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub format: Format,
    /// The dtype of the packed checkpoints' dense tensors (GGUF has its own).
    pub dense: DenseDtype,
    /// The ggml type of a GGUF file's ternary matrices.
    pub gguf_type: gguf::GgufType,
    /// Replace an existing output.
    pub force: bool,
}

impl Options {
    /// `format` with the defaults: bf16 dense tensors, TQ2_0, no replacing.
    pub fn new(format: Format) -> Self {
        Self { format, dense: DenseDtype::Bf16, gguf_type: gguf::GgufType::Tq2_0, force: false }
    }
}

/// Exports the checkpoint in `src` to `out`. The output may not lie in the checkpoint (nor be it, nor hold
/// it), whatever `force` says; an existing `out` is an error unless `force`, and it is only replaced once the
/// new output is complete. Everything that can be checked before writing is.
pub fn export(src: &Path, out: &Path, options: &Options) -> Result<()> {
    refuse_output_in_source(src, out)?;
    if out.exists() || out.is_symlink() {
        ensure!(options.force, "{} already exists; pass --force to replace it", out.display());
    }
    let source = Source::open(src)?;
    match options.format {
        Format::Ternary => replace_dir(out, |dir| ternary::write(dir, &source, options.dense.dtype())),
        Format::Gguf => {
            let plan = gguf::Plan::new(&source, options.gguf_type)?;
            hf::write_atomic(out, |tmp| gguf::write(tmp, &source, &plan))
        }
        Format::HfBitnet => {
            hf_bitnet::check(&source)?;
            replace_dir(out, |dir| hf_bitnet::write(dir, &source, options.dense.dtype()))
        }
    }
}

/// An error when `out` is the checkpoint `src`, lies inside it (an export written into the checkpoint it
/// reads could replace its weights) or holds it.
fn refuse_output_in_source(src: &Path, out: &Path) -> Result<()> {
    let Ok(src_real) = src.canonicalize() else { return Ok(()) };
    // The output may not exist yet: where it would be is its folder's real path plus its name.
    let out_real = match out.canonicalize() {
        Ok(real) => real,
        Err(_) => {
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            match (parent.canonicalize(), out.file_name()) {
                (Ok(parent), Some(name)) => parent.join(name),
                _ => return Ok(()),
            }
        }
    };
    let relation = match () {
        _ if src_real == out_real => "is",
        _ if out_real.starts_with(&src_real) => "is inside",
        _ if src_real.starts_with(&out_real) => "holds",
        _ => return Ok(()),
    };
    bail!(
        "the output {} {relation} the checkpoint being exported ({}); write the export outside it (--force never \
         replaces or writes into the export's own input)",
        out.display(),
        src.display()
    )
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
