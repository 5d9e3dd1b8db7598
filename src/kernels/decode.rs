//! Decoding one token per row (decode.cu): the few rows of a generation step multiplied by a weight matrix
//! in one pass over it, with the output's scales and the residual add, and each row's new token's attention
//! over its KV cache with RoPE and the cache write, in one launch per layer (blocks of 32 columns, joined by
//! the last to finish, as flash-decoding splits them) instead of about fifteen ops.
//! References: `model::bitnet`'s `Stacked::forward` and `Attention::forward` in candle ops.

use candle_core::{DType, Result, Tensor};
use cudarc::driver::LaunchConfig;

use super::shapes::{DecodeAttention, GemvWeight, GEMV_ROWS};
use super::{aligned_ptr, applies, cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("decode");

/// Outputs per block of the product: a warp each.
const GEMV_WARPS: usize = 8;
/// Threads of the attention kernel (`ATTN_THREADS`).
const ATTN_THREADS: u32 = 128;
/// Columns per split of the attention kernel (`SPLIT`): the columns spread over the card.
const SPLIT: usize = 32;
/// Query heads of one kv head an attention block serves (`GROUP_MAX`).
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

/// `x @ w^T (* scale) (+ residual)` for the quantized input `x: [.., k]` of at most [`GEMV_ROWS`] rows (bf16),
/// the weights `w` (`[n, k]` bf16, or packed ternary codes), the outputs' scales `scale: [n]` (or none: the
/// head) and `residual` in the output's shape `[.., n]`, rounded as the candle ops round: `Ok(None)` where it
/// does not apply (more rows, `k` not a multiple of 8, or of 16 packed, not bf16 on CUDA).
pub fn try_gemv(
    x: &Tensor,
    w: GemvWeight,
    scale: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (name, weights, n, k) = match w {
        GemvWeight::Dense(w) => {
            let (n, k) = w.dims2()?;
            ("gemv", w, n, k)
        }
        GemvWeight::Packed { codes, k } => ("gemv_ternary", codes, codes.dim(0)?, k),
    };
    let fits = match w {
        GemvWeight::Dense(w) => w.dtype() == DType::BF16 && k.is_multiple_of(8),
        GemvWeight::Packed { codes, .. } => {
            codes.dtype() == DType::U32 && k.is_multiple_of(16) && codes.dims() == [n, k / 16]
        }
    };
    let rows = x.elem_count() / k.max(1);
    if !applies(x) || !fits || rows > GEMV_ROWS || x.dim(candle_core::D::Minus1)? != k {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    let (x, weights) = (x.contiguous()?, weights.contiguous()?);
    let scale = scale.map(|s| s.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    if residual.as_ref().is_some_and(|r| r.dims() != dims.as_slice()) {
        candle_core::bail!("gemv: residual {:?} for an output {dims:?}", residual.map(|r| r.dims().to_vec()));
    }
    let dev = cuda_device(&x)?;
    let out = uninit(dims, DType::BF16, &dev)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_WARPS) as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(dev, PTX, name, cfg;
        aligned_ptr(&x)?, aligned_ptr(&weights)?, scale.as_ref().map_or(Ok(0), ptr)?,
        residual.as_ref().map_or(Ok(0), ptr)?, ptr(&out)?, rows as i32, n as i32, k as i32);
    Ok(Some(out))
}

/// The ternary weights `w: [n, k]` (bf16 values -1, 0, 1) packed 16 to a u32, `[n, k / 16]`, for
/// [`GemvWeight::Packed`]; `Ok(None)` where that does not apply (not bf16 on CUDA, `k` not a multiple of 16).
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
    {
        candle_core::bail!(
            "decode attention: qkv {:?}, caches {:?}, meta {:?}, inv_freq {:?} for {} heads ({} kv) of {}",
            a.qkv.dims(),
            a.k_cache.dims(),
            a.meta.dims(),
            a.inv_freq.dims(),
            a.heads,
            a.kv_heads,
            a.head_dim
        );
    }
    let qkv = a.qkv.contiguous()?;
    let inv_freq = a.inv_freq.to_dtype(DType::F32)?.contiguous()?;
    let dev = cuda_device(&qkv)?;
    let splits = width.div_ceil(SPLIT);
    let blocks = a.kv_heads * (a.heads / a.kv_heads).div_ceil(GROUP_MAX);
    let y = uninit((rows, a.heads * d), DType::BF16, &dev)?;
    // One split writes y itself; several write their parts, and count themselves done so that the last joins
    // them (the counts start at zero, a memset that a captured step repeats).
    let (parts, counts) = if splits > 1 { (rows * a.heads * splits * (d + 2), rows * blocks) } else { (1, 1) };
    let partial = uninit(parts, DType::F32, &dev)?;
    let done = Tensor::zeros(counts, DType::U32, qkv.device())?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, rows as u32, splits as u32),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY (of writing through the caches): the KV cache's buffers are this generation's alone.
    launch!(dev, PTX, "decode_attention", cfg;
        ptr(&qkv)?, aligned_ptr(a.k_cache)?, aligned_ptr(a.v_cache)?, ptr(a.meta)?, ptr(&inv_freq)?, ptr(&y)?,
        ptr(&partial)?, ptr(&done)?, a.heads as i32, a.kv_heads as i32, d as i32, width as i32);
    Ok(Some(y))
}
