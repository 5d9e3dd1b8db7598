//! Draws the loss curves of one or more runs into one PNG picture.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

/// Draw the train and dev losses of one or more runs against the step, to compare them in one picture.
///
/// Each run is a metrics.jsonl written by bessie-train (training also draws each run's own loss.png
/// beside it). Train losses are solid lines, dev losses dashed, one colour per run, named after the
/// directory holding its metrics.jsonl.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// metrics.jsonl files (or run directories holding one).
    #[arg(required = true)]
    metrics: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(short, long, default_value = "loss.png")]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let runs = args.metrics.iter().map(|p| bessie::plot::read_metrics(p)).collect::<Result<Vec<_>>>()?;
    bessie::plot::draw(&runs, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
