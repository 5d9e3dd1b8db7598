//! What the programs in `src/bin/` share.

use std::path::Path;
use std::process::{ExitCode, Termination};

use anyhow::Result;

use crate::tokenizer::template::{ChatTemplate, TemplateChoice};
use crate::tokenizer::Tokenizer;

/// Runs a program's body and prints its error with the whole context chain on one line
/// (`error: loading ...: model.safetensors: missing tensor ...`), instead of a debug dump. A bad input is
/// the user's to fix, so no backtrace is printed for it, even under `RUST_BACKTRACE=1` (candle attaches
/// one to its errors then); panics, which are bugs, keep theirs.
pub fn run<T: Termination>(body: impl FnOnce() -> anyhow::Result<T>) -> ExitCode {
    match body() {
        Ok(t) => t.report(),
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain joined by ": ", without candle's backtraces.
pub fn message(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => candle_message(c),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

/// `arg` as a POSIX shell reads it back: as it is when that is safe, else in single quotes.
pub fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    match !arg.is_empty() && arg.chars().all(safe) {
        true => arg.to_string(),
        false => format!("'{}'", arg.replace('\'', r"'\''")),
    }
}

/// The chat options of the programs that prompt a model or render data.
#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// The chat template: auto (the checkpoint's own when it has one, else Bessie's), checkpoint, bessie,
    /// or the path of a Jinja file. Use what the model was fine-tuned with.
    #[arg(long, default_value = "auto", value_name = "auto|checkpoint|bessie|FILE")]
    pub template: TemplateChoice,
    /// The system message of conversations without one; with the Bessie template it replaces Bessie's
    /// system prompt.
    #[arg(long)]
    pub system: Option<String>,
}

impl ChatArgs {
    /// The tokenizer of the checkpoint `dir` (checked to fit a model of `model_vocab` ids) and the chat
    /// template these options choose.
    pub fn load(&self, dir: &Path, model_vocab: usize) -> Result<(Tokenizer, ChatTemplate)> {
        let tok = Tokenizer::from_dir(dir)?;
        tok.check_fits(model_vocab, &dir.join("config.json"))?;
        let template = ChatTemplate::load(&self.template, dir, &tok, self.system.as_deref())?;
        Ok((tok, template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_are_left_out() {
        let inner = Box::new(candle_core::Error::Msg("shape mismatch".into()));
        let backtrace = Box::new(std::backtrace::Backtrace::force_capture());
        let e = candle_core::Error::WithBacktrace { inner, backtrace }.context("reading x.safetensors");
        assert!(e.to_string().contains('\n'), "candle's own message has the backtrace: {e}");
        let e = anyhow::Error::from(e).context("loading the model");
        assert_eq!(message(&e), "loading the model: reading x.safetensors: shape mismatch");
    }

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(shell_quote("runs/a=b.toml"), "runs/a=b.toml");
        assert_eq!(shell_quote("data.system_prompt=You are Bessie."), "'data.system_prompt=You are Bessie.'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
