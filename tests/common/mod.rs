//! What several test files share.
// Each test binary that includes this module uses some of it.
#![allow(dead_code)]

use std::path::Path;

use bessie::config::ModelConfig;
use bessie::model::hf::Layout;
use bessie::model::init::{write_random_checkpoint, TokenizerSource};
use bessie::train::model::{shard_abs_sums, shard_step_weights, StepWeights};
use bessie::train::optim::shards;
use bessie::train::params::ParamLayout;
use candle_core::{DType, Tensor};

/// Writes a random tiny checkpoint (f32 safetensors, the shipped tokenizer) to `dir`.
pub fn tiny_checkpoint(dir: &Path, seed: u64) -> ModelConfig {
    write_random_checkpoint(dir, "tiny", TokenizerSource::Shipped, None, seed, DType::F32, Layout::Safetensors).unwrap()
}

/// A flat buffer of an embedding, a norm and an MLP's up and down matrices of `h` by `i`: BitLinear matrices,
/// a norm and a cast slot, for the flat-buffer kernels.
pub fn mlp_layout(h: usize, i: usize) -> ParamLayout {
    ParamLayout::from_shapes(vec![
        ("model.embed_tokens.weight".into(), vec![i / 3 + 1, h]),
        ("model.layers.0.input_layernorm.weight".into(), vec![h]),
        ("model.layers.0.mlp.up_proj.weight".into(), vec![i, h]),
        ("model.layers.0.mlp.ffn_layernorm.weight".into(), vec![i]),
        ("model.layers.0.mlp.down_proj.weight".into(), vec![h, i]),
    ])
}

/// ZeRO-1's step weights of `flat` as `world` ranks build them: each shard written with its matrices' absmean
/// sums added up over the shards, the shards put together.
pub fn sharded_step_weights(
    layout: &ParamLayout,
    flat: &Tensor,
    world: usize,
    lambda: f64,
    dtype: DType,
) -> StepWeights {
    let shards = shards(layout.total, world);
    let sums = shards
        .iter()
        .map(|s| shard_abs_sums(layout, flat, s.clone(), dtype).unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let parts: Vec<Tensor> = shards
        .iter()
        .map(|s| {
            shard_step_weights(layout, flat, s.clone(), &sums, lambda, dtype)
                .unwrap()
                .narrow(0, s.start, s.len())
                .unwrap()
        })
        .collect();
    StepWeights::from_flat(layout, Tensor::cat(&parts, 0).unwrap()).unwrap()
}
