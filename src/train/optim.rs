//! AdamW over the flat parameter buffer, the learning-rate schedule, and global-norm clipping, with
//! PyTorch's exact semantics (`torch.optim.AdamW`, `clip_grad_norm_`, transformers' schedules) so a run
//! matches the original project step for step.

use std::ops::Range;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::moments::{Moments, CHUNK};
use super::params::ParamLayout;

use crate::config::run::{OptimizerState, Schedule, TrainSection};
use crate::dist::Communicator;

/// AdamW state for the range `shard` of the flat parameter buffer, which this optimizer updates: all of it,
/// or under ZeRO-1 this rank's share. First and second moments `shard.len()` long, in f32 or 8-bit
/// ([`Moments`]).
pub struct AdamW {
    pub moments: Moments,
    /// Optimizer steps taken (PyTorch's `state["step"]`).
    pub t: u64,
    pub shard: Range<usize>,
    /// On a GPU, the slot table of AdamW's kernel (f32 moments), made at the first step (one upload).
    #[cfg(feature = "cuda")]
    table: Option<crate::kernels::flat::SlotTable>,
    /// On a GPU, the weight-decay runs of the 8-bit kernel, made at the first step.
    #[cfg(feature = "cuda")]
    runs: Option<Tensor>,
    /// The sums of `|W|` over each BitLinear matrix's part of the shard, as the last step left them (f64, one
    /// per slot; on a GPU only, where the update computes them as it writes): the next step weights' absmean
    /// without another pass over the parameters. Taken by [`AdamW::take_abs_sums`].
    abs_sums: Option<Tensor>,
}

/// Rank `rank`'s share of a flat buffer of `total` elements among `world` ranks under ZeRO-1: contiguous,
/// all of equal length but the last.
pub fn shard_of(total: usize, rank: usize, world: usize) -> Range<usize> {
    let per = total.div_ceil(world.max(1));
    (rank * per).min(total)..((rank + 1) * per).min(total)
}

/// Every rank's [`shard_of`], in rank order.
pub fn shards(total: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| shard_of(total, r, world)).collect()
}

pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay norms and the embedding too.
    pub decay_norms_and_embeddings: bool,
}

impl AdamW {
    /// Zero moments for `shard` of the flat buffer (`0..total` for all of it), held as `state` says.
    pub fn zeros(shard: Range<usize>, state: OptimizerState, device: &Device) -> Result<Self> {
        Ok(Self::new(Moments::zeros(shard.len(), state, device)?, 0, shard))
    }

    /// The state `moments` after `t` steps (a checkpoint's, [`Moments::from_f32`]) for `shard`.
    pub fn new(moments: Moments, t: u64, shard: Range<usize>) -> Self {
        #[cfg(feature = "cuda")]
        return Self { moments, t, shard, table: None, runs: None, abs_sums: None };
        #[cfg(not(feature = "cuda"))]
        Self { moments, t, shard, abs_sums: None }
    }

    /// The sums of `|W|` the last step computed ([`AdamW`]'s `abs_sums`), if it did; valid while nothing but
    /// this optimizer changes the parameters' shard, so they are handed out once.
    pub fn take_abs_sums(&mut self) -> Option<Tensor> {
        self.abs_sums.take()
    }

    /// The whole moments, on rank 0 (None on the others), for a checkpoint. Under ZeRO-1 each rank's share
    /// is broadcast in turn and rank 0 keeps them in host memory, so no device holds more than a share.
    pub fn gather_moments(&self, comm: &Communicator, total: usize) -> Result<Option<(Tensor, Tensor)>> {
        let (m, v) = self.moments.to_f32()?;
        if self.shard.len() == total {
            return Ok(comm.is_main().then_some((m, v)));
        }
        let gather = |mine: &Tensor| -> Result<Option<Tensor>> {
            let mut parts = Vec::new();
            for r in 0..comm.world() {
                let len = shard_of(total, r, comm.world()).len();
                let buf = match r == comm.rank() {
                    true => mine.copy()?,
                    false => Tensor::zeros(len, DType::F32, mine.device())?,
                };
                comm.broadcast_in_place(&buf, r)?;
                comm.wait_for_collectives(mine.device())?;
                if comm.is_main() {
                    parts.push(buf.to_device(&Device::Cpu)?);
                }
            }
            Ok(comm.is_main().then(|| Tensor::cat(&parts, 0)).transpose()?)
        };
        Ok(gather(&m)?.zip(gather(&v)?))
    }

    /// One step, updating `params`, `m` and `v` in place, with the gradients `grads * grad_scale` (the
    /// scale folds the per-token normalisation and the clip factor into the update: no pass of its own).
    /// Same arithmetic as `torch.optim.AdamW` (single-tensor path): `p *= 1 - lr wd`,
    /// `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`. Only `params[shard]` changes. On CUDA one fused
    /// kernel over the whole shard: with f32 moments it also sums the new BitLinear weights' `|W|`
    /// ([`AdamW::take_abs_sums`]); with 8-bit moments it decodes, updates and codes a block of them per CUDA
    /// block. Otherwise candle ops over [`CHUNK`] values of the shard at a time (8-bit moments decoded,
    /// updated in f32 and coded again), per range of it that shares a weight-decay setting.
    pub fn step(
        &mut self,
        params: &Tensor,
        grads: &Tensor,
        layout: &ParamLayout,
        lr: f64,
        h: &AdamWHyper,
        grad_scale: f64,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - h.beta1.powi(self.t as i32);
        let bc2 = 1.0 - h.beta2.powi(self.t as i32);
        let decay = |i: usize| h.weight_decay != 0.0 && layout.decays(i, h.decay_norms_and_embeddings);
        #[cfg(feature = "cuda")]
        if crate::kernels::on_cuda(params) {
            use crate::kernels::flat::{adamw, adamw_int8, AdamWStep, Int8Moments, SlotTable};
            let s = AdamWStep {
                grad_scale: grad_scale as f32,
                beta1: h.beta1 as f32,
                one_minus_beta1: (1.0 - h.beta1) as f32,
                beta2: h.beta2 as f32,
                one_minus_beta2: (1.0 - h.beta2) as f32,
                decay: (1.0 - lr * h.weight_decay) as f32,
                inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                eps: h.eps as f32,
                step_size: (lr / bc1) as f32,
            };
            match &self.moments {
                Moments::F32 { m, v } => {
                    if self.table.is_none() {
                        let slots = super::model::slot_kinds(layout);
                        self.table = Some(SlotTable::new(params, &slots, self.shard.clone(), decay)?);
                    }
                    let table = self.table.as_ref().expect("made above");
                    self.abs_sums = Some(adamw(params, grads, m, v, table, self.shard.start, &s)?);
                }
                Moments::Int8 { u, u_scale, v, v_scale, len } => {
                    if self.runs.is_none() {
                        let runs: Vec<i64> = layout
                            .runs(decay)
                            .iter()
                            .flat_map(|&(offset, _, d)| [offset as i64, i64::from(d)])
                            .collect();
                        self.runs = Some(Tensor::new(runs, params.device())?);
                    }
                    let runs = self.runs.as_ref().expect("made above");
                    let mo = Int8Moments { u, u_scale, v, v_scale, len: *len };
                    adamw_int8(params, grads, &mo, self.shard.start, runs, &s)?;
                }
            }
            return Ok(());
        }
        let runs = layout.runs(decay);
        for start in (0..self.shard.len()).step_by(CHUNK) {
            let chunk = start..(start + CHUNK).min(self.shard.len());
            let (m_chunk, v_chunk) = self.moments.read(chunk.clone())?;
            // The chunk in the flat buffer; each run of slots that share a weight-decay setting, cut to it.
            let (lo, hi) = (self.shard.start + chunk.start, self.shard.start + chunk.end);
            for &(offset, len, decays) in &runs {
                let (global, end) = (offset.max(lo), (offset + len).min(hi));
                if global >= end {
                    continue;
                }
                let (at, n) = (global - lo, end - global);
                let g = (grads.narrow(0, global, n)?.to_dtype(DType::F32)? * grad_scale)?;
                let m = ((m_chunk.narrow(0, at, n)? * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
                let v = ((v_chunk.narrow(0, at, n)? * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
                let mut p = params.narrow(0, global, n)?;
                if decays {
                    p = (p * (1.0 - lr * h.weight_decay))?;
                }
                let denom = ((v.sqrt()? / bc2.sqrt())? + h.eps)?;
                let p = (p - ((&m / denom)? * (lr / bc1))?)?;
                m_chunk.slice_set(&m, 0, at)?;
                v_chunk.slice_set(&v, 0, at)?;
                params.slice_set(&p, 0, global)?;
            }
            self.moments.write(chunk.start, &m_chunk, &v_chunk)?;
        }
        Ok(())
    }
}

/// The learning rate of optimizer step `step` (0-based) out of `total`, as transformers' schedulers give
/// it: linear warm-up from 0, then linear or cosine decay to `lr * min_lr_ratio`.
pub fn learning_rate(cfg: &TrainSection, step: usize, total: usize) -> f64 {
    let warmup = cfg.warmup_steps;
    if step < warmup {
        return cfg.lr * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    let factor = match cfg.schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    };
    cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)
}

/// The quantization warm-up `lambda = min(step / N, 1)`; 1 (plain BitNet) when N is 0.
pub fn quant_lambda(cfg: &TrainSection, step: usize) -> f64 {
    if cfg.quant_warmup_steps == 0 {
        1.0
    } else {
        (step as f64 / cfg.quant_warmup_steps as f64).min(1.0)
    }
}

/// Global L2 norm of the flat gradients (f64 accumulation).
pub fn grad_norm(grads: &Tensor, layout: &ParamLayout) -> Result<f64> {
    Ok(grad_squares(grads, layout, 0..layout.total)?.to_scalar::<f64>()?.sqrt())
}

/// The sum of squares of `grads[range]` (f64 accumulation), an f64 scalar left on the device: all of it, or
/// under ZeRO-1 the shard whose sums this rank holds. On CUDA one fused reduction over the range; elsewhere
/// per parameter and per row first, as GPU reductions parallelise over rows ([`ParamLayout::part_sum`]).
pub fn grad_squares(grads: &Tensor, layout: &ParamLayout, range: Range<usize>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::on_cuda(grads) {
        return Ok(crate::kernels::flat::sum_squares(&grads.narrow(0, range.start, range.len())?)?);
    }
    let partial = layout
        .parts(range)
        .map(|(i, part)| layout.part_sum(grads, i, part, Tensor::sqr))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&partial, 0)?.sum_all()?)
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales the gradients by: `max_norm / (norm + 1e-6)` when
/// below 1, else 1. A `max_norm` of 0 disables clipping.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        coef
    } else {
        1.0
    }
}
