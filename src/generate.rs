//! Text generation: greedy or nucleus sampling with a KV cache, streaming text as it becomes final, and
//! stopping at EOS, at the 🐂 end marker, at a token budget or at the model's context length.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::model::{BitNet, KvCache};
use crate::rng::Rng;
use crate::tokenizer::template::END_MARKER;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Self { temperature, top_p, rng: Rng::new(seed) }
    }

    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    /// Picks a token from `logits: [vocab]` (f32).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        if self.temperature <= 0.0 {
            return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        let logits = logits.to_vec1::<f32>()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) as f64) / self.temperature).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut kept = 0.0;
        let cut = probs
            .iter()
            .position(|p| {
                kept += p.1 / total;
                kept >= self.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        let probs = &probs[..cut];
        let mut r = self.rng.uniform() * probs.iter().map(|p| p.1).sum::<f64>();
        for &(id, p) in probs {
            r -= p;
            if r <= 0.0 {
                return Ok(id);
            }
        }
        Ok(probs[cut - 1].0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    EndMarker,
    MaxNewTokens,
    /// The model's `max_position_embeddings` is reached.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the EOS or marker tokens that stopped it.
    pub ids: Vec<u32>,
    /// The answer: the text before the end marker, trailing whitespace removed.
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prompt_secs: f64,
    /// Time for the remaining tokens.
    pub decode_secs: f64,
}

impl Generation {
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs
    }

    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_secs
    }
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each piece of answer text as soon
/// as it is final (trailing whitespace is held back until more text follows, so the newline before the
/// end marker is never printed).
pub fn generate(
    model: &BitNet,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    anyhow::ensure!(!prompt_ids.is_empty(), "empty prompt");
    let start = Instant::now();
    let mut cache = KvCache::new(&model.cfg);
    let mut stream = DecodeStream::new(tokenizer, prompt_ids);
    let (mut ids, mut text, mut emitted) = (Vec::new(), String::new(), 0);
    let mut input = prompt_ids.to_vec();
    let mut prompt_secs = None;
    let stop = loop {
        if ids.len() == max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        if cache.len() + input.len() > model.cfg.max_position_embeddings {
            break StopReason::ContextFull;
        }
        let x = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward(&x, &mut cache)?;
        let last = hidden.narrow(1, input.len() - 1, 1)?.squeeze(1)?.squeeze(0)?;
        let id = sampler.sample(&model.logits(&last)?)?;
        prompt_secs.get_or_insert_with(|| start.elapsed().as_secs_f64());
        ids.push(id);
        input = vec![id];
        if id == tokenizer.eos_id() {
            break StopReason::Eos;
        }
        if let Some(piece) = stream.push(id)? {
            text.push_str(&piece);
        }
        let marker = text.find(END_MARKER);
        if let Some(at) = marker {
            text.truncate(at);
        }
        let end = text.trim_end().len();
        if end > emitted {
            on_text(&text[emitted..end])?;
            emitted = end;
        }
        if marker.is_some() {
            break StopReason::EndMarker;
        }
    };
    let prompt_secs = prompt_secs.unwrap_or_else(|| start.elapsed().as_secs_f64());
    text.truncate(text.trim_end().len());
    Ok(Generation {
        ids,
        text,
        stop,
        prompt_tokens: prompt_ids.len(),
        prompt_secs,
        decode_secs: start.elapsed().as_secs_f64() - prompt_secs,
    })
}
