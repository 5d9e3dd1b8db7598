//! What the programs in `src/bin/` share.

use std::process::ExitCode;

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
