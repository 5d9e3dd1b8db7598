//! Interactive prompting of a BitNet b1.58 model (the Rust counterpart of the original `scripts/prompt.py`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use bessie::generate::{check_prompt_fits, parse_temperature, parse_top_p, Sampler, Session, Stop};
use bessie::tokenizer::template::Message;
use clap::Parser;

/// Chat with a base or fine-tuned BitNet b1.58 model.
///
/// Reads one message per line from the terminal or a pipe (or answers `--prompt` once) and keeps the
/// conversation: each answer sees the turns before it, rendered with the chat template (the
/// checkpoint's own, or Bessie's for checkpoints without one). A line `/reset` starts a new
/// conversation; `--single-turn` answers every line on its own. When the conversation outgrows the
/// model's context, its oldest turns are left out (and a note says so). Answers stream until an
/// end-of-turn id (EOS, generation_config.json's eos_token_id), the Bessie template's 🐂 end marker or
/// --max-new-tokens. Each turn processes only the tokens its prompt adds to the last turn's: the
/// conversation's keys and values stay cached. After each answer it prints the prompt-processing and
/// decoding speed to stderr (and how many prompt tokens came from the cache).
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
    /// Answer each line on its own instead of continuing one conversation.
    #[arg(long)]
    single_turn: bool,
    #[command(flatten)]
    chat: bessie::cli::ChatArgs,
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
    /// On a terminal, keep the messages typed (for the arrow keys and Ctrl-R) in this file across
    /// sessions too.
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
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
    let (tokenizer, template) = args.chat.load(&args.model, model.cfg.vocab_size)?;
    let stop = Stop::new(&tokenizer, &template);
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut conversation: Vec<Message> = Vec::new();
    // Each turn processes only what its prompt adds to the last one's (the cache keeps the shared prefix).
    let mut session = Session::new(&model, &tokenizer, &stop);
    let mut answer = |conversation: &mut Vec<Message>, prompt: &str| -> Result<()> {
        conversation.push(Message::new("user", prompt));
        let mut ids = template.prompt_ids(&tokenizer, conversation)?;
        // Earlier turns go first when the context is full: the newest message is what must be answered.
        while check_prompt_fits(ids.len(), model.max_positions()).is_err() && conversation.len() > 1 {
            let next_user = conversation.iter().skip(1).position(|m| m.role == "user").map_or(1, |i| i + 1);
            conversation.drain(..next_user);
            eprintln!("[the conversation outgrew the context: its oldest turn is left out]");
            ids = template.prompt_ids(&tokenizer, conversation)?;
        }
        // A message that alone does not fit is refused, and left out of the conversation.
        if let Err(e) = check_prompt_fits(ids.len(), model.max_positions()) {
            conversation.pop();
            return Err(e);
        }
        let mut out = std::io::stdout();
        let g = session.generate(&ids, args.max_new_tokens, &mut sampler, |text| {
            out.write_all(text.as_bytes())?;
            Ok(out.flush()?)
        })?;
        println!();
        eprintln!("{}", g.report());
        conversation.push(Message::new("assistant", &g.text));
        Ok(())
    };
    if let Some(prompt) = &args.prompt {
        return answer(&mut conversation, prompt);
    }
    let mut lines = bessie::cli::Lines::stdin(args.history.as_deref())?;
    let interactive = lines.is_terminal();
    if interactive {
        eprintln!(
            "Bessie on {:?} ({}). One message per line; /reset starts over; Ctrl-D quits.",
            device,
            template.origin()
        );
    }
    loop {
        if interactive {
            println!();
        }
        let Some(line) = lines.next("User: ")? else { break };
        let line = line.trim();
        if args.single_turn || line == "/reset" {
            conversation.clear();
        }
        if !line.is_empty() && line != "/reset" {
            match answer(&mut conversation, line) {
                // At a terminal a message too long for the context must not end the conversation.
                Err(e) if interactive => eprintln!("error: {}", bessie::cli::message(&e)),
                r => r?,
            }
        }
    }
    Ok(())
}
