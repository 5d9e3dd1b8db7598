//! What the programs in `src/bin/` share.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Termination};

use anyhow::{Context, Result};

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
    shell_words::quote(arg).into_owned()
}

/// `path` for a command line to be pasted: absolute, with `.`, `..` and links resolved (for a path that
/// does not exist yet, its directory's), and quoted for the shell.
pub fn shell_path(path: &Path) -> String {
    let resolved = path.canonicalize().ok().or_else(|| {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(dir.canonicalize().ok()?.join(path.file_name()?))
    });
    let resolved = resolved.or_else(|| std::path::absolute(path).ok()).unwrap_or_else(|| path.to_path_buf());
    shell_quote(&resolved.to_string_lossy())
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

/// Where a chat program's messages come from: a terminal, with line editing and history (rustyline), or
/// any other stdin (a pipe, a file), read line by line as it is.
pub enum Lines {
    Terminal { editor: Box<rustyline::DefaultEditor>, history: Option<PathBuf> },
    Piped(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Lines {
    /// Line editing on a terminal, keeping the lines entered in `history` (read now, written at each
    /// line) when given; stdin as it is otherwise.
    pub fn stdin(history: Option<&Path>) -> Result<Lines> {
        if !std::io::stdin().is_terminal() {
            return Ok(Lines::Piped(std::io::stdin().lock().lines()));
        }
        let mut editor = rustyline::DefaultEditor::new().context("setting up line editing on the terminal")?;
        if let Some(h) = history.filter(|h| h.exists()) {
            editor.load_history(h).with_context(|| format!("reading the history file {}", h.display()))?;
        }
        Ok(Lines::Terminal { editor: Box::new(editor), history: history.map(Path::to_path_buf) })
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Lines::Terminal { .. })
    }

    /// The next line, showing `prompt` on a terminal; None at the end (Ctrl-D on a terminal). Ctrl-C
    /// drops the line being typed.
    pub fn next(&mut self, prompt: &str) -> Result<Option<String>> {
        use rustyline::error::ReadlineError;
        let (editor, history) = match self {
            Lines::Piped(lines) => return Ok(lines.next().transpose()?),
            Lines::Terminal { editor, history } => (editor, history),
        };
        loop {
            match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        editor.add_history_entry(line.as_str())?;
                        if let Some(h) = history {
                            editor
                                .save_history(h)
                                .with_context(|| format!("writing the history file {}", h.display()))?;
                        }
                    }
                    return Ok(Some(line));
                }
                Err(ReadlineError::Interrupted) => continue,
                // rustyline has ended the prompt's line already, so the shell's prompt starts on its own.
                Err(ReadlineError::Eof) => return Ok(None),
                Err(e) => return Err(e).context("reading a line from the terminal"),
            }
        }
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
        assert_eq!(shell_quote("runs/tiny/final_checkpoint"), "runs/tiny/final_checkpoint");
        assert_eq!(shell_quote("data.system_prompt=You are Bessie."), "'data.system_prompt=You are Bessie.'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn pasted_paths_are_resolved_and_quoted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let run = root.join("my runs").join("tiny");
        std::fs::create_dir_all(&run).unwrap();
        let quoted = |p: &Path| shell_quote(p.to_str().unwrap());
        // `..` and `.` go; the space is quoted.
        let messy = root.join("my runs/./tiny/../tiny");
        assert_eq!(shell_path(&messy), quoted(&run));
        assert!(shell_path(&messy).starts_with('\'') && !shell_path(&messy).contains(".."));
        // A path to be created: its directory resolved, its name kept.
        assert_eq!(shell_path(&root.join("my runs/../my runs/damaged-x")), quoted(&run.with_file_name("damaged-x")));
        // A link is followed to where it leads.
        std::os::unix::fs::symlink(&run, root.join("link")).unwrap();
        assert_eq!(shell_path(&root.join("link")), quoted(&run));
    }
}
