//! What the programs in `src/bin/` share.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::tokenizer::template::{ChatTemplate, TemplateChoice};
use crate::tokenizer::Tokenizer;

/// Runs a program's body and prints its error with the whole context chain on one line
/// (`error: loading ...: model.safetensors: missing tensor ...`), instead of a debug dump.
pub fn run(body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
