//! The model's Hugging Face `config.json`.
//!
//! Field names and defaults follow transformers' `LlamaConfig` plus the BitNet keys that 1bitLLM writes
//! (`weight_bits`, `input_bits`). Unknown keys are kept verbatim so a checkpoint saved by Bessie carries
//! everything the original file said.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// transformers' default is `false`; 1bitLLM's checkpoints say `true`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_weight_bits")]
    pub weight_bits: u32,
    #[serde(default = "default_input_bits")]
    pub input_bits: u32,
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Hugging Face's form, e.g. `{"rope_type": "linear", "factor": 2.0}`; read through
    /// [`rope_scaling`](Self::rope_scaling), written by [`set_rope_scaling`](Self::set_rope_scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Everything else (`architectures`, `model_type`, `torch_dtype`, ...), kept for saving.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The RoPE scalings Bessie implements, as transformers' `rope_type` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingType {
    /// No scaling: sequences up to `max_position_embeddings`.
    #[default]
    None,
    /// Position interpolation: positions divided by the factor, so `factor x max_position_embeddings`
    /// positions fit in the range the model was trained on.
    Linear,
    /// Dynamic NTK-aware scaling: for a sequence of `L > max_position_embeddings` tokens the base becomes
    /// `rope_theta * (factor L / max_position_embeddings - (factor - 1))^(d / (d - 2))`; no length limit.
    Dynamic,
}

impl RopeScalingType {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Linear => "linear",
            Self::Dynamic => "dynamic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    /// Linear or Dynamic.
    pub kind: RopeScalingType,
    pub factor: f64,
}

/// RoPE's frequencies with the scaling applied: pair `i` of a head rotates position `p` by the angle
/// `(p / position_divisor) / denominators[i]`. Training and inference round this differently (training
/// in f64 then to f32, inference in f32 as transformers does) and must keep doing so: only the numbers
/// are shared.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// `base^(2i / head_dim)`, base = `rope_theta` or the dynamic-NTK base, in f64.
    pub denominators: Vec<f64>,
    /// The linear scaling factor; 1 otherwise.
    pub position_divisor: f64,
}

fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_weight_bits() -> u32 {
    1
}
fn default_input_bits() -> u32 {
    8
}
fn default_bos() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}

/// `quantization_config.quant_method` of Bessie's packed ternary checkpoints (`bessie-export --format
/// ternary`; the layout is documented in `model::ternary`). Deliberately not transformers' `"bitnet"`, whose
/// packing differs: transformers refuses an unknown method with a clear error instead of misreading.
pub const PACKED_QUANT_METHOD: &str = "bessie_ternary";
/// `quantization_config.format` and `.version` of that layout.
pub const PACKED_FORMAT: &str = "ternary-2bit";
pub const PACKED_VERSION: u64 = 1;

/// Bounds on `config.json` sizes: far above any BitNet model, far below what overflows or cannot be allocated.
const MAX_LAYERS: usize = 4096;
const MAX_PARAMETERS: u128 = 1 << 40;

/// Named model shapes: the 1bitLLM family and a tiny one for tests and demos.
pub const SHAPES: &[&str] = &["tiny", "large", "xl", "3b"];

impl ModelConfig {
    /// Reads and validates `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate().with_context(|| format!("invalid {}", path.display()))?;
        Ok(cfg)
    }

    /// A named shape (see [`SHAPES`]) in 1bitLLM's `config.json` form.
    pub fn shape(name: &str, vocab_size: usize) -> Result<Self> {
        let (hidden, inter, layers, heads) = match name {
            "tiny" => (64, 176, 2, 4),
            "large" => (1536, 4096, 24, 16),
            "xl" => (2048, 5460, 24, 32),
            "3b" => (3200, 8640, 26, 32),
            other => bail!("unknown model shape `{other}` (known: {})", SHAPES.join(", ")),
        };
        let cfg = serde_json::json!({
            "architectures": ["BitnetForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "weight_bits": 1,
            "input_bits": 8,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 32000,
            "attention_bias": false,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        });
        let mut cfg: Self = serde_json::from_value(cfg)?;
        // The pad id is the first added token, right after the SentencePiece vocabulary.
        cfg.pad_token_id = Some(vocab_size.saturating_sub(2) as u32);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                bail!("field `{key}` must be positive");
            }
        }
        // Sane bounds before anything is sized from these numbers (`hf::open` then checks them against the
        // weights): the parameter count is computed without overflow, and the layer count bounds the loops
        // over layers.
        if self.num_hidden_layers > MAX_LAYERS {
            bail!("field `num_hidden_layers` is {}; at most {MAX_LAYERS} are supported", self.num_hidden_layers);
        }
        match self.checked_num_parameters() {
            Some(n) if n <= MAX_PARAMETERS => {}
            _ => bail!(
                "fields `vocab_size` ({}), `hidden_size` ({}), `intermediate_size` ({}) and `num_hidden_layers` ({}) \
                 make more than {MAX_PARAMETERS} parameters",
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers
            ),
        }
        for (key, v) in [("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("field `{key}` must be positive, not {v}");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) || !self.head_dim().is_multiple_of(2) {
            bail!(
                "field `hidden_size` ({}) must be an even multiple of `num_attention_heads` ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_kv_heads(),
                self.num_attention_heads
            );
        }
        if self.hidden_act != "silu" {
            bail!("field `hidden_act` is `{}`; only `silu` is supported", self.hidden_act);
        }
        if self.weight_bits != 1 || self.input_bits != 8 {
            bail!(
                "fields `weight_bits`/`input_bits` are {}/{}; BitNet b1.58 needs 1/8",
                self.weight_bits,
                self.input_bits
            );
        }
        self.rope_scaling()?;
        if self.extra.get("attention_bias").and_then(|v| v.as_bool()) == Some(true) {
            bail!("field `attention_bias` is true; BitNet b1.58 has no biases");
        }
        if let Some(q) = self.extra.get("quantization_config") {
            let is = |key: &str, value: serde_json::Value| q.get(key) == Some(&value);
            if !(is("quant_method", PACKED_QUANT_METHOD.into())
                && is("format", PACKED_FORMAT.into())
                && is("version", PACKED_VERSION.into()))
            {
                bail!(
                    "field `quantization_config` is {q}; Bessie reads latent checkpoints and its own packed ternary \
                     ones ({{\"quant_method\": \"{PACKED_QUANT_METHOD}\", \"format\": \"{PACKED_FORMAT}\", \
                     \"version\": {PACKED_VERSION}}})"
                );
            }
        }
        Ok(())
    }

    /// The RoPE scaling `config.json` asks for: transformers' `rope_scaling` with `rope_type` (or the older
    /// `type`) `linear` or `dynamic` and a `factor` of at least 1. Other types are errors naming the field.
    pub fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|k| k.as_str());
        let kind = match kind {
            Some("linear") => RopeScalingType::Linear,
            Some("dynamic") => RopeScalingType::Dynamic,
            Some("default") => return Ok(None),
            other => bail!(
                "field `rope_scaling` has rope_type {}; Bessie supports `linear` and `dynamic`",
                other.map(|k| format!("`{k}`")).unwrap_or_else(|| "missing".into())
            ),
        };
        let factor = v.get("factor").and_then(|f| f.as_f64());
        match factor {
            Some(factor) if factor.is_finite() && factor >= 1.0 => Ok(Some(RopeScaling { kind, factor })),
            _ => bail!("field `rope_scaling` needs a `factor` of at least 1, not {:?}", v.get("factor")),
        }
    }

    /// Sets `rope_scaling` in Hugging Face's form. Both `rope_type` (transformers since 4.42) and `type`
    /// (earlier versions) are written, so either reads it.
    pub fn set_rope_scaling(&mut self, scaling: Option<RopeScaling>) {
        self.rope_scaling = scaling
            .map(|s| serde_json::json!({ "rope_type": s.kind.name(), "type": s.kind.name(), "factor": s.factor }));
    }

    /// The longest sequence the model supports: `max_position_embeddings`, times the factor with linear
    /// scaling; `None` (no limit) with dynamic scaling.
    pub fn max_positions(&self) -> Result<Option<usize>> {
        Ok(match self.rope_scaling()? {
            None => Some(self.max_position_embeddings),
            Some(RopeScaling { kind: RopeScalingType::Linear, factor }) => {
                Some((self.max_position_embeddings as f64 * factor).floor() as usize)
            }
            Some(_) => None,
        })
    }

    /// An error naming `what` (the config key or input that asks for `len` positions) and the limit, when
    /// `len` tokens exceed what the model supports.
    pub fn check_positions(&self, len: usize, what: &str) -> Result<()> {
        match self.max_positions()? {
            Some(max) if len > max => bail!(
                "{what} needs {len} positions but the model supports {max} (max_position_embeddings = {}{}); \
                 longer sequences need RoPE scaling: model.rope_scaling = \"linear\" with model.rope_scaling_factor \
                 >= {:.2}, or \"dynamic\" (in a checkpoint's config.json: `rope_scaling`)",
                self.max_position_embeddings,
                self.rope_scaling()?.map(|s| format!(", linear scaling x{}", s.factor)).unwrap_or_default(),
                len as f64 / self.max_position_embeddings as f64
            ),
            _ => Ok(()),
        }
    }

    /// RoPE's frequencies for a sequence of `seq_len` tokens (dynamic scaling depends on it), as
    /// transformers' `_compute_linear_scaling_rope_parameters` and `_compute_dynamic_ntk_parameters` have them.
    pub fn rope_frequencies(&self, seq_len: usize) -> Result<RopeFrequencies> {
        let d = self.head_dim();
        let (base, position_divisor) = match self.rope_scaling()? {
            None => (self.rope_theta, 1.0),
            Some(RopeScaling { kind: RopeScalingType::Linear, factor }) => (self.rope_theta, factor),
            Some(RopeScaling { factor, .. }) => {
                let max = self.max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                (self.rope_theta * (factor * len / max - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0)), 1.0)
            }
        };
        let denominators = (0..d / 2).map(|i| base.powf(2.0 * i as f64 / d as f64)).collect();
        Ok(RopeFrequencies { denominators, position_divisor })
    }

    /// The `quantization_config` that marks a packed ternary checkpoint.
    pub fn packed_quantization_config() -> serde_json::Value {
        serde_json::json!({"quant_method": PACKED_QUANT_METHOD, "format": PACKED_FORMAT, "version": PACKED_VERSION})
    }

    /// Whether the weights are Bessie's packed ternary export rather than latent weights (`validate` has
    /// refused any other `quantization_config`).
    pub fn is_packed_ternary(&self) -> bool {
        self.extra.contains_key("quantization_config")
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Parameter count, with the embedding counted once when tied.
    pub fn num_parameters(&self) -> usize {
        crate::model::parameter_shapes(self).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// The parameter count of `model::parameter_shapes` in checked arithmetic, for sizes not yet validated.
    fn checked_num_parameters(&self) -> Option<u128> {
        let [h, i, v, l] =
            [self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers].map(|x| x as u128);
        let kv = (self.num_kv_heads() as u128).checked_mul(h / self.num_attention_heads as u128)?;
        // Per block: 4 norms (3 of width h, 1 of width i), q and o (h x h), k and v (kv x h), 3 MLP (i x h).
        let block = [
            h.checked_mul(3)?,
            i,
            h.checked_mul(h)?.checked_mul(2)?,
            kv.checked_mul(h)?.checked_mul(2)?,
            i.checked_mul(h)?.checked_mul(3)?,
        ]
        .into_iter()
        .try_fold(0u128, u128::checked_add)?;
        let embeddings = v.checked_mul(h)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        block.checked_mul(l)?.checked_add(embeddings)?.checked_add(h)
    }
}
