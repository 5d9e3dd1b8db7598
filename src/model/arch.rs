//! The model families Bessie trains, each described once: which `config.json` marks it, the Hugging Face
//! names of a block's tensors, where its extra norms sit and how Bessie saves it. Loading, saving, the flat
//! parameter layout, the inference model, the training step, the memory estimate, `bessie-init-model` and
//! export all read a block through `ModelConfig::block_tensors`, which puts the sizes of `config.json` (heads,
//! KV heads, `head_dim`, a tied or untied head) on the roles and names given here.
//!
//! Adding a family is one more [`Family`] in [`FAMILIES`] (plus its named shapes in [`SHAPES`]), and a kernel
//! only if it needs an operation the others do not have. This module depends on nothing else in Bessie.

use anyhow::{bail, Result};

/// The gated MLP's activation: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `silu(x) = x sigmoid(x)`: LLaMA, 1bitLLM, Falcon3.
    Silu,
    /// `relu(x)^2`: BitNet b1.58 2B4T.
    Relu2,
}

impl Activation {
    /// `config.json`'s `hidden_act` name (transformers' `ACT2FN` key).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Relu2 => "relu2",
        }
    }

    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "relu2" => Some(Self::Relu2),
            _ => None,
        }
    }
}

/// What a tensor of a block does. The order of [`Role::ALL`] is the order of the flat parameter buffer: the
/// projections that read one input are neighbours (q, k, v; gate, up), so training multiplies them as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    InputNorm,
    Q,
    K,
    V,
    /// The norm between attention and `o_proj` (1bitLLM's `inner_attn_ln`, 2B4T's `attn_sub_norm`).
    AttnSubNorm,
    O,
    PostNorm,
    Gate,
    Up,
    /// The norm between the gated activation and `down_proj` (`ffn_layernorm`, `ffn_sub_norm`).
    FfnSubNorm,
    Down,
}

impl Role {
    pub const ALL: [Role; 11] = [
        Role::InputNorm,
        Role::Q,
        Role::K,
        Role::V,
        Role::AttnSubNorm,
        Role::O,
        Role::PostNorm,
        Role::Gate,
        Role::Up,
        Role::FfnSubNorm,
        Role::Down,
    ];

    /// The seven projections are BitLinear layers; the norms are not.
    pub fn is_bitlinear(self) -> bool {
        matches!(self, Role::Q | Role::K | Role::V | Role::O | Role::Gate | Role::Up | Role::Down)
    }
}

/// A model family: how its `config.json` says so and how its blocks are named.
#[derive(Debug, PartialEq, Eq)]
pub struct Family {
    /// Bessie's name for it, in messages, `--family` and the README's table.
    pub name: &'static str,
    /// `architectures[0]` in `config.json`.
    pub architecture: &'static str,
    /// `model_type` in `config.json`.
    pub model_type: &'static str,
    /// The attention sub-norm's name under `model.layers.N.`, or None where the family has none.
    pub attn_sub_norm: Option<&'static str>,
    /// The MLP sub-norm's name, or None.
    pub ffn_sub_norm: Option<&'static str>,
    /// The activation when `config.json` names none (transformers' config default for the family).
    pub default_activation: Activation,
    /// Whether `config.json` of this family says `quantization_config.quant_method = "bitnet"` (the
    /// Llama layout is a BitNet only with it; without it, it is a full-precision Llama).
    pub bitnet_quant_config: bool,
    /// Whether the checkpoint's projections are ternary BitLinear layers as it stands: false for a
    /// full-precision model, which becomes one only by fine-tuning (quantizing it as it is would destroy it).
    pub ternary: bool,
    /// The family Bessie saves a fine-tuned model as: itself, or for a full-precision Llama, the Llama
    /// layout with the `bitnet` quantization config.
    pub saves_as: &'static str,
    /// `general.architecture` of the family's GGUF file: the llama.cpp / bitnet.cpp graph that runs it
    /// (`export::gguf` says which ggml types each reads); None where no such graph exists.
    pub gguf_arch: Option<&'static str>,
}

pub const ONE_BIT_LLM: Family = Family {
    name: "1bitllm",
    architecture: "BitnetForCausalLM",
    model_type: "llama",
    attn_sub_norm: Some("self_attn.inner_attn_ln"),
    ffn_sub_norm: Some("mlp.ffn_layernorm"),
    default_activation: Activation::Silu,
    bitnet_quant_config: false,
    ternary: true,
    saves_as: "1bitllm",
    gguf_arch: Some("bitnet"),
};

pub const BITNET_2B4T: Family = Family {
    name: "bitnet",
    architecture: "BitNetForCausalLM",
    model_type: "bitnet",
    attn_sub_norm: Some("self_attn.attn_sub_norm"),
    ffn_sub_norm: Some("mlp.ffn_sub_norm"),
    default_activation: Activation::Relu2,
    bitnet_quant_config: true,
    ternary: true,
    saves_as: "bitnet",
    gguf_arch: Some("bitnet-b1.58"),
};

pub const LLAMA_BITNET: Family = Family {
    name: "llama-bitnet",
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    attn_sub_norm: None,
    ffn_sub_norm: None,
    default_activation: Activation::Silu,
    bitnet_quant_config: true,
    ternary: true,
    saves_as: "llama-bitnet",
    gguf_arch: Some("llama"),
};

pub const LLAMA: Family = Family {
    name: "llama",
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    attn_sub_norm: None,
    ffn_sub_norm: None,
    default_activation: Activation::Silu,
    bitnet_quant_config: false,
    ternary: false,
    saves_as: "llama-bitnet",
    // A full-precision model is exported only after fine-tuning, as llama-bitnet.
    gguf_arch: None,
};

/// Every family, in the order `config.json` is matched against them.
pub const FAMILIES: [&Family; 4] = [&ONE_BIT_LLM, &BITNET_2B4T, &LLAMA_BITNET, &LLAMA];

impl Family {
    pub fn by_name(name: &str) -> Result<&'static Family> {
        match FAMILIES.into_iter().find(|f| f.name == name) {
            Some(f) => Ok(f),
            None => bail!("unknown model family `{name}` (known: {})", family_names()),
        }
    }

    /// The family a `config.json` describes by `architectures[0]` (or `model_type` when there is none) and,
    /// for the Llama layout, whether `quantization_config.quant_method` is `bitnet`. A config without either
    /// is a 1bitLLM one (their first checkpoints and Bessie's own before families existed).
    pub fn detect(architecture: Option<&str>, model_type: Option<&str>, bitnet_quant: bool) -> Result<&'static Family> {
        let family = match (architecture, model_type) {
            (Some("BitnetForCausalLM"), _) => &ONE_BIT_LLM,
            (Some("BitNetForCausalLM"), _) | (None, Some("bitnet")) => &BITNET_2B4T,
            (Some("LlamaForCausalLM"), _) if bitnet_quant => &LLAMA_BITNET,
            (Some("LlamaForCausalLM"), _) => &LLAMA,
            (None, Some("llama") | None) => &ONE_BIT_LLM,
            (Some(a), _) => bail!(
                "field `architectures` is [\"{a}\"]; Bessie knows {}",
                FAMILIES.iter().map(|f| format!("`{}`", f.architecture)).collect::<Vec<_>>().join(", ")
            ),
            (None, Some(t)) => bail!("field `model_type` is `{t}`; Bessie knows `llama` and `bitnet`"),
        };
        if let Some(t) = model_type.filter(|t| *t != family.model_type) {
            bail!(
                "field `model_type` is `{t}` but `architectures` names {} (model_type `{}`)",
                family.architecture,
                family.model_type
            );
        }
        Ok(family)
    }

    /// The Hugging Face name of a block tensor of this role, under `model.layers.N.`, without `.weight`;
    /// None when the family has no such tensor.
    pub fn tensor_name(&self, role: Role) -> Option<&'static str> {
        Some(match role {
            Role::InputNorm => "input_layernorm",
            Role::Q => "self_attn.q_proj",
            Role::K => "self_attn.k_proj",
            Role::V => "self_attn.v_proj",
            Role::AttnSubNorm => return self.attn_sub_norm,
            Role::O => "self_attn.o_proj",
            Role::PostNorm => "post_attention_layernorm",
            Role::Gate => "mlp.gate_proj",
            Role::Up => "mlp.up_proj",
            Role::FfnSubNorm => return self.ffn_sub_norm,
            Role::Down => "mlp.down_proj",
        })
    }

    pub fn has_sub_norms(&self) -> bool {
        self.attn_sub_norm.is_some()
    }
}

pub fn family_names() -> String {
    FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

/// One tensor of a block: its role, its full Hugging Face name and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTensor {
    pub role: Role,
    pub name: String,
    pub shape: Vec<usize>,
}

pub const EMBEDDING: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// A named shape for `bessie-init-model`, `model.init` and `--bench`: a family at its real size or at a
/// tiny size with the same features (GQA, relu2, an untied head, `head_dim` unlike hidden / heads).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub family: &'static Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// None: hidden / heads (and `head_dim` is not written to `config.json`).
    pub head_dim: Option<usize>,
    pub activation: Activation,
    pub tied: bool,
    pub rope_theta: f64,
    pub max_positions: usize,
    pub rms_norm_eps: f64,
    /// The vocabulary of the real model (benchmarks use it; a random checkpoint takes its tokenizer's).
    pub vocab: usize,
}

#[allow(clippy::too_many_arguments)] // one row of the table below
const fn shape(
    name: &'static str,
    family: &'static Family,
    [hidden, intermediate, layers, heads, kv_heads]: [usize; 5],
    head_dim: Option<usize>,
    activation: Activation,
    tied: bool,
    (rope_theta, max_positions, rms_norm_eps): (f64, usize, f64),
    vocab: usize,
) -> Shape {
    Shape {
        name,
        family,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        activation,
        tied,
        rope_theta,
        max_positions,
        rms_norm_eps,
        vocab,
    }
}

use Activation::{Relu2, Silu};

/// The named shapes. Real sizes are those of the models' `config.json` on the Hugging Face Hub.
pub const SHAPES: &[Shape] = &[
    shape("tiny", &ONE_BIT_LLM, [64, 176, 2, 4, 4], None, Silu, true, (1e4, 2048, 1e-5), 32002),
    shape("large", &ONE_BIT_LLM, [1536, 4096, 24, 16, 16], None, Silu, true, (1e4, 2048, 1e-5), 32002),
    shape("xl", &ONE_BIT_LLM, [2048, 5460, 24, 32, 32], None, Silu, true, (1e4, 2048, 1e-5), 32002),
    shape("3b", &ONE_BIT_LLM, [3200, 8640, 26, 32, 32], None, Silu, true, (1e4, 2048, 1e-5), 32002),
    // GQA 4:1 and relu2, as 2B4T.
    shape("tiny-bitnet", &BITNET_2B4T, [64, 176, 2, 4, 1], None, Relu2, true, (5e5, 4096, 1e-5), 128256),
    shape("2b4t", &BITNET_2B4T, [2560, 6912, 30, 20, 5], None, Relu2, true, (5e5, 4096, 1e-5), 128256),
    // GQA 2:1, an untied head and head_dim 32 where hidden / heads is 16, as Falcon3-1B (256, not 2048 / 8).
    shape("tiny-llama-bitnet", &LLAMA_BITNET, [64, 176, 2, 4, 2], Some(32), Silu, false, (1e6, 2048, 1e-6), 131072),
    shape("falcon3-1b", &LLAMA_BITNET, [2048, 8192, 18, 8, 4], Some(256), Silu, false, (1000042.0, 8192, 1e-6), 131072),
    shape(
        "falcon3-3b",
        &LLAMA_BITNET,
        [3072, 9216, 22, 12, 4],
        Some(256),
        Silu,
        false,
        (1000042.0, 32768, 1e-6),
        131072,
    ),
    shape("llama3-8b-1.58", &LLAMA_BITNET, [4096, 14336, 32, 32, 8], None, Silu, false, (5e5, 8192, 1e-5), 128256),
    shape("tiny-llama", &LLAMA, [64, 176, 2, 4, 2], None, Silu, false, (1e4, 2048, 1e-5), 49152),
    shape("llama3.2-1b", &LLAMA, [2048, 8192, 16, 32, 8], None, Silu, true, (5e5, 131072, 1e-5), 128256),
    shape("smollm-135m", &LLAMA, [576, 1536, 30, 9, 3], None, Silu, true, (1e4, 2048, 1e-5), 49152),
];

pub fn shape_names() -> String {
    SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

pub fn shape_by_name(name: &str) -> Result<&'static Shape> {
    match SHAPES.iter().find(|s| s.name == name) {
        Some(s) => Ok(s),
        None => bail!("unknown model shape `{name}` (known: {})", shape_names()),
    }
}
