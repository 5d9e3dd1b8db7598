//! Training checkpoints that survive a crash.
//!
//! `OUT/checkpoint-STEP/` holds the model in the Hugging Face layout (f32 latent weights, `config.json`,
//! tokenizer files, so any checkpoint can be prompted or evaluated directly), `optimizer.safetensors`
//! (AdamW moments), `trainer_state.json` (step, data position) and `run_config.toml`. It is written under
//! a temporary name and renamed into place once complete, so `checkpoint-*` directories are always whole;
//! only then are old ones beyond `keep` removed. `final_checkpoint/` is written the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::model::hf::{self, Layout};
use crate::train::params::ParamLayout;

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
pub const RUN_CONFIG_FILE: &str = "run_config.toml";
pub const FINAL_DIR: &str = "final_checkpoint";

/// Where training stands; with the data order a function of (seed, epoch), this is enough to continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Rows of this epoch's global order already trained on (all ranks together).
    pub epoch_rows_done: usize,
    /// Data-order seed; resuming with another seed would silently train on another order.
    pub seed: u64,
}

/// Writes a run's checkpoints; holds what does not change between them.
pub struct CheckpointWriter<'a> {
    pub out_dir: &'a Path,
    pub model_cfg: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub tokenizer_files: &'a [PathBuf],
    pub run_config: &'a str,
    /// How many `checkpoint-STEP` directories to keep.
    pub keep: usize,
}

impl CheckpointWriter<'_> {
    /// Writes `OUT/checkpoint-STEP/` atomically, then removes all but the newest `keep` checkpoints. `m` and
    /// `v` are AdamW's whole moments ([`crate::train::optim::AdamW::gather_moments`]), so any number of ranks can resume it.
    pub fn save(&self, params: &Tensor, m: &Tensor, v: &Tensor, state: &TrainerState) -> Result<PathBuf> {
        let dir = self.out_dir.join(format!("checkpoint-{}", state.step));
        write_dir_atomic(&dir, |tmp| {
            self.save_model(tmp, params)?;
            let moments = HashMap::from([("exp_avg".to_string(), m.clone()), ("exp_avg_sq".to_string(), v.clone())]);
            candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER_FILE))?;
            std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
            Ok(())
        })?;
        for (_, old) in list(self.out_dir)?.into_iter().rev().skip(self.keep.max(1)) {
            // Out of the `checkpoint-*` names first, so a kill mid-delete never leaves a partial one there.
            let name = old.file_name().context("checkpoint without a name")?.to_string_lossy().into_owned();
            let doomed = self.out_dir.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&old, &doomed).with_context(|| format!("renaming {}", old.display()))?;
            std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
        }
        Ok(dir)
    }

    /// Writes `OUT/final_checkpoint/` in the Hugging Face layout only (what the Python side loads).
    pub fn save_final(&self, params: &Tensor) -> Result<PathBuf> {
        let dir = self.out_dir.join(FINAL_DIR);
        write_dir_atomic(&dir, |tmp| self.save_model(tmp, params))?;
        Ok(dir)
    }

    fn save_model(&self, dir: &Path, params: &Tensor) -> Result<()> {
        let named = self.layout.named(params)?;
        hf::save(dir, self.model_cfg, &named, DType::F32, Layout::Safetensors, self.tokenizer_files)?;
        Ok(std::fs::write(dir.join(RUN_CONFIG_FILE), self.run_config)?)
    }
}

/// Complete checkpoints in `out_dir`, oldest first.
fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(out_dir) else { return Ok(found) };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint in `out_dir`.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(out_dir)?.pop().map(|(_, p)| p))
}

/// A checkpoint read back for resuming.
pub struct Resumed {
    pub params: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub state: TrainerState,
}

pub fn load(dir: &Path, layout: &ParamLayout, device: &Device) -> Result<Resumed> {
    let (_, vb) = hf::open(dir, DType::F32, device)?;
    let params = layout.load(&vb, device)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut opt =
        candle_core::safetensors::load(&opt_path, device).with_context(|| format!("reading {}", opt_path.display()))?;
    let mut moment = |name: &str| -> Result<Tensor> {
        let t = opt.remove(name).with_context(|| format!("{}: missing tensor `{name}`", opt_path.display()))?;
        if t.dims() != [layout.total] {
            bail!(
                "{}: `{name}` has shape {:?}, the model has {} parameters",
                opt_path.display(),
                t.dims(),
                layout.total
            );
        }
        Ok(t)
    };
    let (m, v) = (moment("exp_avg")?, moment("exp_avg_sq")?);
    let state_path = dir.join(STATE_FILE);
    let state = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("parsing {}", state_path.display()))?;
    Ok(Resumed { params, m, v, state })
}

/// Removes what killed runs left in `out_dir`: `.NAME.tmp-PID` and `.NAME.old-PID` entries (directories
/// being written or deleted) whose process no longer runs. Partial checkpoints are model-sized.
pub fn remove_stale_temporaries(out_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out_dir) else { return Ok(()) };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let pid = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-").or_else(|| n.rsplit_once(".old-")));
        let Some((_, pid)) = pid else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Fills a temporary sibling directory, fsyncs it, and renames it over `dir` (an existing `dir` is moved
/// aside first and removed after, since a directory cannot be renamed onto a non-empty one).
fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().context("checkpoint path without a name")?.to_string_lossy().into_owned();
    let parent = dir.parent().context("checkpoint path without a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp).with_context(|| format!("writing {}", dir.display()))?;
    for e in std::fs::read_dir(&tmp)? {
        std::fs::File::open(e?.path())?.sync_all()?;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    std::fs::File::open(parent)?.sync_all()?;
    if replaced {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let out = tempfile::tempdir().unwrap();
        let dead = out.path().join(".checkpoint-5.tmp-4000000000"); // beyond Linux's pid range
        let alive = out.path().join(format!(".checkpoint-6.tmp-{}", std::process::id()));
        let old = out.path().join(".checkpoint-1.old-4000000000");
        let file = out.path().join(".metrics.jsonl.tmp-4000000000");
        let kept = out.path().join("checkpoint-4");
        for d in [&dead, &alive, &old, &kept] {
            std::fs::create_dir_all(d.join("x")).unwrap();
        }
        std::fs::write(&file, "").unwrap();
        remove_stale_temporaries(out.path()).unwrap();
        assert!(!dead.exists() && !old.exists() && !file.exists());
        assert!(alive.exists() && kept.exists());
    }
}
