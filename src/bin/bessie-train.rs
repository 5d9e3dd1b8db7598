//! Supervised fine-tuning of BitNet b1.58 models (the Rust counterpart of the original `train.py`).

use std::path::PathBuf;

use anyhow::Result;
use bessie::config::run::RunConfig;
use clap::Parser;

/// Fine-tune a BitNet b1.58 model on JSONL prompt/response data.
///
/// With no arguments it trains the built-in demo (configs/tiny.toml: a small random BitNet on the
/// example data in data/tiny) on the CPU in a minute or two. Checkpoints go to checkpoint.out_dir:
/// checkpoint-STEP/ every checkpoint.every steps (the newest checkpoint.keep kept), final_checkpoint/ at
/// the end, metrics.jsonl with one line per step.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML run config (see configs/). Default: the built-in demo, configs/tiny.toml.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-4 --set data.train=my.jsonl (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest complete checkpoint in checkpoint.out_dir.
    #[arg(long)]
    resume: bool,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let cfg = RunConfig::load(args.config.as_deref(), &args.overrides)?;
    let summary = bessie::train::run(&cfg, args.resume)?;
    println!(
        "trained {} steps{}; final model in {}\nprompt it with: cargo run --release --bin bessie-prompt -- -m {}",
        summary.steps,
        summary.last_loss.map(|l| format!(" (last loss {l:.4})")).unwrap_or_default(),
        summary.final_dir.display(),
        summary.final_dir.display()
    );
    Ok(())
}
