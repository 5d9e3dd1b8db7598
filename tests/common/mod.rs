//! What several test files share.

use std::path::Path;

use bessie::config::ModelConfig;
use bessie::model::hf::Layout;
use bessie::model::init::{write_random_checkpoint, TokenizerSource};
use candle_core::DType;

/// Writes a random tiny checkpoint (f32 safetensors, the shipped tokenizer) to `dir`.
pub fn tiny_checkpoint(dir: &Path, seed: u64) -> ModelConfig {
    write_random_checkpoint(dir, "tiny", TokenizerSource::Shipped, None, seed, DType::F32, Layout::Safetensors).unwrap()
}
