//! Random BitNet checkpoints of any shape, for tests, demos and benchmarks (real weights cannot be
//! downloaded everywhere). Matrices are N(0, 0.02) as transformers' `initializer_range`; norms are one.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// All parameters of `cfg`, f32 on the CPU, from a seeded generator: the same seed gives the same model.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if super::is_norm(&name) { vec![1.0; n] } else { normals(&mut rng, n, 0.02) };
            Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
        })
        .collect()
}

/// `n` values `std * rng.normal()`, exactly those of drawing them one by one: the generator's stream is drawn
/// in order a chunk at a time, and its Box-Muller transforms (most of the time: a 2B4T-sized model took a
/// minute on one core) run on every core.
fn normals(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0f32; n];
    let mut draws = vec![0u64; 2 * CHUNK.min(n)];
    for chunk in out.chunks_mut(CHUNK) {
        let draws = &mut draws[..2 * chunk.len()];
        draws.iter_mut().for_each(|d| *d = rng.next_u64());
        chunk.par_iter_mut().zip(draws.par_chunks(2)).for_each(|(v, d)| *v = (std * Rng::normal_of(d[0], d[1])) as f32);
    }
    out
}

/// The tokenizer that ships with Bessie (assets/tokenizer), for random models and the built-in demo.
const SHIPPED_TOKENIZER: &[(&str, &[u8])] = &[
    ("tokenizer.model", include_bytes!("../../assets/tokenizer/tokenizer.model")),
    ("tokenizer_config.json", include_bytes!("../../assets/tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_bytes!("../../assets/tokenizer/special_tokens_map.json")),
];

/// The shipped tokenizer, written to a fresh temporary directory that lives as long as the returned guard:
/// the default of programs that only tokenize (`bessie-data`).
pub fn shipped_tokenizer() -> Result<(tempfile::TempDir, Tokenizer)> {
    let dir = tempfile::tempdir().context("creating a temporary directory for the shipped tokenizer")?;
    for (name, bytes) in SHIPPED_TOKENIZER {
        std::fs::write(dir.path().join(name), bytes)?;
    }
    let tok = Tokenizer::from_dir(dir.path())?;
    Ok((dir, tok))
}

/// Where a random checkpoint's tokenizer comes from.
pub enum TokenizerSource<'a> {
    /// The small tokenizer in assets/tokenizer.
    Shipped,
    /// A checkpoint directory's tokenizer files, a `tokenizer.json` (LLaMA-3's byte-level BPE, copied as
    /// it is), or a bare SentencePiece `tokenizer.model`, to which the BitNet added tokens `<pad>` and
    /// `</line>` are appended as 1bitLLM does.
    Path(&'a Path),
}

/// Writes a random checkpoint of the named shape (`model::arch::SHAPES`: every family at its real size and a
/// tiny one) to `out` with its tokenizer, in the family's `config.json` form. The vocabulary is the
/// tokenizer's unless `vocab_size` asks for more (benchmarks use the real models' vocabularies).
pub fn write_random_checkpoint(
    out: &Path,
    shape: &str,
    tokenizer: TokenizerSource,
    vocab_size: Option<usize>,
    seed: u64,
    dtype: candle_core::DType,
    layout: super::hf::Layout,
) -> Result<ModelConfig> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    match tokenizer {
        TokenizerSource::Shipped => {
            for (name, bytes) in SHIPPED_TOKENIZER {
                std::fs::write(out.join(name), bytes)?;
            }
        }
        TokenizerSource::Path(p) if p.is_dir() => {
            for f in Tokenizer::from_dir(p)?.files() {
                std::fs::copy(f, out.join(f.file_name().context("tokenizer file name")?))?;
            }
        }
        TokenizerSource::Path(p) if p.extension().is_some_and(|e| e == "json") => {
            std::fs::copy(p, out.join("tokenizer.json")).with_context(|| format!("copying {}", p.display()))?;
        }
        TokenizerSource::Path(p) => {
            std::fs::copy(p, out.join("tokenizer.model")).with_context(|| format!("copying {}", p.display()))?;
            let pieces = Tokenizer::from_dir(out)?.vocab_size();
            std::fs::write(out.join("tokenizer_config.json"), added_tokens_config(pieces))?;
        }
    }
    let tok = Tokenizer::from_dir(out)?;
    let vocab = vocab_size.unwrap_or(tok.vocab_size());
    anyhow::ensure!(
        vocab >= tok.vocab_size(),
        "vocab size {vocab} is smaller than the tokenizer's {}",
        tok.vocab_size()
    );
    let mut cfg = ModelConfig::shape(shape, vocab)?;
    (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) = (tok.bos_id(), tok.eos_id(), tok.pad_id());
    let weights = random_weights(&cfg, seed)?;
    super::hf::save(out, &cfg, &weights, dtype, layout, &[])?;
    Ok(cfg)
}

/// A `tokenizer_config.json` adding `<pad>` and `</line>` after `pieces` SentencePiece pieces.
fn added_tokens_config(pieces: usize) -> String {
    let token = |content: &str| {
        serde_json::json!({"content": content, "lstrip": false, "normalized": false,
                           "rstrip": false, "single_word": false, "special": true})
    };
    let cfg = serde_json::json!({
        "added_tokens_decoder": {
            pieces.to_string(): token("<pad>"),
            (pieces + 1).to_string(): token("</line>"),
        },
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer",
    });
    serde_json::to_string_pretty(&cfg).expect("static JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Across chunks, the values are those of the generator drawn one by one, and the stream goes on from
    /// where they left it.
    #[test]
    fn normals_equal_drawing_one_by_one() {
        let n = (1 << 20) * 2 + 12_345;
        let (mut a, mut b) = (Rng::new(11), Rng::new(11));
        let fast = normals(&mut a, n, 0.02);
        let slow: Vec<f32> = (0..n).map(|_| (0.02 * b.normal()) as f32).collect();
        assert!(fast.iter().zip(&slow).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(a.next_u64(), b.next_u64());
    }
}
