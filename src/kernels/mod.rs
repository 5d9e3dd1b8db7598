//! Fused CUDA kernels (feature `cuda`), one `.cu` file per concern beside the Rust that launches it
//! (llm.c's `llmc/*.cuh`). Each replaces a chain of candle ops whose plain version stays beside the caller
//! as the CPU path and the reference (`train::layers`, `train::optim`); `tests/gpu.rs` checks every kernel
//! against its reference on the same GPU tensors, on fresh random inputs.
//!
//! Each module's `try_` functions are what the layers call: `Ok(None)` where the kernel does not apply (not
//! bf16 on CUDA, a shape it does not take), and the caller runs its reference. Without the `cuda` feature
//! the modules are [`stub`]'s, whose `try_` functions always answer `Ok(None)`: callers need no `cfg`.
//! The kernels never import the trainer; the plain types both use are in [`shapes`].
//!
//! `build.rs` compiles the `.cu` files to PTX; candle loads each module once per device and the kernels
//! run on candle's stream, so they are ordered with candle's own ops. Arguments are raw device addresses of
//! contiguous tensors, outputs are fresh tensors, except the flat-buffer kernels, which update the
//! optimizer state in place.

pub mod shapes;

/// The head dims the flash attention kernels are instantiated for (`FLASH(D)` in `flash_attention.cu`); a
/// constant of every build, for the memory estimate.
pub const FLASH_HEAD_DIMS: [usize; 4] = [64, 96, 128, 256];

/// The most bytes of score gradients the flash backward hands over ([`flash_ds_bytes`]): past them (long
/// sequences: the tiles grow as the square of the length) memory matters more than the backward's time, and its
/// dQ kernel recomputes the scores instead.
pub const FLASH_DS_LIMIT: usize = 1 << 30;

/// The bytes of score gradients dS that flash attention's backward on Hopper hands from its dK/dV kernel to its
/// dQ kernel, which then runs one product a tile instead of three (S and dP again, then dS K): a bf16 tile of 64 x
/// 64 for each causal pair of 64-row tiles of each of `heads` query heads (batch x heads) of `seq` tokens. 0 where
/// the dQ kernel recomputes them: past [`FLASH_DS_LIMIT`]. A constant of every build, for the memory estimate,
/// which counts them on every card.
pub fn flash_ds_bytes(heads: usize, seq: usize) -> usize {
    let tiles = seq.div_ceil(64);
    let bytes = heads * tiles * (tiles + 1) / 2 * 64 * 64 * 2;
    if bytes <= FLASH_DS_LIMIT {
        bytes
    } else {
        0
    }
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::*;

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod decode;
#[cfg(feature = "cuda")]
pub mod embedding;
#[cfg(feature = "cuda")]
pub mod flash_attention;
#[cfg(feature = "cuda")]
pub mod flat;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod int8_gemm;
#[cfg(feature = "cuda")]
pub mod readback;
#[cfg(feature = "cuda")]
pub mod residual;
#[cfg(feature = "cuda")]
pub mod rmsnorm;
#[cfg(feature = "cuda")]
pub mod rope;

/// A tensor on `device` whose every element the caller writes before anything reads it: uninitialized on a
/// GPU (no zero-fill pass), zeros elsewhere.
pub fn for_writing(
    shape: impl Into<candle_core::Shape>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return uninit(shape, dtype, dev);
    }
    candle_core::Tensor::zeros(shape, dtype, device)
}

#[cfg(not(feature = "cuda"))]
pub mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::*;
