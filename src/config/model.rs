//! The model's Hugging Face `config.json`.
//!
//! Field names and defaults follow transformers' `LlamaConfig` and `BitNetConfig` plus the BitNet keys that
//! 1bitLLM writes (`weight_bits`, `input_bits`). Both forms of RoPE's settings are read: the Hub files'
//! top-level `rope_theta` / `rope_scaling` and transformers 5's `rope_parameters`. Unknown keys are kept
//! verbatim so a checkpoint saved by Bessie carries everything the original file said. Which family the file
//! describes is `model::arch::Family::of`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::arch::{self, Activation, BlockTensor, Family, Role};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Explicit in Falcon3 (256 where hidden / heads is 256 x 8 = 2048 / 8); hidden / heads when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// The family's default when absent (`relu2` for `bitnet`, `silu` otherwise): [`activation`](Self::activation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
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
    /// Llama 3.1's frequency-dependent scaling (Llama 3.1/3.2 checkpoints): long wavelengths divided by the
    /// factor, short ones kept, the band between interpolated; its parameters come from `config.json`.
    Llama3,
}

impl RopeScalingType {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Linear => "linear",
            Self::Dynamic => "dynamic",
            Self::Llama3 => "llama3",
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

impl ModelConfig {
    /// Reads and validates `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.read_rope_parameters().with_context(|| format!("invalid {}", path.display()))?;
        cfg.validate().with_context(|| format!("invalid {}", path.display()))?;
        Ok(cfg)
    }

    /// transformers 5 writes RoPE's settings as `rope_parameters: {rope_theta, rope_type, factor, ...}` and
    /// reads them before the top-level keys; so does Bessie. The object stays in `extra` for saving, with the
    /// top-level keys set from it, so that either version of transformers reads the same values back.
    fn read_rope_parameters(&mut self) -> Result<()> {
        let Some(p) = self.extra.get("rope_parameters").filter(|p| !p.is_null()) else { return Ok(()) };
        if !p.is_object() {
            bail!("field `rope_parameters` is {p}; expected an object");
        }
        if let Some(theta) = p.get("rope_theta") {
            self.rope_theta = theta
                .as_f64()
                .with_context(|| format!("field `rope_parameters.rope_theta` is {theta}; expected a number"))?;
        }
        let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|k| k.as_str()).unwrap_or("default");
        if kind != "default" {
            self.rope_scaling = Some(p.clone());
        }
        Ok(())
    }

    /// A named shape (see `model::arch::SHAPES`) in its family's `config.json` form, with `vocab_size` ids.
    pub fn shape(name: &str, vocab_size: usize) -> Result<Self> {
        let s = arch::shape_by_name(name)?;
        let f = s.family;
        let mut cfg = serde_json::json!({
            "architectures": [f.architecture],
            "model_type": f.model_type,
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": s.max_positions,
            "rope_theta": s.rope_theta,
            "rms_norm_eps": s.rms_norm_eps,
            "hidden_act": s.activation.hf_name(),
            "tie_word_embeddings": s.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "attention_bias": false,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        });
        if let Some(d) = s.head_dim {
            cfg["head_dim"] = d.into();
        }
        if f == &arch::ONE_BIT_LLM {
            cfg["weight_bits"] = 1.into();
            cfg["input_bits"] = 8.into();
        }
        if f.bitnet_quant_config {
            cfg["quantization_config"] = Self::bitnet_latent_quantization_config();
        }
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
            ("head_dim", self.head_dim.unwrap_or(1)),
            ("num_key_value_heads", self.num_key_value_heads.unwrap_or(1)),
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
                "fields `vocab_size` ({}), `hidden_size` ({}), `intermediate_size` ({}), `num_hidden_layers` ({}) \
                 and the heads make more than {MAX_PARAMETERS} parameters",
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
        let family = self.family()?;
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "field `hidden_size` ({}) must be a multiple of `num_attention_heads` ({}) when `head_dim` is not given",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("the head dimension ({}) must be even for RoPE", self.head_dim());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_kv_heads(),
                self.num_attention_heads
            );
        }
        // The attention sub-norm is as wide as the hidden state in transformers' BitNet.
        if family.has_sub_norms() && self.num_attention_heads * self.head_dim() != self.hidden_size {
            bail!(
                "fields `num_attention_heads` x `head_dim` ({} x {}) must equal `hidden_size` ({}) in the {} family",
                self.num_attention_heads,
                self.head_dim(),
                self.hidden_size,
                family.name
            );
        }
        self.activation()?;
        if self.weight_bits != 1 || self.input_bits != 8 {
            bail!(
                "fields `weight_bits`/`input_bits` are {}/{}; BitNet b1.58 needs 1/8",
                self.weight_bits,
                self.input_bits
            );
        }
        self.rope_scaling()?;
        for key in ["attention_bias", "mlp_bias"] {
            if self.extra.get(key).and_then(|v| v.as_bool()) == Some(true) {
                bail!("field `{key}` is true; BitNet b1.58 has no biases");
            }
        }
        self.quantization()?;
        Ok(())
    }

    /// The model family `config.json` describes (see `model::arch`).
    pub fn family(&self) -> Result<&'static Family> {
        let architecture = match self.extra.get("architectures") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str(),
            Some(other) => bail!("field `architectures` is {other}; expected a list of one class name"),
        };
        let model_type = match self.extra.get("model_type") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => Some(t.as_str()),
            Some(other) => bail!("field `model_type` is {other}; expected a string"),
        };
        Family::detect(architecture, model_type, self.quant_method() == Some("bitnet"))
    }

    /// The tensors of block `layer` in file and flat-buffer order (`model::arch::Role::ALL`), the family's
    /// absent sub-norms left out.
    pub fn block_tensors(&self, family: &Family, layer: usize) -> Vec<BlockTensor> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim(), self.num_kv_heads() * self.head_dim());
        Role::ALL
            .into_iter()
            .filter_map(|role| {
                let shape = match role {
                    Role::InputNorm | Role::PostNorm => vec![h],
                    Role::Q => vec![q, h],
                    Role::K | Role::V => vec![kv, h],
                    Role::AttnSubNorm => vec![q],
                    Role::O => vec![h, q],
                    Role::Gate | Role::Up => vec![i, h],
                    Role::FfnSubNorm => vec![i],
                    Role::Down => vec![h, i],
                };
                let name = family.tensor_name(role)?;
                Some(BlockTensor { role, name: format!("model.layers.{layer}.{name}.weight"), shape })
            })
            .collect()
    }

    /// Every parameter with its shape, in file order: the embedding, the blocks, the final norm and an
    /// untied head. This list is the one source of parameter names: random initialisation, the flat layout
    /// and saving use it, and the loader checks the file against it.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let family = self.family().expect("a validated config names a known family");
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![(arch::EMBEDDING.to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            out.extend(self.block_tensors(family, l).into_iter().map(|t| (t.name, t.shape)));
        }
        out.push((arch::FINAL_NORM.to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push((arch::LM_HEAD.to_string(), vec![v, h]));
        }
        out
    }

    /// The gated MLP's activation: `hidden_act`, or the family's default.
    pub fn activation(&self) -> Result<Activation> {
        match &self.hidden_act {
            None => Ok(self.family()?.default_activation),
            Some(name) => Activation::from_hf(name)
                .with_context(|| format!("field `hidden_act` is `{name}`; Bessie supports `silu` and `relu2`")),
        }
    }

    /// `quantization_config.quant_method`, if any.
    pub fn quant_method(&self) -> Option<&str> {
        self.extra.get("quantization_config")?.get("quant_method")?.as_str()
    }

    /// How the projections' weights are stored, from `quantization_config`: errors name the field and say
    /// what Bessie reads.
    pub fn quantization(&self) -> Result<Quantization> {
        let Some(q) = self.extra.get("quantization_config").filter(|q| !q.is_null()) else {
            return Ok(Quantization::Latent);
        };
        let field = |key: &str| q.get(key).filter(|v| !v.is_null());
        let text = |key: &str, default: &'static str| -> Result<String> {
            match field(key) {
                None => Ok(default.to_string()),
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("field `quantization_config.{key}` is {other}; expected a string"),
            }
        };
        match self.quant_method() {
            Some(PACKED_QUANT_METHOD) => {
                let is = |key: &str, value: serde_json::Value| q.get(key) == Some(&value);
                if !(is("format", PACKED_FORMAT.into()) && is("version", PACKED_VERSION.into())) {
                    bail!(
                        "field `quantization_config` is {q}; Bessie's packed ternary layout is \
                         {{\"quant_method\": \"{PACKED_QUANT_METHOD}\", \"format\": \"{PACKED_FORMAT}\", \
                         \"version\": {PACKED_VERSION}}}"
                    );
                }
                Ok(Quantization::BessieTernary)
            }
            Some("bitnet") => {
                if field("use_rms_norm").and_then(|v| v.as_bool()) == Some(true) {
                    bail!(
                        "field `quantization_config.use_rms_norm` is true: an RMSNorm inside every BitLinear layer \
                         is not supported"
                    );
                }
                match field("modules_to_not_convert") {
                    None => {}
                    Some(serde_json::Value::Array(m)) if m.iter().all(|x| x == "lm_head") => {}
                    Some(other) => bail!(
                        "field `quantization_config.modules_to_not_convert` is {other}; Bessie makes every \
                         projection of the blocks a BitLinear layer and leaves only `lm_head` full precision"
                    ),
                }
                let class = text("linear_class", "bitlinear")?;
                let mode = text("quantization_mode", "offline")?;
                match (class.as_str(), mode.as_str()) {
                    ("autobitlinear", "online") => Ok(Quantization::Latent),
                    ("autobitlinear", "offline") => Ok(Quantization::Bitnet { scale: WeightScale::Absmean }),
                    ("bitlinear", "online" | "offline") => Ok(Quantization::Bitnet { scale: WeightScale::Reciprocal }),
                    ("bitlinear" | "autobitlinear", other) => bail!(
                        "field `quantization_config.quantization_mode` is `{other}`; expected `online` or `offline`"
                    ),
                    (other, _) => bail!(
                        "field `quantization_config.linear_class` is `{other}`; expected `bitlinear` or `autobitlinear`"
                    ),
                }
            }
            other => bail!(
                "field `quantization_config.quant_method` is {}; Bessie reads `bitnet` (transformers' packed or \
                 online BitNet) and `{PACKED_QUANT_METHOD}` (its own packed export)",
                other.map(|m| format!("`{m}`")).unwrap_or_else(|| "missing".into())
            ),
        }
    }

    /// This config as Bessie saves a model it has trained: latent weights in the family it saves as
    /// (`Family::saves_as`), so a full-precision Llama becomes a `bitnet` Llama and a packed checkpoint's
    /// `quantization_config` becomes the online one that describes latent weights.
    pub fn latent_form(&self) -> Result<Self> {
        let family = Family::by_name(self.family()?.saves_as)?;
        let quantization = family.bitnet_quant_config.then(Self::bitnet_latent_quantization_config);
        Ok(self.as_family(family, quantization))
    }

    /// This config as `family` writes it: its class and `model_type`, and `quantization_config` when given.
    pub fn as_family(&self, family: &Family, quantization_config: Option<serde_json::Value>) -> Self {
        let mut cfg = self.clone();
        cfg.extra.insert("architectures".into(), serde_json::json!([family.architecture]));
        cfg.extra.insert("model_type".into(), family.model_type.into());
        if let Some(q) = quantization_config {
            cfg.extra.insert("quantization_config".into(), q);
        }
        cfg
    }

    /// The `quantization_config` Bessie writes beside latent weights of the `bitnet` families: transformers'
    /// `AutoBitLinear` in online mode quantizes the weights per tensor and the activations per token on the
    /// fly, the same arithmetic as Bessie's, so `from_pretrained` runs the fine-tuned model as trained.
    pub fn bitnet_latent_quantization_config() -> serde_json::Value {
        serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
    }

    /// The RoPE scaling `config.json` asks for: transformers' `rope_scaling` with `rope_type` (or the older
    /// `type`) `linear`, `dynamic` or `llama3` and a `factor` of at least 1. Other types are errors naming
    /// the field.
    pub fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|k| k.as_str());
        let kind = match kind {
            Some("linear") => RopeScalingType::Linear,
            Some("dynamic") => RopeScalingType::Dynamic,
            Some("llama3") => RopeScalingType::Llama3,
            Some("default") => return Ok(None),
            other => bail!(
                "field `rope_scaling` has rope_type {}; Bessie supports `linear`, `dynamic` and `llama3`",
                other.map(|k| format!("`{k}`")).unwrap_or_else(|| "missing".into())
            ),
        };
        if kind == RopeScalingType::Llama3 {
            self.llama3_rope()?;
        }
        let factor = v.get("factor").and_then(|f| f.as_f64());
        match factor {
            Some(factor) if factor.is_finite() && factor >= 1.0 => Ok(Some(RopeScaling { kind, factor })),
            _ => bail!("field `rope_scaling` needs a `factor` of at least 1, not {:?}", v.get("factor")),
        }
    }

    /// `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings` of `llama3` scaling.
    fn llama3_rope(&self) -> Result<(f64, f64, f64)> {
        let v = self.rope_scaling.as_ref().context("no rope_scaling")?;
        let get = |key: &str| -> Result<f64> {
            v.get(key)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| format!("field `rope_scaling.{key}` must be a positive number for llama3 scaling"))
        };
        let (low, high) = (get("low_freq_factor")?, get("high_freq_factor")?);
        if high <= low {
            bail!("field `rope_scaling.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})");
        }
        Ok((low, high, get("original_max_position_embeddings")?))
    }

    /// Sets `rope_scaling` in Hugging Face's form. Both `rope_type` (transformers since 4.42) and `type`
    /// (earlier versions) are written, so either reads it.
    pub fn set_rope_scaling(&mut self, scaling: Option<RopeScaling>) {
        self.rope_scaling = scaling
            .map(|s| serde_json::json!({ "rope_type": s.kind.name(), "type": s.kind.name(), "factor": s.factor }));
    }

    /// The longest sequence the model supports: `max_position_embeddings` (already the extended length under
    /// llama3 scaling), times the factor with linear scaling; `None` (no limit) with dynamic scaling.
    pub fn max_positions(&self) -> Result<Option<usize>> {
        Ok(match self.rope_scaling()? {
            None | Some(RopeScaling { kind: RopeScalingType::Llama3, .. }) => Some(self.max_position_embeddings),
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
            Some(RopeScaling { kind: RopeScalingType::Dynamic, factor }) => {
                let max = self.max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                (self.rope_theta * (factor * len / max - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0)), 1.0)
            }
            Some(_) => (self.rope_theta, 1.0),
        };
        let mut denominators: Vec<f64> = (0..d / 2).map(|i| base.powf(2.0 * i as f64 / d as f64)).collect();
        if let Some(RopeScaling { kind: RopeScalingType::Llama3, factor }) = self.rope_scaling()? {
            // transformers' `_compute_llama3_parameters`, on wavelengths `2 pi denominator`.
            let (low, high, context) = self.llama3_rope()?;
            for den in &mut denominators {
                let wavelen = 2.0 * std::f64::consts::PI * *den;
                *den = if wavelen < context / high {
                    *den
                } else if wavelen > context / low {
                    *den * factor
                } else {
                    let smooth = (context / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / (*den * factor) + smooth / *den)
                };
            }
        }
        Ok(RopeFrequencies { denominators, position_divisor })
    }

    /// The `quantization_config` that marks a packed ternary checkpoint.
    pub fn packed_quantization_config() -> serde_json::Value {
        serde_json::json!({"quant_method": PACKED_QUANT_METHOD, "format": PACKED_FORMAT, "version": PACKED_VERSION})
    }

    /// Whether the weights are Bessie's packed ternary export rather than latent weights.
    pub fn is_packed_ternary(&self) -> bool {
        matches!(self.quantization(), Ok(Quantization::BessieTernary))
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Parameter count, with the embedding counted once when tied.
    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// The parameter count of [`parameter_shapes`](Self::parameter_shapes) in checked arithmetic, for sizes not yet validated
    /// (sub-norms counted whatever the family: a bound).
    fn checked_num_parameters(&self) -> Option<u128> {
        let [h, i, v, l] =
            [self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers].map(|x| x as u128);
        let d = match self.head_dim {
            Some(d) => d as u128,
            None => h / (self.num_attention_heads.max(1) as u128),
        };
        let q = (self.num_attention_heads as u128).checked_mul(d)?;
        let kv = (self.num_kv_heads() as u128).checked_mul(d)?;
        // Per block: 3 norms of width h or q, 1 of width i, q and o (q x h), k and v (kv x h), 3 MLP (i x h).
        let block = [
            h.checked_mul(2)?,
            q,
            i,
            q.checked_mul(h)?.checked_mul(2)?,
            kv.checked_mul(h)?.checked_mul(2)?,
            i.checked_mul(h)?.checked_mul(3)?,
        ]
        .into_iter()
        .try_fold(0u128, u128::checked_add)?;
        let embeddings = v.checked_mul(h)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        block.checked_mul(l)?.checked_add(embeddings)?.checked_add(h)
    }
}

/// How a scale stored beside packed ternary codes relates to the matrix's mean absolute value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScale {
    /// transformers' `AutoBitLinear` (what 2B4T's config names): `weight_scale` = absmean, `y = x Wq * scale`.
    Absmean,
    /// transformers' `BitLinear`: `weight_scale` = 1 / absmean, `y = x Wq / scale`.
    Reciprocal,
}

impl WeightScale {
    /// The stored `weight_scale` of a matrix whose absmean is `absmean`.
    pub fn stored(self, absmean: f64) -> f64 {
        match self {
            Self::Absmean => absmean,
            Self::Reciprocal => 1.0 / absmean,
        }
    }

    /// The absmean a stored `weight_scale` stands for (the relation is its own inverse).
    pub fn absmean(self, stored: f64) -> f64 {
        self.stored(stored)
    }
}

/// How `config.json` says the projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Latent weights, quantized on the fly: no `quantization_config`, or transformers' online `bitnet`.
    Latent,
    /// Bessie's own packed export (`model::ternary`).
    BessieTernary,
    /// transformers' offline `bitnet`: ternary codes (U8, four output rows a byte, `model::bitnet_packed`)
    /// and a `weight_scale` per projection.
    Bitnet { scale: WeightScale },
}
