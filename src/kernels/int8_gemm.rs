//! An int8 x int8 GEMM with bf16 output on Hopper's tensor cores (`int8_gemm.cu`: wgmma with s8 inputs and
//! s32 sums, which run at twice bf16's rate; cuBLASLt's int8 GEMM measured slower than its bf16 one at a
//! BitLinear's shapes): `round_bf16(a b^T * a_scale[m] * b_scale[n])` with exact integer sums. The
//! reference is the same product in integers on the host (`tests/gpu.rs`).
//!
//! Not yet called by training: this first version (every thread loading stages with cp.async, no TMA, no
//! warp specialization) runs at 0.62-0.92x of cuBLAS's bf16 GEMM at the forward's shapes (BENCHMARKS.md),
//! and the forward would also need the int8 codes beside the bf16 input its weight gradient reads.

use candle_core::{DType, Result, Tensor};
use cudarc::driver::LaunchConfig;

use super::{compute_capability, cuda_device, launch, opt_in_shared, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("int8_gemm");

/// The rows of the output a block takes, the bytes of k a stage holds, the stages and the threads
/// (int8_gemm.cu's `IG_BM`, `IG_BK`, `STAGES`, `IG_THREADS`).
const ROWS: usize = 128;
const STAGE_K: usize = 128;
const STAGES: usize = 4;
const THREADS: u32 = 256;

/// The columns of the output a block takes: a kernel each (`int8_gemm_n128`, `int8_gemm_n256`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    N128,
    N256,
}

impl Tile {
    fn columns(self) -> usize {
        match self {
            Tile::N128 => 128,
            Tile::N256 => 256,
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            Tile::N128 => "int8_gemm_n128",
            Tile::N256 => "int8_gemm_n256",
        }
    }

    /// The stages' operands, and room to align them to 1,024 bytes (the swizzle's period).
    fn shared(self) -> usize {
        STAGES * (ROWS + self.columns()) * STAGE_K + 1024
    }
}

/// `int8_gemm`'s parameters, as int8_gemm.cu's `Int8Gemm` lays them out (device addresses, 0 for none).
#[repr(C)]
struct GemmParams {
    a: u64,
    b: u64,
    a_scale: u64,
    b_scale: u64,
    out: u64,
    m: i32,
    n: i32,
    k: i32,
}

// SAFETY: a plain `#[repr(C)]` struct of integers, which the kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for GemmParams {}

/// `out[m, n] = round_bf16(sum_k a[m, k] b[n, k] * a_scale[m] * b_scale[n])` (bf16 `[m, n]`) for `a: [m, k]`
/// and `b: [n, k]`, u8 tensors holding int8 values (two's complement), and f32 scales `[m]` and `[n]` (None:
/// 1), each block taking `tile`'s columns. `Ok(None)` where the kernel does not apply: not on a Hopper GPU, `k`
/// not a multiple of 128, `n` odd.
pub fn try_int8_gemm(
    a: &Tensor,
    b: &Tensor,
    a_scale: Option<&Tensor>,
    b_scale: Option<&Tensor>,
    tile: Tile,
) -> Result<Option<Tensor>> {
    let ((m, k), (n, kb)) = (a.dims2()?, b.dims2()?);
    let Ok(dev) = cuda_device(a) else { return Ok(None) };
    // The module is built for sm_90a only: Hopper (compute capability 9.0).
    if compute_capability(&dev) != Some((9, 0))
        || k != kb
        || !k.is_multiple_of(STAGE_K)
        || !n.is_multiple_of(2)
        || m == 0
    {
        return Ok(None);
    }
    let scale_ok = |s: Option<&Tensor>, len: usize| s.is_none_or(|s| s.dtype() == DType::F32 && s.elem_count() == len);
    if a.dtype() != DType::U8 || b.dtype() != DType::U8 || !scale_ok(a_scale, m) || !scale_ok(b_scale, n) {
        candle_core::bail!(
            "int8 GEMM: a {:?} {:?}, b {:?} {:?}, scales {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype(),
            a_scale.map(|s| (s.dims().to_vec(), s.dtype())),
            b_scale.map(|s| (s.dims().to_vec(), s.dtype()))
        );
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let a_scale = a_scale.map(|s| s.contiguous()).transpose()?;
    let b_scale = b_scale.map(|s| s.contiguous()).transpose()?;
    let (name, shared) = (tile.kernel(), tile.shared());
    opt_in_shared(&dev, PTX, name, shared)?;
    let out = uninit((m, n), DType::BF16, &dev)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(tile.columns()) as u32, m.div_ceil(ROWS) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let params = GemmParams {
        a: ptr(&a)?,
        b: ptr(&b)?,
        a_scale: a_scale.as_ref().map_or(Ok(0), ptr)?,
        b_scale: b_scale.as_ref().map_or(Ok(0), ptr)?,
        out: ptr(&out)?,
        m: m as i32,
        n: n as i32,
        k: k as i32,
    };
    launch!(dev, PTX, name, cfg; params);
    Ok(Some(out))
}
