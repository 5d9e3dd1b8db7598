//! The LM head on the CPU when its weights are all bf16 values (a packed export's embedding is bf16 by
//! default, and the tied head is the embedding): the matrix kept as bf16 is half the bytes that the f32
//! GEMM reads per token, the largest single read of packed decoding. Products and sums are f32, so the
//! logits differ from the f32 GEMM's only in the order of the sums.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// A `[rows, cols]` matrix of bf16 values, as the upper halves of their f32 bits.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    bits: Vec<u16>,
}

impl Bf16Matrix {
    /// `w` (f32 on the CPU) as bf16, or None when a value is not a bf16 value (the f32 GEMM then stays).
    pub fn exact(w: &Tensor) -> Result<Option<Self>> {
        let (rows, cols) = w.dims2()?;
        if w.dtype() != DType::F32 || !w.device().is_cpu() {
            return Ok(None);
        }
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        if values.iter().any(|v| v.to_bits() & 0xffff != 0) {
            return Ok(None);
        }
        Ok(Some(Self { rows, cols, bits: values.iter().map(|v| (v.to_bits() >> 16) as u16).collect() }))
    }

    /// `x @ W^T` for `x: [n, cols]` (f32): `[n, rows]` f32. Rows are shared out between the threads in a
    /// few chunks per thread, each against every token.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!("input has {cols} columns, the matrix {}", self.cols);
        }
        let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let chunk = self.rows.div_ceil(4 * rayon::current_num_threads()).max(64);
        let blocks: Vec<Vec<f32>> = self
            .bits
            .par_chunks(chunk * cols)
            .map(|rows| x.chunks(cols).flat_map(|x| rows.chunks(cols).map(|w| dot(w, x))).collect())
            .collect();
        // Block b is `[n, rows in b]`.
        let mut out = vec![0f32; n * self.rows];
        for (b, block) in blocks.iter().enumerate() {
            let len = block.len() / n.max(1);
            for (t, part) in block.chunks(len.max(1)).enumerate() {
                out[t * self.rows + b * chunk..][..len].copy_from_slice(part);
            }
        }
        Tensor::from_vec(out, (n, self.rows), &Device::Cpu)
    }
}

/// `sum_i w_i x_i` of a bf16 row and f32 activations.
fn dot(w: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { dot_avx2(w, x) };
    }
    dot_portable(w, x, 0)
}

/// AVX2: 16 weights per step, widened to f32 by a 16-bit shift, into two FMA accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    assert_eq!(x.len(), n, "one activation per weight");
    let full = n / 16 * 16;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // No closures here: they would not inherit the target features, and their intrinsics would not be
    // inlined.
    for j in (0..full).step_by(16) {
        // SAFETY: j + 16 <= full <= n = x.len(); unaligned loads.
        let b = _mm256_loadu_si256(w.as_ptr().add(j).cast());
        let w_lo = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)));
        let w_hi = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(b)));
        lo = _mm256_fmadd_ps(_mm256_castsi256_ps(w_lo), _mm256_loadu_ps(x.as_ptr().add(j)), lo);
        hi = _mm256_fmadd_ps(_mm256_castsi256_ps(w_hi), _mm256_loadu_ps(x.as_ptr().add(j + 8)), hi);
    }
    let s = _mm256_add_ps(lo, hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s) + dot_portable(w, x, full)
}

/// Any CPU, and the AVX2 kernel's tail (weights `from..`).
fn dot_portable(w: &[u16], x: &[f32], from: usize) -> f32 {
    w[from..].iter().zip(&x[from..]).map(|(&b, &v)| f32::from_bits(u32::from(b) << 16) * v).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Against candle's f32 matmul of the same values, up to the order of the sums, on widths that are not
    /// a multiple of the SIMD step, for one and several tokens; and matrices that are not bf16 are refused.
    #[test]
    fn bf16_head_equals_the_f32_product() {
        let mut rng = Rng::new(3);
        for (rows, cols) in [(300, 37), (1000, 1536), (7, 16)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| half::bf16::from_f64(rng.normal()).to_f32()).collect();
            let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let head = Bf16Matrix::exact(&w).unwrap().expect("bf16 values");
            for n in [1, 3] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.normal() as f32).collect();
                let x = Tensor::from_vec(x, (n, cols), &Device::Cpu).unwrap();
                let expected = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                let got = head.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
                for (e, g) in expected.iter().flatten().zip(got.iter().flatten()) {
                    assert!((e - g).abs() <= 1e-5 * (cols as f32).sqrt() * e.abs().max(1.0), "{e} vs {g}");
                }
            }
            let f32_values = (w + 1e-3).unwrap();
            assert!(Bf16Matrix::exact(&f32_values).unwrap().is_none());
        }
    }
}
