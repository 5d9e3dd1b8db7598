//! Ternary weights packed four to a byte, and the CPU kernel that multiplies them by int8 activations.
//!
//! # Packed layout (Bessie's packed checkpoints, `quantization_config.format = "ternary-2bit"` version 1)
//!
//! A BitLinear weight `[out, in]` with ternary values `w` (from [`quantize_weight`]) is stored as
//! - `<name>.weight`: U8 `[out, ceil(in / 4)]`, row-major. Weight `i` of a row lives in byte `i / 4` at bits
//!   `2 (i % 4)` and `2 (i % 4) + 1` (the first weight in the lowest two bits). Its 2-bit code is `w + 1`:
//!   `0` is -1, `1` is 0, `2` is +1; `3` is invalid and refused at load. A row whose length is not a
//!   multiple of four is padded with code 1 (zero).
//! - `<name>.weight_scale`: F32 `[1]`, the absmean scale `mean|W|`, so that `W ≈ w * weight_scale`.
//!
//! The code `w + 1` is the one ggml's TQ2_0 and transformers' packed BitNet weights use, and it keeps the
//! kernel cheap: with unsigned codes `c = w + 1`, `sum w x = sum c x - sum x`, where `sum x` is computed
//! once per token.
//!
//! [`quantize_weight`]: crate::ops::quantize_weight

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// The 2-bit code of a ternary value `w` is `w + 1`.
const CODE_OF_ZERO: u8 = 1;

/// A ternary matrix `[rows, cols]` as 2-bit codes, `row_bytes(cols)` bytes per row (layout in the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedTernary {
    rows: usize,
    cols: usize,
    codes: Arc<Vec<u8>>,
}

impl PackedTernary {
    /// Bytes per packed row of `cols` weights.
    pub fn row_bytes(cols: usize) -> usize {
        cols.div_ceil(4)
    }

    /// Packs a `[rows, cols]` tensor of values -1, 0 and 1 (any float dtype, any device).
    pub fn pack(ternary: &Tensor) -> Result<Self> {
        let (rows, cols) = ternary.dims2()?;
        let values = ternary.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes = Self::row_bytes(cols);
        let mut codes = vec![0u8; rows * bytes];
        for (r, row) in values.chunks(cols.max(1)).enumerate().take(rows) {
            let out = &mut codes[r * bytes..(r + 1) * bytes];
            for i in 0..bytes * 4 {
                let code = match row.get(i) {
                    None => CODE_OF_ZERO,
                    Some(&v) if v == -1.0 || v == 0.0 || v == 1.0 => (v as i8 + 1) as u8,
                    Some(v) => candle_core::bail!("value {v} at [{r}, {i}] is not ternary (-1, 0 or 1)"),
                };
                out[i / 4] |= code << (2 * (i % 4));
            }
        }
        Ok(Self { rows, cols, codes: Arc::new(codes) })
    }

    /// Wraps stored codes `[rows, row_bytes(cols)]`, refusing the invalid code 3 and non-zero padding.
    pub fn from_codes(codes: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let bytes = Self::row_bytes(cols);
        if codes.len() != rows * bytes {
            candle_core::bail!("{} packed bytes, expected {rows} rows x {bytes}", codes.len());
        }
        // A byte holds a 3 when some bit pair has both bits set; the exact weight is found only for the error.
        let bad = |b: u8| b & (b >> 1) & 0b0101_0101 != 0;
        // Padding weights (past `cols` in a row's last byte) must be code 1.
        let pad_mask = (0..4).filter(|k| 4 * bytes.saturating_sub(1) + k >= cols).fold(0u8, |m, k| m | (3 << (2 * k)));
        for (r, row) in codes.chunks(bytes.max(1)).enumerate() {
            let last = row.len() - 1;
            let pad_ok = row[last] & pad_mask == 0b0101_0101 & pad_mask;
            if let Some(j) = row.iter().position(|&b| bad(b)).or((!pad_ok).then_some(last)) {
                let code = |k: usize| (row[j] >> (2 * k)) & 3;
                let is_pad = |k: usize| j == last && (pad_mask >> (2 * k)) & 3 != 0;
                let k = (0..4).find(|&k| code(k) == 3 || (is_pad(k) && code(k) != 1)).unwrap_or(0);
                candle_core::bail!(
                    "invalid 2-bit code {} for weight [{r}, {}] (byte {j} of row {r})",
                    code(k),
                    4 * j + k
                );
            }
        }
        Ok(Self { rows, cols, codes: Arc::new(codes) })
    }

    /// Reads `<prefix>.weight` (U8 codes) and `<prefix>.weight_scale` (F32 `[1]`) of a packed checkpoint.
    /// Returns the matrix and the scale; errors name the tensor.
    pub fn load(vb: &VarBuilder, rows: usize, cols: usize) -> Result<(Self, f32)> {
        let codes = vb.get_with_hints_dtype((rows, Self::row_bytes(cols)), "weight", Default::default(), DType::U8)?;
        let scale = vb.get_with_hints_dtype(1, "weight_scale", Default::default(), DType::F32)?;
        let codes = codes.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
        let packed = Self::from_codes(codes, rows, cols)
            .map_err(|e| candle_core::Error::Msg(format!("tensor `{}.weight`: {e}", vb.prefix())))?;
        let scale = scale.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0];
        Ok((packed, scale))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The stored bytes, `[rows, row_bytes(cols)]` row-major.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The ternary value of weight `[r, i]`.
    pub fn value(&self, r: usize, i: usize) -> i8 {
        let b = self.codes[r * Self::row_bytes(self.cols) + i / 4];
        ((b >> (2 * (i % 4))) & 3) as i8 - 1
    }

    /// All values, row-major `[rows, cols]`.
    pub fn values(&self) -> Vec<i8> {
        (0..self.rows).flat_map(|r| (0..self.cols).map(move |i| self.value(r, i))).collect()
    }

    /// The ternary matrix as a tensor of `dtype` on `device` (how packed weights run on a GPU).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = self.values().into_iter().map(f32::from).collect();
        Tensor::from_vec(values, (self.rows, self.cols), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// `q @ W^T` for `q: [n, cols]` holding int8 values (as produced by `quantize_activations`, in f32):
    /// the exact integer products as f32 `[n, rows]`. Integer sums stay below 2^24, so they equal what an
    /// f32 matmul of the same values computes in any order.
    pub fn matmul_int8(&self, q: &Tensor) -> Result<Tensor> {
        let (n, cols) = q.dims2()?;
        if cols != self.cols {
            candle_core::bail!("activations have {cols} columns, the packed weight {}", self.cols);
        }
        let q: Vec<i8> = q.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v as i8).collect();
        let bytes = Self::row_bytes(cols);
        // Activations regrouped per token into four planes, plane k holding x[4j + k] (0 past the end), so
        // that the kernel reads codes and activations contiguously; this is O(n cols), the product O(n rows cols).
        let tokens: Vec<(Vec<i8>, i32)> = q
            .chunks(cols.max(1))
            .take(n)
            .map(|x| {
                let mut planes = vec![0i8; 4 * bytes];
                for (i, &v) in x.iter().enumerate() {
                    planes[(i % 4) * bytes + i / 4] = v;
                }
                (planes, x.iter().map(|&v| i32::from(v)).sum())
            })
            .collect();
        // Rows in parallel, each chunk of rows against every token while its codes are in cache. A few
        // chunks per thread balance the load; more would cost more in scheduling than they save.
        let rows_per_task = self.rows.div_ceil(4 * rayon::current_num_threads()).max(16);
        let mut out = vec![0f32; self.rows * n];
        out.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(task, chunk)| {
            let first = task * rows_per_task;
            for (dr, row_out) in chunk.chunks_mut(n).enumerate() {
                let codes = &self.codes[(first + dr) * bytes..(first + dr + 1) * bytes];
                for (o, (planes, sum_x)) in row_out.iter_mut().zip(&tokens) {
                    *o = (dot_codes(codes, planes) - sum_x) as f32;
                }
            }
        });
        // Computed as [rows, n]; the caller wants [n, rows].
        Tensor::from_vec(out, (self.rows, n), &Device::Cpu)?.t()?.contiguous()
    }
}

/// `sum_i c_i x_i` over one packed row: `codes[j]` holds the codes of x[4j + k] (k = 0..4) and `planes` is
/// the four planes `[x[4j + k] for j]` one after another.
fn dot_codes(codes: &[u8], planes: &[i8]) -> i32 {
    let n = codes.len();
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let planes = [p0, p1, p2, &p3[..n]];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { dot_codes_avx2(codes, planes) };
    }
    dot_codes_portable(codes, planes)
}

/// AVX2: 32 code bytes (128 weights) per step; `maddubs` multiplies the unsigned codes by the signed
/// activations and adds pairs (at most 2 * 2 * 128 in magnitude, no saturation), `madd` widens to i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_codes_avx2(codes: &[u8], planes: [&[i8]; 4]) -> i32 {
    use std::arch::x86_64::*;
    let full = codes.len() / 32 * 32;
    let (mask, ones) = (_mm256_set1_epi8(3), _mm256_set1_epi16(1));
    let mut acc = _mm256_setzero_si256();
    let [p0, p1, p2, p3] = [planes[0].as_ptr(), planes[1].as_ptr(), planes[2].as_ptr(), planes[3].as_ptr()];
    for j in (0..full).step_by(32) {
        // SAFETY: j + 32 <= full <= codes.len() = planes[k].len(); unaligned loads.
        let (x0, x1, x2, x3) = (p0.add(j).cast(), p1.add(j).cast(), p2.add(j).cast(), p3.add(j).cast());
        let b = _mm256_loadu_si256(codes.as_ptr().add(j).cast());
        let c0 = _mm256_and_si256(b, mask);
        let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask);
        let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
        let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask);
        let s01 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c0, _mm256_loadu_si256(x0)),
            _mm256_maddubs_epi16(c1, _mm256_loadu_si256(x1)),
        );
        let s23 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c2, _mm256_loadu_si256(x2)),
            _mm256_maddubs_epi16(c3, _mm256_loadu_si256(x3)),
        );
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones));
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc);
    let sum = lanes.iter().sum::<i32>();
    if full == codes.len() {
        return sum;
    }
    let tail = [&planes[0][full..], &planes[1][full..], &planes[2][full..], &planes[3][full..]];
    sum + dot_codes_portable(&codes[full..], tail)
}

/// Any CPU, and the AVX2 kernel's tail.
fn dot_codes_portable(codes: &[u8], planes: [&[i8]; 4]) -> i32 {
    let mut total = 0i32;
    for (k, plane) in planes.into_iter().enumerate() {
        let shift = 2 * k as u32;
        total += codes.iter().zip(plane).map(|(&b, &x)| i32::from((b >> shift) & 3) * i32::from(x)).sum::<i32>();
    }
    total
}
