//! Decoding one token per row (decode.cu): the few rows of a generation step through a BitLinear in one
//! launch (their norm, int8 quantization, the product with the packed ternary weights in one pass over them,
//! the scales and the residual add), the head's bf16 product, and each row's new token's attention
//! over its KV cache with RoPE and the cache write, in one launch per layer (blocks of 32 columns, joined by
//! the last to finish, as flash-decoding splits them) instead of about fifteen ops. The BitLinear and
//! attention kernels read before they wait for their inputs (`super::launch_kernel`'s early launches): on
//! Hopper each starts while the one before it finishes, reading its weights (or its cached columns)
//! meanwhile, where the step writes buffers of its own (`out`, `partial`: no allocation between them in a
//! captured step).
//! References: `model::bitnet`'s `Stacked::forward` and `Attention::forward` in candle ops.

use candle_core::{DType, Result, Tensor, D};
use cudarc::driver::LaunchConfig;

use super::shapes::{BitLinearStep, DecodeAttention, StepLayout, GEMV_ROWS, STEP_WARPS};
use super::{aligned_ptr, applies, cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("decode");

/// Outputs per block of the head's product: a warp each.
const GEMV_WARPS: usize = 8;
/// Threads of the attention kernel (`ATTN_THREADS`).
const ATTN_THREADS: u32 = 128;
/// Columns per split of the attention kernel (`SPLIT`): the columns spread over the card.
const SPLIT: usize = 32;
/// The most query heads of one kv head an attention block serves (`GROUP_MAX`).
const GROUP_MAX: usize = 8;

/// The device address of `t`'s first element: what a captured graph's kernels were given.
pub fn address(t: &Tensor) -> Result<u64> {
    ptr(t)
}

/// Whether [`try_decode_attention`] takes heads of `head_dim` for `x`'s device (bf16 on CUDA, the kernels
/// enabled): a multiple of 8 (16-byte chunks) up to 256.
pub fn takes(x: &Tensor, head_dim: usize) -> bool {
    applies(x) && head_dim.is_multiple_of(8) && head_dim <= 256
}

/// `x @ w^T (* scale) (+ residual)` for `x: [.., k]` of at most [`GEMV_ROWS`] rows and the weights `w: [n, k]`
/// (bf16: the head, or ternary values that were not packed), the outputs' scales `scale: [n]` (or none: the
/// head) and `residual` in the output's shape `[.., n]`, rounded as the candle ops round: `Ok(None)` where it
/// does not apply (more rows, `k` not a multiple of 8, not bf16 on CUDA).
pub fn try_gemv(x: &Tensor, w: &Tensor, scale: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if !applies(x) || w.dtype() != DType::BF16 || !k.is_multiple_of(8) || rows > GEMV_ROWS || x.dim(D::Minus1)? != k {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let scale = scale.map(|s| s.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let dims = output_dims(&x, n, residual.as_ref())?;
    let dev = cuda_device(&x)?;
    let out = uninit(dims, DType::BF16, &dev)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_WARPS) as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(dev, PTX, "gemv", cfg;
        aligned_ptr(&x)?, aligned_ptr(&w)?, scale.as_ref().map_or(Ok(0), ptr)?,
        residual.as_ref().map_or(Ok(0), ptr)?, ptr(&out)?, rows as i32, n as i32, k as i32);
    Ok(Some(out))
}

/// The output's dims: `x`'s with the last one `n`; `residual`, when given, must have them.
fn output_dims(x: &Tensor, n: usize, residual: Option<&Tensor>) -> Result<Vec<usize>> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    if residual.is_some_and(|r| r.dims() != dims.as_slice()) {
        candle_core::bail!("decode product: residual {:?} for an output {dims:?}", residual.map(|r| r.dims().to_vec()));
    }
    Ok(dims)
}

/// `out` (checked to hold `dims` of `dtype`, contiguous: a step's buffer), or a fresh tensor of them.
fn output(out: Option<&Tensor>, dims: &[usize], dtype: DType, dev: &candle_core::CudaDevice) -> Result<Tensor> {
    match out {
        None => uninit(dims, dtype, dev),
        Some(t) if t.dims() == dims && t.dtype() == dtype && t.is_contiguous() => Ok(t.clone()),
        Some(t) => {
            candle_core::bail!("decode step: an output buffer {:?} {:?} for {dims:?} {dtype:?}", t.dims(), t.dtype())
        }
    }
}

/// The ternary weights `w: [n, k]` (bf16 values -1, 0, 1) packed 16 to a u32, `[n, k / 16]`, for
/// [`BitLinearStep::codes`]; `Ok(None)` where that does not apply (not bf16 on CUDA, `k` not a multiple of 16).
pub fn pack_ternary(w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    if !applies(w) || !k.is_multiple_of(16) {
        return Ok(None);
    }
    let w = w.contiguous()?;
    let words = n * k / 16;
    let dev = cuda_device(&w)?;
    let codes = uninit((n, k / 16), DType::U32, &dev)?;
    launch!(dev, PTX, "pack_ternary", super::grid_stride(words); ptr(&w)?, ptr(&codes)?, words as u64);
    Ok(Some(codes))
}

/// `bitlinear_step`'s parameters, as decode.cu's `BitLinearStep` lays them out (device addresses, 0 for none).
#[repr(C)]
struct StepParams {
    x: u64,
    norm: u64,
    codes: u64,
    scale: u64,
    residual: u64,
    out: u64,
    eps: f32,
    act: i32,
    rows: i32,
    n: i32,
    k: i32,
    block_outputs: i32,
    stage_outputs: i32,
}

// SAFETY: a plain `#[repr(C)]` struct of integers and floats, which the kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for StepParams {}

/// Whether [`try_bitlinear_step`] takes `rows` rows of `k` inputs on `x`'s device: bf16 on CUDA, at most
/// [`GEMV_ROWS`] rows, `k` a multiple of 16 (whole words of codes) up to [`STEP_K_MAX`](super::shapes::STEP_K_MAX), whose rows fit a
/// block's shared memory beside two outputs' codes.
pub fn takes_step(x: &Tensor, rows: usize, k: usize) -> bool {
    step_room(x, rows, k).is_some()
}

/// [`takes_step`]'s answer as the dynamic shared memory a block may take on `x`'s device, where it takes them.
fn step_room(x: &Tensor, rows: usize, k: usize) -> Option<usize> {
    if !applies(x) || rows > GEMV_ROWS || k == 0 || !k.is_multiple_of(16) {
        return None;
    }
    let shared = cuda_device(x).and_then(|dev| super::shared_room(&dev, PTX, "bitlinear_step")).ok()?;
    StepLayout::fits(rows, k, shared).then_some(shared)
}

/// A decoding step's BitLinear in one launch ([`BitLinearStep`]): the input normed and quantized to int8 per
/// row as `kernels::rmsnorm`'s forward does it, times the packed ternary codes (exact integer sums), the
/// scales and the residual; `[.., n]` bf16. `Ok(None)` where it does not apply ([`takes_step`], the codes
/// not `[n, k / 16]` u32).
pub fn try_bitlinear_step(s: &BitLinearStep) -> Result<Option<Tensor>> {
    let width = s.x.dim(D::Minus1)?;
    let k = if s.glu.is_some() { width / 2 } else { width };
    let rows = s.x.elem_count() / width.max(1);
    let n = s.codes.dim(0)?;
    let fits = s.codes.dtype() == DType::U32
        && s.codes.dims() == [n, k / 16]
        && s.scales.elem_count() == n
        && s.norm.is_none_or(|w| w.elem_count() == k);
    let Some(shared) = step_room(s.x, rows, k).filter(|_| fits) else { return Ok(None) };
    let dev = cuda_device(s.x)?;
    let name = "bitlinear_step";
    // One block an SM: its registers fill one (launch bounds of 1,024 threads), whatever its shared memory.
    let wave = super::one_wave(&dev, PTX, name, 32 * STEP_WARPS as u32, 0)?;
    let Some(layout) = StepLayout::new(rows, n, k, wave, shared) else { return Ok(None) };
    // Beyond 48 KB with the static arrays: opted into above 40 KB.
    if layout.bytes > 40 * 1024 {
        super::opt_in_shared(&dev, PTX, name, layout.bytes)?;
    }
    let x = s.x.contiguous()?;
    let norm = s.norm.map(|w| w.contiguous()).transpose()?;
    let (codes, scales) = (s.codes.contiguous()?, s.scales.contiguous()?);
    let residual = s.residual.map(|r| r.contiguous()).transpose()?;
    let dims = output_dims(&x, n, residual.as_ref())?;
    let out = output(s.out, &dims, DType::BF16, &dev)?;
    let cfg = LaunchConfig {
        grid_dim: (layout.blocks as u32, 1, 1),
        block_dim: (32 * STEP_WARPS as u32, 1, 1),
        shared_mem_bytes: layout.bytes as u32,
    };
    let params = StepParams {
        x: aligned_ptr(&x)?,
        norm: norm.as_ref().map_or(Ok(0), ptr)?,
        codes: ptr(&codes)?,
        scale: ptr(&scales)?,
        residual: residual.as_ref().map_or(Ok(0), ptr)?,
        out: ptr(&out)?,
        eps: s.eps as f32,
        act: s.glu.map_or(-1, |a| super::rmsnorm::act_arg(Some(a))),
        rows: rows as i32,
        n: n as i32,
        k: k as i32,
        block_outputs: layout.block_outputs as i32,
        stage_outputs: layout.stage_outputs as i32,
    };
    launch!(dev, PTX, name, cfg; params);
    Ok(Some(out))
}

/// The join counts [`try_decode_attention`] needs for `rows` rows of `heads` query heads: one per row and
/// block of a split, a block serving one query head at the least.
pub fn join_counts(rows: usize, heads: usize) -> usize {
    rows * heads
}

/// The query heads of one kv head that an attention block serves for `rows` rows over a cache `width` columns
/// wide: the fewest (a power of two up to the group, at most [`GROUP_MAX`]) whose grid fits two waves of
/// the card. Fewer heads a block spread a short context's few splits over more SMs, each block's chain
/// shorter; past two waves the keys and values each block reads again cost more. 2B4T's heads (20 on 5),
/// H100, us a launch: at 440 columns 10.08 (8 heads a block, 70 blocks), 8.07 (2), 7.10 (1, 280 blocks); at
/// 1,701 columns 17.02 (8), 15.82 (2, 540 blocks), 18.16 (1, 1,080 blocks).
fn heads_per_block(
    dev: &candle_core::CudaDevice,
    rows: usize,
    heads: usize,
    kv_heads: usize,
    width: usize,
) -> Result<usize> {
    let group = heads / kv_heads;
    let waves = 2 * super::one_wave(dev, PTX, "decode_attention", ATTN_THREADS, 0)?;
    let blocks = |per: usize| rows * kv_heads * group.div_ceil(per) * width.div_ceil(SPLIT);
    let mut per = 1;
    while per < group.min(GROUP_MAX) && blocks(per) > waves {
        per *= 2;
    }
    Ok(per)
}

/// The f32 partial results [`try_decode_attention`] needs for `rows` rows of `heads` query heads of `head_dim`
/// over a cache `width` columns wide: each split's output, max and sum of exponentials (one, unused, where one
/// split covers the cache).
pub fn partial_len(rows: usize, heads: usize, head_dim: usize, width: usize) -> usize {
    match width.div_ceil(SPLIT) {
        1 => 1,
        splits => rows * heads * splits * (head_dim + 2),
    }
}

/// One decoding step's attention ([`DecodeAttention`]): the new keys and values written into the caches'
/// column, and each row's attention output `[rows, heads head_dim]` (bf16), its query and key rotated by RoPE;
/// `Ok(None)` where the kernel does not take it ([`takes`]).
pub fn try_decode_attention(a: &DecodeAttention) -> Result<Option<Tensor>> {
    if !takes(a.qkv, a.head_dim) || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Ok(None);
    }
    let (rows, kv_heads, width, d) = a.k_cache.dims4()?;
    let qkv_width = (a.heads + 2 * a.kv_heads) * a.head_dim;
    if kv_heads != a.kv_heads
        || d != a.head_dim
        || width != a.width
        || a.qkv.elem_count() != rows * qkv_width
        || a.meta.dims() != [4 * rows + 2]
        || a.meta.dtype() != DType::U32
        || a.inv_freq.elem_count() != d / 2
        || a.v_cache.dims() != a.k_cache.dims()
        || !a.k_cache.is_contiguous()
        || !a.v_cache.is_contiguous()
        || a.done.dtype() != DType::U32
        || a.done.elem_count() < join_counts(rows, a.heads)
    {
        candle_core::bail!(
            "decode attention: qkv {:?}, caches {:?}, meta {:?}, inv_freq {:?}, join counts {:?} for {} heads ({} kv) \
             of {}",
            a.qkv.dims(),
            a.k_cache.dims(),
            a.meta.dims(),
            a.inv_freq.dims(),
            a.done.dims(),
            a.heads,
            a.kv_heads,
            a.head_dim
        );
    }
    let qkv = a.qkv.contiguous()?;
    let inv_freq = a.inv_freq.to_dtype(DType::F32)?.contiguous()?;
    let dev = cuda_device(&qkv)?;
    let splits = width.div_ceil(SPLIT);
    let per = heads_per_block(&dev, rows, a.heads, a.kv_heads, width)?;
    let blocks = a.kv_heads * (a.heads / a.kv_heads).div_ceil(per);
    let y = output(a.out, &[rows, a.heads * d], DType::BF16, &dev)?;
    // One split writes y itself; several write their parts, and count themselves done in `a.done` so that
    // the last joins them.
    let parts = partial_len(rows, a.heads, d, width);
    let partial = output(a.partial, &[parts], DType::F32, &dev)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, rows as u32, splits as u32),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY (of writing through the caches): the KV cache's buffers are this generation's alone.
    launch!(dev, PTX, "decode_attention", cfg;
        ptr(&qkv)?, aligned_ptr(a.k_cache)?, aligned_ptr(a.v_cache)?, ptr(a.meta)?, ptr(&inv_freq)?, ptr(&y)?,
        ptr(&partial)?, ptr(a.done)?, a.heads as i32, a.kv_heads as i32, d as i32, width as i32, per as i32);
    Ok(Some(y))
}
