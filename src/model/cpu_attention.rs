//! A decoding step's attention on the CPU: each row's one new query over its cached keys and values, in
//! plain loops, a (row, head) a task. At one query row the two candle matmuls (the gemm crate) and the
//! softmax between them cost more in dispatch, packing and thread hand-offs than in arithmetic: they were
//! 15% of packed bitnet_b1_58-large's decoding time on 2 cores, and their thread pool's spinning a tenth
//! more. The reference is the candle ops beside the call (`bitnet::attention_by_ops`); the sums are f32 in
//! another order.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(q k^T / sqrt(d) + mask) v` for one query a row: `q: [b, heads, 1, d]`, `k` and `v`:
/// `[b, kv_heads, n, d]` (query head h reads kv head h / (heads / kv_heads)), f32 on the CPU, each with its
/// last dimension contiguous (the cache's views are); `mask` (additive, `[b, 1, 1, n]`) or None. The output
/// is `[b, heads, 1, d]`. `Ok(None)` where it does not apply: not f32 on the CPU, more than one query a row,
/// or a layout it does not read.
pub fn try_decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, n, _) = k.dims4()?;
    let cpu_f32 = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if t != 1 || !cpu_f32(q) || !cpu_f32(k) || !cpu_f32(v) || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Ok(None);
    }
    if k.dims() != v.dims() || k.dim(0)? != b || k.dim(3)? != d || mask.is_some_and(|m| m.dims() != [b, 1, 1, n]) {
        candle_core::bail!(
            "decode attention: q {:?}, k {:?}, v {:?}, mask {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.map(|m| m.dims().to_vec())
        );
    }
    // The cache's storage is read in place, under its read locks.
    let (qg, kg, vg) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
    let (qs, ks, vs) = (Rows::of(&qg.0, qg.1)?, Rows::of(&kg.0, kg.1)?, Rows::of(&vg.0, vg.1)?);
    let (Some(qs), Some(ks), Some(vs)) = (qs, ks, vs) else { return Ok(None) };
    let mask = mask.map(|m| m.flatten_all()?.to_vec1::<f32>()).transpose()?;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let group = heads / kv_heads;
    let out: Vec<f32> = (0..b * heads)
        .into_par_iter()
        .flat_map_iter(|task| {
            let (r, h) = (task / heads, task % heads);
            let keys = |c: usize| ks.row([r, h / group, c]);
            let values = |c: usize| vs.row([r, h / group, c]);
            let hidden = mask.as_deref().map(|m| &m[r * n..(r + 1) * n]);
            attend(qs.row([r, h, 0]), n, keys, values, hidden, scale)
        })
        .collect();
    Tensor::from_vec(out, (b, heads, 1, d), &Device::Cpu).map(Some)
}

/// A 4-d f32 tensor's rows of its last dimension, read in place through its strides.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
    d: usize,
}

impl<'a> Rows<'a> {
    /// None where the storage is not the CPU's or the last dimension is not contiguous.
    fn of(storage: &'a Storage, layout: &Layout) -> Result<Option<Self>> {
        let Storage::Cpu(cpu) = storage else { return Ok(None) };
        let (stride, d) = (layout.stride(), layout.dims()[3]);
        if stride[3] != 1 && d > 1 {
            return Ok(None);
        }
        let strides = [stride[0], stride[1], stride[2]];
        Ok(Some(Self { data: cpu.as_slice::<f32>()?, start: layout.start_offset(), strides, d }))
    }

    fn row(&self, [i, j, c]: [usize; 3]) -> &'a [f32] {
        let at = self.start + i * self.strides[0] + j * self.strides[1] + c * self.strides[2];
        &self.data[at..at + self.d]
    }
}

/// One query row over `n` keys and values: the scores (times `scale`, plus the mask), their softmax (less
/// the max, as candle's), and the weighted sum of the values.
fn attend<'a>(
    q: &[f32],
    n: usize,
    keys: impl Fn(usize) -> &'a [f32],
    values: impl Fn(usize) -> &'a [f32],
    mask: Option<&[f32]>,
    scale: f32,
) -> Vec<f32> {
    let mut p: Vec<f32> = (0..n).map(|c| dot(q, keys(c)) * scale + mask.map_or(0.0, |m| m[c])).collect();
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in &mut p {
        *s = (*s - max).exp();
        sum += *s;
    }
    let mut y = vec![0f32; q.len()];
    for (c, &w) in p.iter().enumerate() {
        if w != 0.0 {
            axpy(w / sum, values(c), &mut y);
        }
    }
    y
}

/// `sum_i a_i b_i` in eight running sums (which the compiler keeps in one vector register).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += w x`.
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the candle ops (`bitnet::attention_by_ops`) on fresh random tensors: grouped heads (8 over 2)
    /// and plain ones, keys and values read through a wider cache's strides, a mask that hides columns of
    /// some rows, one column and many.
    #[test]
    fn decode_attention_matches_the_candle_ops() {
        let dev = Device::Cpu;
        for (b, heads, kv_heads, d, n, width) in [(3, 8, 2, 64, 37, 50), (1, 16, 16, 96, 440, 512), (2, 4, 4, 8, 1, 4)]
        {
            let q = Tensor::randn(0f32, 1.0, (b, heads, 1, d), &dev).unwrap();
            let cache =
                |s: f32| Tensor::randn(0f32, s, (b, kv_heads, width, d), &dev).unwrap().narrow(2, 0, n).unwrap();
            let (k, v) = (cache(2.0), cache(1.0));
            assert!(!k.is_contiguous() || n == width);
            // Row r hides its columns c with (c + r) % 5 == 1, but never all of them.
            let mask: Vec<f32> = (0..b * n)
                .map(|i| match (i % n + i / n) % 5 == 1 && i % n != n - 1 {
                    true => f32::NEG_INFINITY,
                    false => 0.0,
                })
                .collect();
            let mask = Tensor::from_vec(mask, (b, 1, 1, n), &dev).unwrap();
            for mask in [None, Some(&mask)] {
                let got = try_decode_attention(&q, &k, &v, mask).unwrap().expect("f32 on the CPU");
                let want = crate::model::bitnet::attention_by_ops(&q, &k, &v, mask).unwrap();
                let (g, w) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let top = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-5 * top, "{b} x {heads}/{kv_heads} x {d} over {n}: max difference {diff} of {top}");
            }
        }
        // Not its case: two queries a row, or bf16.
        let q = Tensor::zeros((1, 2, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap();
        assert!(try_decode_attention(&q, &k, &k, None).unwrap().is_none());
        let q1 = q.narrow(2, 0, 1).unwrap().to_dtype(DType::BF16).unwrap();
        let kb = k.to_dtype(DType::BF16).unwrap();
        assert!(try_decode_attention(&q1, &kb, &kb, None).unwrap().is_none());
    }
}
