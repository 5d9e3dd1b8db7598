//! AdamW over the flat parameter buffer, the learning-rate schedule, and global-norm clipping, with
//! PyTorch's exact semantics (`torch.optim.AdamW`, `clip_grad_norm_`, transformers' schedules) so a run
//! matches the original project step for step.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use super::params::ParamLayout;

use crate::config::run::{Schedule, TrainSection};

/// AdamW state: first and second moments, f32, the shape of the flat parameter buffer.
pub struct AdamW {
    pub m: Tensor,
    pub v: Tensor,
    /// Optimizer steps taken (PyTorch's `state["step"]`).
    pub t: u64,
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
    pub fn zeros(n: usize, device: &Device) -> Result<Self> {
        Ok(Self { m: Tensor::zeros(n, DType::F32, device)?, v: Tensor::zeros(n, DType::F32, device)?, t: 0 })
    }

    /// One step, updating `params`, `m` and `v` in place, with the gradients `grads * grad_scale` (the
    /// scale folds the per-token normalisation and the clip factor into the update: no pass of its own).
    /// Same arithmetic as `torch.optim.AdamW` (single-tensor path): `p *= 1 - lr wd`,
    /// `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`. On CUDA one fused kernel runs over each range of
    /// the flat buffer that shares a weight-decay setting; elsewhere one parameter at a time, so the
    /// temporaries stay the size of the largest parameter, not of the model.
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
            use crate::kernels::flat::{adamw, AdamWStep};
            let s = AdamWStep {
                grad_scale: grad_scale as f32,
                beta1: h.beta1 as f32,
                one_minus_beta1: (1.0 - h.beta1) as f32,
                beta2: h.beta2 as f32,
                one_minus_beta2: (1.0 - h.beta2) as f32,
                inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                eps: h.eps as f32,
                step_size: (lr / bc1) as f32,
            };
            for (offset, len, decays) in layout.runs(decay) {
                let view = |t: &Tensor| t.narrow(0, offset, len);
                let factor = if decays { (1.0 - lr * h.weight_decay) as f32 } else { 1.0 };
                adamw(&view(params)?, &view(grads)?, &view(&self.m)?, &view(&self.v)?, factor, &s)?;
            }
            return Ok(());
        }
        for (i, slot) in layout.slots.iter().enumerate() {
            let view = |t: &Tensor| t.narrow(0, slot.offset, slot.len);
            let g = (view(grads)? * grad_scale)?;
            let m = ((view(&self.m)? * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
            let v = ((view(&self.v)? * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
            let mut p = view(params)?;
            if decay(i) {
                p = (p * (1.0 - lr * h.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2.sqrt())? + h.eps)?;
            let p = (p - ((&m / denom)? * (lr / bc1))?)?;
            self.m.slice_set(&m, 0, slot.offset)?;
            self.v.slice_set(&v, 0, slot.offset)?;
            params.slice_set(&p, 0, slot.offset)?;
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

/// Global L2 norm of the flat gradients (f64 accumulation). On CUDA one fused reduction over the buffer;
/// elsewhere per parameter and per row first, as GPU reductions parallelise over rows.
pub fn grad_norm(grads: &Tensor, layout: &ParamLayout) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if crate::kernels::on_cuda(grads) {
        return Ok(crate::kernels::flat::sum_squares(grads)?.sqrt());
    }
    let partial = (0..layout.slots.len())
        .map(|i| layout.view(grads, i)?.sqr()?.sum(D::Minus1)?.to_dtype(DType::F64)?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&partial, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
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
