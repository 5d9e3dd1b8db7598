//! GGUF for llama.cpp and bitnet.cpp: what their converters write, read from their sources (llama.cpp's
//! `convert_hf_to_gguf.py` as vendored by llama-cpp-python 0.3.36; bitnet.cpp's
//! `utils/convert-hf-to-gguf-bitnet.py` and `src/ggml-bitnet-mad.cpp`, microsoft/BitNet of 2026).
//!
//! **Architecture**, from the family (`Family::gguf_arch`):
//! - 1bitLLM → `bitnet` (llama.cpp and bitnet.cpp): sub-norms, SiLU, NEOX (rotate-half) RoPE, the
//!   embedding as lm_head (an untied head is refused);
//! - 2B4T → `bitnet-b1.58` (bitnet.cpp only: llama.cpp has no graph with relu² and sub-norms, so TQ2_0 is
//!   refused for it), as bitnet.cpp's converter writes microsoft/bitnet-b1.58-2B-4T; an untied head is
//!   `output.weight`;
//! - the Llama layout (Falcon3-1.58bit, Llama3-8B-1.58, a Llama fine-tuned into BitNet) → `llama`: q and k
//!   rows permuted from Hugging Face's rotate-half order to llama.cpp's interleaved pairs (the converter's
//!   `LlamaModel.permute`), Llama 3 RoPE scaling as the `rope_freqs` factors.
//!
//! **Ternary matrices**, in the `--type`:
//! - TQ2_0 (ggml type 35, file type 37; llama.cpp since September 2024, and bitnet.cpp): blocks of 256
//!   weights as 64 bytes of 2-bit codes `w + 1` (in each half of 128 weights, byte `j` holds weights `j,
//!   j + 32, j + 64, j + 96` at bits 0, 2, 4, 6) and an f16 scale, here the matrix's absmean scale in every
//!   block. A matrix whose rows are not a multiple of 256 long is written as F16 `value × scale`, as the
//!   converter falls back.
//! - TQ1_0 (ggml type 34, file type 36; the same engines): blocks of 256 weights in 54 bytes (1.69 bits per
//!   weight): five trits `w + 1` a byte for the first 240 weights (bytes 0-31 hold weights `j + 32 k`, bytes
//!   32-47 weights `160 + j + 16 k`, for k = 0..5, most significant trit first), four a byte for the last
//!   16 (`240 + j + 4 k`), each byte stored as `ceil(value x 256 / 243)` so that llama.cpp extracts a trit
//!   with a multiply and a shift, then the f16 scale; as ggml's `quantize_row_tq1_0_ref` writes it. Rows of
//!   other widths become F16 as for TQ2_0.
//! - I2_S (ggml type 36, file type 40; bitnet.cpp only): the whole matrix row-major in blocks of 128
//!   weights, 32 bytes each, byte `j` holding weights `j, j + 32, j + 64, j + 96` at bits 6, 4, 2, 0 (code
//!   `w + 1`), then the f32 scale and 28 zero bytes: `n / 4 + 32` bytes, the layout of bitnet.cpp's x86
//!   build (`ACT_PARALLEL`, its default) and of its Python converter's `quantize_to_i2_s`. Rows must be a
//!   multiple of 128 long; another width is an error before anything is written.
//!
//! Embedding and an untied head are F16, norms F32. **Tokenizer**: a SentencePiece `tokenizer.model` as
//! `llama` (pieces, scores, types); a byte-level BPE `tokenizer.json` (LLaMA-3, Falcon3) as `gpt2` with
//! its merges and the pre-tokenizer name llama.cpp needs (`llama-bpe` for LLaMA-3), found as the converter
//! finds it: by hashing the ids of a fixed text. An unknown one is refused rather than written with a
//! default that tokenizes differently (garbage answers). The checkpoint's chat template is carried.
//!
//! The file is written in one pass, header first (every size is known from the shapes), then each tensor
//! as it is read: the export holds one tensor at a time. candle's `quantized::gguf_file` writer is not
//! used: it takes every tensor at once as a `QTensor`, and candle has no TQ2_0 or I2_S type.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::{Param, Source};
use crate::config::model::RopeScalingType;
use crate::model::arch::Activation;
use crate::tokenizer::template::checkpoint_template;
use crate::tokenizer::{BpeVocab, Tokenizer};

const GGUF_VERSION: u32 = 3;
const ALIGNMENT: usize = 32;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;

/// The ggml type of the ternary matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    /// llama.cpp's TQ2_0 (2.06 bits per weight); llama.cpp and bitnet.cpp run it.
    #[value(name = "tq2_0")]
    Tq2_0,
    /// llama.cpp's TQ1_0 (1.69 bits per weight, base-3 packed); llama.cpp and bitnet.cpp run it.
    #[value(name = "tq1_0")]
    Tq1_0,
    /// bitnet.cpp's I2_S (2 bits per weight and one f32 scale); only bitnet.cpp runs it.
    #[value(name = "i2_s")]
    I2S,
}

impl GgufType {
    fn ggml_type(self) -> u32 {
        match self {
            Self::Tq1_0 => 34,
            Self::Tq2_0 => 35,
            Self::I2S => 36,
        }
    }

    /// `general.file_type`: llama.cpp's MOSTLY_TQ1_0 / MOSTLY_TQ2_0, bitnet.cpp's MOSTLY_I2_S.
    fn file_type(self) -> u32 {
        match self {
            Self::Tq1_0 => 36,
            Self::Tq2_0 => 37,
            Self::I2S => 40,
        }
    }

    /// The row length this type's blocks need.
    fn block(self) -> usize {
        match self {
            Self::Tq1_0 | Self::Tq2_0 => 256,
            Self::I2S => 128,
        }
    }

    fn nbytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Self::Tq1_0 => rows * cols / 256 * 54,
            Self::Tq2_0 => rows * cols / 256 * 66,
            Self::I2S => rows * cols / 4 + 32,
        }
    }

    /// The bytes of the row-major ternary `values` (rows a multiple of `block()` long) with `scale`.
    fn encode(self, values: &[i8], scale: f32) -> Vec<u8> {
        let code = |v: i8| (v + 1) as u8;
        match self {
            Self::Tq2_0 => {
                let d = half::f16::from_f32(scale).to_le_bytes();
                let mut out = Vec::with_capacity(values.len() / 256 * 66);
                for block in values.chunks(256) {
                    for half in block.chunks(128) {
                        out.extend((0..32).map(|j| (0..4).fold(0u8, |b, k| b | code(half[32 * k + j]) << (2 * k))));
                    }
                    out.extend_from_slice(&d);
                }
                out
            }
            Self::Tq1_0 => {
                let d = half::f16::from_f32(scale).to_le_bytes();
                // `trits` values, `stride` apart from `start`, as one base-3 number, most significant first.
                let pack = |block: &[i8], start: usize, stride: usize, trits: u32| {
                    let v = (0..5).fold(0u16, |acc, k| {
                        let trit = if k < trits { u16::from(code(block[start + k as usize * stride])) } else { 0 };
                        acc * 3 + trit
                    });
                    (v * 256).div_ceil(243) as u8
                };
                let mut out = Vec::with_capacity(values.len() / 256 * 54);
                for block in values.chunks(256) {
                    out.extend((0..32).map(|j| pack(block, j, 32, 5)));
                    out.extend((0..16).map(|j| pack(block, 160 + j, 16, 5)));
                    out.extend((0..4).map(|j| pack(block, 240 + j, 4, 4)));
                    out.extend_from_slice(&d);
                }
                out
            }
            Self::I2S => {
                let n = values.len();
                let mut out = vec![0u8; n / 4 + 32];
                for (block, chunk) in values.chunks(128).enumerate() {
                    for (j, &v) in chunk.iter().enumerate() {
                        out[block * 32 + j % 32] |= code(v) << (6 - 2 * (j / 32));
                    }
                }
                out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
                out
            }
        }
    }
}

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
    fn write(&self, w: &mut Vec<u8>) {
        let array = |w: &mut Vec<u8>, elem: u32, n: usize| {
            w.extend_from_slice(&9u32.to_le_bytes());
            w.extend_from_slice(&elem.to_le_bytes());
            w.extend_from_slice(&(n as u64).to_le_bytes());
        };
        match self {
            Value::U32(v) => {
                w.extend_from_slice(&4u32.to_le_bytes());
                w.extend_from_slice(&v.to_le_bytes());
            }
            Value::F32(v) => {
                w.extend_from_slice(&6u32.to_le_bytes());
                w.extend_from_slice(&v.to_le_bytes());
            }
            Value::Bool(v) => {
                w.extend_from_slice(&7u32.to_le_bytes());
                w.push(u8::from(*v));
            }
            Value::Str(s) => {
                w.extend_from_slice(&8u32.to_le_bytes());
                write_str(w, s);
            }
            Value::Strings(v) => {
                array(w, 8, v.len());
                v.iter().for_each(|s| write_str(w, s));
            }
            Value::F32s(v) => {
                array(w, 6, v.len());
                v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            }
            Value::I32s(v) => {
                array(w, 5, v.len());
                v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }
}

fn write_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

/// How a family's graph reads its GGUF.
struct Arch {
    /// `general.architecture`, also the prefix of the hyperparameter keys.
    name: &'static str,
    /// llama.cpp's `llama` graph rotates interleaved pairs; Hugging Face's rows rotate halves.
    permute_qk: bool,
    /// The `bitnet` graph uses the embedding as lm_head and reads no `output.weight`.
    tied_only: bool,
    /// The MLP activation the graph applies.
    activation: Activation,
}

impl Arch {
    fn of(name: &str) -> Option<Arch> {
        let arch = |name, permute_qk, tied_only, activation| Arch { name, permute_qk, tied_only, activation };
        Some(match name {
            "bitnet" => arch("bitnet", false, true, Activation::Silu),
            "bitnet-b1.58" => arch("bitnet-b1.58", false, false, Activation::Relu2),
            "llama" => arch("llama", true, false, Activation::Silu),
            _ => return None,
        })
    }

    /// Whether a reader of this architecture takes `ty`: llama.cpp has no `bitnet-b1.58` graph, and
    /// bitnet.cpp's 2B4T files are I2_S.
    fn takes(&self, ty: GgufType) -> bool {
        self.name != "bitnet-b1.58" || ty == GgufType::I2S
    }
}

/// One tensor of the file: its name, ggml dims (innermost first), type, byte count, and where it comes
/// from.
struct TensorPlan {
    name: String,
    dims: Vec<usize>,
    ggml_type: u32,
    nbytes: usize,
    /// The checkpoint parameter, or None for `rope_freqs` (computed from config.json).
    param: Option<String>,
}

/// Everything about the file that the checkpoint's config and tokenizer decide, settled before any byte
/// is written: a model this export cannot write is refused here.
pub struct Plan {
    ty: GgufType,
    arch: Arch,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorPlan>,
}

impl Plan {
    pub fn new(src: &Source, ty: GgufType) -> Result<Self> {
        let cfg = &src.cfg;
        let config = src.dir.join(crate::model::hf::CONFIG_FILE);
        let family = cfg.family()?;
        let arch = family.gguf_arch.and_then(Arch::of).with_context(|| {
            format!("{}: the {} family has no llama.cpp or bitnet.cpp architecture", config.display(), family.name)
        })?;
        ensure!(
            arch.takes(ty),
            "{}: the {} family is bitnet.cpp's `{}` architecture, which llama.cpp does not have and bitnet.cpp \
             reads as I2_S; export it with --type i2_s",
            config.display(),
            family.name,
            arch.name
        );
        let activation = cfg.activation()?;
        ensure!(
            activation == arch.activation,
            "{}: field `hidden_act` is {}, but the `{}` graph of llama.cpp / bitnet.cpp applies {}",
            config.display(),
            activation.hf_name(),
            arch.name,
            arch.activation.hf_name()
        );
        ensure!(
            cfg.tie_word_embeddings || !arch.tied_only,
            "{}: lm_head is not tied to the embedding (tie_word_embeddings is false), but the `{}` graph uses the \
             embedding as lm_head",
            config.display(),
            arch.name
        );
        let mut tensors = Vec::new();
        for (name, shape) in src.shapes() {
            let gguf = gguf_name(&name)?;
            let dims: Vec<usize> = shape.iter().rev().copied().collect();
            let (ggml_type, nbytes) = if crate::model::is_bitlinear(&name) {
                let (rows, cols) = (shape[0], shape[1]);
                if cols % ty.block() == 0 {
                    (ty.ggml_type(), ty.nbytes(rows, cols))
                } else {
                    ensure!(
                        ty != GgufType::I2S,
                        "{}: tensor `{name}` has rows of {cols} weights, which I2_S cannot hold (it needs a multiple \
                         of 128); --type tq2_0 writes such matrices as F16",
                        config.display()
                    );
                    (GGML_F16, rows * cols * 2)
                }
            } else if shape.len() == 1 {
                (GGML_F32, shape[0] * 4)
            } else {
                (GGML_F16, shape.iter().product::<usize>() * 2)
            };
            tensors.push(TensorPlan { name: gguf, dims, ggml_type, nbytes, param: Some(name) });
        }
        let mut rope_keys = Vec::new();
        let rope_scaling = cfg.rope_scaling()?;
        match rope_scaling.map(|s| s.kind) {
            None | Some(RopeScalingType::None) => {}
            Some(RopeScalingType::Linear) => {
                let factor = rope_scaling.map_or(1.0, |s| s.factor);
                rope_keys.push(("rope.scaling.type", Value::Str("linear".into())));
                rope_keys.push(("rope.scaling.factor", Value::F32(factor as f32)));
            }
            Some(RopeScalingType::Llama3) => {
                let half = cfg.head_dim() / 2;
                tensors.push(TensorPlan {
                    name: "rope_freqs.weight".into(),
                    dims: vec![half],
                    ggml_type: GGML_F32,
                    nbytes: half * 4,
                    param: None,
                });
            }
            Some(RopeScalingType::Dynamic) => bail!(
                "{}: field `rope_scaling` asks for dynamic NTK scaling, which llama.cpp's GGUF cannot express",
                config.display()
            ),
        }
        let mut metadata = vec![
            ("general.architecture".to_string(), Value::Str(arch.name.into())),
            ("general.name".to_string(), Value::Str(model_name(&src.dir))),
            ("general.file_type".to_string(), Value::U32(ty.file_type())),
            ("general.quantization_version".to_string(), Value::U32(2)),
        ];
        let u32_of = |v: usize| Value::U32(v as u32);
        let hyper = [
            ("vocab_size", u32_of(cfg.vocab_size)),
            ("context_length", u32_of(cfg.max_position_embeddings)),
            ("embedding_length", u32_of(cfg.hidden_size)),
            ("block_count", u32_of(cfg.num_hidden_layers)),
            ("feed_forward_length", u32_of(cfg.intermediate_size)),
            ("attention.head_count", u32_of(cfg.num_attention_heads)),
            ("attention.head_count_kv", u32_of(cfg.num_kv_heads())),
            ("attention.key_length", u32_of(cfg.head_dim())),
            ("attention.value_length", u32_of(cfg.head_dim())),
            ("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32)),
            ("rope.freq_base", Value::F32(cfg.rope_theta as f32)),
            ("rope.dimension_count", u32_of(cfg.head_dim())),
        ];
        for (key, value) in hyper.into_iter().chain(rope_keys) {
            metadata.push((format!("{}.{key}", arch.name), value));
        }
        metadata.extend(tokenizer_metadata(src)?);
        Ok(Plan { ty, arch, metadata, tensors })
    }

    /// Magic, version, counts, metadata, then each tensor's name, dims, type and data offset (from the start
    /// of the aligned data section).
    fn header(&self) -> Vec<u8> {
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_str(&mut header, key);
            value.write(&mut header);
        }
        let mut offset = 0;
        for t in &self.tensors {
            write_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.nbytes.next_multiple_of(ALIGNMENT);
        }
        header
    }
}

/// The name the file gives the model: the checkpoint folder's.
fn model_name(dir: &Path) -> String {
    let name = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    name.unwrap_or_else(|| "bitnet".into())
}

/// llama.cpp's name for a Hugging Face parameter name (gguf-py's tensor map).
fn gguf_name(hf: &str) -> Result<String> {
    match hf {
        "model.embed_tokens.weight" => return Ok("token_embd.weight".into()),
        "model.norm.weight" => return Ok("output_norm.weight".into()),
        "lm_head.weight" => return Ok("output.weight".into()),
        _ => {}
    }
    let none = || format!("no GGUF name for tensor `{hf}`");
    let rest = hf.strip_prefix("model.layers.").with_context(none)?;
    let (layer, module) = rest.split_once('.').with_context(none)?;
    let short = match module {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.inner_attn_ln.weight" | "self_attn.attn_sub_norm.weight" => "attn_sub_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "mlp.ffn_layernorm.weight" | "mlp.ffn_sub_norm.weight" => "ffn_sub_norm",
        _ => bail!(none()),
    };
    Ok(format!("blk.{layer}.{short}.weight"))
}

/// llama.cpp names a BPE vocabulary's pre-tokenizer (the split before merging) in the file; its converter
/// (`get_vocab_base_pre`) recognizes it by the SHA-256 of `str(tokenizer.encode(CHECK_TEXT))`. This text
/// and these hashes are the converter's.
const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";
const PRE_TOKENIZERS: [(&str, &str); 3] = [
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"), // Meta-Llama-3
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),   // Falcon3
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),    // SmolLM
];

/// The `tokenizer.ggml.pre` name of a BPE tokenizer. transformers' `encode` starts with BOS where the
/// checkpoint's config says so (LLaMA-3's does, through tokenizer_config.json), so the ids are hashed with
/// and without it.
pub fn pre_tokenizer(tok: &Tokenizer) -> Result<Option<&'static str>> {
    use sha2::Digest;
    let ids = tok.encode(CHECK_TEXT, false)?;
    let hash = |ids: &[u32]| {
        let text = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
        format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
    };
    let hashes = [hash(&[&[tok.bos_id()], &ids[..]].concat()), hash(&ids)];
    Ok(PRE_TOKENIZERS.iter().find(|(h, _)| hashes.iter().any(|x| x == h)).map(|(_, name)| *name))
}

/// The tokenizer's part of the metadata.
fn tokenizer_metadata(src: &Source) -> Result<Vec<(String, Value)>> {
    let (tok, vocab_size) = (&src.tokenizer, src.cfg.vocab_size);
    ensure!(
        tok.vocab_size() <= vocab_size,
        "{}: the tokenizer has {} tokens but config.json's vocab_size is {vocab_size}",
        src.dir.display(),
        tok.vocab_size()
    );
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    // Embedding rows past the tokenizer get placeholders as the converter writes them (UNUSED, 5).
    let placeholder = |i: usize| (format!("[PAD{i}]"), 5);
    let mut kv = Vec::new();
    if let Some(vocab) = tok.sentencepiece_vocab() {
        let mut pieces = vocab.pieces;
        pieces.extend((pieces.len()..vocab_size).map(|i| {
            let (text, kind) = placeholder(i);
            (text, -10000.0, kind)
        }));
        kv.push((key("model"), Value::Str("llama".into())));
        kv.push((key("pre"), Value::Str("default".into())));
        kv.push((key("tokens"), Value::Strings(pieces.iter().map(|p| p.0.clone()).collect())));
        kv.push((key("scores"), Value::F32s(pieces.iter().map(|p| p.1).collect())));
        kv.push((key("token_type"), Value::I32s(pieces.iter().map(|p| p.2).collect())));
        kv.push((key("add_space_prefix"), Value::Bool(vocab.adds_dummy_prefix)));
    } else if let Some(BpeVocab { mut tokens, merges }) = tok.bpe_vocab()? {
        let pre = pre_tokenizer(tok)?.with_context(|| {
            format!(
                "{}: llama.cpp would not know this tokenizer's pre-tokenizer (known here: {}), and a GGUF with \
                 the wrong one tokenizes differently from the model's training, so it answers garbage",
                src.dir.join("tokenizer.json").display(),
                PRE_TOKENIZERS.iter().map(|p| p.1).collect::<Vec<_>>().join(", ")
            )
        })?;
        tokens.resize(vocab_size, None);
        let tokens: Vec<(String, i32)> =
            tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| placeholder(i))).collect();
        kv.push((key("model"), Value::Str("gpt2".into())));
        kv.push((key("pre"), Value::Str(pre.into())));
        kv.push((key("tokens"), Value::Strings(tokens.iter().map(|t| t.0.clone()).collect())));
        kv.push((key("token_type"), Value::I32s(tokens.iter().map(|t| t.1).collect())));
        kv.push((key("merges"), Value::Strings(merges)));
    } else {
        bail!(
            "{}: GGUF export needs a SentencePiece tokenizer.model or a byte-level BPE tokenizer.json",
            src.dir.display()
        );
    }
    kv.push((key("bos_token_id"), Value::U32(tok.bos_id())));
    kv.push((key("eos_token_id"), Value::U32(tok.eos_id())));
    if let Some(unk) = tok.token_to_id("<unk>") {
        kv.push((key("unknown_token_id"), Value::U32(unk)));
    }
    if let Some(pad) = tok.pad_id() {
        kv.push((key("padding_token_id"), Value::U32(pad)));
    }
    // Bessie's prompts start with BOS and never end with EOS.
    kv.push((key("add_bos_token"), Value::Bool(true)));
    kv.push((key("add_eos_token"), Value::Bool(false)));
    if let Some((template, _)) = checkpoint_template(&src.dir)? {
        kv.push(("tokenizer.chat_template".into(), Value::Str(template)));
    }
    Ok(kv)
}

/// Rows of a q or k matrix reordered from Hugging Face's rotate-half layout (each head's first half of
/// dimensions, then its second) to llama.cpp's interleaved pairs: `LlamaModel.permute` of the converter.
fn permute_rows(values: &[i8], cols: usize, heads: usize) -> Vec<i8> {
    let head_dim = values.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let row = h * head_dim + j * half + i;
                out.extend_from_slice(&values[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

/// Writes one tensor's bytes to `w` and returns how many. A dense tensor goes out in pieces of about a
/// million values, so that converting the 128k-row embedding does not hold it twice more.
fn write_tensor(
    w: &mut impl Write,
    plan: &Plan,
    t: &TensorPlan,
    name: &str,
    param: Param,
    src: &Source,
) -> Result<usize> {
    let f16_bytes = |values: &mut dyn Iterator<Item = f32>| -> Vec<u8> {
        values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()
    };
    let bytes = match param {
        Param::Ternary { codes, scale } => {
            let (_, cols) = codes.dims();
            let mut values = codes.values();
            if plan.arch.permute_qk {
                if name.ends_with("self_attn.q_proj.weight") {
                    values = permute_rows(&values, cols, src.cfg.num_attention_heads);
                } else if name.ends_with("self_attn.k_proj.weight") {
                    values = permute_rows(&values, cols, src.cfg.num_kv_heads());
                }
            }
            if t.ggml_type == GGML_F16 {
                // What TQ2_0 would hold, as F16: ternary times the f16-rounded scale.
                let d = half::f16::from_f32(scale).to_f32();
                f16_bytes(&mut values.iter().map(|&v| f32::from(v) * d))
            } else {
                plan.ty.encode(&values, scale)
            }
        }
        Param::Dense(d) => {
            let rows = d.dim(0)?;
            let per_piece = ((1 << 20) / d.elem_count().div_ceil(rows).max(1)).max(1);
            let mut n = 0;
            for start in (0..rows).step_by(per_piece) {
                let piece = d.narrow(0, start, per_piece.min(rows - start))?.flatten_all()?.to_vec1::<f32>()?;
                let bytes = match t.ggml_type {
                    GGML_F32 => piece.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    _ => f16_bytes(&mut piece.into_iter()),
                };
                w.write_all(&bytes)?;
                n += bytes.len();
            }
            return Ok(n);
        }
    };
    w.write_all(&bytes)?;
    Ok(bytes.len())
}

/// llama.cpp's `rope_freqs` for Llama 3 scaling: per frequency pair, the factor its wavelength is
/// stretched by (`theta / factor` is what llama.cpp rotates by).
fn rope_factors(src: &Source) -> Result<Vec<u8>> {
    let cfg = &src.cfg;
    let d = cfg.head_dim();
    let scaled = cfg.rope_frequencies(cfg.max_position_embeddings)?.denominators;
    let factors =
        scaled.iter().enumerate().map(|(i, den)| (den / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)) as f32);
    Ok(factors.flat_map(f32::to_le_bytes).collect())
}

/// Writes tensor `t` at the next aligned offset (zero bytes up to it: the data section and every tensor in it
/// start aligned) with `write`, which returns its byte count, and checks that count against the plan.
fn put<W: Write>(
    w: &mut W,
    written: &mut usize,
    t: &TensorPlan,
    write: impl FnOnce(&mut W) -> Result<usize>,
) -> Result<()> {
    w.write_all(&[0u8; ALIGNMENT][..written.next_multiple_of(ALIGNMENT) - *written])?;
    let n = write(w)?;
    ensure!(n == t.nbytes, "tensor {}: {n} bytes where {} were planned", t.name, t.nbytes);
    *written = written.next_multiple_of(ALIGNMENT) + n;
    Ok(())
}

/// Writes the GGUF file of `src` planned in `plan` to `path`, one tensor at a time.
pub fn write(path: &Path, src: &Source, plan: &Plan) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    let header = plan.header();
    w.write_all(&header)?;
    let mut written = header.len();
    let mut planned = plan.tensors.iter();
    src.for_each_param(|name, param| {
        let t = planned.next().context("more parameters than planned")?;
        ensure!(t.param.as_deref() == Some(name), "parameter {name} where {:?} was planned", t.param);
        put(&mut w, &mut written, t, |w| write_tensor(w, plan, t, name, param, src))
    })?;
    for t in planned {
        ensure!(t.param.is_none(), "parameter {:?} was planned but not read", t.param);
        let bytes = rope_factors(src)?;
        put(&mut w, &mut written, t, |w| Ok(w.write_all(&bytes).map(|()| bytes.len())?))?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
