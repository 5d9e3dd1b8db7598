//! An int8 x int8 GEMM with bf16 output on Hopper's tensor cores (`int8_gemm.cu`: wgmma with s8 inputs and
//! s32 sums, which run at twice bf16's rate; cuBLASLt's int8 GEMM measured slower than its bf16 one at a
//! BitLinear's shapes): `round_bf16(a b^T * a_scale[m] * b_scale[n])` with exact integer sums, and the
//! residual stream's add after o_proj and down in its epilogue. The reference is the same product in
//! integers on the host (`tests/gpu.rs`).
//!
//! The operands are loaded by the TMA, one warpgroup's thread, while two warpgroups multiply; blocks run in
//! clusters of two whose tiles share the weight's columns, loaded once for both (BENCHMARKS.md has the
//! times against cuBLAS's bf16 GEMM at the training forward's shapes). Training's BitLinear forwards run on
//! it at lambda 1 ([`try_bitlinear_forward`]), from the int8 codes the norms and the step weights write
//! beside the bf16 operands the backward reads.

use candle_core::{DType, Device, Result, Tensor};
use cudarc::driver::LaunchConfig;

use super::shapes::{HeadShape, Int8Operand};
use super::{cuda_device, launch, opt_in_shared, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("int8_gemm");

/// The rows of the output a block takes, the bytes of k a stage holds, and the threads: a warpgroup that
/// loads and two that multiply (int8_gemm.cu's `IG_BM`, `IG_BK`, `__launch_bounds__`).
const ROWS: usize = 128;
const STAGE_K: usize = 128;
const THREADS: u32 = 384;
/// The columns of a rows kernel's output buffers (int8_gemm.cu's `IG_OUT_COLS`): each multiplying warpgroup
/// has two of 64 rows of bf16.
const OUT_COLS: usize = 32;

/// How the blocks take the output: tiles of 128 rows and `columns` (128, 192 or 256) columns, each block alone
/// (`cluster` 1) or in clusters of two taking the tiles above each other, the weight's columns loaded once
/// for both; written as rows, or (`head_dim` > 0) as attention's heads of that many channels
/// ([`try_bitlinear_heads`]). A kernel each (int8_gemm.cu's `IG_KERNEL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    columns: usize,
    cluster: usize,
    head_dim: usize,
}

impl Tile {
    /// The tiles that write rows.
    pub const ALL: [Tile; 4] = [
        Tile { columns: 128, cluster: 1, head_dim: 0 },
        Tile { columns: 256, cluster: 1, head_dim: 0 },
        Tile { columns: 128, cluster: 2, head_dim: 0 },
        Tile { columns: 256, cluster: 2, head_dim: 0 },
    ];

    /// The head dims the heads kernels are built for, each with its tile widths (whole heads a tile).
    pub const HEADS: [(usize, &'static [usize]); 4] =
        [(64, &[128, 256]), (96, &[192]), (128, &[128, 256]), (256, &[256])];

    /// Every heads tile of `head_dim` (none where no kernel is built for it), alone and in clusters.
    pub fn all_heads(head_dim: usize) -> Vec<Tile> {
        let widths = Self::HEADS.iter().find(|(d, _)| *d == head_dim).map_or(&[][..], |(_, w)| *w);
        let tiles = widths.iter().flat_map(|&columns| [1, 2].map(|cluster| Tile { columns, cluster, head_dim }));
        tiles.collect()
    }

    /// The heads tile for `m` rows of `n` outputs in heads of `head_dim`: [`Tile::for_shape`]'s where its width
    /// holds whole heads, else the one width built for them (192 for heads of 96, 256 for 256). None where no
    /// kernel takes the heads.
    pub fn for_heads(m: usize, n: usize, head_dim: usize) -> Option<Tile> {
        let rows = Self::for_shape(m, n);
        let (_, widths) = Self::HEADS.iter().find(|(d, _)| *d == head_dim)?;
        let columns = if widths.contains(&rows.columns) { rows.columns } else { widths[0] };
        Some(Tile { columns, cluster: rows.cluster, head_dim })
    }

    /// The tile for `m` rows of `n` outputs, from `int8_gemm_timing` at the training forward's
    /// shapes (-large and 2B4T at 768, 2,048 and 6,144 rows; BENCHMARKS.md's int8 table, H100): 256 columns
    /// where they still make about three waves of tiles on 132 SMs (400; -large's q/k/v at 2,048 rows, 288
    /// such tiles, ran 1.09x slower on them), clusters where the output is wider than 1,536 and the rows more
    /// than 1,024 (alone, -large's `o_proj` and `down` ran 1.02-1.07x faster, and the two were even at 768
    /// rows). Measured again with the outputs stored by the TMA (H100, 2026-12-07): within 2.1% of the fastest
    /// at every 6,144-row shape and for every wider output at 2,048 rows (gate/up), where 256 columns now run
    /// 1.11-1.18x faster than the picked 128 on outputs of 1,536, 3,840 and 4,608 (o_proj and down, which
    /// add the residual on 128 columns only; q/k/v, which goes to the heads kernels).
    pub fn for_shape(m: usize, n: usize) -> Tile {
        let columns = if m.div_ceil(ROWS) * n.div_ceil(256) >= 400 { 256 } else { 128 };
        let cluster = if n > 1536 && m > 1024 { 2 } else { 1 };
        Tile { columns, cluster, head_dim: 0 }
    }

    /// Whether the tile's kernel adds a residual in its epilogue: 128 columns of rows (at 256 the residuals'
    /// registers made the products spill).
    pub fn adds_residual(self) -> bool {
        self.columns == 128 && self.head_dim == 0
    }

    fn kernel(self) -> String {
        let heads = match self.head_dim {
            0 => String::new(),
            d => format!("heads{d}_"),
        };
        let pair = if self.cluster > 1 { "_pair" } else { "" };
        format!("int8_gemm_{heads}n{}{pair}", self.columns)
    }

    /// As many stages as fit 227 KB beside the rest (int8_gemm.cu's kernels).
    fn stages(self) -> usize {
        match self.columns {
            128 if self.adds_residual() => 5,
            128 => 6,
            192 => 5,
            _ => 4,
        }
    }

    /// The stages' operands, room to align them to 1,024 bytes (the swizzle's period), the rows kernels'
    /// output buffers, the residual's slabs (64 rows of the tile's columns for each multiplying warpgroup)
    /// where the tile adds it, two mbarriers a stage and one for each slab, and each multiplying warpgroup's
    /// column scales (f32).
    fn shared(self) -> usize {
        let out_buffers = if self.head_dim == 0 { 2 * 2 * 64 * OUT_COLS * 2 } else { 0 };
        let slabs = if self.adds_residual() { 2 * 64 * self.columns * 2 } else { 0 };
        let barriers = 16 * self.stages() + 16;
        self.stages() * (ROWS + self.columns) * STAGE_K + 1024 + out_buffers + slabs + barriers + 2 * 4 * self.columns
    }
}

/// `int8_gemm`'s parameters, as int8_gemm.cu's `Int8Gemm` lays them out: the operands' TMA descriptors and
/// the rows' output's (zeros for heads), the scales' device addresses (0 for none), the residual's (0 for
/// none), the sizes; then where the heads kernels write ([`Output`]).
#[repr(C, align(64))]
struct GemmParams {
    a: cudarc::driver::sys::CUtensorMap,
    b: cudarc::driver::sys::CUtensorMap,
    out: cudarc::driver::sys::CUtensorMap,
    residual_map: cudarc::driver::sys::CUtensorMap,
    a_scale: u64,
    b_scale: u64,
    residual: u64,
    m: i32,
    n: i32,
    k: i32,
    heads: [u64; 3],
    cos: u64,
    sin: u64,
    t: i32,
    q_heads: i32,
    kv_heads: i32,
}

/// The device addresses a GEMM writes to: rows `out` (`[m, n]`, plus `residual` where not 0), or `heads` (q, k
/// and v) turned by RoPE's `cos` and `sin` (`shape` gives the rows' sequence length and the heads).
enum Output {
    Rows { out: u64, residual: u64 },
    Heads { heads: [u64; 3], cos: u64, sin: u64, shape: HeadShape },
}

// SAFETY: a `#[repr(C)]` struct of plain data, which the kernel takes by value (`__grid_constant__`).
unsafe impl cudarc::driver::DeviceRepr for GemmParams {}

/// How the TMA moves a row-major matrix: its element, the box it moves (columns, rows), and the swizzle the
/// shared side is laid out in.
struct TmaBox {
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    bytes: usize,
    columns: usize,
    rows: usize,
    swizzle: cudarc::driver::sys::CUtensorMapSwizzle,
}

impl TmaBox {
    /// An int8 operand, loaded in boxes of `rows` rows and 128 bytes of k under the 128-byte swizzle the
    /// kernel's wgmma reads; rows past the end read 0.
    fn operand(rows: usize) -> TmaBox {
        use cudarc::driver::sys::*;
        let dtype = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8;
        TmaBox { dtype, bytes: 1, columns: STAGE_K, rows, swizzle: CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B }
    }

    /// The bf16 rows' output, stored from the kernel's buffers of 64 rows x [`OUT_COLS`] (64 bytes a row)
    /// under the 64-byte swizzle, what lies past m or n not written; and the residual, loaded into slabs of
    /// such boxes, zeros past the ends.
    fn output() -> TmaBox {
        use cudarc::driver::sys::*;
        let dtype = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
        TmaBox { dtype, bytes: 2, columns: OUT_COLS, rows: 64, swizzle: CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B }
    }
}

/// The TMA descriptor of the row-major matrix `[rows, columns]` at `address` (16-byte aligned, rows a multiple of
/// 16 bytes apart), moved in `tma`'s boxes.
fn tensor_map(address: u64, rows: usize, columns: usize, tma: TmaBox) -> Result<cudarc::driver::sys::CUtensorMap> {
    use cudarc::driver::sys::*;
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
    let dims: [u64; 2] = [columns as u64, rows as u64];
    let strides: [u64; 1] = [(columns * tma.bytes) as u64];
    let boxes: [u32; 2] = [tma.columns as u32, tma.rows as u32];
    let unit: [u32; 2] = [1, 1];
    // SAFETY: the arrays hold rank (2) entries (strides rank - 1), and `map` is written before it is read.
    let status = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            tma.dtype,
            2,
            address as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            tma.swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != CUresult::CUDA_SUCCESS {
        candle_core::bail!("int8 GEMM: encoding a TMA descriptor for [{rows}, {columns}]: {status:?}");
    }
    // SAFETY: written by the successful call above.
    Ok(unsafe { map.assume_init() })
}

/// Whether the kernel runs on `dev`: a Hopper GPU (the module is built for sm_90a only).
pub fn available(dev: &Device) -> bool {
    match dev {
        Device::Cuda(d) => super::runs_sm90a(d),
        _ => false,
    }
}

/// A BitLinear's forward `x w^T` (bf16 `[rows, outputs]`) from the int8 forms of its input and its weight,
/// with the faster tile for the shape ([`Tile::for_shape`]), plus `residual` (bf16 `[rows, outputs]`, the
/// residual stream o_proj and down add to) where given and the tile adds it in its epilogue
/// ([`Tile::adds_residual`]); the bool says whether it did, and where it did not the caller adds it.
/// `Ok(None)` where the GEMM does not apply.
pub fn try_bitlinear_forward(
    x: &Int8Operand,
    w: &Int8Operand,
    residual: Option<&Tensor>,
) -> Result<Option<(Tensor, bool)>> {
    let ((m, _), (n, _)) = (x.codes.dims2()?, w.codes.dims2()?);
    let tile = Tile::for_shape(m, n);
    let fused = residual.filter(|_| tile.adds_residual());
    let y = try_int8_gemm(&x.codes, &w.codes, Some(&x.scales), Some(&w.scales), fused, tile)?;
    Ok(y.map(|y| (y, fused.is_some())))
}

/// The q/k/v projection's BitLinear forward as attention reads it: q `[b, q_heads, t, d]`, k and v `[b, kv_heads,
/// t, d]` (bf16), q and k turned by RoPE's angles `cos, sin: [b, t, d / 2]` (bf16), from the int8 forms of the
/// input `[b t, k]` and the weight `[(q_heads + 2 kv_heads) d, k]`, with the heads tile for the shape
/// ([`Tile::for_heads`]): the bits of [`try_bitlinear_forward`]'s rows through `rope::try_qkv_heads`, in one
/// pass. `Ok(None)` where it does not apply (no kernel for the head dim, or the GEMM's own conditions).
pub fn try_bitlinear_heads(
    x: &Int8Operand,
    w: &Int8Operand,
    shape: HeadShape,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let ((m, _), (n, _)) = (x.codes.dims2()?, w.codes.dims2()?);
    let Some(tile) = Tile::for_heads(m, n, shape.head_dim) else { return Ok(None) };
    try_int8_gemm_heads(&x.codes, &w.codes, Some(&x.scales), Some(&w.scales), shape, (cos, sin), tile)
}

/// [`try_int8_gemm`]'s product written as attention's heads (see [`try_bitlinear_heads`]) by the heads `tile`.
pub fn try_int8_gemm_heads(
    a: &Tensor,
    b: &Tensor,
    a_scale: Option<&Tensor>,
    b_scale: Option<&Tensor>,
    shape: HeadShape,
    (cos, sin): (&Tensor, &Tensor),
    tile: Tile,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let HeadShape { batch, seq, q_heads, kv_heads, head_dim } = shape;
    let ((m, _), (n, _)) = (a.dims2()?, b.dims2()?);
    let angles_ok = |x: &Tensor| x.dtype() == DType::BF16 && x.dims() == [batch, seq, head_dim / 2];
    if tile.head_dim != head_dim || m != batch * seq || n != (q_heads + 2 * kv_heads) * head_dim {
        candle_core::bail!("int8 GEMM into heads: [{m}, {n}] for {shape:?} on {tile:?}");
    }
    if !(angles_ok(cos) && angles_ok(sin)) {
        candle_core::bail!("int8 GEMM into heads: RoPE angles {:?} {:?} for {shape:?}", cos.dims(), cos.dtype());
    }
    if !applies(a, b, a_scale, b_scale)? {
        return Ok(None);
    }
    let dev = cuda_device(a)?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let [q, k, v] = [q_heads, kv_heads, kv_heads].map(|h| uninit((batch, h, seq, head_dim), DType::BF16, &dev));
    let (q, k, v) = (q?, k?, v?);
    let output = Output::Heads { heads: [ptr(&q)?, ptr(&k)?, ptr(&v)?], cos: ptr(&cos)?, sin: ptr(&sin)?, shape };
    Ok(gemm(a, b, a_scale, b_scale, output, tile)?.then_some((q, k, v)))
}

/// `out[m, n] = round_bf16(sum_k a[m, k] b[n, k] * a_scale[m] * b_scale[n])` (bf16 `[m, n]`) for `a: [m, k]`
/// and `b: [n, k]`, u8 tensors holding int8 values (two's complement), and f32 scales `[m]` and `[n]` (None:
/// 1), plus `residual` (bf16 `[m, n]`, rounded again after the add; only where `tile` adds one), each block
/// taking `tile`'s columns. `Ok(None)` where the kernel does not apply: not on a Hopper GPU, `k` not a
/// multiple of 128, `n` not a multiple of 8 (the TMA stores rows 16-byte aligned), an operand not 16-byte
/// aligned.
pub fn try_int8_gemm(
    a: &Tensor,
    b: &Tensor,
    a_scale: Option<&Tensor>,
    b_scale: Option<&Tensor>,
    residual: Option<&Tensor>,
    tile: Tile,
) -> Result<Option<Tensor>> {
    let ((m, _), (n, _)) = (a.dims2()?, b.dims2()?);
    let residual_ok = residual.is_none_or(|r| tile.adds_residual() && r.dtype() == DType::BF16 && r.dims() == [m, n]);
    if !residual_ok || tile.head_dim != 0 {
        let residual = residual.map(|r| (r.dims().to_vec(), r.dtype()));
        candle_core::bail!("int8 GEMM: residual {residual:?} for [{m}, {n}] on {tile:?}");
    }
    if !applies(a, b, a_scale, b_scale)? || !n.is_multiple_of(8) {
        return Ok(None);
    }
    let dev = cuda_device(a)?;
    // Loaded by the TMA, from a 16-byte aligned address only.
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let residual_ptr = residual.as_ref().map_or(Ok(0), ptr)?;
    if residual_ptr % 16 != 0 {
        return Ok(None);
    }
    let out = uninit((m, n), DType::BF16, &dev)?;
    let output = Output::Rows { out: ptr(&out)?, residual: residual_ptr };
    Ok(gemm(a, b, a_scale, b_scale, output, tile)?.then_some(out))
}

/// Whether the GEMM applies to the operands (see [`try_int8_gemm`]); an error where their types or the scales'
/// sizes are wrong.
fn applies(a: &Tensor, b: &Tensor, a_scale: Option<&Tensor>, b_scale: Option<&Tensor>) -> Result<bool> {
    let ((m, k), (n, kb)) = (a.dims2()?, b.dims2()?);
    if !available(a.device()) || k != kb || !k.is_multiple_of(STAGE_K) || !n.is_multiple_of(2) || m == 0 {
        return Ok(false);
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
            b_scale.map(|s| (s.dims().to_vec(), s.dtype())),
        );
    }
    Ok(true)
}

/// Launches the GEMM of `tile` into `output` for the operands and scales [`applies`] took; false
/// where the kernel does not apply (an operand not 16-byte aligned, no cluster at once on the card).
fn gemm(
    a: &Tensor,
    b: &Tensor,
    a_scale: Option<&Tensor>,
    b_scale: Option<&Tensor>,
    output: Output,
    tile: Tile,
) -> Result<bool> {
    let ((m, k), (n, _)) = (a.dims2()?, b.dims2()?);
    let dev = cuda_device(a)?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    // The TMA reads from 16-byte aligned addresses only.
    if ptr(&a)? % 16 != 0 || ptr(&b)? % 16 != 0 {
        return Ok(false);
    }
    let a_scale = a_scale.map(|s| s.contiguous()).transpose()?;
    let b_scale = b_scale.map(|s| s.contiguous()).transpose()?;
    let (name, shared) = (tile.kernel(), tile.shared());
    let name = name.as_str();
    opt_in_shared(&dev, PTX, name, shared)?;
    // As many blocks (clusters) as run at once, each taking tiles (groups of tiles) in turn: a block's loads
    // run on into its next tile while it writes the last one's outputs. No cluster at once (a partitioned
    // card): decline.
    let groups = n.div_ceil(tile.columns) * m.div_ceil(tile.cluster * ROWS);
    let at_once = match tile.cluster {
        1 => super::one_wave(&dev, PTX, name, THREADS, shared as u32)?,
        _ => super::one_wave_of_clusters(&dev, PTX, name, THREADS, shared as u32)?,
    };
    let clusters = groups.min(at_once);
    if clusters == 0 {
        return Ok(false);
    }
    let cfg = LaunchConfig {
        grid_dim: ((tile.cluster * clusters) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let params = GemmParams {
        a: tensor_map(ptr(&a)?, m, k, TmaBox::operand(ROWS))?,
        // Each block of a cluster loads its share of the tile's columns, for all.
        b: tensor_map(ptr(&b)?, n, k, TmaBox::operand(tile.columns / tile.cluster))?,
        out: cudarc::driver::sys::CUtensorMap { opaque: [0; 16] }, // the heads kernels never read it
        residual_map: cudarc::driver::sys::CUtensorMap { opaque: [0; 16] }, // read where `residual` is given
        a_scale: a_scale.as_ref().map_or(Ok(0), ptr)?,
        b_scale: b_scale.as_ref().map_or(Ok(0), ptr)?,
        residual: 0,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        heads: [0; 3],
        cos: 0,
        sin: 0,
        t: 0,
        q_heads: 0,
        kv_heads: 0,
    };
    let params = match output {
        Output::Rows { out, residual } => {
            let out = tensor_map(out, m, n, TmaBox::output())?;
            let residual_map = match residual {
                0 => params.residual_map,
                at => tensor_map(at, m, n, TmaBox::output())?,
            };
            GemmParams { out, residual_map, residual, ..params }
        }
        Output::Heads { heads, cos, sin, shape } => GemmParams {
            heads,
            cos,
            sin,
            t: shape.seq as i32,
            q_heads: shape.q_heads as i32,
            kv_heads: shape.kv_heads as i32,
            ..params
        },
    };
    launch!(dev, PTX, name, cfg; params);
    Ok(true)
}
