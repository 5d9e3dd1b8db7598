//! Bessie: SFT, evaluation and prompting of BitNet b1.58 models.
//!
//! Data flow at inference: `config` (config.json) -> `model::hf` (weights into a `VarBuilder`) ->
//! `model::BitNet` (forward with a KV cache) -> `generate` (sampling, stop rules, streaming text through
//! `tokenizer`). Evaluation: `eval` (batched greedy answers, SQuAD v2 metrics) over dev files that
//! `squad` converts from the official JSON. Export: `export` writes packed ternary checkpoints (which
//! `model` loads) and GGUF files.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod generate;
pub mod jsonl;
pub mod kernels;
pub mod manifest;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
pub mod squad;
pub mod tokenizer;
pub mod train;
