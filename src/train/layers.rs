//! The layers of BitNet training, each an explicit forward that returns what its backward needs and a
//! backward that returns the input gradient and the parameter gradients (llm.c's shape). Tokens are
//! flattened to rows, `[n, channels]`, except inside attention, which works on `[batch, heads, seq, dim]`.
//! Statistics (norms, softmax, loss) are computed in f32 whatever the compute dtype.
//!
//! The candle-op bodies here are the reference and the CPU path. On CUDA in bf16, the functions that have a
//! fused kernel in `crate::kernels` run it instead: same inputs, same outputs, one pass over memory.

use candle_core::{DType, Result, Tensor, D};

use crate::model::arch::Activation;
use crate::model::bitnet::{activate, quantize_activations, quantize_weight};

/// A BitLinear weight as this step's forward sees it: `W + lambda (Q(W) - W)` in `dtype`, where `Q(W)` is the
/// ternary weight times its scale. lambda = 1 is plain BitNet; lambda < 1 is the warm-up that eases a
/// full-precision checkpoint into ternary.
pub fn effective_weight(latent: &Tensor, lambda: f64, dtype: DType) -> Result<Tensor> {
    let (ternary, scale) = quantize_weight(latent)?;
    let q = ternary.broadcast_mul(&scale)?;
    blend(latent, &q, lambda)?.to_dtype(dtype)
}

/// This step's weights, computed once per optimizer step: every slot of the flat f32 buffer in `dtype`, in the
/// same layout; a slot `(range, Some(columns))` is a BitLinear matrix and becomes its [`effective_weight`],
/// a slot `(range, None)` is cast. On CUDA in bf16, two launches for the whole model.
pub fn step_weights(
    flat: &Tensor,
    slots: &[(std::ops::Range<usize>, Option<usize>)],
    lambda: f64,
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::on_cuda(flat) && dtype == DType::BF16 {
        return crate::kernels::flat::step_weights(&flat.contiguous()?, slots, lambda);
    }
    let out = Tensor::zeros(flat.elem_count(), dtype, flat.device())?;
    for (r, columns) in slots {
        let w = flat.narrow(0, r.start, r.len())?;
        let w = match columns {
            // As a matrix: the scale's reduction goes by rows, as the model's quantizer's does.
            Some(c) => effective_weight(&w.reshape((r.len() / c, *c))?, lambda, dtype)?.flatten_all()?,
            None => w.to_dtype(dtype)?,
        };
        out.slice_set(&w, 0, r.start)?;
    }
    Ok(out)
}

/// `x + lambda (q - x)`, skipping the arithmetic at the ends.
pub(crate) fn blend(x: &Tensor, q: &Tensor, lambda: f64) -> Result<Tensor> {
    if lambda >= 1.0 {
        Ok(q.clone())
    } else if lambda <= 0.0 {
        Ok(x.clone())
    } else {
        x + ((q - x)? * lambda)?
    }
}

/// Activations as the BitLinear GEMM sees them: per-token int8 fake-quantized (blended by lambda).
pub fn effective_input(x: &Tensor, lambda: f64) -> Result<Tensor> {
    let (q, scale) = quantize_activations(x)?;
    let q = q.broadcast_mul(&scale)?;
    blend(&x.to_dtype(DType::F32)?, &q, lambda)?.to_dtype(x.dtype())
}

/// `y = x_eff @ W_eff^T` for `x_eff: [n, in]`, `w: [out, in]`.
pub fn linear_forward(x_eff: &Tensor, w: &Tensor) -> Result<Tensor> {
    x_eff.matmul(&w.t()?)
}

/// Straight-through estimator: both quantizers pass gradients unchanged, so the gradients are those of a
/// plain linear layer at the effective weight and input. Returns `dx` in the compute dtype and `dW` as the
/// product still to take ([`WeightGrad::Product`]), which the gradient buffer takes in place.
pub fn linear_backward(dy: &Tensor, x_eff: &Tensor, w: &Tensor) -> Result<(Tensor, WeightGrad)> {
    Ok((dy.matmul(w)?, WeightGrad::Product { dy: dy.clone(), x: x_eff.clone() }))
}

/// A parameter's gradient as it leaves a layer's backward: a tensor, a linear layer's `dy^T x`, left as
/// a product so that on CUDA one GEMM writes it into the f32 gradient buffer (f32 accumulation, no bf16
/// gradient in memory, no separate addition), or rows of partial sums (f32 `[k, c]`, RMSNorm's per-block
/// shares of its weight's gradient) whose column sums one kernel writes into the buffer, or the embedding's
/// token rows `dx` scattered to their ids' rows, which one kernel adds straight into the buffer's table.
pub enum WeightGrad {
    Tensor(Tensor),
    Product { dy: Tensor, x: Tensor },
    RowSums(Tensor),
    Scatter { dx: Tensor, ids: Tensor, rows: TokenRows },
}

/// How a gradient meets its range of the gradient buffer: the step's first gradient of a slot overwrites
/// whatever the buffer holds there (it is not zero-filled: `train::grads::Gradients`), later ones add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Overwrite,
    Add,
}

impl WeightGrad {
    /// `flat[range] = self` or `flat[range] += self` as `mode` says, in place, for the f32 buffer `flat`.
    /// Overwriting never reads `flat[range]`.
    pub fn add_to(&self, flat: &Tensor, range: std::ops::Range<usize>, mode: Mode) -> Result<()> {
        let dst = flat.narrow(0, range.start, range.len())?;
        #[cfg(feature = "cuda")]
        if crate::kernels::on_cuda(flat) {
            use crate::kernels as k;
            let add = mode == Mode::Add;
            return match self {
                Self::Tensor(g) => k::flat::accumulate(&dst, &g.contiguous()?, add),
                Self::Product { dy, x } if k::applies(dy) => k::gemm::gemm_at_b(&dst, dy, x, add),
                Self::Product { .. } => k::flat::accumulate(&dst, &self.dense(range.len())?.contiguous()?, add),
                Self::RowSums(p) => k::rmsnorm::column_sums(&dst, &p.contiguous()?, add),
                Self::Scatter { dx, rows, .. } if k::applies(dx) => {
                    // The kernel writes the rows of the batch's ids only: the table's other rows need zeros.
                    if !add {
                        k::flat::zero(&dst)?;
                    }
                    k::embedding::add_embedding_rows(&dst, &dx.contiguous()?, rows)
                }
                Self::Scatter { .. } => k::flat::accumulate(&dst, &self.dense(range.len())?, add),
            };
        }
        let g = self.dense(range.len())?.flatten_all()?.to_dtype(DType::F32)?;
        let g = match mode {
            Mode::Overwrite => g,
            Mode::Add => (dst + g)?,
        };
        flat.slice_set(&g, 0, range.start)
    }

    /// The gradient as a tensor of `n` elements (the reference path).
    fn dense(&self, n: usize) -> Result<Tensor> {
        match self {
            Self::Tensor(g) => Ok(g.clone()),
            Self::Product { dy, x } => dy.contiguous()?.t()?.matmul(x),
            Self::RowSums(p) => p.sum(0),
            Self::Scatter { dx, ids, .. } => {
                let c = dx.dim(1)?;
                Tensor::zeros((n / c, c), DType::F32, dx.device())?.index_add(ids, &dx.to_dtype(DType::F32)?, 0)
            }
        }
    }
}

/// What RMSNorm's backward needs: the input and the reciprocal RMS of each row; `glu` when the input is the
/// fused gate/up rows whose gated activation the norm read ([`glu_rmsnorm_quant_forward`]).
pub struct RmsNormSaved {
    x: Tensor,
    rrms: Tensor,
    glu: Option<Activation>,
}

/// `x` as rows `[n, c]`: rows already, or attention's heads `[b, h, t, d]` as `[b t, h d]`.
fn as_rows(x: &Tensor) -> Result<Tensor> {
    match *x.dims() {
        [b, h, t, d] => x.transpose(1, 2)?.reshape((b * t, h * d)),
        _ => Ok(x.clone()),
    }
}

/// The fused kernel's name for a gated activation, or None where it has no fused form yet.
#[cfg(feature = "cuda")]
fn kernel_glu(glu: Option<Activation>) -> Option<bool> {
    match glu {
        None => Some(false),
        Some(Activation::Silu) => Some(true),
        Some(Activation::Relu2) => None,
    }
}

/// `y = w * x / rms(x)`, rows of `x: [n, c]`, statistics in f32. On CUDA the norm kernel of
/// [`rmsnorm_quant_forward`] with the quantization blended out (lambda 0 gives y exactly): the final norm ran as
/// eight candle kernels, 0.6 ms a step of the large model at 768 x 8 (H100).
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormSaved)> {
    #[cfg(feature = "cuda")]
    if crate::kernels::rmsnorm::takes(x, false) && x.rank() == 2 {
        return norm_quant_forward(x, None, w, eps, 0.0);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let rrms = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x32.broadcast_mul(&rrms)?.broadcast_mul(&w.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
    Ok((y, RmsNormSaved { x: x.clone(), rrms, glu: None }))
}

/// RMSNorm and the BitLinear input quantization that follows it: `(x_eff, saved)`, `x_eff` as rows `[n, c]`.
/// `x` is rows, or attention's output heads `[b, h, t, d]` normed as rows `[b t, h d]` (read in place by the
/// kernel: no transposing copy; the backward gives `dx` in the same heads).
pub fn rmsnorm_quant_forward(x: &Tensor, w: &Tensor, eps: f64, lambda: f64) -> Result<(Tensor, RmsNormSaved)> {
    norm_quant_forward(x, None, w, eps, lambda)
}

/// down_proj's input from the fused gate and up projections `gu = [gate | up]: [n, 2m]`: the gated activation,
/// then the MLP's sub-norm and the quantization, as [`rmsnorm_quant_forward`] of [`glu_forward`]. On CUDA one
/// kernel, and `h = act(gate) up` never reaches memory; the backward gives `[dgate | dup]`.
pub fn glu_rmsnorm_quant_forward(
    gu: &Tensor,
    activation: Activation,
    w: &Tensor,
    eps: f64,
    lambda: f64,
) -> Result<(Tensor, RmsNormSaved)> {
    norm_quant_forward(gu, Some(activation), w, eps, lambda)
}

fn norm_quant_forward(
    x: &Tensor,
    glu: Option<Activation>,
    w: &Tensor,
    eps: f64,
    lambda: f64,
) -> Result<(Tensor, RmsNormSaved)> {
    #[cfg(feature = "cuda")]
    if let Some(fused_glu) = kernel_glu(glu).filter(|&g| crate::kernels::rmsnorm::takes(x, g)) {
        let x = x.contiguous()?;
        let (y, rrms) = crate::kernels::rmsnorm::rmsnorm_quant_forward(&x, fused_glu, &w.contiguous()?, eps, lambda)?;
        return Ok((y, RmsNormSaved { x, rrms, glu }));
    }
    let h = match glu {
        Some(a) => glu_forward(x, a)?,
        None => x.clone(),
    };
    let (y, saved) = rmsnorm_forward(&as_rows(&h)?, w, eps)?;
    Ok((effective_input(&y, lambda)?, RmsNormSaved { x: x.clone(), rrms: saved.rrms, glu }))
}

/// The BitLinear input quantization alone, for families without sub-norms: `x` as rows (attention's heads
/// `[b, h, t, d]` become `[b t, h d]`), quantized. The straight-through backward is [`quant_backward`].
pub fn quant_forward(x: &Tensor, lambda: f64) -> Result<Tensor> {
    effective_input(&as_rows(x)?.contiguous()?, lambda)
}

/// The gradient at [`quant_forward`]'s input, whose dims were `dims`: `dy` back in that shape.
pub fn quant_backward(dy: &Tensor, dims: &[usize]) -> Result<Tensor> {
    match *dims {
        [b, h, t, d] => dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous(),
        _ => Ok(dy.clone()),
    }
}

/// down_proj's input without a sub-norm: the gated activation of `gu = [gate | up]`, quantized.
pub fn glu_quant_forward(gu: &Tensor, activation: Activation, lambda: f64) -> Result<Tensor> {
    effective_input(&glu_forward(gu, activation)?, lambda)
}

/// Returns `(dx, dw)`: with `xhat = x r` and `g = dy w`, `dx = r (g - xhat mean(g xhat))`, `dw = sum_rows(dy xhat)`
/// (on CUDA as [`WeightGrad::RowSums`]).
/// `dy` is rows; `dx` has the shape of the forward's input (rows or heads; after the gate's norm, `[dgate | dup]`,
/// through [`glu_backward`]). A pre-norm block adds its branch
/// to the residual stream, so the stream's gradient `residual` is added to `dx` here (fused on CUDA).
pub fn rmsnorm_backward(
    dy: &Tensor,
    w: &Tensor,
    s: &RmsNormSaved,
    residual: Option<&Tensor>,
) -> Result<(Tensor, WeightGrad)> {
    #[cfg(feature = "cuda")]
    if let Some(glu) =
        kernel_glu(s.glu).filter(|&g| crate::kernels::applies(dy) && crate::kernels::rmsnorm::takes(&s.x, g))
    {
        let (dy, x, w) = (dy.contiguous()?, s.x.contiguous()?, w.contiguous()?);
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let (dx, partial) = crate::kernels::rmsnorm::rmsnorm_backward(&dy, &x, glu, &w, &s.rrms, residual.as_ref())?;
        return Ok((dx, WeightGrad::RowSums(partial)));
    }
    let dy = dy.to_dtype(DType::F32)?;
    let x = match s.glu {
        Some(a) => glu_forward(&s.x, a)?,
        None => as_rows(&s.x)?,
    };
    let xhat = x.to_dtype(DType::F32)?.broadcast_mul(&s.rrms)?;
    let dw = (&dy * &xhat)?.sum(0)?;
    let g = dy.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&s.rrms)?.to_dtype(s.x.dtype())?;
    let dx = match s.glu {
        Some(a) => glu_backward(&dx, &s.x, a)?,
        None => quant_backward(&dx, s.x.dims())?,
    };
    let dw = WeightGrad::Tensor(dw);
    match residual {
        Some(r) => Ok(((dx + r)?, dw)),
        None => Ok((dx, dw)),
    }
}

/// The residual stream's add after each block's branch, `x + branch` (one shape, the compute dtype).
pub fn residual_add(x: &Tensor, branch: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(x) && crate::kernels::residual::supports(x.elem_count()) {
        return crate::kernels::residual::residual_add(&x.contiguous()?, &branch.contiguous()?);
    }
    x + branch
}

/// The gated activation of the fused gate and up projections `gu = [gate | up]: [n, 2m]`: `h = act(gate) * up`,
/// `[n, m]`. The reference of the activation part of [`glu_rmsnorm_quant_forward`]'s kernel.
pub fn glu_forward(gu: &Tensor, activation: Activation) -> Result<Tensor> {
    let m = gu.dim(1)? / 2;
    // The activation in f32, rounded once (as torch computes it, and the kernel), then the product.
    activate(&gu.narrow(1, 0, m)?.to_dtype(DType::F32)?, activation)?.to_dtype(gu.dtype())? * gu.narrow(1, m, m)?
}

/// Returns `[dgate | dup]` of [`glu_forward`], in f32: `silu'(a) = s (1 + a (1 - s))` with `s = sigmoid(a)`;
/// `(relu(a)^2)' = 2 relu(a)`.
pub fn glu_backward(dh: &Tensor, gu: &Tensor, activation: Activation) -> Result<Tensor> {
    let m = dh.dim(1)?;
    let dtype = gu.dtype();
    let (dh, a, b) = (
        dh.to_dtype(DType::F32)?,
        gu.narrow(1, 0, m)?.to_dtype(DType::F32)?,
        gu.narrow(1, m, m)?.to_dtype(DType::F32)?,
    );
    let (act, dact) = match activation {
        Activation::Silu => {
            let s = (a.neg()?.exp()? + 1.0)?.recip()?;
            ((&a * &s)?, (&s * ((&a * (1.0 - &s)?)? + 1.0)?)?)
        }
        Activation::Relu2 => {
            let r = a.relu()?;
            (r.sqr()?, (r * 2.0)?)
        }
    };
    let da = ((&dh * &b)? * dact)?;
    let db = (dh * act)?;
    Tensor::cat(&[da, db], 1)?.to_dtype(dtype)
}

/// Rotates `x: [batch, heads, seq, dim]` by per-token angles `cos, sin: [batch, seq, dim/2]`.
pub fn rope_forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// The inverse rotation: a rotation's transpose is the rotation by the negated angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_forward(dy, cos, &sin.neg()?)
}

/// The shape of attention's heads: `[batch, heads, seq, head_dim]`, `q_heads` for queries, `kv_heads` for
/// keys and values.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The rows of the fused q, k, v projection, `qkv: [batch * seq, (q_heads + 2 kv_heads) head_dim]`, as
/// heads `(q, k, v)`, q and k rotated by RoPE. On CUDA one kernel does the split, the transposes and both
/// rotations.
pub fn qkv_heads(qkv: &Tensor, s: HeadShape, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(qkv) && crate::kernels::rope::supports(s.head_dim) {
        return crate::kernels::rope::qkv_heads(&qkv.contiguous()?, s, &cos.contiguous()?, &sin.contiguous()?);
    }
    let d = s.head_dim;
    let heads = |h0: usize, nh: usize| {
        qkv.narrow(1, h0 * d, nh * d)?.reshape((s.batch, s.seq, nh, d))?.transpose(1, 2)?.contiguous()
    };
    let q = rope_forward(&heads(0, s.q_heads)?, cos, sin)?;
    let k = rope_forward(&heads(s.q_heads, s.kv_heads)?, cos, sin)?;
    Ok((q, k, heads(s.q_heads + s.kv_heads, s.kv_heads)?))
}

/// The backward of [`qkv_heads`]: the gradient at the projection rows from the heads' gradients.
pub fn qkv_heads_backward(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(dq) && crate::kernels::rope::supports(s.head_dim) {
        let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
        return crate::kernels::rope::qkv_heads_backward(&dq, &dk, &dv, s, &cos.contiguous()?, &sin.contiguous()?);
    }
    let rows = |x: &Tensor| x.transpose(1, 2)?.reshape((s.batch * s.seq, ()));
    Tensor::cat(&[rows(&rope_backward(dq, cos, sin)?)?, rows(&rope_backward(dk, cos, sin)?)?, rows(dv)?], 1)
}

/// What attention's backward needs.
pub struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Softmax probabilities in f32, `[batch, heads, seq, seq]`.
    probs: Tensor,
}

/// Softmax attention with an additive mask `[batch, 1, seq, seq]`; scores and softmax in f32. The plain
/// form, kept as the reference [`flash_attention_forward`] is tested against.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, AttentionSaved)> {
    let scores = (q.matmul(&k.t()?)? * score_scale(q)?)?.to_dtype(DType::F32)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let y = probs.to_dtype(v.dtype())?.matmul(v)?;
    Ok((y, AttentionSaved { q: q.clone(), k: k.clone(), v: v.clone(), probs }))
}

/// Returns `(dq, dk, dv)`: `dV = P^T dY`, `dP = dY V^T`, `dS = P (dP - rowsum(dP P))`, `dQ = dS K c`, `dK = dS^T Q c`.
pub fn attention_backward(dy: &Tensor, s: &AttentionSaved) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = s.v.dtype();
    let scale = score_scale(&s.q)?;
    let p = s.probs.to_dtype(dtype)?;
    let dv = p.t()?.matmul(dy)?;
    let dp = dy.matmul(&s.v.t()?)?.to_dtype(DType::F32)?;
    let row = (&dp * &s.probs)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row))? * &s.probs)?.to_dtype(dtype)?;
    let dq = (ds.matmul(&s.k)? * scale)?;
    let dk = (ds.t()?.matmul(&s.q)? * scale)?;
    Ok((dq, dk, dv))
}

/// Summed cross-entropy of `logits: [n, stride]` (any float dtype; computed in f32), whose first `vocab`
/// columns are the vocabulary and the rest padding, against `targets: [n]` where `mask: [n]` is 1, and its
/// gradient `(softmax - onehot) * mask` (f32, or bf16 from the fused kernel; 0 on the padding). The loss is an
/// f64 scalar on the device, read once per micro-batch rather than once per chunk. Summed, not averaged: the
/// step divides by the number of trained tokens of the whole optimizer step, so accumulation and data
/// parallelism weigh tokens equally.
pub fn cross_entropy_forward_backward(
    logits: &Tensor,
    vocab: usize,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    // The kernel reads rows of a multiple of 8 logits, as the head pads them.
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(logits) && logits.dim(1)? % 8 == 0 {
        let (logits, targets, mask) = (logits.contiguous()?, targets.contiguous()?, mask.contiguous()?);
        return crate::kernels::cross_entropy::cross_entropy_forward_backward(&logits, vocab, &targets, &mask);
    }
    let (n, stride) = logits.dims2()?;
    let logits = logits.narrow(1, 0, vocab)?.to_dtype(DType::F32)?.contiguous()?;
    let mask = mask.unsqueeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let lse = (sum.log()? + max)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?;
    let loss = ((lse - picked)? * &mask)?.sum_all()?.to_dtype(DType::F64)?;
    // softmax * mask, then minus the mask at each target: no one-hot matrix of the vocabulary's size.
    let dlogits = exp.broadcast_mul(&(mask.clone() / sum)?)?;
    let dlogits = dlogits.scatter_add(&targets.unsqueeze(1)?, &mask.neg()?, 1)?;
    match stride - vocab {
        0 => Ok((loss, dlogits)),
        pad => Ok((loss, Tensor::cat(&[dlogits, Tensor::zeros((n, pad), DType::F32, logits.device())?], 1)?)),
    }
}

/// Which rows of a batch hold each token id, for [`embedding_backward`]: the rows sorted by id (stable),
/// and per distinct id `(id, first, end)` into that order; u32 tensors on the batch's device.
#[derive(Clone)]
pub struct TokenRows {
    pub order: Tensor,
    pub runs: Tensor,
    pub distinct: usize,
}

impl TokenRows {
    pub fn new(ids: &[u32], device: &candle_core::Device) -> Result<Self> {
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let mut runs: Vec<u32> = Vec::new();
        for (k, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            match runs.len() {
                n if n > 0 && runs[n - 3] == id => runs[n - 1] = k as u32 + 1,
                _ => runs.extend([id, k as u32, k as u32 + 1]),
            }
        }
        let distinct = runs.len() / 3;
        Ok(Self { order: Tensor::new(order, device)?, runs: Tensor::from_vec(runs, (distinct, 3), device)?, distinct })
    }
}

/// The embedding table's gradient: row `id` sums the rows of `dx: [n, c]` whose token is `id` (`ids`, on the
/// device, and `rows` describe the same tokens), added into the gradient buffer's table in place.
pub fn embedding_backward(dx: &Tensor, ids: &Tensor, rows: &TokenRows) -> WeightGrad {
    WeightGrad::Scatter { dx: dx.clone(), ids: ids.clone(), rows: rows.clone() }
}

/// Which keys each query may see, as one number per token: query `i` sees keys `j` with
/// `start[i] <= j <= i`, where `start[i]` is the first token of `i`'s example (packed examples are
/// contiguous runs) or `i` itself on padding. O(seq) per row instead of a `[seq, seq]` mask; each block of
/// queries builds its slice of the mask on the device ([`Windows::mask`]).
pub struct Windows {
    /// f32 `[batch, seq]`, exact below 2^24.
    start: Tensor,
    /// f32 `0..seq`, so blocks slice positions on the device instead of copying new ones there.
    index: Tensor,
}

impl Windows {
    pub fn new(start: Vec<f32>, batch: usize, seq: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            start: Tensor::from_vec(start, (batch, seq), device)?,
            index: Tensor::arange(0f32, seq as f32, device)?,
        })
    }

    /// The additive mask `[batch, 1, nq, nk]` of queries `q0..q0 + nq` against keys `0..nk`.
    fn mask(&self, q0: usize, nq: usize, nk: usize) -> Result<Tensor> {
        let b = self.start.dim(0)?;
        let lo = self.start.narrow(1, q0, nq)?.reshape((b, 1, nq, 1))?;
        let hi = self.index.narrow(0, q0, nq)?.reshape((1, 1, nq, 1))?;
        let j = self.index.narrow(0, 0, nk)?.reshape((1, 1, 1, nk))?;
        let seen = j.broadcast_ge(&lo)?.broadcast_mul(&j.broadcast_le(&hi)?)?;
        let shape = (b, 1, nq, nk);
        let zero = Tensor::zeros((), DType::F32, self.start.device())?;
        let hidden = zero.affine(1.0, f64::NEG_INFINITY)?;
        seen.where_cond(&zero.broadcast_as(shape)?, &hidden.broadcast_as(shape)?)
    }
}

/// What [`flash_attention_backward`] needs: the inputs and each query's softmax log-sum-exp (f32
/// `[batch, heads, seq, 1]`); no `[seq, seq]` matrix.
pub struct FlashSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The output, for the fused backward's `rowsum(dO O)` (only CUDA reads it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    o: Tensor,
    lse: Tensor,
}

/// Whether CUDA runs attention as one tensor-core kernel (`crate::kernels::flash_attention`, instantiated
/// for these head dims) rather than the blocked softmax between GEMMs.
pub fn flash_kernel_takes(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 96 | 128)
}

/// Attention's score scale, `1 / sqrt(head_dim)`.
fn score_scale(q: &Tensor) -> Result<f64> {
    Ok(1.0 / (q.dim(D::Minus1)? as f64).sqrt())
}

/// Unscaled scores `Q K^T` of queries `q0..q0 + nq` against keys `0..q0 + nq`, in the compute dtype. Causal
/// attention never looks further, so the keys after the block's last query are skipped (half the work of
/// the full matrix).
fn block_qk(q: &Tensor, k: &Tensor, q0: usize, nq: usize) -> Result<Tensor> {
    q.narrow(2, q0, nq)?.matmul(&k.narrow(2, 0, q0 + nq)?.t()?)
}

/// Masked, scaled scores of a block ([`block_qk`]) in f32.
fn block_scores(q: &Tensor, k: &Tensor, windows: &Windows, q0: usize, nq: usize) -> Result<Tensor> {
    let scores = (block_qk(q, k, q0, nq)? * score_scale(q)?)?.to_dtype(DType::F32)?;
    scores.broadcast_add(&windows.mask(q0, nq, q0 + nq)?)
}

/// One query block's probabilities (for the `P V` GEMM: f32 from the reference, bf16 from the fused
/// kernel) and log-sum-exp (f32 `[batch, heads, nq, 1]`).
fn block_softmax(q: &Tensor, k: &Tensor, windows: &Windows, q0: usize, nq: usize) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(q) {
        return crate::kernels::attention::block_forward(&block_qk(q, k, q0, nq)?, &windows.start, q0, score_scale(q)?);
    }
    let scores = block_scores(q, k, windows, q0, nq)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let lse = (scores.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    // exp(S - lse), not exp / sum: the backward recomputes exactly these probabilities.
    Ok((scores.broadcast_sub(&lse)?.exp()?, lse))
}

/// One query block's probabilities, recomputed from the saved log-sum-exp, and the gradient of its scores
/// times the scale, `c dS` with `dS = P (dP - rowsum(dP P))`, in the compute dtype, from the block's rows
/// `dyb` of the output gradient.
fn block_softmax_backward(
    s: &FlashSaved,
    dyb: &Tensor,
    windows: &Windows,
    q0: usize,
    nq: usize,
) -> Result<(Tensor, Tensor)> {
    let dtype = s.v.dtype();
    let scale = score_scale(&s.q)?;
    let (lse, v) = (s.lse.narrow(2, q0, nq)?, s.v.narrow(2, 0, q0 + nq)?);
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(&s.q) {
        let scores = block_qk(&s.q, &s.k, q0, nq)?;
        let dp = dyb.matmul(&v.t()?)?;
        return crate::kernels::attention::block_backward(&scores, &lse.contiguous()?, &dp, &windows.start, q0, scale);
    }
    let probs = block_scores(&s.q, &s.k, windows, q0, nq)?.broadcast_sub(&lse)?.exp()?;
    let dp = dyb.matmul(&v.t()?)?.to_dtype(DType::F32)?;
    let row = (&dp * &probs)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row)? * &probs)? * scale)?.to_dtype(dtype)?;
    Ok((probs, ds))
}

/// The query blocks `(q0, nq)` of a sequence of `seq` tokens.
fn query_blocks(seq: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq).step_by(block.max(1)).map(move |q0| (q0, block.max(1).min(seq - q0)))
}

/// Memory-efficient causal softmax attention (flash attention's recurrence, written with candle ops):
/// `q, k, v: [batch, heads, seq, dim]`, each query seeing its [`Windows`], queries in blocks of
/// `block` rows so at most `[batch, heads, block, seq]` scores exist at once. Scores and softmax in f32.
/// Equals [`attention_forward`] with the dense mask (a test checks it). On CUDA, for head dims the
/// tensor-core kernel takes ([`crate::kernels::flash_attention`]), the scores never leave registers and
/// `block` does not apply.
pub fn flash_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, FlashSaved)> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(q) && flash_kernel_takes(q.dim(D::Minus1)?) {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (o, lse) = crate::kernels::flash_attention::forward(&q, &k, &v, &windows.start)?;
        return Ok((o.clone(), FlashSaved { q, k, v, o, lse }));
    }
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (q0, nq) in query_blocks(q.dim(2)?, block) {
        let (probs, lse) = block_softmax(q, k, windows, q0, nq)?;
        outs.push(probs.to_dtype(v.dtype())?.matmul(&v.narrow(2, 0, q0 + nq)?)?);
        lses.push(lse);
    }
    let (o, lse) = (Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?);
    Ok((o.clone(), FlashSaved { q: q.clone(), k: k.clone(), v: v.clone(), o, lse }))
}

/// Returns `(dq, dk, dv)` of [`flash_attention_forward`], recomputing each block's probabilities from the
/// saved log-sum-exp (`P = exp(S - lse)`, flash attention 2), so again at most one block of scores exists
/// at once. A query block sees all the keys of its rows, so `dS = P (dP - rowsum(dP P))` is taken as the
/// plain backward takes it, not from `rowsum(dO O)`: that keeps a row with a single key (the first token of
/// every example) at exactly zero, where the other form leaves rounding noise that AdamW amplifies.
/// With one query block (sequences up to `block`) that block's dK and dV are the whole gradients; with more,
/// they are accumulated in f32. The fused kernel cannot see a row's keys at once and takes `rowsum(dO O)`,
/// setting single-key rows to zero itself.
pub fn flash_attention_backward(
    dy: &Tensor,
    s: &FlashSaved,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::kernels::applies(&s.q) && flash_kernel_takes(s.q.dim(D::Minus1)?) {
        let (q, k, v, o) = (&s.q, &s.k, &s.v, &s.o);
        return crate::kernels::flash_attention::backward(&dy.contiguous()?, q, k, v, o, &s.lse, &windows.start);
    }
    let dtype = s.v.dtype();
    let block_grads = |(q0, nq): (usize, usize)| -> Result<(Tensor, Tensor, Tensor)> {
        let nk = q0 + nq;
        let dyb = dy.narrow(2, q0, nq)?;
        let (probs, ds) = block_softmax_backward(s, &dyb, windows, q0, nq)?;
        let dv = probs.to_dtype(dtype)?.t()?.matmul(&dyb)?;
        let dq = ds.matmul(&s.k.narrow(2, 0, nk)?)?;
        let dk = ds.t()?.matmul(&s.q.narrow(2, q0, nq)?)?;
        Ok((dq, dk, dv))
    };
    let blocks: Vec<_> = query_blocks(s.q.dim(2)?, block).collect();
    if let [only] = blocks[..] {
        return block_grads(only);
    }
    let dk = Tensor::zeros(s.k.shape(), DType::F32, s.k.device())?;
    let dv = Tensor::zeros(s.v.shape(), DType::F32, s.v.device())?;
    let mut dqs = Vec::new();
    for b in blocks {
        let (dq, dkb, dvb) = block_grads(b)?;
        dqs.push(dq);
        for (acc, g) in [(&dk, dkb), (&dv, dvb)] {
            let nk = g.dim(2)?;
            acc.slice_set(&(acc.narrow(2, 0, nk)? + g.to_dtype(DType::F32)?)?, 2, 0)?;
        }
    }
    Ok((Tensor::cat(&dqs, 2)?, dk.to_dtype(dtype)?, dv.to_dtype(dtype)?))
}
