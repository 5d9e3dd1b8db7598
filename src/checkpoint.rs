//! Training checkpoints that survive a crash.
//!
//! `OUT/checkpoint-STEP/` holds the model in the Hugging Face layout (f32 latent weights, `config.json`,
//! tokenizer files, so any checkpoint can be prompted or evaluated directly), `optimizer.safetensors`
//! (AdamW moments), `trainer_state.json` (step, data position, what defines the run), `run_config.toml`,
//! the chat template trained with (`chat_template.jinja`, so prompting the checkpoint uses it),
//! and `checksums.json` (`manifest`) over all of them. It is written under a temporary name and renamed
//! into place once complete, so `checkpoint-*` directories are always whole; only then are old ones beyond
//! `keep` removed. `final_checkpoint/` is written the same way. Weights or moments holding NaN or Inf are
//! never saved: every checkpoint is one a run can continue from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::manifest;
use crate::model::hf::{self, Layout};
use crate::tokenizer::template::TEMPLATE_FILE;
use crate::train::params::ParamLayout;

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
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
    /// What else defines the run's trajectory (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunIdentity>,
}

/// What a resumed run must share with the one that saved the checkpoint, besides the trajectory-defining
/// keys of `run_config.toml` (`train::resume` compares them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// CRC-32 of the tokenized training examples (ids and trained spans): changes with the data file, the
    /// tokenizer, the system prompt or the data options.
    pub data_fingerprint: String,
    pub data_examples: usize,
    pub world_size: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
}

impl RunIdentity {
    /// Sequences per optimizer step, all ranks together.
    pub fn global_batch(&self) -> usize {
        // From a file: saturating, so a damaged trainer state compares unequal instead of overflowing.
        self.micro_batch.saturating_mul(self.grad_accum).saturating_mul(self.world_size)
    }
}

/// Writes a run's checkpoints; holds what does not change between them.
pub struct CheckpointWriter<'a> {
    pub out_dir: &'a Path,
    pub model_cfg: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub tokenizer_files: &'a [PathBuf],
    /// The chat template trained with, written as `chat_template.jinja` (`ChatTemplate::standalone`).
    pub chat_template: &'a str,
    pub run_config: &'a str,
    /// How many `checkpoint-STEP` directories to keep.
    pub keep: usize,
    /// A checkpoint every this many steps; 0: none before the final model.
    pub every: usize,
}

impl CheckpointWriter<'_> {
    /// Whether step `step` of `total` ends with a checkpoint: every `every` steps before the last (whose
    /// model `save_final` writes), and whenever the run stops early (`stop`).
    pub fn due(&self, step: usize, total: usize, stop: bool) -> bool {
        stop || self.every > 0 && step.is_multiple_of(self.every) && step < total
    }

    /// Writes `OUT/checkpoint-STEP/` atomically, then removes all but the newest `keep` checkpoints. `m` and
    /// `v` are AdamW's whole moments ([`crate::train::optim::AdamW::gather_moments`]), so any number of ranks can resume it.
    pub fn save(&self, params: &Tensor, m: &Tensor, v: &Tensor, state: &TrainerState) -> Result<PathBuf> {
        let dir = self.out_dir.join(format!("checkpoint-{}", state.step));
        let refused = || format!("not saving {} after step {}", dir.display(), state.step);
        for (what, flat) in [("weight", params), ("AdamW moment exp_avg of", m), ("AdamW moment exp_avg_sq of", v)] {
            ensure_finite(self.layout, what, flat).with_context(refused)?;
        }
        write_dir_atomic(&dir, |tmp| {
            self.save_model(tmp, params)?;
            let moments = HashMap::from([("exp_avg".to_string(), m.clone()), ("exp_avg_sq".to_string(), v.clone())]);
            candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER_FILE))?;
            std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
            Ok(())
        })?;
        for (_, old) in list(self.out_dir)?.into_iter().rev().skip(self.keep.max(1)) {
            // Out of the `checkpoint-*` names first, so a kill mid-delete never leaves a partial one there
            // (and under another suffix than a replaced directory's, which a restart may restore).
            let name = old.file_name().context("checkpoint without a name")?.to_string_lossy().into_owned();
            let doomed = self.out_dir.join(format!(".{name}.deleting-{}", std::process::id()));
            std::fs::rename(&old, &doomed).with_context(|| format!("renaming {}", old.display()))?;
            std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))?;
        }
        Ok(dir)
    }

    /// Writes `OUT/final_checkpoint/` in the Hugging Face layout only (what the Python side loads).
    pub fn save_final(&self, params: &Tensor) -> Result<PathBuf> {
        let dir = self.out_dir.join(FINAL_DIR);
        ensure_finite(self.layout, "weight", params).with_context(|| format!("not saving {}", dir.display()))?;
        write_dir_atomic(&dir, |tmp| self.save_model(tmp, params))?;
        Ok(dir)
    }

    fn save_model(&self, dir: &Path, params: &Tensor) -> Result<()> {
        let named = self.layout.named(params)?;
        hf::save(dir, self.model_cfg, &named, DType::F32, Layout::Safetensors, self.tokenizer_files)?;
        std::fs::write(dir.join(TEMPLATE_FILE), self.chat_template)?;
        Ok(std::fs::write(dir.join(RUN_CONFIG_FILE), self.run_config)?)
    }
}

/// Refuses a flat buffer holding NaN or Inf, naming the first such tensor: one reduction over the buffer
/// (cheap on a GPU); the culprit is searched for only when it fails.
fn ensure_finite(layout: &ParamLayout, what: &str, flat: &Tensor) -> Result<()> {
    if flat.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
        return Ok(());
    }
    for (name, t) in layout.named(flat)? {
        let values = crate::device::to_host(&t.flatten_all()?.to_dtype(DType::F32)?)?.to_vec1::<f32>()?;
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            bail!("{what} `{name}` holds {v}: the training diverged");
        }
    }
    // Finite values whose sum overflowed f32.
    Ok(())
}

/// Complete checkpoints in `out_dir`, oldest first.
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
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

/// The newest checkpoint in `out_dir`, its checksums verified. A damaged one is an error that says so and
/// names the newest intact one to continue from instead.
pub fn newest_intact(out_dir: &Path) -> Result<Option<PathBuf>> {
    let mut all = list(out_dir)?;
    let Some((_, newest)) = all.pop() else { return Ok(None) };
    let Err(damage) = manifest::verify(&newest) else { return Ok(Some(newest)) };
    let name = newest.file_name().unwrap_or_default().to_string_lossy();
    let aside = out_dir.join(format!("damaged-{name}"));
    let offer = match all.into_iter().rev().find(|(_, p)| manifest::verify(p).is_ok()) {
        Some((_, previous)) => format!(
            "the previous one, {}, is intact: move the damaged one aside (mv {} {}) and run with --resume again \
             to continue from it",
            previous.display(),
            crate::cli::shell_path(&newest),
            crate::cli::shell_path(&aside)
        ),
        None => "no earlier intact checkpoint is left".to_string(),
    };
    Err(damage.context(format!("the newest checkpoint {} is damaged; {offer}", newest.display())))
}

/// A checkpoint read back for resuming.
pub struct Resumed {
    pub params: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub state: TrainerState,
}

/// Reads a checkpoint to resume from (one `newest_intact` verified).
pub fn load(dir: &Path, layout: &ParamLayout, device: &Device) -> Result<Resumed> {
    let (_, vb) = hf::open(dir, DType::F32, device)?;
    let params = layout.load(&vb, device)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    // The moments stay in host memory: the optimizer takes its share of them, in the form it keeps them.
    let mut opt = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .with_context(|| format!("reading {}", opt_path.display()))?;
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

/// Cleans up after killed runs in `out_dir`: `.NAME.tmp-PID`, `.NAME.old-PID` and `.NAME.deleting-PID`
/// entries whose process no longer runs are removed (partial checkpoints are model-sized). A run killed
/// between the two renames that replace a directory (`write_dir_atomic`) left no `NAME` at all: the new
/// copy (complete, since the old one is moved aside only then) or else the old one is put back first.
pub fn remove_stale_temporaries(out_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out_dir) else { return Ok(()) };
    let mut stale = Vec::new();
    for e in entries {
        let path = e?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(hidden) = name.strip_prefix('.') else { continue };
        let parts = ["tmp", "old", "deleting"]
            .into_iter()
            .find_map(|kind| hidden.rsplit_once(&format!(".{kind}-")).map(|(base, pid)| (base, kind, pid)));
        let Some((base, kind, pid)) = parts else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            stale.push((base.to_string(), kind, pid.to_string(), path));
        }
    }
    for (base, kind, pid, old) in &stale {
        let target = out_dir.join(base);
        if *kind != "old" || target.exists() {
            continue;
        }
        let new = out_dir.join(format!(".{base}.tmp-{pid}"));
        let from = if new.is_dir() && manifest::verify(&new).is_ok() { &new } else { old };
        std::fs::rename(from, &target)
            .with_context(|| format!("restoring {} from {}", target.display(), from.display()))?;
    }
    for (_, _, _, path) in stale.iter().filter(|(_, _, _, p)| p.symlink_metadata().is_ok()) {
        let meta = path.symlink_metadata()?;
        if meta.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
            .with_context(|| format!("removing {}", path.display()))?;
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
    manifest::write(&tmp)?;
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
        let old = out.path().join(".checkpoint-1.deleting-4000000000");
        let file = out.path().join(".metrics.jsonl.tmp-4000000000");
        let kept = out.path().join("checkpoint-4");
        for d in [&dead, &alive, &old, &kept] {
            std::fs::create_dir_all(d.join("x")).unwrap();
        }
        std::fs::write(&file, "").unwrap();
        remove_stale_temporaries(out.path()).unwrap();
        assert!(!dead.exists() && !old.exists() && !file.exists());
        assert!(alive.exists() && kept.exists());
        assert!(!out.path().join("checkpoint-1").exists(), "a checkpoint being deleted stays deleted");
    }

    /// A diverged step's weights or moments are refused before anything is written, naming the tensor.
    #[test]
    fn non_finite_weights_are_never_saved() {
        let out = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::shape("tiny", 300).unwrap();
        let layout = ParamLayout::new(&cfg);
        let writer = CheckpointWriter {
            out_dir: out.path(),
            model_cfg: &cfg,
            layout: &layout,
            tokenizer_files: &[],
            chat_template: "",
            run_config: "",
            keep: 2,
            every: 1,
        };
        let state = TrainerState { step: 7, epoch: 0, epoch_rows_done: 0, seed: 1, run: None };
        let good = Tensor::full(0.5f32, layout.total, &Device::Cpu).unwrap();
        let slot = &layout.slots[layout.index("model.layers.1.mlp.up_proj.weight")];
        let mut values = vec![0.5f32; layout.total];
        values[slot.offset + 3] = f32::INFINITY;
        let bad = Tensor::from_vec(values, layout.total, &Device::Cpu).unwrap();
        for (p, m, what) in [(&bad, &good, "weight"), (&good, &bad, "AdamW moment exp_avg of")] {
            let e = format!("{:#}", writer.save(p, m, &good, &state).unwrap_err());
            assert!(
                e.contains("checkpoint-7 after step 7") && e.contains(&format!("{what} `{}` holds inf", slot.name)),
                "{e}"
            );
        }
        let e = format!("{:#}", writer.save_final(&bad).unwrap_err());
        assert!(e.contains("not saving") && e.contains("holds inf"), "{e}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "nothing written");
        writer.save(&good, &good, &good, &state).unwrap();
        manifest::verify(&out.path().join("checkpoint-7")).unwrap();
    }

    /// A kill between the two renames that replace `final_checkpoint` leaves only the hidden copies.
    #[test]
    fn a_directory_killed_mid_replacement_is_restored() {
        let out = tempfile::tempdir().unwrap();
        let (old, new) =
            (out.path().join(".final_checkpoint.old-4000000000"), out.path().join(".final_checkpoint.tmp-4000000000"));
        let final_dir = out.path().join(FINAL_DIR);
        for (dir, text) in [(&old, "old"), (&new, "new")] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("model.safetensors"), text).unwrap();
            manifest::write(dir).unwrap();
        }
        remove_stale_temporaries(out.path()).unwrap();
        assert_eq!(std::fs::read_to_string(final_dir.join("model.safetensors")).unwrap(), "new");
        assert!(!old.exists() && !new.exists());

        // The new copy damaged: the old one comes back instead.
        std::fs::rename(&final_dir, &old).unwrap();
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("model.safetensors"), "ne").unwrap();
        std::fs::copy(old.join(manifest::MANIFEST_FILE), new.join(manifest::MANIFEST_FILE)).unwrap();
        remove_stale_temporaries(out.path()).unwrap();
        assert_eq!(std::fs::read_to_string(final_dir.join("model.safetensors")).unwrap(), "new");
        assert!(!old.exists() && !new.exists());
    }
}
