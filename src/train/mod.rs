//! Supervised fine-tuning (torchtitan's shape: separate parts joined in one short loop).
//!
//! config -> model and data -> for each optimizer step: this rank's micro-batches -> [`model::forward`] and
//! [`model::backward`] -> gradients summed over micro-batches, then over ranks -> / trained tokens -> clip ->
//! AdamW -> metrics -> checkpoint.
//!
//! Data parallelism: an optimizer step takes `micro_batch x grad_accum x world` rows of the epoch's order
//! and each rank trains on its disjoint share. Since gradients and token counts are summed over ranks before
//! the division, N ranks with accumulation A compute the step of one rank with accumulation N x A. Every rank
//! then takes the same optimizer step (under ZeRO-1, each on its own shard of the parameters:
//! [`optimizer_shard`]); rank 0 alone writes logs, metrics and checkpoints.

pub mod bench;
pub mod cursor;
pub mod grads;
pub mod interrupt;
pub mod layers;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod moments;
pub mod optim;
pub mod params;
pub mod resume;
pub mod run_dir;

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{self, CheckpointWriter, RunIdentity};
use crate::config::run::{GradBuffer, RunConfig, StepWeightsPlan, TrainSection};
use crate::config::ModelConfig;
use crate::data::{self, Batch, DataOptions, Dataset, Row};
use crate::dist::{Communicator, GradReducer, Watchdog};
use crate::model::hf::{self, Layout};
use crate::model::init::{write_random_checkpoint, TokenizerSource};
use crate::tokenizer::{template::ChatTemplate, Tokenizer};
use cursor::DataCursor;
use grads::Gradients;
use interrupt::Interrupt;
use metrics::Reporter;
use model::{BatchTensors, MemoryPlan, RopeTables, StepWeights};
use optim::{AdamW, AdamWHyper};
use params::ParamLayout;
use run_dir::{Lock, Start, BASE_MODEL_DIR, CACHE_DIR};

/// What every step needs and nothing changes: the model's shape, where parameters live, the device.
pub struct StepContext {
    pub model_cfg: ModelConfig,
    pub layout: ParamLayout,
    pub rope: RopeTables,
    pub device: Device,
    pub dtype: DType,
    pub hyper: AdamWHyper,
    pub plan: MemoryPlan,
}

impl StepContext {
    /// For sequences of up to `max_seq_len` tokens.
    pub fn new(model_cfg: ModelConfig, train: &TrainSection, max_seq_len: usize, device: Device) -> Result<Self> {
        let hyper = AdamWHyper {
            beta1: train.beta1,
            beta2: train.beta2,
            eps: train.eps,
            weight_decay: train.weight_decay,
            decay_norms_and_embeddings: train.decay_norms_and_embeddings,
        };
        Ok(Self {
            layout: ParamLayout::new(&model_cfg),
            rope: RopeTables::new(&model_cfg, max_seq_len, &device)?,
            plan: MemoryPlan::new(train),
            dtype: crate::device::compute_dtype(&device),
            model_cfg,
            device,
            hyper,
        })
    }
}

/// Of the whole step, all ranks together.
pub struct StepResult {
    /// Mean loss per trained token.
    pub loss: f64,
    pub grad_norm: f64,
    /// Non-padding tokens processed.
    pub tokens: usize,
}

/// Wall time per phase of a step, taken by synchronizing the device at each phase boundary (which
/// costs a little overlap): `bessie-train --bench --profile`.
pub struct PhaseTimer {
    device: Device,
    last: Instant,
    pub totals: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    pub fn new(device: &Device) -> Self {
        Self { device: device.clone(), last: Instant::now(), totals: Vec::new() }
    }

    fn mark(timer: &mut Option<&mut Self>, phase: &'static str) -> Result<()> {
        let Some(t) = timer else { return Ok(()) };
        t.device.synchronize()?;
        let secs = t.last.elapsed().as_secs_f64();
        match t.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += secs,
            None => t.totals.push((phase, secs)),
        }
        t.last = Instant::now();
        Ok(())
    }
}

/// Summed loss (an f64 scalar on the device) and trained-token count of micro-batches at fixed weights, their
/// gradients summed into `grads` and over the ranks by `reducer`, all of `grads` settled. The last
/// micro-batch's backward hands each finished range of the gradients to the reducer, so the reduction overlaps
/// the rest of the backward; once per optimizer step, not per micro-batch.
fn accumulate(
    ctx: &StepContext,
    w: &StepWeights,
    micro: &[BatchTensors],
    lambda: f64,
    grads: &Gradients,
    mut reducer: GradReducer,
    timer: &mut Option<&mut PhaseTimer>,
) -> Result<(Tensor, usize)> {
    // The loss stays on the device until every micro-batch is queued: one host sync per step.
    let (mut loss, mut tokens) = (Tensor::zeros((), DType::F64, &ctx.device)?, 0);
    for (i, bt) in micro.iter().enumerate() {
        let (l, saved) = model::forward(&ctx.model_cfg, &ctx.layout, w, bt, lambda, ctx.plan, grads)?;
        PhaseTimer::mark(timer, "forward + loss")?;
        let last = i + 1 == micro.len();
        let mut done = |range: Range<usize>| {
            if !last {
                return Ok(());
            }
            // The sum reads all of the range, slots without a gradient included.
            grads.settle(&ctx.layout, range.clone())?;
            reducer.reduce(range)
        };
        model::backward(&ctx.model_cfg, &ctx.layout, w, bt, ctx.plan, saved, grads, &mut done)?;
        PhaseTimer::mark(timer, "backward")?;
        loss = (loss + l)?;
        tokens += bt.loss_tokens;
    }
    // The gradient norm and AdamW read the whole buffer (nothing to fill when the backward handed it all over).
    grads.settle(&ctx.layout, 0..ctx.layout.total)?;
    reducer.finish()?;
    PhaseTimer::mark(timer, "all-reduce (the part not overlapped)")?;
    Ok((loss, tokens))
}

/// This rank's share of the flat buffer for the optimizer: all of it, or with `train.zero1` and several
/// ranks its ZeRO-1 share.
pub fn optimizer_shard(train: &TrainSection, comm: &Communicator, total: usize) -> Range<usize> {
    match train.zero1 {
        true => optim::shard_of(total, comm.rank(), comm.world()),
        false => 0..total,
    }
}

/// This step's weights from the f32 latents `params`, whose `shard` this rank's optimizer updates. Under
/// ZeRO-1 the latents are current in this rank's shard only: each rank quantizes its shard, each matrix's
/// absmean summed over the ranks' parts of it, and the ranks exchange the shards in the compute dtype (half
/// the bytes of exchanging the f32 latents on GPUs). Otherwise every rank builds them from the whole buffer.
/// `sums`: the shard's sums of `|W|` where the last AdamW step left them ([`AdamW::take_abs_sums`], on GPUs),
/// which saves a pass over the latents. With `train.step_weights = "per_block"` only the scales are taken
/// now, and the latents gathered whole under ZeRO-1 (f32, twice the bytes of the weights) for the blocks'
/// weights to be built from when they are needed.
fn step_weights(
    ctx: &StepContext,
    comm: &Communicator,
    params: &Tensor,
    shard: &Range<usize>,
    sums: Option<Tensor>,
    lambda: f64,
) -> Result<StepWeights> {
    let layout = &ctx.layout;
    let whole = shard.len() == layout.total;
    let per_block = ctx.plan.step_weights == StepWeightsPlan::PerBlock;
    let sums = match sums {
        Some(sums) => sums,
        None if whole && !per_block => return StepWeights::new(layout, params, lambda, ctx.dtype),
        None => model::shard_abs_sums(layout, params, shard.clone(), ctx.dtype)?,
    };
    if !whole {
        comm.sum_in_place(&sums)?;
        comm.wait_for_collectives(&ctx.device)?;
    }
    if per_block {
        gather_params(comm, params, shard)?;
        return StepWeights::per_block(layout, params, sums, lambda, ctx.dtype);
    }
    let (flat, int8) = model::shard_step_weights(layout, params, shard.clone(), &sums, lambda, ctx.dtype)?;
    if !whole {
        comm.all_gather_in_place(&flat, &optim::shards(layout.total, comm.world()))?;
        comm.wait_for_collectives(&ctx.device)?;
    }
    StepWeights::from_flat(flat, int8)
}

/// Gives every rank the whole f32 latents: under ZeRO-1 each rank's are current in its `shard` only (the
/// steps exchange the compute-dtype weights instead), so this runs before anything reads all of `params`
/// (checkpoints), on every rank. A no-op otherwise.
pub fn gather_params(comm: &Communicator, params: &Tensor, shard: &Range<usize>) -> Result<()> {
    if shard.len() == params.elem_count() {
        return Ok(());
    }
    comm.all_gather_in_place(params, &optim::shards(params.elem_count(), comm.world()))?;
    comm.wait_for_collectives(params.device())
}

/// One optimizer step on this rank's micro-batches. The parameters are replaced only when the loss is
/// finite, so a NaN leaves the last good weights (and checkpoints) untouched.
// Each argument is a separate input of the step (llm.c's `gpt2_update` style); bundling them would only hide
// the data flow the training loop reads top to bottom.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    ctx: &StepContext,
    train: &TrainSection,
    comm: &Communicator,
    params: &Tensor,
    adam: &mut AdamW,
    micro: &[Batch],
    step: usize,
    lr: f64,
    mut timer: Option<&mut PhaseTimer>,
) -> Result<StepResult> {
    let lambda = optim::quant_lambda(train, step);
    // The batches go to the device first, while the last step's AdamW still runs: each upload waits for the
    // stream, and behind this step's own kernels it would leave the GPU idle while the host catches up.
    let batches =
        micro.iter().map(|b| BatchTensors::new(b, &ctx.rope, ctx.dtype, &ctx.device)).collect::<Result<Vec<_>>>()?;
    PhaseTimer::mark(&mut timer, "batch to device")?;
    let sums = adam.take_abs_sums();
    let w = step_weights(ctx, comm, params, &adam.shard, sums, lambda)?;
    PhaseTimer::mark(&mut timer, "quantize weights")?;
    // A bf16 buffer is summed over the ranks as it is.
    let buffer = train.grad_buffer_dtype(ctx.device.is_cuda(), comm.world()).dtype();
    let wire = match buffer {
        DType::BF16 => buffer,
        _ => train.grad_dtype.dtype(),
    };
    // ZeRO-1: each rank needs the summed gradients of its own shard only, so each part is summed onto its
    // owner (half the traffic of an all-reduce); the rest of this rank's `grads` stays partial.
    let sharded = adam.shard.len() < ctx.layout.total;
    let owners = sharded.then(|| optim::shards(ctx.layout.total, comm.world()));
    let grads = Gradients::new(&ctx.layout, &ctx.device, buffer)?;
    let reducer = comm.grad_reducer(grads.tensor(), wire, owners);
    let (loss_sum, loss_tokens) = accumulate(ctx, &w, &batches, lambda, &grads, reducer, &mut timer)?;
    drop((w, batches));
    let tokens = micro.iter().map(|b| b.segments.iter().filter(|&&s| s != 0).count()).sum::<usize>();
    // The squared gradient norm is queued before the host reads anything back, so that it waits for the GPU
    // once for both. Under ZeRO-1 it is this rank's shard's, summed over the ranks with the other scalars.
    let squares = optim::grad_squares(grads.tensor(), &ctx.layout, adam.shard.clone())?;
    let [loss_sum, squares]: [f64; 2] =
        Tensor::stack(&[loss_sum, squares], 0)?.to_vec1::<f64>()?.try_into().expect("two scalars");
    let mut sums = [loss_sum, loss_tokens as f64, tokens as f64, if sharded { squares } else { 0.0 }];
    comm.all_reduce_sum_f64(&mut sums)?;
    let [loss_sum, loss_tokens, tokens, shard_squares] = sums;
    // Without ZeRO-1 every rank holds the whole summed gradient, and its own squares are the norm's.
    let squares = if sharded { shard_squares } else { squares };
    // The loss is global now, so on a NaN every rank stops here together.
    let loss = loss_sum / loss_tokens.max(1.0);
    if !loss.is_finite() {
        bail!("loss is {loss} at step {}", step + 1);
    }
    // The gradients are sums over the step's tokens: the update divides by their number.
    let per_token = 1.0 / loss_tokens.max(1.0);
    let grad_norm = squares.sqrt() * per_token;
    PhaseTimer::mark(&mut timer, "clip")?;
    if !grad_norm.is_finite() {
        bail!("gradient norm is {grad_norm} at step {}", step + 1);
    }
    let grad_scale = per_token * optim::clip_factor(grad_norm, train.grad_clip);
    // Only `params[adam.shard]` changes: under ZeRO-1 the other ranks' shards of it are stale from now on
    // (the next step weights are built from the shards; checkpoints gather them first).
    adam.step(params, grads.tensor(), &ctx.layout, lr, &ctx.hyper, grad_scale)?;
    drop(grads);
    PhaseTimer::mark(&mut timer, "adamw")?;
    Ok(StepResult { loss, grad_norm, tokens: tokens as usize })
}

/// Mean loss per trained token over a dataset, in batches of `batch` rows, the rows spread over the ranks.
/// `shard` is this rank's optimizer shard ([`optimizer_shard`]), where `params` is current.
// As train_step: each argument is a separate input.
#[allow(clippy::too_many_arguments)]
pub fn dev_loss(
    ctx: &StepContext,
    comm: &Communicator,
    params: &Tensor,
    shard: &Range<usize>,
    ds: &Dataset,
    opts: &DataOptions,
    batch: usize,
    pad: u32,
) -> Result<f64> {
    let w = step_weights(ctx, comm, params, shard, None, 1.0)?;
    // Every row once, all of them: `data::shard` would drop the remainder.
    let rows: Vec<Row> = data::epoch_rows(ds, 0, 0, opts).into_iter().skip(comm.rank()).step_by(comm.world()).collect();
    let mut sums = [0.0, 0.0];
    for chunk in rows.chunks(batch) {
        let b = data::make_batch(ds, chunk, pad);
        let bt = BatchTensors::new(&b, &ctx.rope, ctx.dtype, &ctx.device)?;
        sums[0] += model::loss(&ctx.model_cfg, &ctx.layout, &w, &bt, 1.0, ctx.plan)?;
        sums[1] += b.loss_tokens as f64;
    }
    comm.all_reduce_sum_f64(&mut sums)?;
    Ok(sums[0] / sums[1].max(1.0))
}

/// Where a finished (or interrupted) run left its model.
pub struct RunSummary {
    /// `final_checkpoint`, or the checkpoint an interrupted run saved.
    pub final_dir: PathBuf,
    pub steps: usize,
    pub total_steps: usize,
    pub last_loss: Option<f64>,
    /// Stopped early by Ctrl-C or SIGTERM (`interrupt`).
    pub interrupted: bool,
}

/// The model directory to start from: the configured checkpoint, or `OUT/base-model` for a random model.
fn base_model_dir(cfg: &RunConfig) -> PathBuf {
    match cfg.model.init.is_empty() {
        true => cfg.model.path.clone(),
        false => cfg.checkpoint.out_dir.join(BASE_MODEL_DIR),
    }
}

/// Creates the output directory and locks it for this run, refuses links out of it, cleans up after killed
/// runs, makes it ready for `start` (`run_dir::claim`) and writes the random base model once (demos and
/// benchmarks). Rank 0's job alone: ranks would race on the same files, and on several nodes a rank cannot
/// tell whether another node's temporaries are stale.
fn prepare_out_dir(cfg: &RunConfig, start: Start) -> Result<Lock> {
    let out = &cfg.checkpoint.out_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    run_dir::refuse_links(out)?;
    let lock = Lock::acquire(out)?;
    let base = base_model_dir(cfg);
    for dir in [out, &out.join(BASE_MODEL_DIR)] {
        checkpoint::remove_stale_temporaries(dir)?;
    }
    run_dir::claim(out, start)?;
    if !cfg.model.init.is_empty() && !base.join(hf::SAFETENSORS_FILE).exists() {
        write_random_checkpoint(
            &base,
            &cfg.model.init,
            TokenizerSource::Shipped,
            None,
            cfg.model.init_seed,
            DType::F32,
            Layout::Safetensors,
        )?;
    }
    Ok(lock)
}

/// Refuses token ids beyond the model's vocabulary (a damaged or crafted data cache: the cache reader
/// checks its structure, not the ids), which would otherwise index past the embedding.
fn check_examples(ds: &Dataset, vocab_size: usize, what: &std::path::Path, cache: &std::path::Path) -> Result<()> {
    for (i, ex) in ds.examples.iter().enumerate() {
        if let Some(id) = ex.ids.iter().find(|&&id| id as usize >= vocab_size) {
            bail!(
                "{}: example {} (of {}) has token id {id}, beyond the model's vocabulary of {vocab_size}: the data \
                 cache in {} is damaged; delete that directory to tokenize the file again",
                what.display(),
                i + 1,
                ds.examples.len(),
                cache.display()
            );
        }
    }
    Ok(())
}

/// The newest checkpoint's path, for the message of a run that stopped on an error.
fn last_good(out: &std::path::Path) -> String {
    match checkpoint::latest(out) {
        Ok(Some(dir)) => format!("the last good checkpoint is {} (continue from it with --resume)", dir.display()),
        _ => "no checkpoint was saved yet".into(),
    }
}

/// The model a run starts from, as it will be saved: its config (latent weights in the family it is saved
/// as, the run's RoPE scaling), its weights, tokenizer and chat template, checked against the run before
/// anything is on the device.
struct BaseModel {
    cfg: ModelConfig,
    vb: candle_nn::VarBuilder<'static>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl BaseModel {
    fn open(cfg: &RunConfig, device: &Device, world: usize, note: &dyn Fn(String)) -> Result<Self> {
        let dir = base_model_dir(cfg);
        let (mut model_cfg, vb) = hf::open(&dir, DType::F32, device)?;
        if model_cfg.is_packed_ternary() {
            bail!(
                "{} is a packed ternary export (bessie-export): it has no latent weights to train; train from the \
                 checkpoint it was exported from",
                dir.display()
            );
        }
        if !model_cfg.family()?.ternary && cfg.train.quant_warmup_steps == 0 {
            note(format!(
                "note: {} is a full-precision Llama; its projections train as ternary BitLinear layers from the \
                 first step. train.quant_warmup_steps = N blends the quantizers in over N steps instead (the \
                 Hugging Face 1.58-bit recipe)",
                dir.display()
            ));
        }
        // Checkpoints hold latent weights in the family the model is saved as (a full-precision Llama becomes
        // a `bitnet` Llama).
        model_cfg = model_cfg.latent_form()?;
        // The run config's RoPE scaling replaces the checkpoint's and goes into every saved config.json.
        if let Some(scaling) = cfg.model.rope() {
            model_cfg.set_rope_scaling(Some(scaling));
        }
        model_cfg.check_positions(cfg.data.max_seq_len, "data.max_seq_len")?;
        // Before any weight is on the device: a config that cannot fit fails now, saying what would.
        let t = &cfg.train;
        let shape = memory::StepShape::of_run(&model_cfg, t, t.micro_batch, cfg.data.max_seq_len, device, world);
        memory::check_device(&shape, device, t.check_memory)?;
        let tokenizer = Tokenizer::from_dir(&dir)?;
        tokenizer.check_fits(model_cfg.vocab_size, &dir.join("config.json"))?;
        let template = ChatTemplate::load(&cfg.template()?, &dir, &tokenizer, cfg.system_prompt())?;
        Ok(Self { cfg: model_cfg, vb, tokenizer, template })
    }
}

/// The run's tokenized data (cached under `OUT/cache`), checked against the model's vocabulary.
struct TrainData {
    train: Dataset,
    dev: Option<Dataset>,
    opts: DataOptions,
}

impl TrainData {
    fn load(cfg: &RunConfig, base: &BaseModel, note: &dyn Fn(String)) -> Result<Self> {
        let opts = DataOptions {
            max_seq_len: cfg.data.max_seq_len,
            loss_on: cfg.data.loss_on,
            overflow: cfg.data.overflow,
            pack: cfg.data.pack,
        };
        let cache = cfg.checkpoint.out_dir.join(CACHE_DIR);
        let load = |file: &std::path::Path| -> Result<Dataset> {
            let ds = data::load_jsonl(file, &base.tokenizer, &base.template, &opts, Some(&cache))?;
            check_examples(&ds, base.cfg.vocab_size, file, &cache)?;
            Ok(ds)
        };
        let train = load(&cfg.data.train)?;
        let dev = match cfg.data.dev.as_os_str().is_empty() {
            true => None,
            false => Some(load(&cfg.data.dev)?),
        };
        let s = &train.stats;
        note(format!(
            "data: {} examples, {} tokens ({} trained) from {}; {} truncated, {} dropped (max_seq_len {})",
            train.examples.len(),
            s.tokens,
            s.loss_tokens,
            cfg.data.train.display(),
            s.truncated,
            s.dropped,
            cfg.data.max_seq_len
        ));
        Ok(Self { train, dev, opts })
    }
}

/// Trains as `cfg` says, as one rank of `comm`, started as `start` says. Resuming continues from the newest
/// intact checkpoint in the output directory (or starts fresh when there is none), whatever the world size
/// that wrote it, as long as it was saved by the same run (`resume`).
pub fn run(cfg: &RunConfig, comm: &Communicator, start: Start) -> Result<RunSummary> {
    let (out, t) = (&cfg.checkpoint.out_dir, &cfg.train);
    let note = |msg: String| {
        if comm.is_main() {
            eprintln!("{msg}");
        }
    };
    let _lock = match comm.is_main() {
        true => Some(prepare_out_dir(cfg, start)?),
        false => None,
    };
    // The other ranks read the base model once rank 0 has written it.
    comm.barrier()?;
    let device = crate::device::rank_device(&t.device, comm.local_rank())?;
    comm.use_device(&device)?;
    let base = BaseModel::open(cfg, &device, comm.world(), &note)?;
    let data = TrainData::load(cfg, &base, &note)?;
    let ctx = StepContext::new(base.cfg.clone(), t, cfg.data.max_seq_len, device.clone())?;

    let rows_per_step = t.micro_batch * t.grad_accum * comm.world();
    note(format!(
        "global batch: {rows_per_step} sequences per step (micro-batch {} x accumulation {} x {} ranks); \
         gradient buffer {}{}",
        t.micro_batch,
        t.grad_accum,
        comm.world(),
        t.grad_buffer_dtype(device.is_cuda(), comm.world()).dtype().as_str(),
        if t.grad_buffer == GradBuffer::Auto { " (auto)" } else { "" },
    ));
    let total = cursor::total_steps(&data.train, &data.opts, t.seed, t.epochs, rows_per_step, t.max_steps);
    if total == 0 {
        bail!("{}: too little data for one optimizer step of {rows_per_step} sequences", cfg.data.train.display());
    }
    let epoch_rows = |e: usize| data::epoch_rows(&data.train, e, t.seed, &data.opts).len();
    let this_run = resume::ThisRun {
        toml: cfg.to_toml(),
        identity: RunIdentity {
            data_fingerprint: resume::data_fingerprint(&data.train),
            data_examples: data.train.examples.len(),
            world_size: comm.world(),
            micro_batch: t.micro_batch,
            grad_accum: t.grad_accum,
        },
        total_steps: total,
        train: t,
        epoch_rows: &epoch_rows,
    };
    let BaseModel { cfg: model_cfg, vb, tokenizer, template } = base;
    let begun = resume::begin(out, start, this_run, &ctx, comm, vb, &note)?;
    let (params, mut adam) = (begun.params, begun.adam);
    let mut cursor = DataCursor::new(&data.train, &data.opts, t.seed, rows_per_step, begun.state);

    // Rank 0 reports and writes.
    let mut reporter = match comm.is_main() {
        true => {
            hf::write_atomic(&out.join(checkpoint::RUN_CONFIG_FILE), |tmp| Ok(std::fs::write(tmp, &begun.run_toml)?))?;
            let flops = metrics::flops_per_token(&model_cfg, cfg.data.max_seq_len);
            Some(Reporter::open(
                out,
                cursor.step(),
                total,
                flops,
                metrics::peak_tflops(&device),
                &begun.accepted_changes,
            )?)
        }
        false => None,
    };
    // The template the model learns goes with every checkpoint, so prompting it finds that one.
    let chat_template = template.standalone();
    let writer = CheckpointWriter {
        out_dir: out,
        model_cfg: &model_cfg,
        layout: &ctx.layout,
        tokenizer_files: tokenizer.files(),
        chat_template: &chat_template,
        run_config: &begun.run_toml,
        keep: cfg.checkpoint.keep,
        every: cfg.checkpoint.every,
    };

    let pad = tokenizer.pad_id().unwrap_or(0);
    let mut last_loss = None;
    let watchdog = (comm.world() > 1 && t.step_timeout > 0)
        .then(|| Watchdog::start(comm.rank(), std::time::Duration::from_secs(t.step_timeout)));
    let beat = || watchdog.as_ref().map(Watchdog::beat);
    // From here on Ctrl-C saves before stopping; earlier, nothing would be lost by stopping at once.
    let interrupt = Interrupt::install(comm.world() > 1)?;
    let stopped = |e: anyhow::Error| e.context(format!("training stopped; {}", last_good(out)));
    let mut saved_at_stop = None;
    while cursor.step() < total {
        let step = cursor.step();
        let mine = data::shard(cursor.next_step(), comm.rank(), comm.world());
        let micro: Vec<Batch> = mine.chunks(t.micro_batch).map(|c| data::make_batch(&data.train, c, pad)).collect();
        let lr = optim::learning_rate(t, step, total);
        let started = Instant::now();
        let r = train_step(&ctx, t, comm, &params, &mut adam, &micro, step, lr, None).map_err(stopped)?;
        let secs = started.elapsed().as_secs_f64();
        beat();
        last_loss = Some(r.loss);
        let step = cursor.step();

        let measure_dev = cfg.log.dev_every > 0 && step.is_multiple_of(cfg.log.dev_every) || step == total;
        let dev = match (&data.dev, measure_dev) {
            (Some(ds), true) => Some(dev_loss(&ctx, comm, &params, &adam.shard, ds, &data.opts, t.micro_batch, pad)?),
            _ => None,
        };
        // Every rank stops at the same step, if any rank was asked to.
        let mut asked = [f64::from(u8::from(interrupt.requested()))];
        comm.all_reduce_sum_f64(&mut asked)?;
        let stop = asked[0] > 0.0 && step < total;
        // Under ZeRO-1 every rank takes part in collecting the weights and moments; rank 0 alone writes them.
        let moments = match writer.due(step, total, stop) {
            true => {
                gather_params(comm, &params, &adam.shard)?;
                adam.gather_moments(comm, ctx.layout.total)?
            }
            false => None,
        };
        // The other ranks go on to the next step and wait for rank 0 in its all-reduce.
        let Some(report) = reporter.as_mut() else {
            if stop {
                break;
            }
            continue;
        };
        report.step(step, &r, dev, lr, secs)?;
        if let Some((m, v)) = &moments {
            let dir = writer.save(&params, m, v, &cursor.state).map_err(stopped)?;
            report.draw_loss();
            beat();
            if stop {
                report.abandon();
                saved_at_stop = Some(dir);
                break;
            }
        }
    }
    // Only an interrupted run ends before the last step; all ranks know it (the stop was agreed).
    let steps = cursor.step();
    let interrupted = steps < total;
    if !interrupted {
        gather_params(comm, &params, &adam.shard)?;
    }
    let final_dir = match (&reporter, saved_at_stop) {
        (_, Some(dir)) => dir,
        (Some(report), None) if !interrupted => {
            report.finish();
            let dir = writer.save_final(&params).map_err(stopped)?;
            report.draw_loss();
            dir
        }
        _ => out.join(checkpoint::FINAL_DIR),
    };
    // Every rank returns once the final model (or the interrupted run's checkpoint) is written.
    comm.barrier()?;
    Ok(RunSummary { final_dir, steps, total_steps: total, last_loss, interrupted })
}
