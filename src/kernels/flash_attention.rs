//! Flash attention on tensor cores, forward and backward: no `[seq, seq]` scores in memory, grouped-query
//! heads read in place (no expanded K and V). `flash_attention.cu`'s kernels run on every card;
//! on Hopper both directions run `flash_hopper.cu`'s (warpgroup products), which [`FlashKernels`] chooses.

use candle_core::{DType, Result, Tensor};
use cudarc::driver::LaunchConfig;

use super::shapes::{FlashInputs, FlashKernels};
use super::{aligned_ptr, cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("flash_attention");
/// The forward's and the backward's kernels on Hopper's warpgroup products (`flash_hopper.cu`), built for sm_90a only.
const HOPPER: Ptx = ptx!("flash_hopper");

/// Threads per block (`THREADS` in the kernel) and rows per block (64 queries or keys).
const THREADS: u32 = 128;
const TILE: usize = 64;

/// One block per 64 rows of each `(batch, head)`: heads along x, the rows' tiles along y, so that the card
/// starts every head's longest block first (`grid_head` in `flash_common.cuh`), and the heads in sections of
/// `section` along z (a divisor of `heads`; `heads` for one section).
fn tiles(t: usize, heads: usize, section: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (section as u32, t.div_ceil(TILE) as u32, (heads / section) as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The backward's sections of heads: the most heads, a divisor of `heads`, of which at least 8 blocks each run
/// at once among the `wave` that the card holds, so that they read each tile of their head together (from L2
/// after the first). With all heads in one section, -large's 128 heads at 768 x 8 ran two blocks each at once
/// and the backward took 8% longer (BENCHMARKS.md); the forward, sectioned, ran no faster there (0.084 ms
/// against 0.085), so it takes one section.
fn backward_section(heads: usize, wave: usize) -> usize {
    let most = (wave / 8).max(1);
    (1..=heads.min(most)).rev().find(|s| heads.is_multiple_of(*s)).unwrap_or(1)
}

/// The portable dK/dV kernel's threads and dynamic shared memory (`KvShared` in the kernel): from d = 256 two
/// warps per 16 keys (`SPLIT`), else one. K and V tiles of 64 rows, two query tiles of Q and dO rows (`bq`
/// each), their per-row values, and under `SPLIT` the probabilities handed between warps (f32, 64 x `bq`);
/// rows of `d + 8` bf16. 141 KB at d = 256, within the H100's and H200's 227 KB a block.
fn kv_shape(d: usize) -> (u32, u32) {
    let split = d >= 256;
    let bq = if d <= 96 {
        64
    } else if split {
        32
    } else {
        16
    };
    let handed = if split { TILE * bq * 4 } else { 0 };
    (if split { 2 * THREADS } else { THREADS }, ((2 * TILE + 4 * bq) * (d + 8) * 2 + 2 * 3 * bq * 4 + handed) as u32)
}

/// The bytes of one of the Hopper kernels' tiles (`HopperTiles::TILE`): 64 rows of d in panels of 64 columns,
/// 128 bytes a row.
fn hopper_tile(d: usize) -> usize {
    d.div_ceil(64) * TILE * 128
}

/// The Hopper kernels' threads and dynamic shared memory (`HopperTiles` in `flash_hopper.cu`) for `stages`
/// stages, where they run: on an sm_90 card. Two resident tiles of 64 rows and two a stage, in panels of 64
/// columns (128 bytes a row); at d = 256, where a block is a pair of warpgroups (256 threads), the tiles they
/// hand each other (P in f32, dS in bf16, 64 x 64 each); the stages' per-row values (3 x 64 f32), and 1,024
/// bytes to align the tiles. With two stages 98.5 KB at d = 96 and 128, two blocks an SM; with one 66 KB,
/// three; 218.5 KB at d = 256, one.
fn hopper_shape(dev: &candle_core::CudaDevice, d: usize, stages: usize) -> Option<(u32, u32)> {
    let pair = d > 128;
    let handed = if pair { TILE * TILE * (4 + 2) } else { 0 };
    let bytes = (2 + 2 * stages) * hopper_tile(d) + handed + stages * 3 * TILE * 4 + 1024;
    super::runs_sm90a(dev).then_some((if pair { 2 * THREADS } else { THREADS }, bytes as u32))
}

/// The Hopper forward's threads and dynamic shared memory (`forward_hopper` in `flash_hopper.cu`), where it
/// runs: one warpgroup, the Q, K and V tiles of 64 rows in panels of 64 columns (48 KB at d = 96 and 128), and
/// 1,024 bytes to align them.
fn hopper_forward_shape(dev: &candle_core::CudaDevice, d: usize) -> Option<(u32, u32)> {
    let bytes = 3 * hopper_tile(d) + 1024;
    super::runs_sm90a(dev).then_some((THREADS, bytes as u32))
}

/// The Hopper dQ kernel that reads the dK/dV kernel's score gradients (`backward_q_from_ds` in
/// `flash_hopper.cu`): one warpgroup, [`ds_stages`] stages of a K tile and a dS tile (64 x 64 bf16), and 1,024
/// bytes to align them: 73 KB at d = 96 and 128, three blocks an SM; 81 KB at 256, two.
fn hopper_q_ds_shape(d: usize) -> (u32, u32) {
    (THREADS, (ds_stages(d) * (hopper_tile(d) + TILE * TILE * 2) + 1024) as u32)
}

/// The stages of the dQ kernel that reads dS (`ds_stages` in `flash_hopper.cu`): three, two at d = 256.
fn ds_stages(d: usize) -> usize {
    if d > 128 {
        2
    } else {
        3
    }
}

/// The Hopper dQ kernel's stages (`q_stages` in `flash_hopper.cu`).
fn q_stages(d: usize) -> usize {
    if d == 96 || d == 128 {
        1
    } else {
        2
    }
}

/// The dQ kernel's dynamic shared memory (`DqShape` in the kernel): two stages of K and V rows (32 keys up
/// to d = 128, else 16), through which Q, dO and O pass first, and from d = 256 (`RESIDENT`) the Q and dO
/// tiles of 64 rows kept ahead of them; rows of `d + 8` bf16. 99 KB at d = 256.
fn q_shared_bytes(d: usize) -> u32 {
    let (bq, bk) = (TILE, if d <= 128 { 32 } else { 16 });
    let stage_rows = if 4 * bk >= 2 * bq { 4 * bk } else { bq.max(4 * bk) };
    let resident = if d >= 256 { 2 * bq } else { 0 };
    ((resident + stage_rows) * (d + 8) * 2) as u32
}

/// `log2(e) / sqrt(d)`: the kernels' softmax runs in base 2.
fn scale2(d: usize) -> f32 {
    (std::f64::consts::LOG2_E / (d as f64).sqrt()) as f32
}

/// `(b, h, t, d, group)` where the kernels apply to queries `q: [b, h, t, d]` and keys `k: [b, h / group, t, d]`:
/// bf16 on CUDA, a head dim of [`super::FLASH_HEAD_DIMS`].
fn takes(q: &Tensor, k: &Tensor) -> Option<(usize, usize, usize, usize, usize)> {
    let ((b, h, t, d), (bk, hk, tk, dk)) = (q.dims4().ok()?, k.dims4().ok()?);
    let fits = super::applies(q) && super::FLASH_HEAD_DIMS.contains(&d) && hk > 0 && h.is_multiple_of(hk);
    (fits && (bk, tk, dk) == (b, t, d)).then_some((b, h, t, d, h / hk))
}

/// Whether [`try_forward`] takes heads of `head_dim` for `x`'s device (bf16 on CUDA, the kernels enabled), so a
/// caller can skip preparing its fallback.
pub fn takes_heads(x: &Tensor, head_dim: usize) -> bool {
    super::applies(x) && super::FLASH_HEAD_DIMS.contains(&head_dim)
}

/// `q: [b, h, t, d]`, `k, v: [b, h / group, t, d]` (bf16; grouped-query heads: query head `i` attends with key
/// and value head `i / group`), `start: [b, t]` (f32, see `train::layers::Windows`): the output
/// `[b, h, t, d]` and each row's softmax log-sum-exp (f32 `[b, h, t, 1]`), by the kernel `kernels` names.
/// `Ok(None)` where the kernels do not apply.
pub fn try_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: &Tensor,
    kernels: FlashKernels,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some((b, h, t, d, group)) = takes(q, k) else { return Ok(None) };
    let (q, k, v, start) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, start.contiguous()?);
    let dev = cuda_device(&q)?;
    let (o, lse) = (uninit(q.shape(), DType::BF16, &dev)?, uninit((b, h, t, 1), DType::F32, &dev)?);
    let (module, name, (threads, bytes)) =
        match hopper_forward_shape(&dev, d).filter(|_| kernels != FlashKernels::Portable) {
            Some(shape) => (HOPPER, format!("flash_forward_hopper_{d}"), shape),
            None => (PTX, format!("flash_forward_{d}"), (THREADS, 0)),
        };
    super::opt_in_shared(&dev, module, &name, bytes as usize)?;
    let blocks = tiles(t, b * h, b * h);
    launch!(dev, module, &name, LaunchConfig { shared_mem_bytes: bytes, block_dim: (threads, 1, 1), ..blocks };
        aligned_ptr(&q)?, aligned_ptr(&k)?, aligned_ptr(&v)?, ptr(&start)?, aligned_ptr(&o)?, ptr(&lse)?,
        t as i32, h as i32, group as i32, scale2(d));
    Ok(Some((o, lse)))
}

/// Where the backward kernels write the gradients, as `GradRows` in `flash_common.cuh` lays it out: each
/// one's address, the elements between batches (of query heads, of key/value heads), heads and rows, and RoPE's
/// angles to turn dQ and dK back by (0: none).
#[repr(C)]
#[derive(Clone, Copy)]
struct GradRows {
    dq: u64,
    dk: u64,
    dv: u64,
    q_batch: i64,
    kv_batch: i64,
    head: i64,
    row: i64,
    cos: u64,
    sin: u64,
}

// SAFETY: a `#[repr(C)]` struct of plain data, which the kernels take by value.
unsafe impl cudarc::driver::DeviceRepr for GradRows {}

/// The backward's inputs where the kernels apply: the shape and the tensors, contiguous.
struct Backward {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    group: usize,
    dev: candle_core::CudaDevice,
    /// `dy, q, k, v, o, lse, start`.
    inputs: [Tensor; 7],
    /// Each row's delta where given.
    delta: Option<Tensor>,
}

impl Backward {
    fn new(x: &FlashInputs) -> Result<Option<Self>> {
        let Some((b, h, t, d, group)) = takes(x.q, x.k) else { return Ok(None) };
        let c = |x: &Tensor| x.contiguous();
        let inputs = [c(x.dy)?, c(x.q)?, c(x.k)?, c(x.v)?, c(x.o)?, c(x.lse)?, c(x.start)?];
        let dev = cuda_device(&inputs[1])?;
        if let Some(delta) = x.delta {
            if delta.dtype() != DType::F32 || delta.elem_count() != b * h * t {
                candle_core::bail!("flash backward: deltas {:?} {:?} for [{b}, {h}, {t}]", delta.dims(), delta.dtype());
            }
        }
        let delta = x.delta.map(|d| d.contiguous()).transpose()?;
        Ok(Some(Self { b, h, t, d, group, dev, inputs, delta }))
    }

    /// The kernels of `kernels`' set, writing into `grads`. dQ in one kernel, dK and dV in another, so that no
    /// sum crosses blocks. Either the dQ kernel first, recomputing the scores and writing each row's delta =
    /// rowsum(dO O), which both need; or on Hopper where the score gradients are handed over
    /// ([`super::flash_ds_bytes`]), the deltas (unless given), the dK/dV kernel writing dS, and the dQ kernel
    /// reading it.
    fn launch(&self, kernels: FlashKernels, grads: GradRows) -> Result<()> {
        let (b, h, t, d, group, dev) = (self.b, self.h, self.t, self.d, self.group, &self.dev);
        let [dy, q, k, v, o, lse, start] = &self.inputs;
        let hopper = kernels != FlashKernels::Portable && super::runs_sm90a(dev);
        let ds_bytes = super::flash_ds_bytes(b * h, t);
        let ds = match hopper && kernels == FlashKernels::Fastest && ds_bytes > 0 {
            true => Some(uninit(ds_bytes / 2, DType::BF16, dev)?),
            false => None,
        };
        // The dQ kernel that recomputes the scores writes the deltas itself: given ones serve the hand-over only.
        let given = self.delta.as_ref().filter(|_| ds.is_some());
        let delta = match given {
            Some(delta) => delta.clone(),
            None => uninit(b * h * t, DType::F32, dev)?,
        };
        // A kernel with its threads and shared memory over `heads` heads' tiles (sections of them when `sectioned`).
        let run = |module: Ptx, name: &str, (threads, bytes): (u32, u32), heads: usize, sectioned: bool| {
            super::opt_in_shared(dev, module, name, bytes as usize)?;
            let section = match sectioned {
                true => backward_section(heads, super::one_wave(dev, module, name, threads, bytes)?),
                false => heads,
            };
            Ok::<_, candle_core::Error>(LaunchConfig {
                shared_mem_bytes: bytes,
                block_dim: (threads, 1, 1),
                ..tiles(t, heads, section)
            })
        };
        match &ds {
            Some(_) if given.is_some() => {}
            Some(_) => {
                let name = format!("flash_deltas_hopper_{d}");
                let cfg = run(HOPPER, &name, (THREADS, 0), b * h, false)?;
                launch!(dev, HOPPER, &name, cfg; aligned_ptr(dy)?, aligned_ptr(o)?, ptr(&delta)?, t as i32);
            }
            None => {
                let (module, name, shape) = match hopper_shape(dev, d, q_stages(d)).filter(|_| hopper) {
                    Some(shape) => (HOPPER, format!("flash_backward_q_hopper_{d}"), shape),
                    None => (PTX, format!("flash_backward_q_{d}"), (THREADS, q_shared_bytes(d))),
                };
                let cfg = run(module, &name, shape, b * h, true)?;
                launch!(dev, module, &name, cfg;
                    aligned_ptr(q)?, aligned_ptr(k)?, aligned_ptr(v)?, aligned_ptr(dy)?, aligned_ptr(o)?, ptr(lse)?,
                    ptr(&delta)?, ptr(start)?, grads, t as i32, h as i32, group as i32, scale2(d));
            }
        }
        // A block per 64 keys of each key/value head.
        match hopper_shape(dev, d, 2).filter(|_| hopper) {
            Some(shape) => {
                let name = format!("flash_backward_kv_hopper_{d}");
                let cfg = run(HOPPER, &name, shape, b * h / group, true)?;
                let ds = match &ds {
                    Some(ds) => aligned_ptr(ds)?,
                    None => 0,
                };
                launch!(dev, HOPPER, &name, cfg;
                    aligned_ptr(q)?, aligned_ptr(k)?, aligned_ptr(v)?, aligned_ptr(dy)?, ptr(lse)?, ptr(&delta)?,
                    ptr(start)?, grads, ds, t as i32, h as i32, group as i32, scale2(d));
            }
            None => {
                let name = format!("flash_backward_kv_{d}");
                let cfg = run(PTX, &name, kv_shape(d), b * h / group, true)?;
                launch!(dev, PTX, &name, cfg;
                    aligned_ptr(q)?, aligned_ptr(k)?, aligned_ptr(v)?, aligned_ptr(dy)?, ptr(lse)?, ptr(&delta)?,
                    ptr(start)?, grads, t as i32, h as i32, group as i32, scale2(d));
            }
        }
        if let Some(ds) = &ds {
            let name = format!("flash_backward_q_ds_hopper_{d}");
            let cfg = run(HOPPER, &name, hopper_q_ds_shape(d), b * h, true)?;
            launch!(dev, HOPPER, &name, cfg;
                aligned_ptr(k)?, aligned_ptr(ds)?, ptr(start)?, grads, t as i32, h as i32, group as i32, scale2(d));
        }
        Ok(())
    }
}

/// The gradients `(dq, dk, dv)` of [`try_forward`] from `x.dy`, the gradient at its output `x.o`; `dk` and `dv`
/// in `k`'s shape, each summed over the query heads of its group, by the kernels `kernels` names. `Ok(None)`
/// where the kernels do not apply.
pub fn try_backward(x: &FlashInputs, kernels: FlashKernels) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(x) = Backward::new(x)? else { return Ok(None) };
    let (b, h, t, d, kv_heads) = (x.b, x.h, x.t, x.d, x.h / x.group);
    let dq = uninit((b, h, t, d), DType::BF16, &x.dev)?;
    let (dk, dv) =
        (uninit((b, kv_heads, t, d), DType::BF16, &x.dev)?, uninit((b, kv_heads, t, d), DType::BF16, &x.dev)?);
    let grads = GradRows {
        dq: aligned_ptr(&dq)?,
        dk: aligned_ptr(&dk)?,
        dv: aligned_ptr(&dv)?,
        q_batch: (h * t * d) as i64,
        kv_batch: (kv_heads * t * d) as i64,
        head: (t * d) as i64,
        row: d as i64,
        cos: 0,
        sin: 0,
    };
    x.launch(kernels, grads)?;
    Ok(Some((dq, dk, dv)))
}

/// The gradient at the q/k/v projection's rows `[b t, (h + 2 h / group) d]` (bf16) from `x.dy`:
/// [`try_backward`]'s gradients written as those rows, dQ and dK turned back by RoPE's angles `cos, sin: [b, t,
/// d / 2]` (bf16, the forward's), as `train::layers::qkv_heads_backward` makes them from the heads' gradients,
/// rounded once after the turn. `Ok(None)` where the kernels do not apply.
pub fn try_backward_rows(x: &FlashInputs, rope: (&Tensor, &Tensor), kernels: FlashKernels) -> Result<Option<Tensor>> {
    let Some(x) = Backward::new(x)? else { return Ok(None) };
    let (b, h, t, d, kv_heads) = (x.b, x.h, x.t, x.d, x.h / x.group);
    let (cos, sin) = (rope.0.contiguous()?, rope.1.contiguous()?);
    for angles in [&cos, &sin] {
        if angles.dtype() != DType::BF16 || angles.dims() != [b, t, d / 2] {
            candle_core::bail!(
                "flash backward: RoPE angles {:?} {:?} for [{b}, {t}, {}]",
                angles.dims(),
                angles.dtype(),
                d / 2
            );
        }
    }
    let width = (h + 2 * kv_heads) * d;
    let dqkv = uninit((b * t, width), DType::BF16, &x.dev)?;
    let base = aligned_ptr(&dqkv)?;
    let bf16 = DType::BF16.size_in_bytes() as u64;
    let grads = GradRows {
        dq: base,
        dk: base + (h * d) as u64 * bf16,
        dv: base + ((h + kv_heads) * d) as u64 * bf16,
        q_batch: (t * width) as i64,
        kv_batch: (t * width) as i64,
        head: d as i64,
        row: width as i64,
        cos: aligned_ptr(&cos)?,
        sin: aligned_ptr(&sin)?,
    };
    x.launch(kernels, grads)?;
    Ok(Some(dqkv))
}
