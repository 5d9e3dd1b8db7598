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

#[cfg(not(feature = "cuda"))]
pub mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::*;
