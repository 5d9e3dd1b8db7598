//! Choosing the device and the compute dtype.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

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
    keep_pool_memory(ordinal)?;
    Ok(device)
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
