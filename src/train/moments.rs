//! AdamW's moments for a shard of the flat parameters: f32 (8 bytes a parameter for both), or with
//! `train.optimizer_state = "int8"` one byte a value each, in blocks of [`BLOCK`] values with an f32 scale
//! a block and moment (2.03 bytes a parameter for both).
//!
//! Adam's update `m / sqrt(v)` is the same size for a parameter whose gradients are tiny as for one whose
//! gradients are large, and a block holds both, so the 8-bit form must keep every parameter's ratio, not
//! only the block's largest values:
//!
//! - The second moment is coded logarithmically (as bitsandbytes' dynamic quantization is non-linear): a
//!   value is its block's largest times `2^(-k/4)`, `k` = 0 to 254, and code 0 is zero. Relative error at
//!   most 9% (4.4% on `sqrt(v)`, the denominator of the update) over 19 orders of magnitude, 9.6 of the
//!   gradients' scale: a parameter whose `v` fell below the range would lose its history, and its next
//!   updates, divided by Adam's bias correction of a history it no longer has, would be many times too large
//!   (8 codes an octave, 9.5 orders, let that happen in blocks whose gradient scales differ by 5 orders).
//! - The first moment is stored as the update direction `u = m / sqrt(v)`, with `v` as decoded, linearly
//!   in 255 levels of its block's largest `|u|`. `|u|` is bounded (by 7.3 at betas 0.9 and 0.999, by
//!   Cauchy-Schwarz over the two averages of the same gradients), so the error of each update is at most
//!   half a level of the block's largest, a fraction of a percent of a typical update, whatever the scale
//!   of the parameter's gradients. Below `v`'s range, `sqrt(v)` is taken at the range's floor, so `u` stays
//!   bounded there too.
//!
//! Coding and decoding are candle ops here, the CPU's update and the reference of the GPU's, where one fused
//! kernel (`kernels::flat::adamw_int8`) decodes, updates and codes a block per CUDA block.

use std::f64::consts::LN_2;
use std::ops::Range;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::run::OptimizerState;

/// Values per block, each block with its own scales.
pub const BLOCK: usize = 256;

/// Values taken at a time where whole moments are coded, or the update without the fused kernel runs
/// (whole blocks): their f32 temporaries are a few of these, not a few of the model.
pub const CHUNK: usize = 1 << 22;
const _: () = assert!(CHUNK.is_multiple_of(BLOCK), "chunks hold whole blocks of 8-bit moments");

/// Codes per octave of the second moment.
const STEPS: f64 = 4.0;
/// Its non-zero codes: 1 to 255.
const V_LEVELS: f64 = 255.0;
/// Just below its smallest non-zero code (`2^(-254/4)` of the block's largest): `2^-64`, where `sqrt(v)` is
/// taken at least.
const V_FLOOR: f64 = 5.421010862427522e-20;
/// The first moment's direction `u`: codes 1 to 255 for -127 to 127 levels of the block's largest `|u|`.
const U_LEVELS: f64 = 127.0;

/// Both moments of a shard.
#[derive(Debug, Clone)]
pub enum Moments {
    F32 {
        m: Tensor,
        v: Tensor,
    },
    /// u8 codes, the shard's length rounded up to whole blocks; f32 scales, one per block.
    Int8 {
        u: Tensor,
        u_scale: Tensor,
        v: Tensor,
        v_scale: Tensor,
        len: usize,
    },
}

impl Moments {
    /// Zero moments of `len` parameters.
    pub fn zeros(len: usize, state: OptimizerState, device: &Device) -> Result<Self> {
        let f32s = |n| Tensor::zeros(n, DType::F32, device);
        let codes = |n| Tensor::zeros(n, DType::U8, device);
        let blocks = len.div_ceil(BLOCK);
        Ok(match state {
            OptimizerState::F32 => Moments::F32 { m: f32s(len)?, v: f32s(len)? },
            OptimizerState::Int8 => Moments::Int8 {
                u: codes(blocks * BLOCK)?,
                u_scale: f32s(blocks)?,
                v: codes(blocks * BLOCK)?,
                v_scale: f32s(blocks)?,
                len,
            },
        })
    }

    /// The moments `m`, `v` (f32, a checkpoint's, in host memory) on `device`, held as `state` says: coded a
    /// chunk at a time, so the f32 moments never exist on the device.
    pub fn from_f32(m: &Tensor, v: &Tensor, state: OptimizerState, device: &Device) -> Result<Self> {
        if state == OptimizerState::F32 {
            // Copies of their own on the CPU, not views that keep the whole checkpoint's moments alive.
            let own = |t: &Tensor| if device.is_cpu() { t.copy() } else { t.to_device(device) };
            return Ok(Moments::F32 { m: own(m)?, v: own(v)? });
        }
        let len = m.elem_count();
        let moments = Self::zeros(len, state, device)?;
        for start in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - start);
            let part = |t: &Tensor| t.narrow(0, start, n)?.to_device(device);
            moments.write(start, &part(m)?, &part(v)?)?;
        }
        Ok(moments)
    }

    pub fn len(&self) -> usize {
        match self {
            Moments::F32 { m, .. } => m.elem_count(),
            Moments::Int8 { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole moments in f32 (for a checkpoint); the tensors themselves when they are f32.
    pub fn to_f32(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Moments::F32 { m, v } => Ok((m.clone(), v.clone())),
            Moments::Int8 { .. } => self.read(0..self.len()),
        }
    }

    /// `m` and `v` of `range` in f32, copies; `range` starts on a block.
    pub fn read(&self, range: Range<usize>) -> Result<(Tensor, Tensor)> {
        match self {
            Moments::F32 { m, v } => {
                let part = |t: &Tensor| t.narrow(0, range.start, range.len())?.copy();
                Ok((part(m)?, part(v)?))
            }
            Moments::Int8 { u, u_scale, v, v_scale, .. } => {
                ensure!(range.start.is_multiple_of(BLOCK), "8-bit moments are read from the start of a block");
                let (first, blocks) = (range.start / BLOCK, range.len().div_ceil(BLOCK));
                let codes = |c: &Tensor| c.narrow(0, range.start, blocks * BLOCK);
                let scales = |s: &Tensor| s.narrow(0, first, blocks);
                let (m, v) = decode(&codes(u)?, &scales(u_scale)?, &codes(v)?, &scales(v_scale)?)?;
                Ok((m.narrow(0, 0, range.len())?, v.narrow(0, 0, range.len())?))
            }
        }
    }

    /// Sets the moments from `start` (on a block) to `m` and `v` (f32), which end on a block or at the end.
    pub fn write(&self, start: usize, m_new: &Tensor, v_new: &Tensor) -> Result<()> {
        match self {
            Moments::F32 { m, v } => {
                m.slice_set(m_new, 0, start)?;
                v.slice_set(v_new, 0, start)?;
            }
            Moments::Int8 { u, u_scale, v, v_scale, len } => {
                let n = m_new.elem_count();
                ensure!(
                    start.is_multiple_of(BLOCK) && (n.is_multiple_of(BLOCK) || start + n == *len),
                    "8-bit moments are written in whole blocks"
                );
                let padded = n.next_multiple_of(BLOCK);
                let pad = |t: &Tensor| match padded > n {
                    true => Tensor::cat(&[t, &Tensor::zeros(padded - n, DType::F32, t.device())?], 0),
                    false => Ok(t.clone()),
                };
                let [uc, us, vc, vs] = encode(&pad(m_new)?, &pad(v_new)?)?;
                u.slice_set(&uc, 0, start)?;
                u_scale.slice_set(&us, 0, start / BLOCK)?;
                v.slice_set(&vc, 0, start)?;
                v_scale.slice_set(&vs, 0, start / BLOCK)?;
            }
        }
        Ok(())
    }
}

/// Device bytes of both moments of `len` parameters held as `state` says.
pub fn moments_bytes(len: f64, state: OptimizerState) -> f64 {
    match state {
        OptimizerState::F32 => 8.0 * len,
        OptimizerState::Int8 => 2.0 * len * (1.0 + 4.0 / BLOCK as f64),
    }
}

/// The codes and scales `[u, u_scale, v, v_scale]` of `m` and `v` (f32, whole blocks), as the module doc
/// describes.
pub fn encode(m: &Tensor, v: &Tensor) -> Result<[Tensor; 4]> {
    let blocks = m.elem_count() / BLOCK;
    let (m, v) = (m.reshape((blocks, BLOCK))?, v.reshape((blocks, BLOCK))?);
    let v_scale = v.max_keepdim(1)?;
    let r = v.broadcast_div(&v_scale.maximum(f32::MIN_POSITIVE)?)?;
    // log(0) is -inf, which the clamp takes to code 0 (zero).
    let v_codes = ((r.log()? * (STEPS / LN_2))?.round()?.clamp(-V_LEVELS, 0.0)? + V_LEVELS)?;
    let u = m.broadcast_div(&root_v(&v_codes, &v_scale)?)?;
    let u_scale = u.abs()?.max_keepdim(1)?;
    let u_codes = (u.broadcast_div(&u_scale.maximum(f32::MIN_POSITIVE)?)? * U_LEVELS)?.round()? + (U_LEVELS + 1.0);
    let flat = |t: Tensor, dtype| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.flatten_all()?) };
    Ok([flat(u_codes?, DType::U8)?, flat(u_scale, DType::F32)?, flat(v_codes, DType::U8)?, flat(v_scale, DType::F32)?])
}

/// `m` and `v` (f32) from their codes and blocks' scales.
pub fn decode(u: &Tensor, u_scale: &Tensor, v: &Tensor, v_scale: &Tensor) -> Result<(Tensor, Tensor)> {
    let blocks = u_scale.elem_count();
    let (u_scale, v_scale) = (u_scale.reshape((blocks, 1))?, v_scale.reshape((blocks, 1))?);
    let v_codes = v.to_dtype(DType::F32)?.reshape((blocks, BLOCK))?;
    let v = v_level(&v_codes)?.broadcast_mul(&v_scale)?;
    let u = ((u.to_dtype(DType::F32)?.reshape((blocks, BLOCK))? - (U_LEVELS + 1.0))? / U_LEVELS)?
        .broadcast_mul(&u_scale)?;
    let m = (u * root_v(&v_codes, &v_scale)?)?;
    Ok((m.flatten_all()?, v.flatten_all()?))
}

/// The second moment's codes `[blocks, BLOCK]` (as f32) relative to their block's largest: `2^((c - 255)/4)`,
/// 0 for code 0.
fn v_level(codes: &Tensor) -> Result<Tensor> {
    let power = ((codes - V_LEVELS)? * (LN_2 / STEPS))?.exp()?;
    Ok((power * codes.gt(0.0)?.to_dtype(DType::F32)?)?)
}

/// What `u` is taken relative to: `sqrt(v)` as decoded from `codes` and `scale`, at least at the floor of
/// the code's range (and never 0).
fn root_v(codes: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let relative = v_level(codes)?.maximum(V_FLOOR)?;
    Ok(relative.broadcast_mul(scale)?.sqrt()?.maximum(f32::MIN_POSITIVE)?)
}
