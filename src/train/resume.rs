//! How a run begins ([`begin`]): fresh from the base model, or from the newest intact checkpoint with
//! `--resume`. What `--resume` checks before continuing: that the checkpoint was saved by the same run (the
//! trajectory-defining keys of the run config, the data, the global batch) and that its trainer state fits
//! this run. A changed run is refused, naming each difference, unless the user accepts the changes
//! (`--resume-changed`); a different rank count with the same global batch passes with a notice, since
//! gradients are summed over ranks and micro-batches before the update.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::metrics::METRICS_FILE;
use super::moments::Moments;
use super::optim::AdamW;
use super::run_dir::Start;
use super::{optimizer_shard, StepContext};
use crate::checkpoint::{self, RunIdentity, TrainerState};
use crate::config::run::TrainSection;
use crate::data::Dataset;
use crate::dist::Communicator;

/// Keys that change how a run is carried out but not its trajectory; they may differ on resume.
/// `model.path`: the weights come from the checkpoint (the tokenizer is part of the data fingerprint);
/// `data.train`: the data is compared by content; micro-batch and accumulation: by the global batch.
const NOT_TRAJECTORY: [&str; 15] = [
    "model.path",
    "data.train",
    "data.dev",
    "train.micro_batch",
    "train.grad_accum",
    "train.device",
    "train.grad_dtype",
    "train.grad_buffer",
    "train.step_timeout",
    "train.recompute",
    "train.attention_block",
    "train.loss_chunk",
    "train.check_memory",
    "train.zero1",
    "train.step_weights",
];
/// Sections that are all operational.
const NOT_TRAJECTORY_SECTIONS: [&str; 2] = ["checkpoint", "log"];
/// How run_config.toml records an accepted change (a comment line each, kept by later saves).
pub const CHANGE_NOTE: &str = "# resumed at step ";

/// CRC-32 of the tokenized examples (each one's trained ranges and ids): what the data, the tokenizer, the
/// template and the data options made of them.
pub fn data_fingerprint(ds: &Dataset) -> String {
    let mut h = crc32fast::Hasher::new();
    for ex in &ds.examples {
        h.update(&(ex.trained.len() as u64).to_le_bytes());
        for r in &ex.trained {
            h.update(&(r.start as u64).to_le_bytes());
            h.update(&(r.end as u64).to_le_bytes());
        }
        h.update(&(ex.ids.len() as u64).to_le_bytes());
        for id in &ex.ids {
            h.update(&id.to_le_bytes());
        }
    }
    format!("{:08x}", h.finalize())
}

/// How a resumed run differs from the checkpoint it continues.
#[derive(Debug, Default, PartialEq)]
pub struct Differences {
    /// What changes the trajectory, one line each.
    pub changes: Vec<String>,
    /// What may differ, said once (another split of the same global batch, an older checkpoint).
    pub notices: Vec<String>,
}

fn split(id: &RunIdentity) -> String {
    let ranks = if id.world_size == 1 { "1 rank".to_string() } else { format!("{} ranks", id.world_size) };
    format!("{ranks} x micro-batch {} x accumulation {}", id.micro_batch, id.grad_accum)
}

/// Compares the checkpoint's `run_config.toml` text and recorded identity (None: saved by an older
/// version) with this run's.
pub fn compare(
    saved_toml: &str,
    saved: Option<&RunIdentity>,
    now_toml: &str,
    now: &RunIdentity,
) -> Result<Differences> {
    let parse = |text: &str, what: &str| -> Result<toml::Table> {
        text.parse().map_err(|e| anyhow::anyhow!("parsing the {what} run config: {e}"))
    };
    let (then_cfg, now_cfg) = (parse(saved_toml, "checkpoint's")?, parse(now_toml, "current")?);
    let mut d = Differences::default();
    for (section, fields) in &now_cfg {
        let (Some(toml::Value::Table(fields)), Some(toml::Value::Table(then_fields))) =
            (Some(fields), then_cfg.get(section))
        else {
            continue;
        };
        if NOT_TRAJECTORY_SECTIONS.contains(&section.as_str()) {
            continue;
        }
        for (key, value) in fields {
            let name = format!("{section}.{key}");
            // A key the checkpoint's version did not have cannot be compared.
            let Some(then) = then_fields.get(key) else { continue };
            if then != value && !NOT_TRAJECTORY.contains(&name.as_str()) {
                d.changes.push(format!("{name}: {then} in the checkpoint, {value} now"));
            }
        }
    }
    let Some(then) = saved else {
        d.notices.push("the checkpoint predates data and batch records: those are not checked".into());
        return Ok(d);
    };
    if then.data_fingerprint != now.data_fingerprint {
        d.changes.push(format!(
            "data: the tokenized training examples differ (fingerprint {}, {} examples in the checkpoint; {}, {} \
             now): data.train, the tokenizer, the system prompt or the data options changed",
            then.data_fingerprint, then.data_examples, now.data_fingerprint, now.data_examples
        ));
    }
    if then.global_batch() != now.global_batch() {
        d.changes.push(format!(
            "global batch: {} sequences per step in the checkpoint ({}), {} now ({})",
            then.global_batch(),
            split(then),
            now.global_batch(),
            split(now)
        ));
    } else if then != now {
        d.notices.push(format!(
            "the same global batch of {} sequences per step, split as {} (the checkpoint: {})",
            now.global_batch(),
            split(now),
            split(then)
        ));
    }
    Ok(d)
}

/// Refuses a trainer state this run cannot continue from (a damaged or foreign `trainer_state.json`):
/// `epoch_rows(e)` is the number of rows of epoch `e`.
pub fn check_state(
    state: &TrainerState,
    total_steps: usize,
    epochs: usize,
    epoch_rows: impl Fn(usize) -> usize,
) -> Result<()> {
    if state.step > total_steps {
        bail!("step {} is beyond this run's {total_steps} steps", state.step);
    }
    if state.epoch >= epochs {
        bail!("epoch {} is beyond this run's {epochs} epochs (counted from 0)", state.epoch);
    }
    let rows = epoch_rows(state.epoch);
    if state.epoch_rows_done > rows {
        bail!("{} rows of epoch {} done, but the epoch has {rows}", state.epoch_rows_done, state.epoch);
    }
    Ok(())
}

/// What a run starts from: the latent weights, the optimizer, the trainer state (where in the data), the run
/// config to record (with the changes earlier resumes accepted) and the changes this one accepted.
pub struct Begun {
    pub params: Tensor,
    pub adam: AdamW,
    pub state: TrainerState,
    pub run_toml: String,
    pub accepted_changes: Vec<String>,
}

/// What a run is, for [`begin`]: its run config as TOML, what else defines its trajectory, its optimizer
/// steps and the number of rows of each epoch.
pub struct ThisRun<'a> {
    pub toml: String,
    pub identity: RunIdentity,
    pub total_steps: usize,
    pub train: &'a TrainSection,
    pub epoch_rows: &'a dyn Fn(usize) -> usize,
}

/// Starts the run as `start` says: from the newest intact checkpoint in `out` (checked against `run`), or
/// from the base model's weights in `vb` with fresh optimizer state. `note` tells the user (rank 0).
pub fn begin(
    out: &Path,
    start: Start,
    run: ThisRun,
    ctx: &StepContext,
    comm: &Communicator,
    vb: VarBuilder,
    note: &dyn Fn(String),
) -> Result<Begun> {
    let t = run.train;
    let shard = optimizer_shard(t, comm, ctx.layout.total);
    let resumed = match start {
        Start::Resume { .. } => checkpoint::newest_intact(out)?,
        _ => None,
    };
    let Some(dir) = resumed else {
        if let Start::Resume { .. } = start {
            note(format!("--resume: no checkpoint in {}; starting from the beginning", out.display()));
        }
        let state = TrainerState { step: 0, epoch: 0, epoch_rows_done: 0, seed: t.seed, run: Some(run.identity) };
        let params = ctx.layout.load(&vb, &ctx.device)?;
        let adam = AdamW::zeros(shard, t.optimizer_state, &ctx.device)?;
        return Ok(Begun { params, adam, state, run_toml: run.toml, accepted_changes: Vec::new() });
    };
    let r = checkpoint::load(&dir, &ctx.layout, &ctx.device)?;
    let state_file = dir.join(checkpoint::STATE_FILE);
    check_state(&r.state, run.total_steps, t.epochs, run.epoch_rows)
        .with_context(|| format!("{}: the trainer state does not fit this run", state_file.display()))?;
    let saved_config = dir.join(checkpoint::RUN_CONFIG_FILE);
    let saved_toml =
        std::fs::read_to_string(&saved_config).with_context(|| format!("reading {}", saved_config.display()))?;
    let d = compare(&saved_toml, r.state.run.as_ref(), &run.toml, &run.identity)
        .with_context(|| saved_config.display().to_string())?;
    for n in &d.notices {
        note(format!("resuming: {n}"));
    }
    // Changes accepted earlier stay on record in every later run config.
    let mut history: String =
        saved_toml.lines().filter(|l| l.starts_with(CHANGE_NOTE)).map(|l| format!("{l}\n")).collect();
    if !d.changes.is_empty() {
        if start != (Start::Resume { accept_changes: true }) {
            bail!(
                "{} was saved by a different run: {}. Resume with the checkpoint's settings, or pass \
                 --resume-changed to continue with the new ones (recorded in {METRICS_FILE} and {})",
                dir.display(),
                d.changes.join("; "),
                checkpoint::RUN_CONFIG_FILE
            );
        }
        note(format!("resuming with changes (--resume-changed): {}", d.changes.join("; ")));
        history += &format!("{CHANGE_NOTE}{} with changes: {}\n", r.state.step, d.changes.join("; "));
    }
    note(format!("resuming from {} (step {})", dir.display(), r.state.step));
    // A checkpoint holds the whole moments in f32, whatever the world size and the optimizer state it was
    // saved with.
    let mine = |x: &Tensor| x.narrow(0, shard.start, shard.len());
    let moments = Moments::from_f32(&mine(&r.m)?, &mine(&r.v)?, t.optimizer_state, &ctx.device)?;
    let adam = AdamW::new(moments, r.state.step as u64, shard.clone());
    let state = TrainerState { run: Some(run.identity), ..r.state };
    Ok(Begun { params: r.params, adam, state, run_toml: history + &run.toml, accepted_changes: d.changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(world_size: usize, micro_batch: usize, grad_accum: usize, data: &str) -> RunIdentity {
        RunIdentity { data_fingerprint: data.into(), data_examples: 10, world_size, micro_batch, grad_accum }
    }

    #[test]
    fn differences_are_named_and_operational_keys_ignored() {
        let then = "[train]\nlr = 0.0002\nseed = 42\ndevice = \"cpu\"\nmicro_batch = 4\n[log]\ndev_every = 5\n";
        let now =
            "[train]\nlr = 0.001\nseed = 42\ndevice = \"cuda\"\nmicro_batch = 2\nnew_key = 1\n[log]\ndev_every = 9\n";
        let d = compare(then, Some(&id(2, 4, 2, "aa")), now, &id(1, 4, 2, "bb")).unwrap();
        assert_eq!(d.changes.len(), 3, "{d:?}");
        assert_eq!(d.changes[0], "train.lr: 0.0002 in the checkpoint, 0.001 now");
        assert!(d.changes[1].starts_with("data: the tokenized training examples differ (fingerprint aa"), "{d:?}");
        assert_eq!(
            d.changes[2],
            "global batch: 16 sequences per step in the checkpoint (2 ranks x micro-batch 4 x accumulation 2), 8 now \
             (1 rank x micro-batch 4 x accumulation 2)"
        );
        // Two ranks resumed on one with twice the accumulation: the same steps, with a notice.
        let d = compare(then, Some(&id(2, 4, 2, "aa")), then, &id(1, 4, 4, "aa")).unwrap();
        assert!(d.changes.is_empty() && d.notices.len() == 1, "{d:?}");
        assert!(d.notices[0].contains("the same global batch of 16"), "{d:?}");
        let d = compare(then, Some(&id(2, 4, 2, "aa")), then, &id(2, 4, 2, "aa")).unwrap();
        assert_eq!(d, Differences::default());
    }

    #[test]
    fn a_state_beyond_the_run_is_refused() {
        let state = |step, epoch, epoch_rows_done| TrainerState { step, epoch, epoch_rows_done, seed: 1, run: None };
        check_state(&state(10, 1, 8), 10, 2, |_| 8).unwrap();
        let e = check_state(&state(usize::MAX >> 1, 0, 0), 10, 2, |_| 8).unwrap_err().to_string();
        assert!(e.contains("beyond this run's 10 steps"), "{e}");
        let e = check_state(&state(3, 2, 0), 10, 2, |_| 8).unwrap_err().to_string();
        assert!(e.contains("epoch 2 is beyond this run's 2 epochs"), "{e}");
        let e = check_state(&state(3, 0, usize::MAX - 1), 10, 2, |_| 8).unwrap_err().to_string();
        assert!(e.contains("but the epoch has 8"), "{e}");
    }
}
