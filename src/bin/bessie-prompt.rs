//! Interactive prompting of a BitNet b1.58 model (the Rust counterpart of the original `scripts/prompt.py`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use bessie::generate::{check_prompt_fits, generate, parse_temperature, parse_top_p, Sampler};
use bessie::tokenizer::{template::ChatTemplate, Tokenizer};
use clap::Parser;

/// Chat with a base or fine-tuned BitNet b1.58 model.
///
/// Reads one prompt per line from the terminal or a pipe (or answers `--prompt` once), renders it with
/// the Bessie chat template, and streams the answer until EOS, the 🐂 end marker or --max-new-tokens.
/// After each answer it prints the prompt-processing and decoding speed to stderr.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Checkpoint directory in the Hugging Face layout (config.json, weights, tokenizer files): latent
    /// weights, or a packed checkpoint from bessie-export.
    #[arg(short, long)]
    model: PathBuf,
    /// Answer this prompt and exit instead of reading prompts from stdin.
    #[arg(short, long)]
    prompt: Option<String>,
    /// Replace Bessie's system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature, at least 0; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature)]
    temperature: f64,
    /// Nucleus sampling: sample from the most likely tokens whose probabilities add up to this, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = parse_top_p)]
    top_p: f64,
    /// Seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N (auto takes the first GPU when there is one).
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> std::process::ExitCode {
    bessie::cli::run(|| body(Args::parse()))
}

fn body(args: Args) -> Result<()> {
    let device = bessie::device::parse_device(&args.device)?;
    let model = bessie::model::load(&args.model, &device)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let template = ChatTemplate::new(args.system.as_deref());
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut answer = |prompt: &str| -> Result<()> {
        let ids = tokenizer.encode(&template.generation_prompt(prompt), true)?;
        check_prompt_fits(ids.len(), model.max_positions())?;
        let mut out = std::io::stdout();
        let g = generate(&model, &tokenizer, &ids, args.max_new_tokens, &mut sampler, |text| {
            out.write_all(text.as_bytes())?;
            Ok(out.flush()?)
        })?;
        println!();
        eprintln!("{}", g.report());
        Ok(())
    };
    if let Some(prompt) = &args.prompt {
        return answer(prompt);
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Bessie on {:?}. One prompt per line; Ctrl-D to quit.", device);
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("\nUser: ");
        }
        let Some(line) = lines.next().transpose()? else { break };
        if !line.trim().is_empty() {
            answer(line.trim())?;
        }
    }
    Ok(())
}
