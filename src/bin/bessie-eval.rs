//! SQuAD v2 evaluation of a BitNet b1.58 model (the original project's `tools/eval.py`, which it left as a
//! TODO).

use std::path::PathBuf;

use anyhow::{Context, Result};
use bessie::dist::Communicator;
use bessie::eval;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

/// Evaluate a model on a SQuAD v2 dev file, or re-score existing predictions.
///
/// Answers every question greedily (batched, at most --max-new-tokens, stopping at the checkpoint's
/// end-of-turn ids or the Bessie template's 🐂 end marker) and writes one line per question to --out:
/// the input fields plus `guess`, `is_correct` (the original project's check: equal to an answer
/// ignoring case, or containing "not in context" for an unanswerable question), `exact_match` and `f1` (SQuAD v2's official normalized metrics; "Not in
/// context." is the abstention), `model` and `time` (seconds until the answer was complete). Prints a
/// table split into HasAns / NoAns and writes it to eval_summary.json beside --out.
///
/// Dev lines need `prompt` and `answers` (a list; empty for an unanswerable question); `bessie-data squad
/// --dev` writes them from the official dev-v2.0.json.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Checkpoint directory in the Hugging Face layout: latent weights, or a packed checkpoint from bessie-export.
    #[arg(short, long, required_unless_present = "predictions", conflicts_with = "predictions")]
    model: Option<PathBuf>,
    /// Dev JSONL file: `prompt` and `answers` on every line.
    #[arg(short, long, required_unless_present = "predictions", conflicts_with = "predictions")]
    dev: Option<PathBuf>,
    /// Output JSONL, one line per question. With --predictions: optional, the re-scored lines.
    #[arg(short, long, required_unless_present = "predictions")]
    out: Option<PathBuf>,
    /// Re-score this bessie-eval output (its `guess` and `answers` fields) without a model; the summary
    /// goes beside --out, or beside this file without --out.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Evaluate only the first N questions.
    #[arg(short = 'n', long)]
    limit: Option<usize>,
    /// Prompts generated together.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Stop an answer after this many new tokens (the original used 50).
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// auto, cpu, cuda or cuda:N (auto takes the first GPU when there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    #[command(flatten)]
    chat: bessie::cli::ChatArgs,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let comm = Communicator::from_env()?;
    comm.or_abort(run(&args, &comm))
}

fn run(args: &Args, comm: &Communicator) -> Result<()> {
    // Fail now, not after hours of generation, when the output cannot be written. (Not when re-scoring:
    // --out may be the predictions file itself.)
    if let (Some(out), None, true) = (&args.out, &args.predictions, comm.is_main()) {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let scored = match &args.predictions {
        Some(path) => Some(eval::rescore(path, args.limit)?),
        None => evaluate(args, comm)?,
    };
    // Only rank 0 holds the merged answers.
    let Some((lines, summary)) = scored else { return Ok(()) };
    if let Some(out) = &args.out {
        eval::write_lines(out, &lines)?;
    }
    let beside = args.out.as_ref().or(args.predictions.as_ref()).context("--out is required")?;
    let summary_path = eval::write_summary(beside, &summary)?;
    print!("{summary}");
    let lines_path = args.out.as_ref().map(|o| format!("{} and ", o.display())).unwrap_or_default();
    eprintln!("[wrote {lines_path}{}]", summary_path.display());
    Ok(())
}

fn evaluate(args: &Args, comm: &Communicator) -> Result<Option<eval::Scored>> {
    let (model_dir, dev) = (args.model.as_ref().context("--model")?, args.dev.as_ref().context("--dev")?);
    let examples = eval::read_dev(dev, args.limit)?;
    let device = bessie::device::rank_device(&args.device, comm.local_rank())?;
    let model = bessie::model::load(model_dir, &device)?;
    let (tokenizer, template) = args.chat.load(model_dir, model.cfg.vocab_size)?;
    // Rank 0 shows the progress of its own shard, which stands for all: shards are equal to within one.
    let total = eval::shard(&examples, comm.rank(), comm.world()).len();
    let bar = if comm.is_main() { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} questions, {per_sec} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("static template"),
    );
    let name = model_dir.display().to_string();
    let mut done = 0;
    let progress = |n: usize| {
        bar.inc(n as u64);
        // Without a terminal the bar is hidden; logs get a line every 5% instead.
        let every = total.div_ceil(20);
        if comm.is_main() && bar.is_hidden() && ((done + n) / every > done / every || done + n == total) {
            eprintln!("{}/{total} questions", done + n);
        }
        done += n;
    };
    let (batch, max_new) = (args.batch_size, args.max_new_tokens);
    let scored = eval::evaluate(&model, &tokenizer, &template, &examples, batch, max_new, &name, comm, progress)?;
    bar.finish_and_clear();
    Ok(scored)
}
