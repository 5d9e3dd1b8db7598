//! Supervised fine-tuning of BitNet b1.58 models (the Rust counterpart of the original `train.py`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use bessie::config::run::RunConfig;
use bessie::dist::Communicator;
use bessie::train::bench::BenchOptions;
use bessie::train::run_dir::Start;
use clap::Parser;

/// Fine-tune a BitNet b1.58 model on JSONL prompt/response data.
///
/// With no arguments it trains the built-in demo (configs/tiny.toml of the Bessie checkout, found in the
/// current directory or above this program: a small random BitNet on the example data in data/tiny) on
/// the CPU in a minute or two. Checkpoints go to checkpoint.out_dir:
/// checkpoint-STEP/ every checkpoint.every steps (the newest checkpoint.keep kept), final_checkpoint/ at
/// the end, metrics.jsonl with one line per step. A new run refuses an out_dir that holds another run
/// (see --resume and --overwrite), and one out_dir takes one run at a time (bessie-train.lock).
///
/// Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and exits with status 130, saying
/// how to resume; a second Ctrl-C exits at once.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML run config (see configs/). Default: the built-in demo, the checkout's configs/tiny.toml.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-4 --set data.train=my.jsonl (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest complete checkpoint in checkpoint.out_dir. Refused when the checkpoint
    /// was saved under another configuration (data, model, trajectory-defining keys, global batch).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// With --resume: continue even though the configuration changed; each change is recorded in
    /// metrics.jsonl and run_config.toml.
    #[arg(long, requires = "resume")]
    resume_changed: bool,
    /// Start afresh in an out_dir that holds another run, moving that run into out_dir/previous-run-N
    /// (nothing is deleted).
    #[arg(long)]
    overwrite: bool,
    /// Benchmark instead of training: timed optimizer steps on a random model (see --shape, --seq,
    /// --batch, --accum, --steps), one JSON line on stdout. Under mpirun every rank runs --batch x --accum
    /// sequences per step on its own GPU, with the gradient all-reduce of real training. --set applies to
    /// the defaults' [train] keys (e.g. train.recompute=blocks) and model.rope_scaling*; --config is not read.
    #[arg(long)]
    bench: bool,
    /// Benchmark model shape, any of bessie-init-model's (tiny, large, 2b4t, falcon3-1b, ...), with its real vocabulary.
    #[arg(long, default_value = "large", requires = "bench")]
    shape: String,
    /// Benchmark sequence length.
    #[arg(long, default_value_t = 768, requires = "bench")]
    seq: usize,
    /// Benchmark micro-batch (sequences per forward and backward).
    #[arg(long, default_value_t = 8, requires = "bench")]
    batch: usize,
    /// Benchmark gradient accumulation: micro-batches per optimizer step (and per all-reduce).
    #[arg(long, default_value_t = 1, requires = "bench")]
    accum: usize,
    /// Benchmark timed steps (after 2 untimed warm-up steps).
    #[arg(long, default_value_t = 10, requires = "bench")]
    steps: usize,
    /// Benchmark device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", requires = "bench")]
    device: String,
    /// Benchmark: also report milliseconds per phase of the step.
    #[arg(long, requires = "bench")]
    profile: bool,
}

fn main() -> ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

/// What the shell exit status of a Ctrl-C'd program is.
const INTERRUPTED: u8 = 130;

fn body(args: Args) -> Result<ExitCode> {
    let comm = Communicator::from_env()?;
    if args.bench {
        let o = BenchOptions {
            shape: args.shape,
            seq: args.seq,
            batch: args.batch,
            accum: args.accum,
            warmup: 2,
            steps: args.steps,
            device: args.device,
            profile: args.profile,
            config: RunConfig::for_bench(&args.overrides)?,
        };
        let result = comm.or_abort(bessie::train::bench::bench(&o, &comm))?;
        if comm.is_main() {
            println!("{}", serde_json::to_string(&result)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = RunConfig::load(args.config.as_deref(), &args.overrides)?;
    let demo = args.config.is_none();
    let start = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume { accept_changes: args.resume_changed },
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    let summary = comm.or_abort(bessie::train::run(&cfg, &comm, start))?;
    if !comm.is_main() {
        return Ok(ExitCode::SUCCESS);
    }
    let dir = bessie::cli::shell_path(&summary.final_dir);
    if summary.interrupted {
        // The same command, resuming (and no longer overwriting).
        let again: Vec<String> = std::env::args()
            .filter(|a| a != "--overwrite" && a != "--resume")
            .chain(["--resume".to_string()])
            .map(|a| bessie::cli::shell_quote(&a))
            .collect();
        eprintln!(
            "interrupted after step {} of {}; saved {}\ncontinue with: {}",
            summary.steps,
            summary.total_steps,
            dir,
            again.join(" ")
        );
        return Ok(ExitCode::from(INTERRUPTED));
    }
    // The demo ends by showing that its model learned: its answers to the dev questions, scored.
    if demo && !cfg.data.dev.as_os_str().is_empty() {
        let device = bessie::device::parse_device(&cfg.train.device)?;
        let scores = bessie::eval::evaluate_checkpoint(&summary.final_dir, &cfg.data.dev, &device)?;
        let dev = cfg.data.dev.canonicalize().unwrap_or_else(|_| cfg.data.dev.clone());
        println!("answers to the {} dev questions of {}:\n{scores}", scores.overall.count, dev.display());
    }
    println!(
        "trained {} steps{}; final model in {dir}\nprompt it with: cargo run --release --bin bessie-prompt -- -m {dir}",
        summary.steps,
        summary.last_loss.map(|l| format!(" (last loss {l:.4})")).unwrap_or_default(),
    );
    Ok(ExitCode::SUCCESS)
}
