//! Building and checking training data: SQuAD v2 to Bessie JSONL, and a report on any JSONL file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use bessie::cli::ChatArgs;
use bessie::tokenizer::{template::ChatTemplate, Tokenizer};
use clap::{Parser, Subcommand};

/// Build and check Bessie training and dev data (JSONL with `prompt` and `response`, or `messages`).
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
    /// Lines hold `prompt` and `response`, or `messages` (a list of {role, content} turns). Reports every
    /// problem bessie-train would (with FILE:LINE; the first 20 in full, then a count), the example counts
    /// (per format, per `source`, and answerable/unanswerable where lines carry `answers`), the share of
    /// tokens the loss trains on (the assistant turns), the token-length percentiles of the rendered
    /// examples and how many examples --max-seq-len would truncate. Exits with an error when bessie-train
    /// would refuse the file.
    Check {
        /// The JSONL file.
        file: PathBuf,
        /// The tokenizer: a checkpoint directory (also --model), a tokenizer.json or a tokenizer.model.
        #[arg(short, long, visible_alias = "model")]
        tokenizer: PathBuf,
        /// The training max sequence length (data.max_seq_len).
        #[arg(long, default_value_t = 512)]
        max_seq_len: usize,
        #[command(flatten)]
        chat: ChatArgs,
    },
    /// Print the token ids of a text as a JSON array, as bessie-train tokenizes it.
    ///
    /// Special tokens written in the text (`<|eot_id|>`, `</s>`) become their ids, as transformers does by
    /// default. With --file, one array per line of the file.
    Tokenize {
        /// The tokenizer: a checkpoint directory (also --model), a tokenizer.json or a tokenizer.model.
        #[arg(short, long, visible_alias = "model")]
        tokenizer: PathBuf,
        /// The text.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        /// A text file: each line on its own (without its newline).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Put the BOS id first.
        #[arg(long)]
        bos: bool,
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
        Command::Check { file, tokenizer, max_seq_len, chat } => {
            let tok = Tokenizer::load(&tokenizer)?;
            let dir =
                if tokenizer.is_dir() { tokenizer.as_path() } else { tokenizer.parent().unwrap_or(Path::new(".")) };
            let template = ChatTemplate::load(&chat.template, dir, &tok, chat.system.as_deref())?;
            let report = bessie::data::check(&file, &tok, &template, max_seq_len)?;
            print!("{}: chat template {}\n{report}", file.display(), template.origin());
            ensure!(!report.refused(), "bessie-train would refuse {} as it is (see above)", file.display());
        }
        Command::Tokenize { tokenizer, text, file, bos } => {
            let tok = Tokenizer::load(&tokenizer)?;
            let mut out = std::io::stdout().lock();
            let mut print = |line: &str| -> Result<()> {
                let ids = tok.encode(line, bos)?;
                Ok(writeln!(out, "{}", serde_json::to_string(&ids)?)?)
            };
            match (text, file) {
                (Some(text), _) => print(&text)?,
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    for line in text.lines() {
                        print(line)?;
                    }
                }
                (None, None) => unreachable!("clap requires --text or --file"),
            }
        }
    }
    Ok(())
}
