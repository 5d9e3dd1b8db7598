//! Building and checking training data: SQuAD v2 to Bessie JSONL, and a report on any JSONL file.

use std::path::PathBuf;

use anyhow::Result;
use bessie::tokenizer::{template::ChatTemplate, Tokenizer};
use clap::{Parser, Subcommand};

/// Build and check Bessie training and dev data (JSONL with `prompt` and `response`).
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert the official SQuAD v2 JSON (train-v2.0.json, dev-v2.0.json) to JSONL.
    ///
    /// One line per question: prompt "Context: {context}\n\nQuestion: {question}", response the first
    /// answer or "Not in context." for an unanswerable question, source "squad_v2", id the official
    /// question id. With --dev each line also lists every distinct answer in `answers` (empty for an
    /// unanswerable question), what bessie-eval scores against.
    Squad {
        /// The official SQuAD v2 JSON file.
        #[arg(short, long)]
        input: PathBuf,
        /// Output JSONL file.
        #[arg(short, long)]
        out: PathBuf,
        /// Keep all answers (for bessie-eval).
        #[arg(long)]
        dev: bool,
    },
    /// Validate a JSONL file for training and measure it under the chat template.
    ///
    /// Reports every problem bessie-train would (with FILE:LINE), then the example counts (per `source`,
    /// and answerable/unanswerable where lines carry `answers`), the token-length percentiles of the
    /// rendered examples (BOS, system prompt, prompt, response, end marker) and how many examples
    /// --max-seq-len would truncate.
    Check {
        /// The JSONL file.
        file: PathBuf,
        /// Directory with the tokenizer files: a checkpoint (also --model) or a tokenizer directory.
        #[arg(short, long, visible_alias = "model")]
        tokenizer: PathBuf,
        /// The training max sequence length (data.max_seq_len).
        #[arg(long, default_value_t = 512)]
        max_seq_len: usize,
        /// The system prompt training uses (data.system_prompt); default: Bessie's.
        #[arg(long)]
        system: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    match args.command {
        Command::Squad { input, out, dev } => {
            let stats = bessie::squad::convert(&input, &out, dev)?;
            println!("{}: {stats}", out.display());
        }
        Command::Check { file, tokenizer, max_seq_len, system } => {
            let tok = Tokenizer::from_dir(&tokenizer)?;
            let report = bessie::data::check(&file, &tok, &ChatTemplate::new(system.as_deref()), max_seq_len)?;
            print!("{}: {report}", file.display());
        }
    }
    Ok(())
}
