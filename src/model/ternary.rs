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
        let q = q.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let acts = Int8Activations::new(cols, q.chunks(cols.max(1)).take(n).map(|x| (x.iter().map(|&v| v as i8), 1.0)));
        let out = products(&[self], &acts, |_, _| 1.0)?;
        Tensor::from_vec(out.concat(), (n, self.rows), &Device::Cpu)
    }
}

/// BitLinear layers on the CPU that read the same input `x: [.., cols]` (any float dtype), each a packed
/// matrix and its weight scale: `x` is quantized once per token and the matrices' rows are shared out
/// between the threads in one pass. Output `i` is `[.., rows_i]` in `x`'s dtype. Quantization and
/// scaling are `quantize_activations`' and the dense BitLinear's, in f32, so both forms agree bit for bit.
pub fn bitlinear_forward(layers: &[(&PackedTernary, f64)], x: &Tensor) -> Result<Vec<Tensor>> {
    let dims = x.dims();
    let cols = dims.last().copied().unwrap_or(1);
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let acts = Int8Activations::new(cols, values.chunks(cols.max(1)).map(quantize_token));
    let mats: Vec<&PackedTernary> = layers.iter().map(|&(m, _)| m).collect();
    // `x_scale * weight_scale` is candle's affine op in f32: one product, as here.
    let products = products(&mats, &acts, |m, t| acts.scales[t] * layers[m].1 as f32)?;
    products
        .into_iter()
        .zip(&mats)
        .map(|(y, m)| {
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().unwrap_or(&mut 0) = m.rows;
            Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())
        })
        .collect()
}

/// One token quantized as `quantize_activations` quantizes it, bit for bit: candle's `absmax / 127.0`
/// multiplies by the f32 reciprocal, `x / scale` divides, and rounding is half away from zero. Returns the
/// values and the scale.
fn quantize_token(x: &[f32]) -> (impl Iterator<Item = i8> + '_, f32) {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
    let scale = absmax * (1.0f64 / 127.0) as f32;
    // `f32::round` is a libm call on baseline x86-64; |x / scale| <= 127 (and rounding), so truncating to
    // i32 and comparing the exact fraction with 0.5 rounds the same way, in instructions that vectorize.
    let round = move |v: f32| {
        let q = v / scale;
        let t = q as i32;
        let frac = q - t as f32;
        (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)).clamp(-128, 127) as i8
    };
    (x.iter().map(move |&v| round(v)), scale)
}

/// Int8 activations of `n` tokens laid out for the kernel: per token four planes of `row_bytes(cols)`
/// values, plane k holding x[4j + k] (0 past the end), so that the kernel reads a packed row's bytes and
/// the activations contiguously. Building them is O(n cols), the products O(n rows cols).
struct Int8Activations {
    cols: usize,
    /// `row_bytes(cols)`: the length of a plane.
    plane: usize,
    n: usize,
    planes: Vec<i8>,
    /// Per token, the sum of its values: `sum w x = sum c x - sum x`.
    sums: Vec<i32>,
    /// Per token, the value of one int8 step.
    scales: Vec<f32>,
}

impl Int8Activations {
    fn new<I: Iterator<Item = i8>>(cols: usize, tokens: impl Iterator<Item = (I, f32)>) -> Self {
        let plane = PackedTernary::row_bytes(cols);
        let mut acts = Self { cols, plane, n: 0, planes: Vec::new(), sums: Vec::new(), scales: Vec::new() };
        for (values, scale) in tokens {
            let start = acts.planes.len();
            acts.planes.resize(start + 4 * plane, 0);
            let planes = &mut acts.planes[start..];
            let mut sum = 0;
            for (i, v) in values.enumerate() {
                planes[(i % 4) * plane + i / 4] = v;
                sum += i32::from(v);
            }
            acts.sums.push(sum);
            acts.scales.push(scale);
            acts.n += 1;
        }
        acts
    }

    fn token(&self, t: usize) -> &[i8] {
        &self.planes[4 * self.plane * t..4 * self.plane * (t + 1)]
    }
}

/// Tokens multiplied per pass over a row: the row's codes are unpacked once for all of them. (Passes over
/// four rows at once for one token, sharing the activations' loads, decoded slower: the kernel waits on
/// the codes' loads, and four streams of them prefetch worse than one.)
const TOKENS_PER_PASS: usize = 4;

/// `(sum_i w_i x_i) * scale(m, t)` for every token `t` and row of every matrix `m` (all `cols` wide), as
/// `[n, rows_m]` per matrix. The rows of all matrices are cut into a few chunks per thread (more would
/// cost more in scheduling than they save); each chunk is multiplied by every token while its codes are
/// in cache.
fn products(
    mats: &[&PackedTernary],
    acts: &Int8Activations,
    scale: impl Fn(usize, usize) -> f32 + Sync,
) -> Result<Vec<Vec<f32>>> {
    if let Some(m) = mats.iter().find(|m| m.cols != acts.cols) {
        candle_core::bail!("activations have {} columns, the packed weight {}", acts.cols, m.cols);
    }
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let chunk = total.div_ceil(4 * rayon::current_num_threads()).max(16);
    let tasks: Vec<(usize, usize, usize)> = mats
        .iter()
        .enumerate()
        .flat_map(|(m, mat)| (0..mat.rows).step_by(chunk).map(move |r| (m, r, chunk.min(mat.rows - r))))
        .collect();
    let (n, scale) = (acts.n, &scale);
    // Each task's block is `[n, len]`.
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(m, first, len)| {
            let rows = &mats[m].codes[first * acts.plane..(first + len) * acts.plane];
            let mut dots = vec![0i32; n * len];
            let mut t0 = 0;
            while t0 < n {
                let pass: Pass = match n - t0 {
                    1 => pass::<1>,
                    2 => pass::<2>,
                    3 => pass::<3>,
                    _ => pass::<TOKENS_PER_PASS>,
                };
                t0 += pass(rows, acts, t0, &mut dots);
            }
            // One scale per token, applied by a loop that vectorizes: a closure per output, in a `flat_map`
            // over the tokens, took a fifth of the kernel's time.
            let mut block = Vec::with_capacity(n * len);
            for (t, dots) in dots.chunks(len).enumerate() {
                let s = scale(m, t);
                block.extend(dots.iter().map(|&dot| dot as f32 * s));
            }
            block
        })
        .collect();
    let mut out: Vec<Vec<f32>> = mats.iter().map(|mat| vec![0f32; n * mat.rows]).collect();
    for (&(m, first, len), block) in tasks.iter().zip(blocks) {
        for (t, part) in block.chunks(len).enumerate() {
            out[m][t * mats[m].rows + first..][..len].copy_from_slice(part);
        }
    }
    Ok(out)
}

/// `pass::<T>(rows, acts, t0, dots)`.
type Pass = fn(&[u8], &Int8Activations, usize, &mut [i32]) -> usize;

/// Each packed row in `rows` times tokens `t0..t0 + T`: `sum w x` into `dots` (`[n, rows]`); returns `T`.
fn pass<const T: usize>(rows: &[u8], acts: &Int8Activations, t0: usize, dots: &mut [i32]) -> usize {
    let len = rows.len() / acts.plane;
    let tokens: [&[i8]; T] = std::array::from_fn(|j| acts.token(t0 + j));
    for (r, codes) in rows.chunks(acts.plane).enumerate() {
        for (j, dot) in dot_codes(codes, tokens).into_iter().enumerate() {
            dots[(t0 + j) * len + r] = dot - acts.sums[t0 + j];
        }
    }
    T
}

/// `sum_i c_i x_i` of one packed row for each of `T` tokens, each given as its four planes (see
/// `Int8Activations`).
fn dot_codes<const T: usize>(codes: &[u8], tokens: [&[i8]; T]) -> [i32; T] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { x86::dot_codes_avx2(codes, tokens) };
        }
    }
    tokens.map(|x| dot_codes_portable(codes, x, 0))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2: 32 code bytes (128 weights) per step, unpacked once for all `T` tokens; `maddubs` multiplies
    /// the unsigned codes by the signed activations and adds pairs, and four of its sums are at most
    /// 4 * 2 * 2 * 128 in magnitude (no i16 saturation) before `madd` widens them to i32. Measured no
    /// faster on Zen 4: AVX-512 VNNI's `dpbusd` in place of the three, and sums kept in i16 over 16 steps
    /// before widening (slower at the prompt).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_codes_avx2<const T: usize>(codes: &[u8], tokens: [&[i8]; T]) -> [i32; T] {
        let n = codes.len();
        let full = n / 32 * 32;
        assert!(tokens.iter().all(|x| x.len() == 4 * n), "four planes of {n} activations per token");
        let (mask, ones) = (_mm256_set1_epi8(3), _mm256_set1_epi16(1));
        let mut acc = [_mm256_setzero_si256(); T];
        // Plain loops: closures (`array::from_fn`) would not inherit the target feature, and their
        // intrinsics would not be inlined.
        for j in (0..full).step_by(32) {
            // SAFETY: j + 32 <= full <= n, and plane k of a token is x[k n..(k + 1) n] (asserted above);
            // unaligned loads.
            let b = _mm256_loadu_si256(codes.as_ptr().add(j).cast());
            let c0 = _mm256_and_si256(b, mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
            let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask);
            for t in 0..T {
                let x = tokens[t].as_ptr().add(j);
                let (x0, x1) = (_mm256_loadu_si256(x.cast()), _mm256_loadu_si256(x.add(n).cast()));
                let (x2, x3) = (_mm256_loadu_si256(x.add(2 * n).cast()), _mm256_loadu_si256(x.add(3 * n).cast()));
                let s01 = _mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1));
                let s23 = _mm256_add_epi16(_mm256_maddubs_epi16(c2, x2), _mm256_maddubs_epi16(c3, x3));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones));
            }
        }
        let mut out = [0i32; T];
        for t in 0..T {
            // Horizontal sum of the eight i32 lanes.
            let a = _mm_add_epi32(_mm256_castsi256_si128(acc[t]), _mm256_extracti128_si256::<1>(acc[t]));
            let a = _mm_add_epi32(a, _mm_shuffle_epi32::<0b01_00_11_10>(a));
            let a = _mm_add_epi32(a, _mm_shuffle_epi32::<0b10_11_00_01>(a));
            // Most widths are a whole number of steps: no tail to call for.
            let tail = if full < n { super::dot_codes_portable(codes, tokens[t], full) } else { 0 };
            out[t] = _mm_cvtsi128_si32(a) + tail;
        }
        out
    }
}

/// `sum_i c_i x_i` over the bytes `from..` of one packed row (any CPU, and the SIMD kernels' tail).
fn dot_codes_portable(codes: &[u8], x: &[i8], from: usize) -> i32 {
    let n = codes.len();
    (0..4)
        .map(|k| {
            let plane = &x[k * n + from..(k + 1) * n];
            codes[from..].iter().zip(plane).map(|(&b, &v)| i32::from((b >> (2 * k)) & 3) * i32::from(v)).sum::<i32>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Random ternary rows after a row of +1s, which with the int8 extremes gives the largest sums.
    fn random_codes(rng: &mut Rng, rows: usize, cols: usize) -> PackedTernary {
        let values: Vec<f32> =
            (0..rows * cols).map(|i| if i < cols { 1.0 } else { (rng.uniform() * 3.0).floor() as f32 - 1.0 }).collect();
        PackedTernary::pack(&Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()).unwrap()
    }

    /// Activations of `n` tokens: the int8 extremes first (no i16 sum may saturate), then random values.
    fn random_acts(rng: &mut Rng, n: usize, cols: usize) -> Int8Activations {
        let values: Vec<Vec<i8>> = (0..n)
            .map(|t| match t {
                0 => vec![-128; cols],
                1 => vec![127; cols],
                _ => (0..cols).map(|_| (rng.next_u64() >> 56) as u8 as i8).collect(),
            })
            .collect();
        Int8Activations::new(cols, values.iter().map(|v| (v.iter().copied(), 1.0)))
    }

    /// Widths below, at and beyond one SIMD step (128 weights), not multiples of it nor of four.
    const WIDTHS: [usize; 9] = [1, 5, 127, 128, 129, 300, 512, 1536, 4099];

    /// The kernel this CPU runs (AVX2 on x86-64 where it has it) against the portable one, for a pass of
    /// `T` tokens.
    fn check_kernels<const T: usize>() {
        let mut rng = Rng::new(5 + T as u64);
        for cols in WIDTHS {
            let packed = random_codes(&mut rng, 3, cols);
            let acts = random_acts(&mut rng, T, cols);
            let tokens: [&[i8]; T] = std::array::from_fn(|t| acts.token(t));
            for codes in packed.codes().chunks(acts.plane) {
                let expected = tokens.map(|x| dot_codes_portable(codes, x, 0));
                assert_eq!(dot_codes(codes, tokens), expected, "{cols} columns");
            }
        }
    }

    #[test]
    fn simd_kernels_equal_the_portable_one() {
        check_kernels::<1>();
        check_kernels::<2>();
        check_kernels::<3>();
        check_kernels::<TOKENS_PER_PASS>();
    }

    /// The product of several matrices sharing one pass, for token counts that end in every pass size.
    #[test]
    fn products_of_several_matrices_are_the_rows_dot_products() {
        let mut rng = Rng::new(6);
        for cols in WIDTHS {
            let (a, b) = (random_codes(&mut rng, 9, cols), random_codes(&mut rng, 40, cols));
            for n in 1..=2 * TOKENS_PER_PASS + 1 {
                let acts = random_acts(&mut rng, n, cols);
                let got = products(&[&a, &b], &acts, |m, t| (m + 2 * t + 1) as f32).unwrap();
                for (m, mat) in [&a, &b].into_iter().enumerate() {
                    for (r, codes) in mat.codes().chunks(acts.plane).enumerate() {
                        for t in 0..n {
                            let dot = dot_codes_portable(codes, acts.token(t), 0) - acts.sums[t];
                            let expected = (dot * (m + 2 * t + 1) as i32) as f32;
                            assert_eq!(
                                got[m][t * mat.rows + r],
                                expected,
                                "{cols} columns, {n} tokens, [{m}, {t}, {r}]"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `bitlinear_forward` quantizes as `quantize_activations` does, bit for bit: all-zero tokens (the
    /// 1e-5 floor), exact halves of a step, and the f32 scale.
    #[test]
    fn activations_are_quantized_as_candle_quantizes_them() {
        let mut rng = Rng::new(9);
        let cols = 77;
        let mut x: Vec<f32> = (0..4 * cols).map(|_| (rng.normal() * 3.0) as f32).collect();
        x[cols..2 * cols].fill(0.0);
        // Token 2: max 127, so that one step is 1 and 2.5 is an exact half.
        (x[2 * cols], x[2 * cols + 1], x[2 * cols + 2]) = (127.0, 2.5, -2.5);
        let x = Tensor::from_vec(x, (4, cols), &Device::Cpu).unwrap();
        let (q, scale) = crate::ops::quantize_activations(&x).unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let acts = Int8Activations::new(cols, values.chunks(cols).map(quantize_token));
        let expected = Int8Activations::new(
            cols,
            q.to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .zip(scale.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(|(q, s)| (q.into_iter().map(|v| v as i8).collect::<Vec<_>>().into_iter(), s)),
        );
        assert_eq!(acts.planes, expected.planes);
        assert_eq!(acts.sums, expected.sums);
        assert_eq!(
            acts.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            expected.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>()
        );
    }
}
