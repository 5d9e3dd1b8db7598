//! GGUF for llama.cpp's BitNet support and bitnet.cpp.
//!
//! What is written is what llama.cpp's `convert_hf_to_gguf.py --outtype tq2_0` writes for a 1bitLLM
//! `BitnetForCausalLM` checkpoint (class `BitnetModel`, read from llama.cpp master of 2025; the vendored
//! llama.cpp of llama-cpp-python 0.3.36 runs it, see tests/reference/llama_cpp_eval.py):
//! - GGUF version 3, alignment 32, `general.architecture = "bitnet"`, `general.file_type = 37`
//!   (MOSTLY_TQ2_0), `general.quantization_version = 2`;
//! - `bitnet.{context_length, embedding_length, block_count, feed_forward_length, vocab_size}`,
//!   `bitnet.attention.{head_count, head_count_kv, layer_norm_rms_epsilon}`, `bitnet.rope.freq_base`,
//!   `bitnet.rope.scaling.{type = "linear", factor = 1}`;
//! - the LLaMA SentencePiece vocabulary: `tokenizer.ggml.model = "llama"`, `.pre = "default"`, `.tokens`,
//!   `.scores`, `.token_type` (sentencepiece's piece types, which GGUF shares), BOS/EOS/UNK/pad ids,
//!   `add_bos_token`, `add_eos_token`, `add_space_prefix`;
//! - tensors `token_embd.weight` (F16), `output_norm.weight` and per block `blk.N.{attn_norm, attn_sub_norm,
//!   ffn_norm, ffn_sub_norm}.weight` (F32), `blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up,
//!   ffn_down}.weight` in ggml type TQ2_0 (35). No `output.weight`: llama.cpp's bitnet graph uses the
//!   embedding as lm_head, so an untied lm_head is refused.
//!
//! TQ2_0 (llama.cpp PR #8151, September 2024) stores blocks of 256 weights as 64 bytes of 2-bit codes
//! `w + 1` (Bessie's own code) and an f16 scale: in each half of 128 weights, byte `j` holds weights
//! `j, j + 32, j + 64, j + 96` at bits 0, 2, 4, 6. Every block's scale is the matrix's absmean scale, as
//! the converter's quantizer finds it (`max|block|` of `ternary * scale`), so llama.cpp computes with the
//! same ternary values; the scale is rounded to f16 there. A matrix whose rows are not a multiple of 256
//! long (the 3B's 3200 and 8640, the xl's 5460, the tiny test shape) is written as F16 `ternary * scale`
//! instead, as the converter falls back. q and k are not permuted: llama.cpp runs `bitnet` with NEOX
//! (rotate-half) RoPE, the layout of the Hugging Face weights.
//!
//! bitnet.cpp (microsoft/BitNet) runs a llama.cpp fork (Eddie-Wang1120/llama.cpp, branch merge-dev) that
//! has the same `bitnet` architecture and lists the TQ1_0/TQ2_0 types (ids 34/35); its own I2_S/TL1/TL2 types
//! are made from an F32/F16 GGUF by its `llama-quantize`, and I2_S has no reader outside that fork, which
//! is why this file uses TQ2_0.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::DType;

use super::{Param, Source};
use crate::model::ternary::PackedTernary;

const GGUF_VERSION: u32 = 3;
const ALIGNMENT: usize = 32;
/// ggml tensor types.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_TQ2_0: u32 = 35;
/// `llama_ftype` MOSTLY_TQ2_0.
const FILE_TYPE_TQ2_0: u32 = 37;
/// Weights per TQ2_0 block, and bytes per block (64 of codes, 2 of f16 scale).
const QK_K: usize = 256;
const TQ2_0_BLOCK_BYTES: usize = QK_K / 4 + 2;

/// A metadata value (the GGUF value types Bessie writes).
enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

impl Value {
    /// GGUF value type ids: UINT32 4, INT32 5, FLOAT32 6, BOOL 7, STRING 8, ARRAY 9.
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let array = |w: &mut dyn Write, elem: u32, n: usize| -> std::io::Result<()> {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(n as u64).to_le_bytes())
        };
        match self {
            Value::U32(v) => {
                w.write_all(&4u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())
            }
            Value::F32(v) => {
                w.write_all(&6u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())
            }
            Value::Bool(v) => {
                w.write_all(&7u32.to_le_bytes())?;
                w.write_all(&[u8::from(*v)])
            }
            Value::Str(s) => {
                w.write_all(&8u32.to_le_bytes())?;
                write_str(w, s)
            }
            Value::Strings(v) => {
                array(w, 8, v.len())?;
                v.iter().try_for_each(|s| write_str(w, s))
            }
            Value::F32s(v) => {
                array(w, 6, v.len())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
            Value::I32s(v) => {
                array(w, 5, v.len())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
        }
    }
}

fn write_str(w: &mut (impl Write + ?Sized), s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// A tensor ready to write: ggml dims (innermost first), type and raw bytes.
struct GgufTensor {
    name: String,
    dims: Vec<usize>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// llama.cpp's name for a Hugging Face parameter name (gguf-py's tensor_mapping for BITNET).
fn gguf_name(hf: &str) -> Result<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Ok(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.").with_context(|| format!("no GGUF name for tensor `{hf}`"))?;
    let (layer, module) = rest.split_once('.').with_context(|| format!("no GGUF name for tensor `{hf}`"))?;
    let short = match module {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.inner_attn_ln.weight" => "attn_sub_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "mlp.ffn_layernorm.weight" => "ffn_sub_norm",
        _ => anyhow::bail!("no GGUF name for tensor `{hf}`"),
    };
    Ok(format!("blk.{layer}.{short}.weight"))
}

/// TQ2_0 blocks of a ternary matrix whose rows are a multiple of 256 long, every block scaled by `scale`.
fn tq2_0(codes: &PackedTernary, scale: f32) -> Vec<u8> {
    let (rows, cols) = codes.dims();
    let d = half::f16::from_f32(scale).to_le_bytes();
    let mut out = Vec::with_capacity(rows * cols / QK_K * TQ2_0_BLOCK_BYTES);
    for r in 0..rows {
        for block in 0..cols / QK_K {
            for half in 0..2 {
                let base = block * QK_K + half * 128;
                out.extend((0..32).map(|j| {
                    (0..4).fold(0u8, |byte, k| byte | (((codes.value(r, base + 32 * k + j) + 1) as u8) << (2 * k)))
                }));
            }
            out.extend_from_slice(&d);
        }
    }
    out
}

/// The tensor of one exported parameter.
fn tensor(name: &str, param: &Param) -> Result<GgufTensor> {
    let name = gguf_name(name)?;
    Ok(match param {
        Param::Ternary { codes, scale } => {
            let (rows, cols) = codes.dims();
            if cols % QK_K == 0 {
                GgufTensor { name, dims: vec![cols, rows], ggml_type: GGML_TQ2_0, data: tq2_0(codes, *scale) }
            } else {
                // The values TQ2_0 would hold, as F16: ternary times the f16-rounded scale.
                let d = half::f16::from_f32(*scale).to_f32();
                let data = codes.values().into_iter().flat_map(|v| half::f16::from_f32(f32::from(v) * d).to_le_bytes());
                GgufTensor { name, dims: vec![cols, rows], ggml_type: GGML_F16, data: data.collect() }
            }
        }
        Param::Dense(t) => {
            let dims: Vec<usize> = t.dims().iter().rev().copied().collect();
            // 1-D tensors (norms) stay F32 as the converter keeps them; the embedding is F16.
            let (ggml_type, dtype) = if dims.len() == 1 { (GGML_F32, DType::F32) } else { (GGML_F16, DType::F16) };
            let flat = t.to_dtype(dtype)?.flatten_all()?;
            let data = match dtype {
                DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            GgufTensor { name, dims, ggml_type, data }
        }
    })
}

/// Metadata of `src` (architecture, hyperparameters, tokenizer).
fn metadata(src: &Source) -> Result<Vec<(String, Value)>> {
    let cfg = &src.cfg;
    let tok = &src.tokenizer;
    let vocab = tok.sentencepiece_vocab().with_context(|| {
        format!("{}: GGUF export needs a SentencePiece tokenizer.model (the LLaMA vocabulary)", src.dir.display())
    })?;
    let pieces = vocab.pieces;
    ensure!(
        pieces.len() <= cfg.vocab_size,
        "{}: the tokenizer has {} tokens but config.json's vocab_size is {}",
        src.dir.display(),
        pieces.len(),
        cfg.vocab_size
    );
    let mut tokens = Vec::with_capacity(cfg.vocab_size);
    let (mut scores, mut types) = (Vec::with_capacity(cfg.vocab_size), Vec::with_capacity(cfg.vocab_size));
    for (text, score, kind) in pieces {
        tokens.push(text);
        scores.push(score);
        types.push(kind);
    }
    // Embedding rows past the tokenizer: placeholders as the converter writes them (UNUSED).
    for i in tokens.len()..cfg.vocab_size {
        tokens.push(format!("[PAD{i}]"));
        scores.push(-10000.0);
        types.push(5);
    }
    let arch = |key: &str| format!("bitnet.{key}");
    let u32_of = |v: usize| Value::U32(v as u32);
    let name = src.dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut kv = vec![
        ("general.architecture".to_string(), Value::Str("bitnet".into())),
        ("general.name".to_string(), Value::Str(name.unwrap_or_else(|| "bitnet".into()))),
        ("general.file_type".to_string(), Value::U32(FILE_TYPE_TQ2_0)),
        ("general.quantization_version".to_string(), Value::U32(2)),
        (arch("vocab_size"), u32_of(cfg.vocab_size)),
        (arch("context_length"), u32_of(cfg.max_position_embeddings)),
        (arch("embedding_length"), u32_of(cfg.hidden_size)),
        (arch("block_count"), u32_of(cfg.num_hidden_layers)),
        (arch("feed_forward_length"), u32_of(cfg.intermediate_size)),
        (arch("attention.head_count"), u32_of(cfg.num_attention_heads)),
        (arch("attention.head_count_kv"), u32_of(cfg.num_kv_heads())),
        (arch("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (arch("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (arch("rope.scaling.type"), Value::Str("linear".into())),
        (arch("rope.scaling.factor"), Value::F32(1.0)),
        ("tokenizer.ggml.model".to_string(), Value::Str("llama".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str("default".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strings(tokens)),
        ("tokenizer.ggml.scores".to_string(), Value::F32s(scores)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(tok.bos_id())),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(tok.eos_id())),
    ];
    if let Some(unk) = tok.token_to_id("<unk>") {
        kv.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
    }
    if let Some(pad) = tok.pad_id() {
        kv.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad)));
    }
    // Bessie's tokenizer adds BOS and never EOS (as 1bitLLM's tokenizer_config.json says).
    kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    kv.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(vocab.adds_dummy_prefix)));
    Ok(kv)
}

/// Writes the GGUF file of `src` to `path`.
pub fn write(path: &Path, src: &Source) -> Result<()> {
    let family = src.cfg.family()?;
    ensure!(
        family == &crate::model::arch::ONE_BIT_LLM,
        "{}: GGUF export writes llama.cpp's `bitnet` architecture, the 1bitllm family's; this checkpoint is of the \
         {} family",
        src.dir.display(),
        family.name
    );
    ensure!(
        src.cfg.tie_word_embeddings,
        "{}: lm_head is not tied to the embedding (tie_word_embeddings is false), but llama.cpp's bitnet \
         architecture uses the embedding as lm_head",
        src.dir.display()
    );
    let kv = metadata(src)?;
    let tensors: Vec<GgufTensor> = src.params.iter().map(|(n, p)| tensor(n, p)).collect::<Result<_>>()?;
    // Header: magic, version, counts, metadata, then tensor infos (name, dims, type, and the offset of the
    // data from the start of the aligned data section).
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (key, value) in &kv {
        write_str(&mut header, key)?;
        value.write(&mut header)?;
    }
    let mut offset = 0;
    for t in &tensors {
        write_str(&mut header, &t.name)?;
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in &t.dims {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ggml_type.to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGNMENT);
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    w.write_all(&header)?;
    let mut written = header.len();
    for t in &tensors {
        // Zero bytes up to the alignment: the data section and every tensor in it start aligned.
        let pad = written.next_multiple_of(ALIGNMENT) - written;
        w.write_all(&vec![0u8; pad])?;
        w.write_all(&t.data)?;
        written += pad + t.data.len();
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
