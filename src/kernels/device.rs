//! What every kernel module shares: loading PTX, launching, device addresses of tensors, fresh outputs.

use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, DType, Device, Result, Shape, Storage, Tensor};
use cudarc::driver::{DevicePtr, LaunchConfig};

/// A PTX module: its name for candle's module cache and its text.
#[derive(Clone, Copy)]
pub(crate) struct Ptx(pub(crate) &'static str, pub(crate) &'static str);

macro_rules! ptx {
    ($file:literal) => {
        crate::kernels::Ptx(concat!("bessie_", $file), include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")))
    };
}
pub(crate) use ptx;

/// Launches kernel `$name` of module `$ptx` on `$dev`'s stream with the given arguments (each a value
/// the kernel takes by copy: device addresses as `u64`, scalars as `i32`/`u64`/`f32`, or a `#[repr(C)]`
/// parameter struct), overlapping the stream's previous kernel where the card allows ([`launch_kernel`]).
macro_rules! launch {
    ($dev:expr, $ptx:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, $ptx.0, $ptx.1)?;
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        // Each `arg` lives to the end of this block (shadowed, not dropped): the pointers stay valid.
        $( let arg = $arg; params.push(crate::kernels::param(&arg)); )*
        // SAFETY: the arguments match the kernel's signature in the .cu file, and every address points into
        // a live tensor of the size the kernel indexes.
        unsafe { crate::kernels::launch_kernel(&$dev, &func, $cfg, &mut params) }
            .map_err(|e| candle_core::Error::Msg(format!("launching {}: {e:?}", $name)))?;
    }};
}
pub(crate) use launch;

/// A kernel parameter: the address of an argument the kernel takes by copy (a plain value, [`DeviceRepr`]).
///
/// [`DeviceRepr`]: cudarc::driver::DeviceRepr
pub(crate) fn param<T: cudarc::driver::DeviceRepr>(arg: &T) -> *mut std::ffi::c_void {
    (arg as *const T).cast_mut().cast()
}

/// Whether `dev` launches kernels early (programmatic dependent launch): compute capability 9.0 on, and not
/// turned off by `BESSIE_PDL=0` (to measure what it gains, or to rule it out when hunting a bug).
fn early_launches(dev: &CudaDevice) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("BESSIE_PDL").is_ok_and(|v| v == "0"));
    !off && compute_capability(dev).is_some_and(|(major, _)| major >= 9)
}

/// `dev`'s compute capability (major, minor), or None where the driver does not say. Asked before every int8
/// GEMM, flash backward and early launch, so [`remembered`] (as 100 major + minor) after the first answer.
pub(crate) fn compute_capability(dev: &CudaDevice) -> Option<(i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    let packed = remembered(dev, Fact::ComputeCapability, "", 0, 0, || {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let err = |e| candle_core::Error::Msg(format!("compute capability: {e:?}"));
        let (major, minor) = (ctx.attribute(MAJOR).map_err(err)?, ctx.attribute(MINOR).map_err(err)?);
        Ok(major.max(0) as usize * 100 + minor.clamp(0, 99) as usize)
    })
    .ok()?;
    Some(((packed / 100) as i32, (packed % 100) as i32))
}

/// Whether `dev` runs the modules built for sm_90a alone (build.rs's `HOPPER_ONLY`: the int8 GEMM, the Hopper
/// flash backward): compute capability 9.0, an H100 or H200. Elsewhere those modules are empty.
pub(crate) fn runs_sm90a(dev: &CudaDevice) -> bool {
    compute_capability(dev) == Some((9, 0))
}

/// Lets kernel `name` of module `ptx` take `bytes` of dynamic shared memory a block: above 48 KB (the static
/// arrays count too) a block's shared memory must be opted into, per function. Nothing to do for none (static
/// arrays alone cannot pass 48 KB), which spares the launches of such kernels a driver call each.
pub(crate) fn opt_in_shared(dev: &CudaDevice, ptx: Ptx, name: &str, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let func = dev.get_or_load_custom_func(name, ptx.0, ptx.1)?;
    func.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        .map_err(|e| candle_core::Error::Msg(format!("{name}: shared memory of {bytes} bytes: {e:?}")))
}

/// Launches `func` on `dev`'s stream with the kernel parameters `params` (pointers to each argument)
/// (`cuLaunchKernelEx`, whose programmatic serialization attribute cudarc's safe launch does not take). Kernel
/// launches of [`launch!`] only.
///
/// Where [`early_launches`], every kernel launches early: its blocks may start once the stream's previous
/// kernel let them (`let_next_start` in `common.cuh`), beside that kernel's last blocks, instead of after its
/// end and the launch's latency. Each kernel of this crate is written for it: it waits (`wait_for_inputs`)
/// before it reads anything a kernel of the stream writes and before it writes anything: most first of all
/// (`follow_previous`), decode's after reading its weights. Between the hundreds of short kernels of a
/// training step the GPU otherwise idles a few microseconds at each boundary.
///
/// # Safety
/// `params` must match the kernel's signature and point at live arguments; the kernel must wait as above.
pub(crate) unsafe fn launch_kernel(
    dev: &CudaDevice,
    func: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread()?;
    let mut early = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
    };
    let mut config = driver_config(dev, cfg);
    if early_launches(dev) {
        (config.attrs, config.numAttrs) = (&mut early, 1);
    }
    // SAFETY: as the caller promises; `config` and `early` outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()
}

/// `cfg` as the driver's launch configuration on `dev`'s stream, with no launch attributes.
fn driver_config(dev: &CudaDevice, cfg: LaunchConfig) -> cudarc::driver::sys::CUlaunchConfig {
    cudarc::driver::sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: dev.cuda_stream().cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    }
}

/// `BESSIE_UNFUSED=1` runs the candle-op references on the GPU too: to compare the two paths on one card
/// (the loss-curve check in BENCHMARKS.md) or to rule a kernel out when hunting a bug.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("BESSIE_UNFUSED").map_or(true, |v| v.is_empty() || v == "0"))
}

/// True when the flat-buffer kernels apply: a tensor on a CUDA device.
pub fn on_cuda(t: &Tensor) -> bool {
    enabled() && t.device().is_cuda()
}

/// True when the activation kernels apply: a bf16 tensor on a CUDA device (the training compute dtype).
pub fn applies(t: &Tensor) -> bool {
    on_cuda(t) && t.dtype() == DType::BF16
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("a fused kernel was given a tensor that is not on a CUDA device"),
    }
}

/// The device address of `t`'s first element. `t` must be contiguous (no hidden copy whose buffer could be
/// freed before the kernel runs) and must outlive the launch; frees after it are ordered on the stream.
pub(crate) fn ptr(t: &Tensor) -> Result<u64> {
    let Some((start, _)) = t.layout().contiguous_offsets() else { bail!("a fused kernel was given a strided tensor") };
    Ok(storage_ptr(t)? + (start * t.dtype().size_in_bytes()) as u64)
}

/// The address and row stride of a matrix whose rows are contiguous but may lie further apart (the first
/// columns of a wider matrix), for cuBLAS's leading dimension; as [`ptr`] otherwise.
pub(crate) fn rows_ptr(t: &Tensor) -> Result<(u64, usize)> {
    let l = t.layout();
    let [rows, 1] = *l.stride() else { bail!("a GEMM was given a matrix whose rows are not contiguous") };
    Ok((storage_ptr(t)? + (l.start_offset() * t.dtype().size_in_bytes()) as u64, rows))
}

/// The device address of the start of `t`'s storage.
fn storage_ptr(t: &Tensor) -> Result<u64> {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("a fused kernel was given a tensor that is not on a CUDA device") };
    let stream = s.device.cuda_stream();
    Ok(match t.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::F64 => s.as_cuda_slice::<f64>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::U8 => s.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::I64 => s.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        d => bail!("fused kernels take no {d:?} tensors"),
    })
}

/// [`ptr`] for kernels that access 16 bytes at a time (`load8`/`store8` in `common.cuh`).
pub(crate) fn aligned_ptr(t: &Tensor) -> Result<u64> {
    let p = ptr(t)?;
    if !p.is_multiple_of(16) {
        bail!("a vectorized kernel was given a tensor that does not start on a 16-byte boundary");
    }
    Ok(p)
}

/// A tensor whose elements the next kernel writes, all of them; no zero-fill pass.
pub(crate) fn uninit(shape: impl Into<Shape>, dtype: DType, dev: &CudaDevice) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: the caller's kernel writes every element before anything reads the tensor.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::F64 => CudaStorage::wrap_cuda_slice(dev.alloc::<f64>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc::<u8>(n)?, dev.clone()),
            d => bail!("fused kernels write no {d:?} tensors"),
        }
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

/// What [`remembered`] keeps about a kernel: how many of its blocks run at once ([`one_wave`]), how many of
/// its clusters ([`one_wave_of_clusters`]), the shared memory a block may take ([`shared_room`]); and about
/// the device itself (no kernel name), its compute capability ([`compute_capability`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Fact {
    Blocks,
    Clusters,
    SharedRoom,
    ComputeCapability,
}

/// A fact about kernel `name` on `dev` (or about `dev` itself, with no name) that does not change while the
/// process runs (keyed further by `threads` and `shared`), asked of the driver once: eager decoding launches
/// ask on every step, and a driver query costs microseconds beside a 3 us kernel.
fn remembered(
    dev: &CudaDevice,
    fact: Fact,
    name: &str,
    threads: u32,
    shared: u32,
    ask: impl FnOnce() -> Result<usize>,
) -> Result<usize> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (candle_core::cuda_backend::DeviceId, Fact, String, u32, u32);
    static FACTS: OnceLock<Mutex<HashMap<Key, usize>>> = OnceLock::new();
    let key = (dev.id(), fact, name.to_string(), threads, shared);
    let facts = FACTS.get_or_init(Default::default);
    if let Some(&v) = facts.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(v);
    }
    let v = ask()?;
    facts.lock().unwrap_or_else(|e| e.into_inner()).insert(key, v);
    Ok(v)
}

/// The most blocks of `threads` (and `shared` bytes of dynamic shared memory) of kernel `name` that the card
/// runs at once: the blocks an SM holds (as the kernel's registers and shared memory allow) times the SMs.
/// Kernels that stride over uniform rows launch no more: with 1024 blocks where 792 fit, the RMSNorm backward
/// ran a second wave on 30% of the card (60% of the memory's bandwidth overall, H100).
pub(crate) fn one_wave(dev: &CudaDevice, ptx: Ptx, name: &str, threads: u32, shared: u32) -> Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    remembered(dev, Fact::Blocks, name, threads, shared, || {
        let func = dev.get_or_load_custom_func(name, ptx.0, ptx.1)?;
        let err = |e| candle_core::Error::Msg(format!("{name}: occupancy: {e:?}"));
        let per_sm =
            func.occupancy_max_active_blocks_per_multiprocessor(threads, shared as usize, None).map_err(err)?;
        let sms = dev.cuda_stream().context().attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(err)?;
        Ok((per_sm as usize * sms as usize).max(1))
    })
}

/// The most clusters of kernel `name` (its blocks of `threads` and `shared` bytes of dynamic shared memory, in
/// the clusters its `__cluster_dims__` names) that the card runs at once: the driver's count, as the GPCs'
/// SMs hold whole clusters only. Kernels whose clusters take tiles in turn launch no more.
pub(crate) fn one_wave_of_clusters(dev: &CudaDevice, ptx: Ptx, name: &str, threads: u32, shared: u32) -> Result<usize> {
    use cudarc::driver::sys;
    remembered(dev, Fact::Clusters, name, threads, shared, || {
        let func = dev.get_or_load_custom_func(name, ptx.0, ptx.1)?;
        let config = driver_config(
            dev,
            LaunchConfig { grid_dim: (2, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared },
        );
        let mut clusters = 0;
        // SAFETY: `config` and `clusters` outlive the call; no attributes (the kernel names its cluster).
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, func.cu_function(), &config) }
            .result()
            .map_err(|e| candle_core::Error::Msg(format!("{name}: cluster occupancy: {e:?}")))?;
        Ok(clusters.max(0) as usize)
    })
}

/// The dynamic shared memory one block of kernel `name` may take on `dev`: the device's most for a block
/// (opted into, [`opt_in_shared`]) less the kernel's static arrays.
pub(crate) fn shared_room(dev: &CudaDevice, ptx: Ptx, name: &str) -> Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
    remembered(dev, Fact::SharedRoom, name, 0, 0, || {
        let func = dev.get_or_load_custom_func(name, ptx.0, ptx.1)?;
        let err = |e| candle_core::Error::Msg(format!("{name}: shared memory: {e:?}"));
        let most = dev
            .cuda_stream()
            .context()
            .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(err)?;
        Ok((most as usize).saturating_sub(func.shared_size_bytes().map_err(err)? as usize))
    })
}

/// One block of `threads` per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Threads per block of the grid-stride kernels, and the most blocks they use.
const STRIDE_THREADS: u32 = 256;
const STRIDE_BLOCKS: usize = 2048;

/// A grid-stride launch over `n` elements: enough blocks to fill the card, no more than there is work.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(STRIDE_THREADS as usize).clamp(1, STRIDE_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (STRIDE_THREADS, 1, 1), shared_mem_bytes: 0 }
}
