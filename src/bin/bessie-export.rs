//! Exports a BitNet b1.58 checkpoint as real ternary weights: a packed checkpoint, a GGUF file or
//! transformers' packed `bitnet` checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use bessie::export::gguf::GgufType;
use bessie::export::{disk_size, export, DenseDtype, Format, Options};
use clap::Parser;

/// Export a trained BitNet b1.58 checkpoint as real ternary weights.
///
/// Every BitLinear weight is quantized exactly as training and inference quantize it (ternary values and
/// one absmean scale per matrix); the source may be latent (f32/f16/bf16) or an earlier packed export.
///
/// --format ternary writes a checkpoint directory: BitLinear weights as 2-bit codes (four per byte, code =
/// value + 1) with an f32 `weight_scale` each, the embedding, norms and any untied lm_head in --dtype, a
/// config.json whose `quantization_config` marks the layout, and the tokenizer files. bessie-prompt and
/// bessie-eval load it directly and compute what the latent checkpoint computes (bit for bit when --dtype
/// is the latent checkpoint's dtype); on CPU they multiply the packed weights by int8 activations, several
/// times faster. bitnet_b1_58-large: 2.9 GB -> about 0.27 GB.
///
/// --format gguf writes one GGUF file for llama.cpp and bitnet.cpp: architecture `bitnet` (1bitLLM),
/// `bitnet-b1.58` (2B4T; bitnet.cpp only) or `llama` (the Llama layout: Falcon3, Llama3-8B-1.58), ternary
/// matrices in --type tq2_0 or tq1_0 (llama.cpp and bitnet.cpp) or i2_s (bitnet.cpp's own), the embedding in F16,
/// norms in F32, the tokenizer (SentencePiece, or LLaMA-3/Falcon3 byte-level BPE with llama.cpp's
/// pre-tokenizer name) and the chat template embedded. README.md says which versions it targets.
///
/// --format hf-bitnet writes a checkpoint directory in transformers' own packed `bitnet` layout, which
/// `AutoModelForCausalLM.from_pretrained` loads without remote code: families bitnet (BitNetForCausalLM,
/// autobitlinear offline, weight_scale = absmean) and llama-bitnet / llama (LlamaForCausalLM, bitlinear,
/// weight_scale = 1 / absmean); projections as U8 [out/4, in] (four output-row blocks per byte), the rest
/// and the scales in --dtype. Bessie loads it back. 1bitLLM checkpoints have no transformers class and are
/// refused.
///
/// The output must not exist unless --force; it is replaced only once the new one is complete, and it may
/// never be the checkpoint being exported, lie inside it or hold it. Tensors are read and written one at a
/// time, so an export needs little memory beyond its largest tensor.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Checkpoint directory to export (Hugging Face layout: config.json, weights, tokenizer files).
    #[arg(short, long)]
    model: PathBuf,
    /// ternary (a packed checkpoint directory), gguf (one file) or hf-bitnet (transformers' packed layout).
    #[arg(short, long, value_enum)]
    format: Format,
    /// Output directory (ternary, hf-bitnet) or file (gguf).
    #[arg(short, long)]
    out: PathBuf,
    /// Dtype of the packed checkpoint's embedding, norms and untied lm_head (and hf-bitnet's weight
    /// scales): bf16 (smallest), or f32 for logits bit-identical to an f32 latent checkpoint (ternary)
    /// or equal within float rounding (hf-bitnet). Not used for GGUF.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DenseDtype,
    /// The GGUF type of the ternary matrices: tq2_0 (llama.cpp's, also read by bitnet.cpp; rows of other
    /// than a multiple of 256 weights become F16), tq1_0 (the same, 1.69 instead of 2.06 bits per weight) or
    /// i2_s (bitnet.cpp's; rows must be a multiple of 128).
    #[arg(long = "type", value_enum, default_value = "tq2_0")]
    gguf_type: GgufType,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let options = Options { format: args.format, dense: args.dtype, gguf_type: args.gguf_type, force: args.force };
    export(&args.model, &args.out, &options)?;
    println!("wrote {} ({:.1} MB)", args.out.display(), disk_size(&args.out)? as f64 / 1e6);
    Ok(())
}
