//! RMSNorm fused with the int8 quantization of the BitLinear input that follows it, and RMSNorm's backward;
//! with `glu`, the norm's input is the gated activation `act(gate) up` computed on the fly from the fused
//! gate/up rows (down_proj's input: h never reaches memory, and the backward writes the gate/up gradient).
//! References: `train::layers::{sub_norm_quant_forward_reference, norm_backward_reference}`.

use candle_core::{bail, DType, Result, Tensor};
use cudarc::driver::LaunchConfig;

pub use super::shapes::ColumnSum;
use super::shapes::Int8Operand;
use super::{aligned_ptr, cuda_device, launch, ptr, ptx, uninit, Ptx};
use crate::model::arch::Activation;

const PTX: Ptx = ptx!("rmsnorm");

/// Whether the kernels take rows of `c` channels: whole 8-channel vectors, at most 4 per thread of a block of 512.
pub fn supports(c: usize) -> bool {
    c.is_multiple_of(8) && c <= 4 * 8 * 512
}

/// Whether the kernels apply to `x`: bf16 on CUDA, rows or heads (see [`row_shape`]) of channels they take.
fn takes(x: &Tensor, glu: bool) -> bool {
    super::applies(x) && row_shape(x, glu).is_ok_and(|(_, c, _, _)| supports(c))
}

/// The kernel's name: `glu_` for the gate/up input, then the kind and the variant.
fn kernel(kind: &str, glu: bool, v: &Variant) -> String {
    format!("{}rmsnorm_{kind}_{}", if glu { "glu_" } else { "" }, v.suffix)
}

/// The kernels' `act` argument (`rmsnorm.cu`'s `ACT_*`); 0 without a gated activation, where it is not read.
pub(crate) fn act_arg(glu: Option<Activation>) -> i32 {
    match glu {
        None | Some(Activation::Silu) => 0,
        Some(Activation::Relu2) => 1,
    }
}

/// How a kernel spreads rows: its name suffix (`w` or `b` and the vectors of 8 channels per thread), threads
/// per block and rows (groups of threads) per block.
struct Variant {
    suffix: String,
    threads: u32,
    groups: usize,
}

/// The variant for rows of `c` channels. The forward: a warp per row up to 1536 channels (6 vectors per lane),
/// else a block per row with 4 vectors per thread. The backward: a block per row of at most 512 threads (two
/// fit an SM) with 1, 2 or 4 vectors each. `rmsnorm.cu` gives the measurements behind the limits.
fn variant(c: usize, backward: bool) -> Result<Variant> {
    if !supports(c) {
        bail!("the RMSNorm kernels take a multiple of 8 channels up to 16384, not {c}");
    }
    let vectors = c / 8;
    let block = |k: usize| Variant {
        suffix: format!("b{k}"),
        threads: (vectors.div_ceil(k).div_ceil(32) * 32) as u32,
        groups: 1,
    };
    if backward {
        return Ok(block([1, 2, 4].into_iter().find(|k| vectors.div_ceil(*k) <= 512).expect("supports() bounds c")));
    }
    match [1, 2, 4, 6].into_iter().find(|k| vectors.div_ceil(32) <= *k) {
        Some(k) => Ok(Variant { suffix: format!("w{k}"), threads: 256, groups: 8 }),
        None => Ok(block(4)),
    }
}

/// `(n, c, t, d)` of `x`: rows `[n, c]` (t = d = 0), or attention's heads `[b, h, t, d]` read as rows
/// `[b t, h d]`; with `glu`, gate/up rows `[n, 2c]`.
fn row_shape(x: &Tensor, glu: bool) -> Result<(usize, usize, usize, usize)> {
    match *x.dims() {
        [n, c2] if glu && c2.is_multiple_of(2) => Ok((n, c2 / 2, 0, 0)),
        _ if glu => bail!("the gated norm kernels take gate/up rows [n, 2c], not {:?}", x.dims()),
        [n, c] => Ok((n, c, 0, 0)),
        [b, h, t, d] if d.is_multiple_of(8) => Ok((b * t, h * d, t, d)),
        _ => bail!("the RMSNorm kernels take rows [n, c] or heads [b, h, t, d] with d % 8 == 0, not {:?}", x.dims()),
    }
}

/// For `x` (rows `[n, c]` or heads, or with `glu` gate/up rows `[n, 2c]` whose gated activation is normed:
/// see [`row_shape`]) and the norm weight `w: [c]` (bf16; None: no norm, the input only quantized, and the
/// reciprocal RMS written as 1): the BitLinear input (normed, fake-quantized to int8
/// per row, blended by `lambda`), bf16 rows `[n, c]`, the reciprocal RMS of each row, f32 `[n, 1]`, and with
/// `int8` (lambda 1 only: the input is then its codes times its row's scale) the input's int8 form.
/// `Ok(None)` where the kernels do not apply.
pub fn try_rmsnorm_quant_forward(
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    eps: f64,
    lambda: f64,
    int8: bool,
) -> Result<Option<(Tensor, Tensor, Option<Int8Operand>)>> {
    if !takes(x, glu.is_some()) {
        return Ok(None);
    }
    if int8 && lambda < 1.0 {
        bail!("the int8 form of a BitLinear input needs lambda 1, not {lambda}");
    }
    let w = w.map(|w| w.contiguous()).transpose()?;
    rmsnorm_quant_forward(&x.contiguous()?, glu, w.as_ref(), eps, lambda, int8).map(Some)
}

/// The weight's address, or 0 (null) for none.
fn weight_ptr(w: Option<&Tensor>) -> Result<u64> {
    w.map_or(Ok(0), ptr)
}

fn rmsnorm_quant_forward(
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    eps: f64,
    lambda: f64,
    int8: bool,
) -> Result<(Tensor, Tensor, Option<Int8Operand>)> {
    let (n, c, t, d) = row_shape(x, glu.is_some())?;
    let v = variant(c, false)?;
    let dev = cuda_device(x)?;
    let (y, rrms) = (uninit((n, c), DType::BF16, &dev)?, uninit((n, 1), DType::F32, &dev)?);
    let int8 = match int8 {
        true => Some(Int8Operand { codes: uninit((n, c), DType::U8, &dev)?, scales: uninit(n, DType::F32, &dev)? }),
        false => None,
    };
    let (codes, scales) = match &int8 {
        Some(o) => (ptr(&o.codes)?, ptr(&o.scales)?),
        None => (0, 0),
    };
    let inv_c = (1.0 / c as f64) as f32;
    launch!(dev, PTX, &kernel("quant_forward", glu.is_some(), &v), super::per_row(n.div_ceil(v.groups), v.threads);
        aligned_ptr(x)?, weight_ptr(w)?, aligned_ptr(&y)?, ptr(&rrms)?, codes, scales, n as i32, c as i32, inv_c,
        eps as f32, lambda as f32, t as i32, d as i32, act_arg(glu));
    Ok((y, rrms, int8))
}

/// `(dx, partial)` of RMSNorm for `dy: [n, c]` and `x` (bf16; rows, heads or with `glu` gate/up rows, see
/// [`row_shape`]), `w: [c]` (None: no norm, the gradient passes through), `rrms: [n, 1]` (f32); `dx` in `x`'s
/// shape (with `glu`, `[dgate | dup]`) with
/// `residual` (the same shape) added; the weight's gradient as rows of partial sums (f32 `[blocks, c]`), for
/// [`try_column_sums`]; with `deltas`, where `x` is attention's output heads `[b, h, t, d]`, each head row's
/// `delta = sum over d of dx x` (f32 `[b, h, t]`) that flash attention's backward reads (`FlashInputs::delta`).
/// `Ok(None)` where the kernels do not apply.
pub fn try_rmsnorm_backward(
    dy: &Tensor,
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    rrms: &Tensor,
    residual: Option<&Tensor>,
    deltas: bool,
) -> Result<Option<NormBackward>> {
    if !(super::applies(dy) && takes(x, glu.is_some())) {
        return Ok(None);
    }
    let (dy, x, rrms) = (dy.contiguous()?, x.contiguous()?, rrms.contiguous()?);
    let w = w.map(|w| w.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    rmsnorm_backward(&dy, &x, glu, w.as_ref(), &rrms, residual.as_ref(), deltas).map(Some)
}

/// What [`try_rmsnorm_backward`] gives: `dx`, the weight gradient's partial sums, and the heads' deltas where
/// asked for.
pub type NormBackward = (Tensor, Tensor, Option<Tensor>);

fn rmsnorm_backward(
    dy: &Tensor,
    x: &Tensor,
    glu: Option<Activation>,
    w: Option<&Tensor>,
    rrms: &Tensor,
    residual: Option<&Tensor>,
    deltas: bool,
) -> Result<NormBackward> {
    let (n, c, t, d) = row_shape(x, glu.is_some())?;
    let v = variant(c, true)?;
    // Groups share the rows, at least 4 each: each group writes one row of dw partial sums, which
    // `column_sums` sums, and with one row per group that traffic would match the rows' own. At most one wave.
    let dev = cuda_device(x)?;
    let name = kernel("backward", glu.is_some(), &v);
    let blocks = n.div_ceil(4 * v.groups).clamp(1, super::one_wave(&dev, PTX, &name, v.threads, 0)?);
    let partial = uninit((blocks * v.groups, c), DType::F32, &dev)?;
    let dx = uninit(x.shape(), DType::BF16, &dev)?;
    let delta = match deltas && d > 0 && glu.is_none() {
        true => Some(uninit((n / t, c / d, t), DType::F32, &dev)?),
        false => None,
    };
    let inv_c = (1.0 / c as f64) as f32;
    launch!(dev, PTX, &name, super::per_row(blocks, v.threads);
        aligned_ptr(dy)?, aligned_ptr(x)?, weight_ptr(w)?, ptr(rrms)?, residual.map_or(Ok(0), aligned_ptr)?,
        aligned_ptr(&dx)?, ptr(&partial)?, delta.as_ref().map_or(Ok(0), ptr)?,
        n as i32, c as i32, inv_c, t as i32, d as i32, act_arg(glu));
    Ok((dx, partial, delta))
}

/// The sums `rmsnorm.cu`'s `column_sums` takes in one launch.
const COLUMN_JOBS: usize = 4;

/// `rmsnorm.cu`'s `ColumnSums`: each job's partial sums, destination, rows, columns, whether it adds, and its
/// first block; the number of jobs.
#[repr(C)]
#[derive(Default)]
struct ColumnSumsParams {
    x: [u64; COLUMN_JOBS],
    out: [u64; COLUMN_JOBS],
    rows: [i32; COLUMN_JOBS],
    cols: [i32; COLUMN_JOBS],
    add: [i32; COLUMN_JOBS],
    first: [i32; COLUMN_JOBS],
    jobs: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for ColumnSumsParams {}

/// Each of `sums` written, its rows added in a fixed order, up to four in one launch (a block's norms); every
/// `dst` of one dtype. `Ok(None)` off CUDA.
pub fn try_column_sums(sums: &[ColumnSum]) -> Result<Option<()>> {
    let Some(first) = sums.first() else { return Ok(Some(())) };
    if !super::on_cuda(first.partial) {
        return Ok(None);
    }
    let dtype = first.dst.dtype();
    if sums.iter().any(|s| s.dst.dtype() != dtype) {
        bail!("column sums into gradient buffers of different dtypes");
    }
    let dev = cuda_device(first.partial)?;
    let name = match dtype {
        DType::BF16 => "column_sums_bf16",
        _ => "column_sums_f32",
    };
    for chunk in sums.chunks(COLUMN_JOBS) {
        let mut p = ColumnSumsParams { jobs: chunk.len() as i32, ..Default::default() };
        let mut blocks = 0;
        // The partials made contiguous (they are, as the norms' kernels write them) live until the launch.
        let partials = chunk.iter().map(|s| s.partial.contiguous()).collect::<Result<Vec<_>>>()?;
        for (j, (s, partial)) in chunk.iter().zip(&partials).enumerate() {
            let (rows, c) = partial.dims2()?;
            if s.dst.elem_count() != c {
                bail!("column sums of {c} columns into a gradient of {} elements", s.dst.elem_count());
            }
            (p.x[j], p.out[j]) = (ptr(partial)?, ptr(&s.dst)?);
            (p.rows[j], p.cols[j], p.add[j], p.first[j]) = (rows as i32, c as i32, s.add as i32, blocks as i32);
            blocks += c.div_ceil(32);
        }
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 32, 1), shared_mem_bytes: 0 };
        launch!(dev, PTX, name, cfg; p);
    }
    Ok(Some(()))
}
