//! transformers' `bitnet` packing of ternary weights (`integrations/bitnet.py`: `pack_weights`,
//! `unpack_weights`), and the latent weights Bessie reads such a checkpoint as.
//!
//! A ternary matrix `[out, in]` is stored as U8 `[P, in]` with `P = ceil(out / 4)`: code = value + 1 (0, 1,
//! 2; 3 is invalid), and row `i P + r` (i = 0..4) sits in bits `2i`..`2i+1` of packed row `r`, i.e. four
//! blocks of P output rows share a byte column by column. When `out` is not a multiple of 4 the last block
//! is short and its missing rows are zero bits, as `pack_weights` leaves them (transformers itself loads
//! only `out` a multiple of 4: `BitLinear` holds `out // 4` rows and `BitNetDeserialize` unpacks only when
//! the stored rows x 4 equal `out`). Beside each packed weight, `weight_scale` (shape `[1]`) is the
//! matrix's absmean (`AutoBitLinear` offline: `y = x Wq * scale`) or its reciprocal (`BitLinear`:
//! `y = x Wq / scale`): `config::model::WeightScale`.
//!
//! Bessie has no packed-weight path for these files: it reads them as latent weights that its own
//! quantizer (scale = mean|W|, `round(W / scale)` clamped to [-1, 1]) turns back into the stored matrix
//! ([`latent`]), so inference, export and fine-tuning run on them unchanged.

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};

use crate::ops::quantize_weight;

/// Ternary values per byte.
pub const VALUES_PER_BYTE: usize = 4;

/// Rows of the packed matrix of a ternary matrix with `out` rows.
pub fn packed_rows(out: usize) -> usize {
    out.div_ceil(VALUES_PER_BYTE)
}

/// Packs a row-major ternary matrix `[out, cols]` (values -1, 0, 1) as `pack_weights` does: row-major U8
/// `[ceil(out / 4), cols]`.
pub fn pack(values: &[i8], out: usize, cols: usize) -> Result<Vec<u8>> {
    ensure!(values.len() == out * cols, "{} values for a {out} x {cols} matrix", values.len());
    let p = packed_rows(out);
    let mut packed = vec![0u8; p * cols];
    for (row, chunk) in values.chunks(cols.max(1)).enumerate().take(out) {
        let (block, r) = (row / p, row % p);
        for (c, &v) in chunk.iter().enumerate() {
            ensure!((-1..=1).contains(&v), "value {v} at [{row}, {c}] is not ternary");
            packed[r * cols + c] |= ((v + 1) as u8) << (2 * block);
        }
    }
    Ok(packed)
}

/// Unpacks `[ceil(out / 4), cols]` codes to the row-major ternary matrix `[out, cols]` (`unpack_weights`,
/// its rows past `out` dropped). Errors name the position of a code 3 or of a non-zero padding code.
pub fn unpack(packed: &[u8], out: usize, cols: usize) -> Result<Vec<i8>> {
    let p = packed_rows(out);
    ensure!(
        packed.len() == p * cols,
        "{} bytes, but a packed {out} x {cols} matrix is [{p}, {cols}] = {} bytes",
        packed.len(),
        p * cols
    );
    let mut values = vec![0i8; out * cols];
    for (r, bytes) in packed.chunks(cols.max(1)).enumerate() {
        for (c, &byte) in bytes.iter().enumerate() {
            for block in 0..VALUES_PER_BYTE {
                let code = (byte >> (2 * block)) & 3;
                let row = block * p + r;
                match (code, row < out) {
                    (3, _) => {
                        bail!("invalid 2-bit code 3 for row {row}, column {c} (packed row {r}, bits {})", 2 * block)
                    }
                    (_, true) => values[row * cols + c] = code as i8 - 1,
                    (0, false) => {}
                    (_, false) => bail!(
                        "code {code} in the padding of packed row {r}, column {c} (bits {}): row {row} is past the \
                         matrix's {out} rows",
                        2 * block
                    ),
                }
            }
        }
    }
    Ok(values)
}

/// The latent weights `[out, cols]` Bessie reads a ternary matrix with absmean `absmean` as:
/// `value x absmean / share`, `share` the fraction of non-zero values. Their mean |W| is `absmean` itself, so
/// Bessie's quantizer (`quantize_weight`) gives back the same ternary matrix (every non-zero weight is
/// `absmean / share >= absmean`, which rounds to ±1) and `absmean` as its scale; `value x absmean` alone
/// would give the same values but the scale `absmean x share`. The quantizer's own f32 roundings (row sums,
/// two reciprocals) can land an ulp or two off, so the magnitude is stepped by up to 4 ulps until the
/// quantizer's scale is `absmean` to the bit; when no step reaches it (the steps of a small matrix's mean
/// can be coarser than one ulp of the scale) the nearest one stays. An all-zero matrix stays zero.
pub fn latent(values: &[i8], out: usize, cols: usize, absmean: f32) -> Result<Tensor> {
    let nonzero = values.iter().filter(|&&v| v != 0).count();
    let build =
        |m: f32| Tensor::from_iter(values.iter().map(|&v| f32::from(v) * m), &Device::Cpu)?.reshape((out, cols));
    if nonzero == 0 {
        return Ok(build(0.0)?);
    }
    let m0 = (f64::from(absmean) * values.len() as f64 / nonzero as f64) as f32;
    ensure!(m0.is_finite(), "the latent magnitude absmean / nonzero share = {m0} is not a finite f32");
    let mut best: Option<(f32, Tensor)> = None;
    for k in [0, 1, -1, 2, -2, 3, -3, 4, -4] {
        let w = build(f32::from_bits((m0.to_bits() as i32 + k) as u32))?;
        let miss = (quantize_weight(&w)?.1.to_scalar::<f32>()? - absmean).abs();
        if miss == 0.0 {
            return Ok(w);
        }
        if best.as_ref().is_none_or(|(b, _)| miss < *b) {
            best = Some((miss, w));
        }
    }
    Ok(best.expect("nine candidates").1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        // Rows 0..3 of a 4-row matrix share each byte, row i at bits 2i: column 0 holds codes 0, 2, 1, 2.
        let values = [-1i8, 0, 1, 1, 0, -1, 1, -1];
        let packed = pack(&values, 4, 2).unwrap();
        assert_eq!(packed, vec![0b10_01_10_00, 0b00_00_10_01]);
        assert_eq!(unpack(&packed, 4, 2).unwrap(), values);
        for out in 1..=9 {
            let values: Vec<i8> = (0..out * 3).map(|i| (i % 3) as i8 - 1).collect();
            assert_eq!(unpack(&pack(&values, out, 3).unwrap(), out, 3).unwrap(), values, "{out}");
        }
    }

    #[test]
    fn errors_name_the_position() {
        let e = unpack(&[0b11_00_01_01], 4, 1).unwrap_err().to_string();
        assert!(e.contains("code 3") && e.contains("row 3"), "{e}");
        // 5 rows in 2 packed rows: row 5 (packed row 1, bits 4) does not exist.
        let e = unpack(&[0, 0b01_00_00], 5, 1).unwrap_err().to_string();
        assert!(e.contains("padding") && e.contains("row 5"), "{e}");
        let e = unpack(&[0; 3], 5, 1).unwrap_err().to_string();
        assert!(e.contains("[2, 1]"), "{e}");
        assert!(pack(&[2], 1, 1).is_err());
    }

    #[test]
    fn latent_weights_quantize_back_to_the_values_and_the_scale() {
        let mut rng = crate::rng::Rng::new(3);
        let mut exact = 0;
        for (out, cols) in [(2, 4), (64, 176), (96, 301)] {
            let values: Vec<i8> =
                (0..out * cols).map(|_| (rng.normal() * 0.8).round().clamp(-1.0, 1.0) as i8).collect();
            for absmean in [0.02f32, 0.016_420_444, 1.7e-3, 0.61] {
                let (ternary, scale) = quantize_weight(&latent(&values, out, cols, absmean).unwrap()).unwrap();
                let back: Vec<i8> =
                    ternary.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as i8).collect();
                assert_eq!(back, values, "{out} x {cols}");
                let scale = scale.to_scalar::<f32>().unwrap();
                exact += usize::from(scale == absmean);
                assert!((scale / absmean - 1.0).abs() < 4e-7, "{out} x {cols}, {absmean}: {scale}");
            }
        }
        // Most land on the bit; the rest an ulp or so away.
        assert!(exact >= 8, "{exact} of 12 exact");
        assert_eq!(latent(&[0, 0], 1, 2, 0.5).unwrap().to_vec2::<f32>().unwrap(), [[0.0, 0.0]]);
        assert!(latent(&[1, 0], 1, 2, 3e38).is_err());
    }
}
