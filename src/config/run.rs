//! The training run: a TOML file (see configs/) whose every key can be overridden with `--set section.key=value`.
//!
//! Every key has a default, and the defaults are the original project's recipe (SEED.md), so a file only names
//! what it changes. Unknown keys are errors everywhere: a typo must not silently fall back to a default.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::model::{RopeScaling, RopeScalingType};
use crate::model::arch;
use crate::tokenizer::template::TemplateChoice;
// The data module defines what these mean; the config only names them (`response`/`all`, `truncate`/`drop`).
pub use crate::data::{LossOn, Overflow};

/// The built-in demo run, used when no config file is given: this file of the Bessie checkout.
pub const DEMO_CONFIG: &str = "configs/tiny.toml";

/// Bounds on run sizes: far beyond any real run, small enough that the arithmetic on them cannot overflow
/// and counting the steps cannot take long.
const MAX_ROWS_PER_STEP: usize = 1 << 32;
const MAX_EPOCHS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    pub log: LogSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face checkpoint directory to fine-tune.
    pub path: PathBuf,
    /// Or a random model of a named shape (`model::arch::SHAPES`) with the shipped tokenizer.
    pub init: String,
    pub init_seed: u64,
    /// RoPE scaling for sequences beyond the checkpoint's `max_position_embeddings`: `none` (keep what the
    /// checkpoint's config.json says), `linear` or `dynamic`. Written into saved checkpoints' config.json.
    pub rope_scaling: RopeScalingType,
    /// The scaling factor (at least 1); only with `rope_scaling` linear or dynamic.
    pub rope_scaling_factor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// JSONL with `prompt`/`response` fields.
    pub train: PathBuf,
    /// Optional JSONL for the periodic dev loss; empty means none.
    pub dev: PathBuf,
    pub max_seq_len: usize,
    pub loss_on: LossOn,
    pub overflow: Overflow,
    /// Several examples per sequence; attention never crosses examples.
    pub pack: bool,
    /// The system message of conversations without one; empty means none (with the Bessie template,
    /// Bessie's own system prompt).
    pub system_prompt: String,
    /// The chat template: `auto` (the checkpoint's own when it has one, else Bessie's), `checkpoint`,
    /// `bessie`, or the path of a Jinja file.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    /// 0 runs the epochs; more caps the optimizer steps.
    pub max_steps: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// The schedule decays from `lr` to `lr * min_lr_ratio` after warm-up.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Weight decay skips norms and the embedding unless true.
    pub decay_norms_and_embeddings: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm gradient clip; 0 turns it off.
    pub grad_clip: f64,
    /// Quantizer strength `min(step / N, 1)`; 0 quantizes fully from step 0.
    pub quant_warmup_steps: usize,
    /// Seeds the data order.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The dtype gradients are all-reduced in (bf16 whenever the buffer is).
    pub grad_dtype: GradDtype,
    /// The dtype of the step's gradient buffer on the device, where each layer's gradient is summed (in f32,
    /// then stored): `"f32"`; `"bf16"`, half the bytes (2 a parameter instead of 4, for the largest models
    /// on the smallest cards), each micro-batch's sum rounded to bf16 as a bf16 all-reduce rounds it; or
    /// `"auto"` ([`TrainSection::grad_buffer_dtype`]).
    pub grad_buffer: GradBuffer,
    /// With several ranks: seconds without a finished optimizer step (or checkpoint, or dev loss) after
    /// which a rank ends the job, so a hung rank cannot hang the others forever; 0 turns it off.
    pub step_timeout: u64,
    /// What the backward recomputes instead of keeping from the forward (README, "Long context").
    pub recompute: Recompute,
    /// Query rows per block of the memory-efficient attention: at most `[micro_batch, heads,
    /// attention_block, seq]` f32 scores exist at once.
    pub attention_block: usize,
    /// Token rows per chunk of the loss: the logits `[loss_chunk, vocab]` and their gradient exist one chunk at
    /// a time (bf16 on a GPU, f32 on the CPU).
    pub loss_chunk: usize,
    /// On a GPU, refuse to start when the estimated peak memory (`train::memory`) exceeds the card's;
    /// false starts anyway, for when the estimate is wrong.
    pub check_memory: bool,
    /// With several ranks, ZeRO-1: each rank owns a contiguous share of the flat parameters. The backward
    /// sums each gradient share onto its owner only (a reduce, half an all-reduce's traffic); each rank
    /// keeps the AdamW moments of its share only and updates its share of the f32 latents; each step's
    /// weights (ternary matrices, every matrix's absmean summed over the ranks) are built share by share
    /// and exchanged in the compute dtype (bf16 on GPUs). The f32 latents are gathered only for checkpoints.
    /// Optimizer memory falls by the number of ranks; the weights are those of a run without it, to f32
    /// rounding (sums taken in another order).
    pub zero1: bool,
    /// How AdamW holds its moments: `"f32"`, or `"int8"`, 8-bit codes per block of 256 values with an f32
    /// scale (`train::moments`): a quarter of the memory, for the largest models on the smallest cards.
    pub optimizer_state: OptimizerState,
    /// Where this step's ternary weights (in the compute dtype) live: `"kept"`, all built once per optimizer
    /// step and kept for it (fastest); or `"per_block"`, each block's built from the latents whenever its
    /// forward or backward needs it, so that one block's exist at a time (2 bytes a parameter less on a GPU,
    /// for about three more passes over the latents per micro-batch; the same weights and gradients).
    pub step_weights: StepWeightsPlan,
}

/// Where the step's weights live (`train.step_weights`; `train::model::StepWeights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepWeightsPlan {
    /// All of them for the whole step.
    Kept,
    /// One block's at a time, built when needed.
    PerBlock,
}

/// How AdamW holds its moments (`train::moments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    /// 8 bytes a parameter for both moments: exactly PyTorch's AdamW.
    F32,
    /// About 2 bytes a parameter for both moments.
    Int8,
}

/// Activation recomputation: memory for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every tensor the backward needs (fastest).
    None,
    /// Keep all but attention's (q, k, v, log-sum-exp); the backward recomputes the q/k/v
    /// projections and the attention forward of each block.
    Attention,
    /// Keep only each block's input; the backward re-runs the block's forward (about a third more compute).
    Blocks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    pub out_dir: PathBuf,
    /// Optimizer steps between checkpoints; 0 saves only the final one.
    pub every: usize,
    /// How many `checkpoint-STEP` directories to keep.
    pub keep: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// Optimizer steps between dev-loss measurements; 0 measures only at the end.
    pub dev_every: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDtype {
    F32,
    Bf16,
}

/// `train.grad_buffer`: what the step's gradient buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradBuffer {
    /// bf16 on a GPU at one micro-batch a step on one rank, else f32 ([`TrainSection::grad_buffer_dtype`]).
    Auto,
    F32,
    Bf16,
}

impl GradDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            init: String::new(),
            init_seed: 0,
            rope_scaling: RopeScalingType::None,
            rope_scaling_factor: 1.0,
        }
    }
}

impl ModelSection {
    /// The RoPE scaling this config sets, if any.
    pub fn rope(&self) -> Option<RopeScaling> {
        (self.rope_scaling != RopeScalingType::None)
            .then_some(RopeScaling { kind: self.rope_scaling, factor: self.rope_scaling_factor })
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            dev: PathBuf::new(),
            max_seq_len: 512,
            loss_on: LossOn::Response,
            overflow: Overflow::Truncate,
            pack: true,
            system_prompt: String::new(),
            template: "auto".into(),
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 2,
            max_steps: 0,
            micro_batch: 1,
            grad_accum: 4,
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 30,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            decay_norms_and_embeddings: false,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            quant_warmup_steps: 0,
            seed: 42,
            device: "auto".into(),
            grad_dtype: GradDtype::F32,
            grad_buffer: GradBuffer::Auto,
            step_timeout: 900,
            recompute: Recompute::None,
            attention_block: 1024,
            loss_chunk: 2048,
            check_memory: true,
            zero1: false,
            optimizer_state: OptimizerState::F32,
            step_weights: StepWeightsPlan::Kept,
        }
    }
}

impl TrainSection {
    /// The gradient buffer's dtype for a step on `world` ranks, on a GPU (`cuda`) or not. `auto` is bf16 on
    /// a GPU when a step is one micro-batch on one rank: each weight gradient is then stored once, rounded to
    /// bf16 as PyTorch's autocast GEMMs round theirs (a tied embedding's two parts are added in it), in half
    /// the memory and with fewer bytes for the gradient norm and AdamW to read. Elsewhere it is f32, which
    /// sums micro-batches and ranks without rounding, and keeps the CPU's step in f32 throughout.
    pub fn grad_buffer_dtype(&self, cuda: bool, world: usize) -> GradDtype {
        match self.grad_buffer {
            GradBuffer::F32 => GradDtype::F32,
            GradBuffer::Bf16 => GradDtype::Bf16,
            GradBuffer::Auto if cuda && self.grad_accum == 1 && world == 1 => GradDtype::Bf16,
            GradBuffer::Auto => GradDtype::F32,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { out_dir: PathBuf::from("runs/bessie"), every: 500, keep: 2 }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self { dev_every: 100 }
    }
}

/// The demo's config in a Bessie checkout: under the current directory, else under a directory holding the
/// running program (`target/release/bessie-train` lies two levels below its checkout), so the demo finds
/// its files wherever the checkout is, never through a path fixed when the program was built.
pub fn find_demo_config() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let exe = std::env::current_exe().context("finding the running program")?;
    let found = std::iter::once(cwd.as_path()).chain(exe.ancestors().skip(1)).map(|d| d.join(DEMO_CONFIG));
    found.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no --config given, and the built-in demo's {DEMO_CONFIG} is neither in the current directory ({}) nor \
             in a directory above this program ({}): run the demo from a Bessie checkout (`cargo run --release \
             --bin bessie-train` there), or pass --config FILE",
            cwd.display(),
            exe.display()
        )
    })
}

impl RunConfig {
    /// Reads a TOML file (or, with `None`, the demo's configs/tiny.toml, `find_demo_config`), applies `section.key=value`
    /// overrides, makes the paths absolute and validates.
    ///
    /// Relative paths in the file are relative to the file's directory; relative paths in overrides are
    /// relative to the current directory, as anything typed on a command line is. Paths end up absolute so
    /// that [`to_toml`](Self::to_toml) can be saved anywhere and loaded back unchanged.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
        let demo;
        let p = match path {
            Some(p) => p,
            None => {
                demo = find_demo_config()?;
                &demo
            }
        };
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        // `run.toml` has the parent "", which std::path::absolute refuses.
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = p.display().to_string();
        // toml's own error names the key and its line and column.
        let mut cfg: RunConfig = toml::from_str(&text).with_context(|| format!("parsing {name}"))?;
        cfg.resolve_paths(&std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?);
        if !overrides.is_empty() {
            cfg = cfg.with_overrides(overrides)?;
            cfg.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
        }
        let with = if overrides.is_empty() { "" } else { " with the --set overrides" };
        cfg.validate().with_context(|| format!("invalid run config {name}{with}"))?;
        Ok(cfg)
    }

    /// The defaults with `--set` overrides, for `bessie-train --bench`, which reads the `[train]` keys and
    /// the RoPE scaling and needs no data or model paths.
    pub fn for_bench(overrides: &[String]) -> Result<RunConfig> {
        let cfg = RunConfig::default().with_overrides(overrides)?;
        cfg.validate_settings().context("invalid --set overrides")?;
        Ok(cfg)
    }

    /// Applies `section.key=value` overrides one at a time, so a bad value is blamed on its own key.
    fn with_overrides(&self, overrides: &[String]) -> Result<RunConfig> {
        let mut table = toml::Table::try_from(self).context("serializing the run config")?;
        let mut cfg = self.clone();
        for spec in overrides {
            let (key, raw) = spec
                .split_once('=')
                .with_context(|| format!("malformed override `{spec}`: expected section.key=value"))?;
            let key = key.trim();
            let (section, field) = key
                .split_once('.')
                .with_context(|| format!("malformed override `{spec}`: the key must be section.key"))?;
            let Some(toml::Value::Table(fields)) = table.get_mut(section) else {
                let sections: Vec<&str> = table.keys().map(String::as_str).collect();
                bail!("unknown config key `{key}` (sections: {})", sections.join(", "));
            };
            let Some(slot) = fields.get_mut(field) else {
                let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
                bail!("unknown config key `{key}` (keys of [{section}]: {})", keys.join(", "));
            };
            *slot = override_value(raw, slot);
            cfg = table.clone().try_into().with_context(|| format!("invalid value `{raw}` for `{key}`"))?;
        }
        Ok(cfg)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        for p in [&mut self.model.path, &mut self.data.train, &mut self.data.dev, &mut self.checkpoint.out_dir] {
            // Empty means "not set" and stays empty; joining an absolute path leaves it as it is.
            if !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
        if let Ok(TemplateChoice::File(path)) = self.data.template.parse() {
            self.data.template = dir.join(path).display().to_string();
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (m, d, c) = (&self.model, &self.data, &self.checkpoint);
        match (m.path.as_os_str().is_empty(), m.init.is_empty()) {
            (false, true) => {}
            (true, false) if arch::shape_by_name(&m.init).is_ok() => {}
            (true, false) => {
                bail!("model.init `{}` is not a known shape (known: {})", m.init, arch::shape_names())
            }
            _ => bail!("exactly one of model.path and model.init must be set"),
        }
        if d.train.as_os_str().is_empty() {
            bail!("data.train is empty");
        }
        self.template()?;
        if c.out_dir.as_os_str().is_empty() {
            bail!("checkpoint.out_dir is empty");
        }
        self.validate_settings()
    }

    /// Everything but the model, data and output paths.
    fn validate_settings(&self) -> Result<()> {
        let (m, d, t, c) = (&self.model, &self.data, &self.train, &self.checkpoint);
        let positive = [
            ("data.max_seq_len", d.max_seq_len),
            ("train.epochs", t.epochs),
            ("train.micro_batch", t.micro_batch),
            ("train.grad_accum", t.grad_accum),
            ("train.attention_block", t.attention_block),
            ("train.loss_chunk", t.loss_chunk),
            ("checkpoint.keep", c.keep),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be positive");
            }
        }
        // Sequences per step and per rank; any world size times this still fits a usize.
        if t.micro_batch.checked_mul(t.grad_accum).is_none_or(|n| n > MAX_ROWS_PER_STEP) {
            bail!(
                "train.micro_batch x train.grad_accum is {} x {}; at most {MAX_ROWS_PER_STEP} sequences per step",
                t.micro_batch,
                t.grad_accum
            );
        }
        // Each epoch's order is computed to count the steps, even when train.max_steps stops the run sooner.
        if t.epochs > MAX_EPOCHS {
            bail!("train.epochs is {}; at most {MAX_EPOCHS} (train.max_steps caps a run by steps)", t.epochs);
        }
        match m.rope_scaling {
            RopeScalingType::None if m.rope_scaling_factor != 1.0 => {
                bail!("model.rope_scaling_factor is {} but model.rope_scaling is none", m.rope_scaling_factor)
            }
            RopeScalingType::None => {}
            RopeScalingType::Llama3 => {
                bail!("model.rope_scaling = \"llama3\" is read from a checkpoint's config.json only (it has more parameters than a factor)")
            }
            _ if !(m.rope_scaling_factor.is_finite() && m.rope_scaling_factor >= 1.0) => {
                bail!("model.rope_scaling_factor must be at least 1, not {}", m.rope_scaling_factor)
            }
            _ => {}
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("train.lr must be positive, not {}", t.lr);
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            bail!("train.min_lr_ratio must be in [0, 1], not {}", t.min_lr_ratio);
        }
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{key} must be in [0, 1), not {v}");
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            bail!("train.eps must be positive, not {}", t.eps);
        }
        for (key, v) in [("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{key} must be zero or positive, not {v}");
            }
        }
        // Only the spelling: whether the device exists is for the run to find out (validating must not need a GPU).
        let device_ok = matches!(t.device.as_str(), "auto" | "cpu" | "cuda")
            || t.device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            bail!("train.device `{}` must be auto, cpu, cuda or cuda:N", t.device);
        }
        Ok(())
    }

    /// The effective config as TOML, saved beside checkpoints; [`load`](Self::load) reads it back unchanged.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every RunConfig field is a TOML scalar and paths are UTF-8")
    }

    /// The system prompt to train with; `None` means none (Bessie's own with the Bessie template).
    pub fn system_prompt(&self) -> Option<&str> {
        Some(self.data.system_prompt.as_str()).filter(|s| !s.is_empty())
    }

    /// Which chat template `data.template` names.
    pub fn template(&self) -> Result<TemplateChoice> {
        self.data.template.parse().context("data.template")
    }
}

/// Parses an override's value as TOML; a bare word that isn't TOML (`foo.jsonl`, `fast`) is a string.
/// A string key takes the text as written, so `--set checkpoint.out_dir=2024` is the directory `2024`.
fn override_value(raw: &str, current: &toml::Value) -> toml::Value {
    let raw = raw.trim();
    let parsed = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ toml::Value::String(_)) => v,
        Some(_) if current.is_str() => toml::Value::String(raw.to_string()),
        Some(v) => v,
        None => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.model.init = "tiny".into();
        cfg.data.train = "train.jsonl".into();
        cfg
    }

    #[test]
    fn defaults_are_the_original_recipe() {
        let t = TrainSection::default();
        assert_eq!((t.lr, t.weight_decay, t.warmup_steps, t.grad_clip), (2e-4, 0.0, 30, 1.0));
        assert_eq!((t.micro_batch, t.grad_accum, t.epochs, t.schedule), (1, 4, 2, Schedule::Linear));
        assert_eq!(DataSection::default().max_seq_len, 512);
        let c = CheckpointSection::default();
        assert_eq!((c.every, c.keep), (500, 2));
        // An empty file means the defaults.
        assert_eq!(toml::from_str::<RunConfig>("").unwrap(), RunConfig::default());
        valid().validate().unwrap();
    }

    /// `auto` is bf16 only where nothing but the tied embedding is summed in the buffer: a GPU step of one
    /// micro-batch on one rank; the named dtypes hold everywhere.
    #[test]
    fn auto_grad_buffer_is_bf16_only_for_one_micro_batch_on_one_gpu() {
        let with = |grad_buffer, grad_accum| TrainSection { grad_buffer, grad_accum, ..TrainSection::default() };
        let auto = |grad_accum, cuda, world| with(GradBuffer::Auto, grad_accum).grad_buffer_dtype(cuda, world);
        assert_eq!(auto(1, true, 1), GradDtype::Bf16);
        assert_eq!([auto(2, true, 1), auto(1, true, 2), auto(1, false, 1)], [GradDtype::F32; 3]);
        for (cuda, world) in [(true, 1), (true, 4), (false, 1)] {
            assert_eq!(with(GradBuffer::F32, 1).grad_buffer_dtype(cuda, world), GradDtype::F32);
            assert_eq!(with(GradBuffer::Bf16, 4).grad_buffer_dtype(cuda, world), GradDtype::Bf16);
        }
        let parsed = |v: &str| toml::from_str::<RunConfig>(&format!("[train]\ngrad_buffer = \"{v}\"")).unwrap();
        assert_eq!(RunConfig::default().train.grad_buffer, GradBuffer::Auto);
        assert_eq!(parsed("auto").train.grad_buffer, GradBuffer::Auto);
        assert_eq!(parsed("f32").train.grad_buffer, GradBuffer::F32);
    }

    #[test]
    fn validate_names_the_key() {
        type Edit = fn(&mut RunConfig);
        let cases: [(Edit, &str); 16] = [
            (|c| c.train.micro_batch = 0, "train.micro_batch must be positive"),
            (
                |c| {
                    c.train.micro_batch = 1 << 40;
                    c.train.grad_accum = 1 << 40;
                },
                "train.micro_batch x train.grad_accum",
            ),
            (|c| c.train.epochs = usize::MAX, "train.epochs is 18446744073709551615; at most 10000"),
            (|c| c.data.max_seq_len = 0, "data.max_seq_len must be positive"),
            (|c| c.train.lr = 0.0, "train.lr must be positive"),
            (|c| c.train.min_lr_ratio = 1.5, "train.min_lr_ratio"),
            (|c| c.train.beta2 = 1.0, "train.beta2"),
            (|c| c.train.grad_clip = -1.0, "train.grad_clip"),
            (|c| c.train.device = "gpu".into(), "train.device `gpu`"),
            (|c| c.data.train = PathBuf::new(), "data.train is empty"),
            (|c| c.model.init = "huge".into(), "model.init `huge` is not a known shape"),
            (|c| c.model.path = "m".into(), "exactly one of model.path and model.init"),
            (|c| c.train.attention_block = 0, "train.attention_block must be positive"),
            (|c| c.train.loss_chunk = 0, "train.loss_chunk must be positive"),
            (|c| c.model.rope_scaling_factor = 2.0, "model.rope_scaling_factor is 2 but model.rope_scaling is none"),
            (
                |c| {
                    c.model.rope_scaling = RopeScalingType::Linear;
                    c.model.rope_scaling_factor = 0.5;
                },
                "model.rope_scaling_factor must be at least 1",
            ),
        ];
        for (edit, want) in cases {
            let mut cfg = valid();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "`{err}` should contain `{want}`");
        }
    }

    #[test]
    fn override_values() {
        let s = toml::Value::String(String::new());
        let f = toml::Value::Float(0.0);
        assert_eq!(override_value("foo.jsonl", &s), toml::Value::String("foo.jsonl".into()));
        assert_eq!(override_value("\"a b\"", &s), toml::Value::String("a b".into()));
        assert_eq!(override_value("2024", &s), toml::Value::String("2024".into()));
        assert_eq!(override_value("3e-3", &f), toml::Value::Float(3e-3));
        assert_eq!(override_value("fast", &f), toml::Value::String("fast".into()));
        assert_eq!(override_value("false", &toml::Value::Boolean(true)), toml::Value::Boolean(false));
    }

    #[test]
    fn system_prompt_is_none_when_empty() {
        let mut cfg = valid();
        assert_eq!(cfg.system_prompt(), None);
        cfg.data.system_prompt = "Moo.".into();
        assert_eq!(cfg.system_prompt(), Some("Moo."));
    }
}
