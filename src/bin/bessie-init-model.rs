//! Writes a random BitNet b1.58 checkpoint in the Hugging Face layout.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bessie::model::hf::Layout;
use bessie::model::init::{write_random_checkpoint, TokenizerSource};
use candle_core::DType;
use clap::Parser;

/// Write a random BitNet b1.58 checkpoint of a named shape, for tests, demos and benchmarks.
///
/// Shapes, by family: 1bitllm: tiny (hidden 64, 2 layers), large, xl, 3b (the bitnet_b1_58 models);
/// bitnet (BitNet b1.58 2B4T: GQA, relu2): tiny-bitnet, 2b4t; llama-bitnet (Llama layout with transformers'
/// bitnet quantization: no sub-norms, untied head, explicit head_dim): tiny-llama-bitnet, falcon3-1b,
/// falcon3-3b, llama3-8b-1.58; llama (full precision, to be fine-tuned into BitNet): tiny-llama,
/// llama3.2-1b, smollm-135m. The output loads in bessie-prompt, bessie-train and transformers like a
/// downloaded checkpoint.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Output directory (created; must be empty unless --force).
    #[arg(short, long)]
    out: PathBuf,
    /// A shape named above.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Tokenizer: a checkpoint directory, a tokenizer.json (e.g. LLaMA-3's) or a SentencePiece
    /// tokenizer.model. Default: Bessie's small SentencePiece one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the model (default: the tokenizer's, added tokens included).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype on disk: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// File layout of the weights.
    #[arg(long, value_enum, default_value = "safetensors")]
    layout: Layout,
    /// Write transformers' packed `bitnet` layout (2-bit codes and a weight_scale per projection, as the
    /// 2B4T and Falcon3 Hub repos ship) instead of latent weights: families bitnet, llama-bitnet and llama.
    #[arg(long)]
    packed: bool,
    /// Write into a non-empty directory.
    #[arg(long)]
    force: bool,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: use f32, f16 or bf16"),
    };
    if !args.force && args.out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} is not empty (pass --force to write into it)", args.out.display());
    }
    let tokenizer = args.tokenizer.as_deref().map_or(TokenizerSource::Shipped, TokenizerSource::Path);
    let write = |dir: &std::path::Path| {
        write_random_checkpoint(dir, &args.shape, tokenizer, args.vocab_size, args.seed, dtype, args.layout)
    };
    let cfg = match args.packed {
        false => write(&args.out)?,
        true => {
            // The latent model first, then its export: the packed file holds exactly its ternary values.
            let latent = tempfile::tempdir()?;
            let cfg = write(latent.path())?;
            std::fs::create_dir_all(&args.out)?;
            let dense = if dtype == DType::F32 { DType::F32 } else { DType::BF16 };
            bessie::export::hf_bitnet::write(&args.out, &bessie::export::Source::open(latent.path())?, dense)?;
            cfg
        }
    };
    println!(
        "wrote a random {} model of the {} family ({:.1}M parameters, vocab {}) to {}",
        args.shape,
        cfg.family()?.name,
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        args.out.display()
    );
    Ok(())
}
