//! What a run reports: one JSON line per optimizer step in `OUT/metrics.jsonl`, and a progress bar (or,
//! without a terminal, progress lines).

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    /// Mean loss per trained token of this step.
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_loss: Option<f64>,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// Tokens processed this step (padding excluded), all ranks.
    pub tokens: usize,
    pub tokens_per_sec: f64,
    /// Model FLOPs per second (6 x parameters x tokens plus attention), in TFLOP/s.
    pub tflops: f64,
    /// Against the card's dense bf16 datasheet peak; absent on the CPU and on a card whose peak is not known
    /// (`device::peak_bf16_tflops`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

pub const METRICS_FILE: &str = "metrics.jsonl";

/// The step of any line: step lines, and event lines (`"event"` and `"step"`, such as a resume with a
/// changed config).
#[derive(Deserialize)]
struct AtStep {
    step: usize,
}

/// Appends to `metrics.jsonl`. On resume, lines past the resumed step (written after that checkpoint by
/// the run that stopped) are dropped, so the file reads as one uninterrupted run.
pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: &Path, resume_step: usize) -> Result<Self> {
        let kept: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<AtStep>(l).is_ok_and(|m| m.step <= resume_step))
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        // Through a temporary file: a kill here must not lose the lines that are kept.
        crate::model::hf::write_atomic(path, |tmp| Ok(std::fs::write(tmp, &text)?))?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self { file })
    }

    /// A step line, or an event line (an object with `step` and `event`).
    pub fn log(&mut self, line: &impl Serialize) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }
}

pub fn progress_bar(total: usize, done: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .expect("static template"),
    );
    bar.set_position(done as u64);
    bar.reset_eta();
    bar
}

/// Training FLOPs per token: 6 per parameter (forward and backward of every matmul, the tied head
/// counted once) plus attention's `12 x layers x seq x (heads x head_dim)`.
pub fn flops_per_token(cfg: &crate::config::ModelConfig, seq: usize) -> f64 {
    let q_width = cfg.num_attention_heads * cfg.head_dim();
    6.0 * cfg.num_parameters() as f64 + 12.0 * (cfg.num_hidden_layers * seq * q_width) as f64
}

/// The dense bf16 peak (TFLOP/s) of `device`'s datasheet, for MFU; None on the CPU and on a card whose peak
/// is not known.
pub fn peak_tflops(device: &candle_core::Device) -> Option<f64> {
    crate::device::gpu_name(device).and_then(|name| crate::device::peak_bf16_tflops(&name))
}

/// Rank 0's reporting for a run: a line per step in `metrics.jsonl`, the progress bar, without a terminal a
/// progress line every 5% of the run and at every dev loss, and `loss.png` at each checkpoint and at the end.
pub struct Reporter {
    out: std::path::PathBuf,
    log: MetricsLog,
    bar: ProgressBar,
    total: usize,
    flops_per_token: f64,
    /// The card's dense bf16 peak (TFLOP/s) for MFU; None on the CPU or an unknown card.
    peak_tflops: Option<f64>,
}

impl Reporter {
    /// Opens `OUT/metrics.jsonl` for a run at `step` of `total` (a resumed run keeps the lines up to its
    /// step) and records the config changes a resume accepted.
    pub fn open(
        out: &Path,
        step: usize,
        total: usize,
        flops_per_token: f64,
        peak_tflops: Option<f64>,
        accepted_changes: &[String],
    ) -> Result<Self> {
        let mut log = MetricsLog::open(&out.join(METRICS_FILE), step)?;
        if !accepted_changes.is_empty() {
            log.log(&serde_json::json!({"step": step, "event": "resumed with changes", "changes": accepted_changes}))?;
        }
        Ok(Self { out: out.to_path_buf(), log, bar: progress_bar(total, step), total, flops_per_token, peak_tflops })
    }

    /// Records optimizer step `step` that took `secs`.
    pub fn step(
        &mut self,
        step: usize,
        r: &super::StepResult,
        dev_loss: Option<f64>,
        lr: f64,
        secs: f64,
    ) -> Result<()> {
        let tokens_per_sec = r.tokens as f64 / secs;
        let tflops = tokens_per_sec * self.flops_per_token / 1e12;
        self.log.log(&StepMetrics {
            step,
            loss: r.loss,
            dev_loss,
            lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            tokens_per_sec,
            tflops,
            mfu: self.peak_tflops.map(|peak| tflops / peak),
        })?;
        let status = format!(
            "loss {:.4}{} lr {lr:.2e} {:.0} tok/s",
            r.loss,
            dev_loss.map(|d| format!(" dev {d:.4}")).unwrap_or_default(),
            tokens_per_sec
        );
        let total = self.total;
        if self.bar.is_hidden() && (step.is_multiple_of(total.div_ceil(20)) || step == total || dev_loss.is_some()) {
            eprintln!("step {step}/{total} {status}");
        }
        self.bar.set_message(status);
        self.bar.inc(1);
        Ok(())
    }

    /// Redraws `OUT/loss.png` from the metrics. The picture is a convenience: failing to draw it warns, and
    /// training goes on.
    pub fn draw_loss(&self) {
        self.bar.suspend(|| {
            if let Err(e) = crate::plot::plot_run(&self.out) {
                let png = self.out.join(crate::plot::LOSS_PNG);
                eprintln!("warning: {} not written: {}", png.display(), crate::cli::message(&e));
            }
        });
    }

    /// The run stopped early: the bar stays as it is.
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
