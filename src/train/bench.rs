//! `bessie-train --bench`: optimizer steps on a random model of a named shape with random tokens, timed,
//! reported as one JSON line. Measures the training step alone: no data loading, logging or checkpoints.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use super::{memory, metrics, optim::AdamW, train_step, PhaseTimer, StepContext};
use crate::config::run::{GradDtype, OptimizerState, Recompute, RunConfig, StepWeightsPlan, TrainSection};
use crate::config::ModelConfig;
use crate::data::Batch;
use crate::dist::Communicator;
use crate::rng::Rng;

pub struct BenchOptions {
    pub shape: String,
    pub seq: usize,
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation); the all-reduce runs once per step.
    pub accum: usize,
    pub warmup: usize,
    pub steps: usize,
    pub device: String,
    /// Also time each phase of the step (synchronizing the device between phases).
    pub profile: bool,
    /// The `[train]` keys (recompute, attention block, loss chunk, ...) and the RoPE scaling, from `--set`.
    pub config: RunConfig,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub shape: String,
    pub params: usize,
    pub seq: usize,
    pub batch: usize,
    pub accum: usize,
    pub steps: usize,
    pub recompute: Recompute,
    /// How AdamW holds its moments (`train.optimizer_state`).
    pub optimizer_state: OptimizerState,
    /// Where the step's weights live (`train.step_weights`).
    pub step_weights: StepWeightsPlan,
    /// The gradient buffer's dtype (`train.grad_buffer`).
    pub grad_buffer: GradDtype,
    /// Ranks (GPUs) taking part; each runs `batch` sequences per step.
    pub world: usize,
    pub device: String,
    /// All ranks together.
    pub tokens_per_sec: f64,
    pub tokens_per_sec_per_gpu: f64,
    /// Per GPU.
    pub tflops: f64,
    /// `tflops` over the card's datasheet peak (`device::peak_bf16_tflops`); null on the CPU or on a card
    /// whose peak Bessie does not know.
    pub mfu: Option<f64>,
    pub step_ms: f64,
    /// `train::memory`'s estimate of this step's peak (CUDA context included on a GPU).
    pub estimated_peak_gib: f64,
    /// The card's peak memory in use over the warm-up and timed steps, sampled every 5 ms (every process
    /// on the card, as nvidia-smi counts it); GPU only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_peak_gib: Option<f64>,
    /// Milliseconds per step in each phase, from a separate profiled run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases_ms: Vec<(&'static str, f64)>,
}

/// Full rows of random tokens, loss on every position.
fn random_batch(rng: &mut Rng, batch: usize, seq: usize, vocab: usize) -> Batch {
    let n = batch * seq;
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    let targets = (0..n).map(|i| if (i + 1) % seq == 0 { 0 } else { ids[i + 1] }).collect();
    let loss_mask: Vec<f32> = (0..n).map(|i| if (i + 1) % seq == 0 { 0.0 } else { 1.0 }).collect();
    Batch {
        batch,
        seq,
        ids,
        targets,
        loss_tokens: loss_mask.iter().filter(|&&m| m > 0.0).count(),
        loss_mask,
        positions: (0..n).map(|i| (i % seq) as u32).collect(),
        segments: vec![1; n],
    }
}

pub fn bench(o: &BenchOptions, comm: &Communicator) -> Result<BenchResult> {
    let device = crate::device::rank_device(&o.device, comm.local_rank())?;
    comm.use_device(&device)?;
    // The real model's vocabulary: the head and the loss are a large share of a step.
    let mut cfg = ModelConfig::shape(&o.shape, crate::model::arch::shape_by_name(&o.shape)?.vocab)?;
    if let Some(scaling) = o.config.model.rope() {
        cfg.set_rope_scaling(Some(scaling));
    }
    // The step's micro-batches are the bench's, whatever the config says (`train.grad_buffer = "auto"` asks).
    let train = TrainSection { grad_accum: o.accum, ..o.config.train.clone() };
    let shape = memory::StepShape::of_run(&cfg, &train, o.batch, o.seq, &device, comm.world());
    let estimated_peak_gib = memory::estimate(&shape).gib();
    memory::check_device(&shape, &device, train.check_memory)?;
    let ctx = StepContext::new(cfg.clone(), &train, o.seq, device.clone())?;
    let params = (Tensor::randn(0f32, 1f32, ctx.layout.total, &device)? * 0.02)?;
    let shard = super::optimizer_shard(&train, comm, ctx.layout.total);
    let mut adam = AdamW::zeros(shard, train.optimizer_state, &device)?;
    let mut rng = Rng::new(comm.rank() as u64);
    let micro: Vec<Batch> = (0..o.accum).map(|_| random_batch(&mut rng, o.batch, o.seq, cfg.vocab_size)).collect();
    let mut run = |steps: usize, mut timer: Option<&mut PhaseTimer>| -> Result<f64> {
        let start = Instant::now();
        for s in 0..steps {
            train_step(&ctx, &train, comm, &params, &mut adam, &micro, s, 1e-4, timer.as_deref_mut())?;
        }
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let sampler = memory::PeakSampler::start(&device);
    run(o.warmup, None)?;
    let secs = run(o.steps, None)?;
    let measured_peak_gib = sampler.stop();
    let mut timer = PhaseTimer::new(&device);
    if o.profile {
        run(o.steps, Some(&mut timer))?;
    }
    let phases_ms = timer.totals.into_iter().map(|(p, s)| (p, s * 1e3 / o.steps as f64)).collect();
    let tokens_per_sec = (o.steps * o.accum * o.batch * o.seq * comm.world()) as f64 / secs;
    let tflops = tokens_per_sec / comm.world() as f64 * metrics::flops_per_token(&cfg, o.seq) / 1e12;
    Ok(BenchResult {
        shape: o.shape.clone(),
        params: cfg.num_parameters(),
        seq: o.seq,
        batch: o.batch,
        accum: o.accum,
        steps: o.steps,
        recompute: train.recompute,
        optimizer_state: train.optimizer_state,
        step_weights: train.step_weights,
        grad_buffer: shape.grad_buffer,
        world: comm.world(),
        device: crate::device::gpu_name(&device).unwrap_or_else(|| format!("{device:?}")),
        tokens_per_sec,
        tokens_per_sec_per_gpu: tokens_per_sec / comm.world() as f64,
        tflops,
        mfu: metrics::peak_tflops(&device).map(|peak| tflops / peak),
        step_ms: secs * 1e3 / o.steps as f64,
        estimated_peak_gib,
        measured_peak_gib,
        phases_ms,
    })
}
