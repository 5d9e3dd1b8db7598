//! The layers of BitNet training, each an explicit forward that returns what its backward needs and a
//! backward that returns the input gradient and the parameter gradients (llm.c's shape). Tokens are
//! flattened to rows, `[n, channels]`, except inside attention, which works on `[batch, heads, seq, dim]`.
//! Statistics (norms, softmax, loss) are computed in f32 whatever the compute dtype.
//!
//! A function with a fused kernel in `crate::kernels` asks the kernel's `try_` function first (it runs on CUDA
//! in bf16: same inputs, same outputs, one pass over memory) and otherwise runs its candle-op reference, the
//! `_reference` function beside it, which is the CPU path and what `tests/gpu.rs` checks each kernel against.

use candle_core::{DType, Result, Tensor, D};

use crate::kernels;
pub use crate::kernels::flat::TernaryCodes;
use crate::kernels::shapes::{ColumnSum, Gemm};
pub use crate::kernels::shapes::{FlashInputs, FlashKernels, HeadShape, Int8Operand, TokenRows};
use crate::model::arch::Activation;
use crate::ops::{activate, quantize_activations, quantize_weight, repeat_kv};

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
/// a slot `(range, None)` is cast. On CUDA in bf16, two launches for the whole model, and with `codes` (lambda
/// 1) the matrices' int8 form for the int8 forward GEMM too; elsewhere no codes.
pub fn step_weights(
    flat: &Tensor,
    slots: &[(std::ops::Range<usize>, Option<usize>)],
    lambda: f64,
    dtype: DType,
    codes: bool,
) -> Result<(Tensor, Option<TernaryCodes>)> {
    match kernels::flat::try_step_weights(flat, slots, lambda, dtype, codes)? {
        Some(w) => Ok(w),
        None => Ok((step_weights_reference(flat, slots, lambda, dtype)?, None)),
    }
}

/// [`step_weights`] in candle ops.
pub fn step_weights_reference(
    flat: &Tensor,
    slots: &[(std::ops::Range<usize>, Option<usize>)],
    lambda: f64,
    dtype: DType,
) -> Result<Tensor> {
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

/// `y = x_eff @ W_eff^T` for `x_eff: [n, in]`, `w: [out, in]`, plus `residual` where given: the residual
/// stream the branch adds to, `residual + y` as [`residual_add`] rounds it. With both operands' int8 forms
/// (`int8`: the input's and the weight's, at lambda 1 on Hopper) the int8 GEMM computes it from their codes,
/// the add in its epilogue: exact integer sums scaled once, where the bf16 GEMM sums the rounded products
/// `x_eff w` in f32 (the two differ by bf16 roundings; `tests/gpu.rs` bounds it).
pub fn linear_forward(
    x_eff: &Tensor,
    w: &Tensor,
    int8: Option<(&Int8Operand, &Int8Operand)>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let int8_product = match int8 {
        Some((x8, w8)) => kernels::int8_gemm::try_bitlinear_forward(x8, w8, residual)?,
        None => None,
    };
    // Whether the int8 GEMM's epilogue added the residual already (its 128-column tiles do).
    let (y, added) = match int8_product {
        Some(done) => done,
        None => (x_eff.matmul(&w.t()?)?, false),
    };
    match residual {
        Some(r) if !added => residual_add(r, &y),
        _ => Ok(y),
    }
}

/// The head's logits `h w^T` for the loss (`h: [n, c]`, `w: [vocab, c]`): on CUDA bf16 rows padded to a
/// multiple of 8 columns, the padding unset (the cross-entropy kernel reads aligned rows, and ignores it);
/// elsewhere `[n, vocab]`. No padded copy of the head: a vocabulary such as 32002 is two products.
pub fn head_logits(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    match kernels::gemm::try_padded_logits(h, w)? {
        Some(logits) => Ok(logits),
        None => h.matmul(&w.t()?),
    }
}

/// The head's input gradient `dlogits w` (`dlogits: [n, vocab]`, its rows may lie further apart: the
/// vocabulary's columns of [`head_logits`]' rows) into rows `first..first + n` of `dx`.
pub fn head_input_grad(dlogits: &Tensor, w: &Tensor, dx: &Tensor, first: usize) -> Result<()> {
    let rows = dx.narrow(0, first, dlogits.dim(0)?)?;
    match kernels::gemm::try_gemm(&rows, Gemm { a: dlogits, a_t: false, b: w, b_t: false, add: false })? {
        Some(()) => Ok(()),
        None => dx.slice_set(&dlogits.matmul(w)?, 0, first),
    }
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
    /// `flat[range] = self` or `flat[range] += self` as `mode` says, in place, for the gradient buffer `flat`
    /// (f32 or bf16: the sum is taken in f32 and stored once). Overwriting never reads `flat[range]`.
    pub fn add_to(&self, flat: &Tensor, range: std::ops::Range<usize>, mode: Mode) -> Result<()> {
        Self::add_all_to(flat, &[(self, range, mode)])
    }

    /// [`Self::add_to`] for each of `grads`, whose ranges do not overlap: the others in turn, then RMSNorm's row
    /// sums together (on CUDA a block's norms in one launch).
    pub fn add_all_to(flat: &Tensor, grads: &[(&WeightGrad, std::ops::Range<usize>, Mode)]) -> Result<()> {
        let mut sums = Vec::new();
        for (g, range, mode) in grads {
            let dst = flat.narrow(0, range.start, range.len())?;
            let add = *mode == Mode::Add;
            let fused = match g {
                Self::Tensor(t) => kernels::flat::try_accumulate(&dst, t, add)?,
                Self::Product { dy, x } => {
                    kernels::gemm::try_gemm(&dst, Gemm { a: dy, a_t: true, b: x, b_t: false, add })?
                }
                Self::RowSums(partial) => {
                    sums.push(ColumnSum { dst, partial, add });
                    continue;
                }
                Self::Scatter { dx, rows, .. } => kernels::embedding::try_add_embedding_rows(&dst, dx, rows, add)?,
            };
            if fused.is_none() {
                g.add_to_reference(flat, range.clone(), *mode)?;
            }
        }
        if kernels::rmsnorm::try_column_sums(&sums)?.is_none() {
            for (g, range, mode) in grads.iter().filter(|(g, ..)| matches!(g, Self::RowSums(_))) {
                g.add_to_reference(flat, range.clone(), *mode)?;
            }
        }
        Ok(())
    }

    /// [`Self::add_to`] in candle ops.
    pub fn add_to_reference(&self, flat: &Tensor, range: std::ops::Range<usize>, mode: Mode) -> Result<()> {
        let dst = flat.narrow(0, range.start, range.len())?;
        let g = self.dense(range.len())?.flatten_all()?.to_dtype(DType::F32)?;
        let g = match mode {
            Mode::Overwrite => g,
            Mode::Add => (dst.to_dtype(DType::F32)? + g)?,
        };
        flat.slice_set(&g.to_dtype(flat.dtype())?, 0, range.start)
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
/// fused gate/up rows whose gated activation the norm read ([`sub_norm_quant_forward`]).
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

/// `y = w * x / rms(x)`, rows of `x: [n, c]`, statistics in f32. On CUDA the norm kernel of
/// [`rmsnorm_quant_forward`] with the quantization blended out (lambda 0 gives y exactly): the final norm ran as
/// eight candle kernels, 0.6 ms a step of the large model at 768 x 8 (H100).
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormSaved)> {
    if x.rank() == 2 {
        if let Some((y, rrms, _)) = kernels::rmsnorm::try_rmsnorm_quant_forward(x, None, Some(w), eps, 0.0, false)? {
            return Ok((y, RmsNormSaved { x: x.clone(), rrms, glu: None }));
        }
    }
    rmsnorm_forward_reference(x, w, eps)
}

/// [`rmsnorm_forward`] in candle ops.
pub fn rmsnorm_forward_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormSaved)> {
    let x32 = x.to_dtype(DType::F32)?;
    let rrms = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x32.broadcast_mul(&rrms)?.broadcast_mul(&w.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
    Ok((y, RmsNormSaved { x: x.clone(), rrms, glu: None }))
}

/// A BitLinear input as a norm's forward gives it: `x_eff` (bf16 rows, what the GEMMs of the backward read), what
/// the norm's backward needs, and where asked for and the kernel ran (lambda 1, CUDA) the input's int8 form.
pub type NormedInput = (Tensor, RmsNormSaved, Option<Int8Operand>);

/// RMSNorm and the BitLinear input quantization that follows it: `x_eff` as rows `[n, c]`, and with `int8`
/// its int8 form where the kernel ran ([`NormedInput`]). `x` is rows, or attention's output heads
/// `[b, h, t, d]` normed as rows `[b t, h d]` (read in place by the kernel: no transposing copy; the backward
/// gives `dx` in the same heads).
pub fn rmsnorm_quant_forward(x: &Tensor, w: &Tensor, eps: f64, lambda: f64, int8: bool) -> Result<NormedInput> {
    sub_norm_quant_forward(x, None, Some(w), eps, lambda, int8)
}

/// A BitLinear input at a sub-norm's place (before `o_proj`, before `down_proj`): `x` as rows (attention's
/// heads `[b, h, t, d]` read as `[b t, h d]`), or with `glu` the gated activation `act(gate) up` of the fused
/// gate/up rows `[n, 2m]`; normed by `w` where the family has the sub-norm (None: not normed), then quantized.
/// On CUDA one kernel, and `h = act(gate) up` never reaches memory; the backward ([`sub_norm_backward`])
/// gives the gradient in `x`'s shape (`[dgate | dup]` with `glu`). `int8`: as [`rmsnorm_quant_forward`].
pub fn sub_norm_quant_forward(
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    eps: f64,
    lambda: f64,
    int8: bool,
) -> Result<NormedInput> {
    match kernels::rmsnorm::try_rmsnorm_quant_forward(x, glu, w, eps, lambda, int8)? {
        Some((y, rrms, int8)) => Ok((y, RmsNormSaved { x: x.clone(), rrms, glu }, int8)),
        None => {
            let (y, saved) = sub_norm_quant_forward_reference(x, glu, w, eps, lambda)?;
            Ok((y, saved, None))
        }
    }
}

/// [`sub_norm_quant_forward`] in candle ops.
pub fn sub_norm_quant_forward_reference(
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    eps: f64,
    lambda: f64,
) -> Result<(Tensor, RmsNormSaved)> {
    let h = match glu {
        Some(a) => glu_forward(x, a)?,
        None => x.clone(),
    };
    let h = as_rows(&h)?.contiguous()?;
    let (y, rrms) = match w {
        Some(w) => {
            let (y, saved) = rmsnorm_forward_reference(&h, w, eps)?;
            (y, saved.rrms)
        }
        None => (h.clone(), Tensor::ones((h.dim(0)?, 1), DType::F32, h.device())?),
    };
    Ok((effective_input(&y, lambda)?, RmsNormSaved { x: x.clone(), rrms, glu }))
}

/// `dy` (rows) back in the shape of a norm's input `x`: attention's heads, or rows.
fn rows_as_input(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    match *x.dims() {
        [b, h, t, d] => dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous(),
        _ => Ok(dy.clone()),
    }
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
    let (dx, dw, _) = norm_backward(dy, Some(w), s, residual, false)?;
    Ok((dx, dw.expect("a norm with a weight has its gradient")))
}

/// The backward of [`sub_norm_quant_forward`]: the gradient at its input and, where there is a norm, at its
/// weight. Without a norm the quantization's straight-through gradient passes as it is (through the gate).
pub fn sub_norm_backward(dy: &Tensor, w: Option<&Tensor>, s: &RmsNormSaved) -> Result<(Tensor, Option<WeightGrad>)> {
    let (dx, dw, _) = norm_backward(dy, w, s, None, false)?;
    Ok((dx, dw))
}

/// [`sub_norm_backward`] at attention's output (its input `x`: the heads `[b, h, t, d]`), with each head row's
/// `delta = rowsum(dx x)` (f32 `[b, h, t]`) that [`qkv_attention_backward`] reads, where the kernel ran (else
/// `None`, and the flash backward computes them): the norm has both in registers.
pub fn attention_sub_norm_backward(
    dy: &Tensor,
    w: Option<&Tensor>,
    s: &RmsNormSaved,
) -> Result<(Tensor, Option<WeightGrad>, Option<Tensor>)> {
    norm_backward(dy, w, s, None, true)
}

fn norm_backward(
    dy: &Tensor,
    w: Option<&Tensor>,
    s: &RmsNormSaved,
    residual: Option<&Tensor>,
    deltas: bool,
) -> Result<(Tensor, Option<WeightGrad>, Option<Tensor>)> {
    match kernels::rmsnorm::try_rmsnorm_backward(dy, &s.x, s.glu, w, &s.rrms, residual, deltas)? {
        Some((dx, partial, delta)) => Ok((dx, w.map(|_| WeightGrad::RowSums(partial)), delta)),
        None => {
            let (dx, dw) = norm_backward_reference(dy, w, s, residual)?;
            Ok((dx, dw, None))
        }
    }
}

/// [`rmsnorm_backward`] and [`sub_norm_backward`] in candle ops.
pub fn norm_backward_reference(
    dy: &Tensor,
    w: Option<&Tensor>,
    s: &RmsNormSaved,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Option<WeightGrad>)> {
    let (dx, dw) = match w {
        Some(w) => {
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
            (dx, Some(WeightGrad::Tensor(dw)))
        }
        None => (dy.to_dtype(s.x.dtype())?, None),
    };
    let dx = match s.glu {
        Some(a) => glu_backward(&dx, &s.x, a)?,
        None => rows_as_input(&dx, &s.x)?,
    };
    match residual {
        Some(r) => Ok(((dx + r)?, dw)),
        None => Ok((dx, dw)),
    }
}

/// The residual stream's add after each block's branch, `x + branch` (one shape, the compute dtype).
pub fn residual_add(x: &Tensor, branch: &Tensor) -> Result<Tensor> {
    match kernels::residual::try_residual_add(x, branch)? {
        Some(y) => Ok(y),
        None => x + branch,
    }
}

/// The gated activation of the fused gate and up projections `gu = [gate | up]: [n, 2m]`: `h = act(gate) * up`,
/// `[n, m]`. The reference of the activation part of [`sub_norm_quant_forward`]'s kernel.
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

/// The rows of the fused q, k, v projection, `qkv: [batch * seq, (q_heads + 2 kv_heads) head_dim]`, as
/// heads `(q, k, v)`, q and k rotated by RoPE. On CUDA one kernel does the split, the transposes and both
/// rotations.
pub fn qkv_heads(qkv: &Tensor, s: HeadShape, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    match kernels::rope::try_qkv_heads(qkv, s, cos, sin)? {
        Some(heads) => Ok(heads),
        None => qkv_heads_reference(qkv, s, cos, sin),
    }
}

/// The q/k/v projection of `x_eff` by the stacked weight `w` as attention reads it: [`linear_forward`], then
/// [`qkv_heads`]. With both operands' int8 forms (as [`linear_forward`] takes them) one int8 GEMM writes the
/// heads, q and k turned, with the same bits: the pass over the projection's rows that RoPE took is gone.
pub fn qkv_forward(
    x_eff: &Tensor,
    w: &Tensor,
    int8: Option<(&Int8Operand, &Int8Operand)>,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some((x8, w8)) = int8 {
        if let Some(heads) = kernels::int8_gemm::try_bitlinear_heads(x8, w8, s, cos, sin)? {
            return Ok(heads);
        }
    }
    qkv_heads(&linear_forward(x_eff, w, int8, None)?, s, cos, sin)
}

/// [`qkv_heads`] in candle ops.
pub fn qkv_heads_reference(qkv: &Tensor, s: HeadShape, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
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
    match kernels::rope::try_qkv_heads_backward(dq, dk, dv, s, cos, sin)? {
        Some(dqkv) => Ok(dqkv),
        None => qkv_heads_backward_reference(dq, dk, dv, s, cos, sin),
    }
}

/// [`qkv_heads_backward`] in candle ops.
pub fn qkv_heads_backward_reference(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    s: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
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
    match kernels::cross_entropy::try_cross_entropy_forward_backward(logits, vocab, targets, mask)? {
        Some(r) => Ok(r),
        None => cross_entropy_forward_backward_reference(logits, vocab, targets, mask),
    }
}

/// [`cross_entropy_forward_backward`] in candle ops.
pub fn cross_entropy_forward_backward_reference(
    logits: &Tensor,
    vocab: usize,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
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

/// The embedding's rows of the tokens `ids` (u32 on the device): `table.index_select(ids, 0)`, on CUDA one
/// kernel of 16-byte copies.
pub fn embedding_forward(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    match kernels::embedding::try_embedding_rows(table, ids)? {
        Some(rows) => Ok(rows),
        None => table.index_select(ids, 0),
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

/// What [`flash_attention_backward`] needs: the inputs (K and V with their own, possibly fewer, heads) and each
/// query's softmax log-sum-exp (f32 `[batch, heads, seq, 1]`); no `[seq, seq]` matrix.
pub struct FlashSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The output, for the fused backward's `rowsum(dO O)`.
    o: Tensor,
    lse: Tensor,
}

impl FlashSaved {
    /// What the flash kernels' backward reads, with the gradient at the output `dy` (and its rows' deltas where
    /// computed).
    fn inputs<'a>(&'a self, dy: &'a Tensor, delta: Option<&'a Tensor>, windows: &'a Windows) -> FlashInputs<'a> {
        let (q, k, v, o, lse) = (&self.q, &self.k, &self.v, &self.o, &self.lse);
        FlashInputs { dy, q, k, v, o, lse, start: &windows.start, delta }
    }

    /// The same with K and V expanded to a head per query head ([`repeat_kv`]), for the blocked path.
    fn expanded(&self) -> Result<Self> {
        let groups = kv_groups(&self.q, &self.k)?;
        Ok(Self {
            q: self.q.clone(),
            k: repeat_kv(&self.k, groups)?,
            v: repeat_kv(&self.v, groups)?,
            o: self.o.clone(),
            lse: self.lse.clone(),
        })
    }
}

/// Whether CUDA runs attention as one tensor-core kernel (`crate::kernels::flash_attention`, instantiated
/// for these head dims) rather than the blocked softmax between GEMMs.
pub fn flash_kernel_takes(head_dim: usize) -> bool {
    kernels::FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Query heads per key/value head of grouped-query attention, for `q: [b, hq, t, d]` and `k: [b, hkv, t, d]`.
fn kv_groups(q: &Tensor, k: &Tensor) -> Result<usize> {
    let (hq, hkv) = (q.dim(1)?, k.dim(1)?);
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        candle_core::bail!("attention: {hq} query heads do not share {hkv} key/value heads evenly");
    }
    Ok(hq / hkv)
}

/// The backward of [`repeat_kv`]: the gradients of the query heads that shared a key/value head, summed (f32).
fn sum_kv_groups(dx: &Tensor, groups: usize) -> Result<Tensor> {
    let (b, n, t, d) = dx.dims4()?;
    dx.reshape((b, n / groups, groups, t, d))?.sum(2)
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

/// Masked, scaled scores in f32 of a block's unscaled scores `qk` ([`block_qk`]).
fn block_scores(qk: &Tensor, q: &Tensor, windows: &Windows, q0: usize, nq: usize) -> Result<Tensor> {
    let scores = (qk * score_scale(q)?)?.to_dtype(DType::F32)?;
    scores.broadcast_add(&windows.mask(q0, nq, q0 + nq)?)
}

/// One query block's probabilities (for the `P V` GEMM: f32 from the reference, bf16 from the fused
/// kernel, tried when `fused`) and log-sum-exp (f32 `[batch, heads, nq, 1]`).
fn block_softmax(
    q: &Tensor,
    k: &Tensor,
    windows: &Windows,
    (q0, nq): (usize, usize),
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let qk = block_qk(q, k, q0, nq)?;
    if fused {
        if let Some(r) = kernels::attention::try_block_forward(&qk, &windows.start, q0, score_scale(q)?)? {
            return Ok(r);
        }
    }
    let scores = block_scores(&qk, q, windows, q0, nq)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let lse = (scores.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    // exp(S - lse), not exp / sum: the backward recomputes exactly these probabilities.
    Ok((scores.broadcast_sub(&lse)?.exp()?, lse))
}

/// One query block's probabilities, recomputed from the saved log-sum-exp, and the gradient of its scores
/// times the scale, `c dS` with `dS = P (dP - rowsum(dP P))`, in the compute dtype, from the block's rows
/// `dyb` of the output gradient; `s` has a key/value head per query head. The fused kernel tried when `fused`.
fn block_softmax_backward(
    s: &FlashSaved,
    dyb: &Tensor,
    windows: &Windows,
    (q0, nq): (usize, usize),
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let dtype = s.v.dtype();
    let scale = score_scale(&s.q)?;
    let (lse, v) = (s.lse.narrow(2, q0, nq)?, s.v.narrow(2, 0, q0 + nq)?);
    let qk = block_qk(&s.q, &s.k, q0, nq)?;
    let dp = dyb.matmul(&v.t()?)?;
    if fused {
        if let Some(r) = kernels::attention::try_block_backward(&qk, &lse, &dp, &windows.start, q0, scale)? {
            return Ok(r);
        }
    }
    let probs = block_scores(&qk, &s.q, windows, q0, nq)?.broadcast_sub(&lse)?.exp()?;
    let dp = dp.to_dtype(DType::F32)?;
    let row = (&dp * &probs)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row)? * &probs)? * scale)?.to_dtype(dtype)?;
    Ok((probs, ds))
}

/// The query blocks `(q0, nq)` of a sequence of `seq` tokens.
fn query_blocks(seq: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq).step_by(block.max(1)).map(move |q0| (q0, block.max(1).min(seq - q0)))
}

/// Memory-efficient causal softmax attention (flash attention's recurrence): `q: [batch, heads, seq, dim]`,
/// `k, v: [batch, kv_heads, seq, dim]` (grouped-query attention: query head `i` reads key/value head
/// `i / (heads / kv_heads)`), each query seeing its [`Windows`]. On CUDA, for head dims the tensor-core kernel
/// takes ([`flash_kernel_takes`]), one kernel: the scores never leave registers and K and V are read in place.
/// Otherwise [`flash_attention_forward_reference`]'s blocks, with the masked softmax fused on CUDA.
pub fn flash_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, FlashSaved)> {
    if let Some((o, lse)) = kernels::flash_attention::try_forward(q, k, v, &windows.start, FlashKernels::Fastest)? {
        return Ok((o.clone(), FlashSaved { q: q.clone(), k: k.clone(), v: v.clone(), o, lse }));
    }
    blocked_attention_forward(q, k, v, windows, block, true)
}

/// [`flash_attention_forward`] in candle ops: K and V expanded to a head per query head, queries in blocks of
/// `block` rows so at most `[batch, heads, block, seq]` scores exist at once. Scores and softmax in f32.
/// Equals [`attention_forward`] with the dense mask (a test checks it).
pub fn flash_attention_forward_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, FlashSaved)> {
    blocked_attention_forward(q, k, v, windows, block, false)
}

/// The blocked forward, its softmax kernel tried when `fused`.
fn blocked_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    windows: &Windows,
    block: usize,
    fused: bool,
) -> Result<(Tensor, FlashSaved)> {
    let groups = kv_groups(q, k)?;
    let (ke, ve) = (repeat_kv(k, groups)?, repeat_kv(v, groups)?);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (q0, nq) in query_blocks(q.dim(2)?, block) {
        let (probs, lse) = block_softmax(q, &ke, windows, (q0, nq), fused)?;
        outs.push(probs.to_dtype(v.dtype())?.matmul(&ve.narrow(2, 0, q0 + nq)?)?);
        lses.push(lse);
    }
    let (o, lse) = (Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?);
    Ok((o.clone(), FlashSaved { q: q.clone(), k: k.clone(), v: v.clone(), o, lse }))
}

/// Returns `(dq, dk, dv)` of [`flash_attention_forward`], `dk` and `dv` in K's and V's shape (summed over the
/// query heads of each group). On CUDA for the flash kernel's head dims two kernels; otherwise
/// [`flash_attention_backward_reference`]'s blocks, with the softmax's backward fused on CUDA. The fused kernel
/// cannot see a row's keys at once and takes `rowsum(dO O)`, setting single-key rows to zero itself.
pub fn flash_attention_backward(
    dy: &Tensor,
    s: &FlashSaved,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(grads) = kernels::flash_attention::try_backward(&s.inputs(dy, None, windows), FlashKernels::Fastest)? {
        return Ok(grads);
    }
    blocked_attention_backward(dy, s, windows, block, true)
}

/// The gradient at the q/k/v projection's rows (`[batch * seq, (q_heads + 2 kv_heads) head_dim]`) from the
/// attention output's `dy` (and its rows' `delta`, where [`attention_sub_norm_backward`] gave them):
/// [`flash_attention_backward`] then [`qkv_heads_backward`], which on CUDA, for the flash kernel's head dims, its
/// backward kernels do at once: they write the rows, dQ and dK turned back by RoPE, in place of the heads (a pass
/// over all three gradients fewer). `(cos, sin)`: RoPE's angles, as the kernels take them.
pub fn qkv_attention_backward(
    dy: &Tensor,
    delta: Option<&Tensor>,
    s: &FlashSaved,
    windows: &Windows,
    block: usize,
    shape: HeadShape,
    (cos, sin): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let (x, fastest) = (s.inputs(dy, delta, windows), FlashKernels::Fastest);
    if let Some(dqkv) = kernels::flash_attention::try_backward_rows(&x, (cos, sin), fastest)? {
        return Ok(dqkv);
    }
    let (dq, dk, dv) = flash_attention_backward(dy, s, windows, block)?;
    qkv_heads_backward(&dq, &dk, &dv, shape, cos, sin)
}

/// [`flash_attention_backward`] in candle ops, recomputing each block's probabilities from the saved
/// log-sum-exp (`P = exp(S - lse)`, flash attention 2), so again at most one block of scores exists at once.
/// A query block sees all the keys of its rows, so `dS = P (dP - rowsum(dP P))` is taken as the plain backward
/// takes it, not from `rowsum(dO O)`: that keeps a row with a single key (the first token of every example)
/// at exactly zero, where the other form leaves rounding noise that AdamW amplifies. With one query block
/// (sequences up to `block`) that block's dK and dV are the whole gradients; with more, they are accumulated
/// in f32.
pub fn flash_attention_backward_reference(
    dy: &Tensor,
    s: &FlashSaved,
    windows: &Windows,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    blocked_attention_backward(dy, s, windows, block, false)
}

/// The blocked backward, its softmax kernel tried when `fused`.
fn blocked_attention_backward(
    dy: &Tensor,
    saved: &FlashSaved,
    windows: &Windows,
    block: usize,
    fused: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let groups = kv_groups(&saved.q, &saved.k)?;
    let s = &saved.expanded()?;
    let dtype = s.v.dtype();
    let block_grads = |(q0, nq): (usize, usize)| -> Result<(Tensor, Tensor, Tensor)> {
        let nk = q0 + nq;
        let dyb = dy.narrow(2, q0, nq)?;
        let (probs, ds) = block_softmax_backward(s, &dyb, windows, (q0, nq), fused)?;
        let dv = probs.to_dtype(dtype)?.t()?.matmul(&dyb)?;
        let dq = ds.matmul(&s.k.narrow(2, 0, nk)?)?;
        let dk = ds.t()?.matmul(&s.q.narrow(2, q0, nq)?)?;
        Ok((dq, dk, dv))
    };
    let blocks: Vec<_> = query_blocks(s.q.dim(2)?, block).collect();
    let (dq, dk, dv) = match blocks[..] {
        [only] => block_grads(only)?,
        _ => {
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
            (Tensor::cat(&dqs, 2)?, dk, dv)
        }
    };
    if groups == 1 {
        return Ok((dq, dk.to_dtype(dtype)?, dv.to_dtype(dtype)?));
    }
    let sum = |g: &Tensor| sum_kv_groups(&g.to_dtype(DType::F32)?, groups)?.to_dtype(dtype);
    Ok((dq, sum(&dk)?, sum(&dv)?))
}
