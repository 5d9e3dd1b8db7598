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
    Ok(Device::new_cuda(ordinal)?)
}

/// f32 on CPU (exact reference), bf16 on the GPU (tensor cores).
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}
