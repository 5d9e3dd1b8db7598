//! RMSNorm fused with the int8 quantization of the BitLinear input that follows it, and RMSNorm's backward.

use candle_core::{bail, DType, Result, Tensor};

use super::{cuda_device, launch, ptr, ptx, uninit, Ptx};

const PTX: Ptx = ptx!("rmsnorm");

/// For `x: [n, c]` and the norm weight `w: [c]` (bf16): the BitLinear input (normed, fake-quantized to int8
/// per row, blended by `lambda`), bf16 `[n, c]`, and the reciprocal RMS of each row, f32 `[n, 1]`.
pub fn rmsnorm_quant_forward(x: &Tensor, w: &Tensor, eps: f64, lambda: f64) -> Result<(Tensor, Tensor)> {
    let (n, c) = x.dims2()?;
    let dev = cuda_device(x)?;
    let (y, rrms) = (uninit((n, c), DType::BF16, &dev)?, uninit((n, 1), DType::F32, &dev)?);
    let inv_c = (1.0 / c as f64) as f32;
    launch!(dev, PTX, "rmsnorm_quant_forward", super::per_row(n, 256);
        ptr(x)?, ptr(w)?, ptr(&y)?, ptr(&rrms)?, c as i32, inv_c, eps as f32, lambda as f32);
    Ok((y, rrms))
}

/// `(dx, dw)` of RMSNorm for `dy, x: [n, c]` (bf16), `w: [c]`, `rrms: [n, 1]` (f32); `dw` in f32.
pub fn rmsnorm_backward(dy: &Tensor, x: &Tensor, w: &Tensor, rrms: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c) = x.dims2()?;
    // Each thread keeps the dw sums of up to 32 columns in registers (RMS_BWD_COLS in the kernel).
    let threads = match c {
        0..=8192 => 256,
        8193..=16384 => 512,
        16385..=32768 => 1024,
        _ => bail!("rmsnorm_backward supports up to 32768 channels, not {c}"),
    };
    // Blocks share the rows; each writes one row of dw partial sums, which the sum below reduces.
    let blocks = n.clamp(1, 1024);
    let dev = cuda_device(x)?;
    let (dx, partial) = (uninit((n, c), DType::BF16, &dev)?, uninit((blocks, c), DType::F32, &dev)?);
    let inv_c = (1.0 / c as f64) as f32;
    launch!(dev, PTX, "rmsnorm_backward", super::per_row(blocks, threads);
        ptr(dy)?, ptr(x)?, ptr(w)?, ptr(rrms)?, ptr(&dx)?, ptr(&partial)?, n as i32, c as i32, inv_c);
    Ok((dx, partial.sum(0)?))
}
