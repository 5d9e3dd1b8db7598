//! SQuAD v2 evaluation of a BitNet b1.58 model (the original project's `tools/eval.py`, which it left as a
//! TODO).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bessie::dist::Communicator;
use bessie::eval::{self, PartialOutput};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

/// Evaluate a model on a SQuAD v2 dev file, or re-score existing predictions.
///
/// Answers every question greedily (batched, at most --max-new-tokens, stopping at the checkpoint's
/// end-of-turn ids or the Bessie template's 🐂 end marker) and writes one line per question to --out:
/// the input fields plus `guess`, `is_correct` (the original project's check: equal to an answer
/// ignoring case, or containing "not in context" for an unanswerable question), `exact_match` and `f1`
/// (those of SQuAD v2's official script; a guess normalizing as "Not in context." does is the official
/// empty prediction, right on an unanswerable question as "" is), `model` and `time` (seconds until the
/// answer was complete). Prints a table split into HasAns / NoAns and writes it beside --out, named after
/// it (eval.jsonl -> eval_summary.json).
///
/// Answers are written to OUT.partial as they complete, and --out is replaced only once all are done, so
/// a failed or interrupted evaluation never costs the previous output; --resume continues from
/// OUT.partial. A question whose prompt does not fit the model's context is skipped with a warning (its
/// line has a `skipped` field, and it scores 0, also on an unanswerable question).
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
    /// goes beside --out, or beside this file without --out (keeping the speed of the run that generated
    /// it, from that run's summary).
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Continue an interrupted evaluation from OUT.partial (the same model, dev file, --max-new-tokens,
    /// --template and --system).
    #[arg(long, conflicts_with = "predictions")]
    resume: bool,
    /// Evaluate only the first N questions.
    #[arg(short = 'n', long)]
    limit: Option<usize>,
    /// Prompts generated together (continuous batching: a row whose answer ends takes the next prompt).
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
    let scored = match &args.predictions {
        Some(path) => Some(rescore(args, path)?),
        None => evaluate(args, comm)?,
    };
    // Only rank 0 holds the merged answers.
    let Some((lines, summary, partial)) = scored else { return Ok(()) };
    if let Some(out) = &args.out {
        eval::write_lines(out, &lines)?;
    }
    let named_after = args.out.as_ref().or(args.predictions.as_ref()).context("--out is required")?;
    let summary_path = eval::write_summary(named_after, &summary)?;
    if let Some(partial) = partial {
        partial.finish()?;
    }
    print!("{summary}");
    let lines_path = args.out.as_ref().map(|o| format!("{} and ", o.display())).unwrap_or_default();
    eprintln!("[wrote {lines_path}{}]", summary_path.display());
    Ok(())
}

type Outcome = (Vec<serde_json::Map<String, serde_json::Value>>, eval::Summary, Option<PartialOutput>);

/// Re-scores predictions, keeping the speed block of the summary of the run that generated them.
fn rescore(args: &Args, predictions: &Path) -> Result<Outcome> {
    let (lines, mut summary) = eval::rescore(predictions, args.limit)?;
    summary.speed = eval::earlier_speed(predictions);
    Ok((lines, summary, None))
}

/// Refuses an output that would destroy an input: the dev file itself (also through a link), or a
/// summary path that is the dev file.
fn check_output(out: &Path, dev: &Path) -> Result<()> {
    if out.is_dir() {
        bail!("--out {} is a directory; name a file", out.display());
    }
    for (what, path) in [("--out", out.to_path_buf()), ("the summary", eval::summary_path(out))] {
        if eval::same_file(&path, dev) {
            bail!("{what} {} is the dev file {}: writing it would destroy the dev set", path.display(), dev.display());
        }
    }
    Ok(())
}

fn evaluate(args: &Args, comm: &Communicator) -> Result<Option<Outcome>> {
    let (model_dir, dev) = (args.model.as_ref().context("--model")?, args.dev.as_ref().context("--dev")?);
    let out = args.out.as_ref().context("--out")?;
    // Everything is checked before anything is written; --out itself is replaced only at the end.
    let examples = eval::read_dev(dev, args.limit)?;
    check_output(out, dev)?;
    let device = bessie::device::rank_device(&args.device, comm.local_rank())?;
    let model = bessie::model::load(model_dir, &device)?;
    let (tokenizer, template) = args.chat.load(model_dir, model.cfg.vocab_size)?;
    let name = model_dir.display().to_string();
    let header = eval::PartialHeader {
        model: name.clone(),
        dev: dev.display().to_string(),
        max_new_tokens: args.max_new_tokens,
        template: format!("{:?}", args.chat.template),
        system: args.chat.system.clone(),
    };
    let (mut partial, done) = match comm.is_main() {
        true => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let (partial, done) = PartialOutput::open(out, &header, args.resume, examples.len())?;
            if !done.is_empty() {
                eprintln!("--resume: {} of {} questions answered already", done.len(), examples.len());
            }
            (Some(partial), done)
        }
        false => (None, Default::default()),
    };
    // Rank 0 shows the progress of its own shard, which stands for all: shards are equal to within one.
    let total = eval::shard(&examples, comm.rank(), comm.world()).len().saturating_sub(done.len() / comm.world());
    let bar = if comm.is_main() { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} questions, {per_sec} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("static template"),
    );
    let mut progress_done = 0;
    let started = std::time::Instant::now();
    let progress = |n: usize| {
        bar.inc(n as u64);
        // Without a terminal the bar is hidden; logs get a line every 5% instead.
        let every = total.div_ceil(20).max(1);
        if comm.is_main()
            && bar.is_hidden()
            && ((progress_done + n) / every > progress_done / every || progress_done + n == total)
        {
            eprintln!("{}", eval::progress_line(progress_done + n, total, started.elapsed().as_secs_f64()));
        }
        progress_done += n;
    };
    let record = |answers: &[(usize, eval::Guess)]| match partial.as_mut() {
        Some(p) => p.append(answers),
        None => Ok(()),
    };
    let settings =
        eval::Settings { batch_size: args.batch_size, max_new_tokens: args.max_new_tokens, model_name: &name };
    let scored = eval::evaluate(&model, &tokenizer, &template, &examples, done, &settings, comm, record, progress)?;
    bar.finish_and_clear();
    let Some((lines, summary)) = scored else { return Ok(None) };
    if summary.skipped > 0 {
        eprintln!(
            "warning: {} questions skipped: their prompts do not fit the model's context (the `skipped` field of \
             their output lines says by how much)",
            summary.skipped
        );
    }
    Ok(Some((lines, summary, partial)))
}
