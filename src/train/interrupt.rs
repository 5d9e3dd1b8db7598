//! Ctrl-C and SIGTERM during training: the first one is noted, and the run finishes its step, saves a
//! checkpoint and stops (`train::run` checks `Interrupt::requested` after each step); a second one ends
//! the process at once (status 130), for when the user cannot wait for the step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// The signals that ask a run to stop, once installed.
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as it was before this signal: set only by an earlier one.
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&flag))
                .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&flag)))
                .context("installing the Ctrl-C handler")?;
        }
        Ok(Self { flag })
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}
