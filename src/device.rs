//! Choosing the device and the compute dtype, and moving tensors to the host.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Parses `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU in a CUDA build that finds one, else the CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    rank_device(spec, 0)
}

/// The device of a data-parallel rank, one rank per GPU: `auto` and `cuda` mean the GPU numbered by the
/// rank's local rank on its node; `cpu` and `cuda:N` are taken as written.
pub fn rank_device(spec: &str, local_rank: usize) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => local_rank,
        "auto" => return Ok(Device::Cpu),
        "cuda" => local_rank,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown device `{spec}`: use auto, cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!("device `{spec}` needs a CUDA build: cargo build --release --features cuda");
    }
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    {
        keep_pool_memory(ordinal)?;
        no_buffer_events(&device);
    }
    Ok(device)
}

/// Stops cudarc making two CUDA events for every buffer it allocates. They order a buffer's uses between
/// streams; Bessie's work runs on candle's one stream, and the one other stream (NCCL's, `dist`) meets it
/// only where `dist` orders the two explicitly. Without them a step of -large at 1 x 4 makes about 8,700
/// event creations and as many destructions fewer (CUPTI) and the GPU idles less under the profiler;
/// unprofiled, the speed is the same (H100: 48,148-48,300 tok/s against 48,142-48,598). A rank with NCCL
/// needs it, so every GPU run has it: a run of one GPU behaves as one rank of many.
#[cfg(feature = "cuda")]
fn no_buffer_events(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: called before any tensor is made on this device; the uses on other streams are ordered
        // where they happen (see above).
        unsafe { d.disable_event_tracking() }
    }
}

/// Keeps freed GPU memory in the allocator's pool across synchronizations. cudarc allocates with
/// cuMemAllocAsync from the device's default pool, whose release threshold is 0: every sync (a step reads
/// its loss) hands the freed memory back to the driver, and the next step maps it again, host work that
/// leaves the GPU idle behind it (PyTorch's caching allocator keeps its blocks the same way).
#[cfg(feature = "cuda")]
fn keep_pool_memory(ordinal: usize) -> Result<()> {
    use cudarc::driver::{result, sys};
    let mut threshold = u64::MAX;
    // SAFETY: the device is the one candle just opened; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(result::device::get(ordinal as i32)?)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )?;
    }
    Ok(())
}

/// f32 on CPU (exact reference), bf16 on the GPU (tensor cores).
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The GPU's name as its driver reports it ("NVIDIA H200", "NVIDIA H100 80GB HBM3"); None on the CPU.
pub fn gpu_name(device: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.cuda_stream().context().name().ok();
    }
    let _ = device;
    None
}

/// Dense bf16 tensor-core peak in TFLOP/s (without sparsity, FP32 accumulate) from NVIDIA's datasheet or
/// architecture whitepaper for the card its driver names, for MFU. None for a card not listed (A10G, whose
/// maker publishes no datasheet; pre-Ampere cards without bf16), so that MFU says "unknown" rather than
/// a wrong number. More specific names come first (H200 NVL before H200, L40S before L40 before L4).
pub fn peak_bf16_tflops(gpu_name: &str) -> Option<f64> {
    const PEAKS: [(&str, f64); 13] = [
        ("H200 NVL", 835.0),
        ("H200", 989.0),
        ("H100 NVL", 835.0),
        ("H100 PCIe", 756.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("A10G", f64::NAN),
        ("A10", 125.0),
        ("L40S", 362.0),
        ("L40", 181.0),
        ("L4", 121.0),
        ("RTX 4090", 165.2),
        ("RTX A6000", 154.8),
    ];
    // A name matches as whole words, so that "A10" does not match "A100" and "L4" not "L40".
    let words: Vec<&str> = gpu_name.split([' ', '-']).collect();
    let matches = |pattern: &str| {
        let p: Vec<&str> = pattern.split(' ').collect();
        words.windows(p.len()).any(|w| w == p.as_slice())
    };
    PEAKS.iter().find(|(pattern, _)| matches(pattern)).map(|&(_, peak)| peak).filter(|p| p.is_finite())
}

/// Free memory of the GPU, in bytes, as its driver reports it; None on the CPU.
pub fn gpu_free_memory(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        d.cuda_stream().context().bind_to_thread()?;
        let (free, _total) = cudarc::driver::result::mem_get_info()?;
        return Ok(Some(free as u64));
    }
    let _ = device;
    Ok(None)
}

/// `t`'s elements on the host. On a GPU its own elements are copied out first: moving a view (a training
/// run's parameters are views of one flat buffer) to the host copies its whole buffer, which made saving a
/// bitnet_b1_58-large checkpoint take minutes. On the CPU nothing is copied.
pub fn to_host(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.device() {
        Device::Cpu => Ok(t.clone()),
        _ => t.force_contiguous()?.to_device(&Device::Cpu),
    }
}
