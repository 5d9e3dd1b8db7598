//! Text generation: greedy or nucleus sampling with a KV cache, streaming text as it becomes final, and
//! stopping at an end-of-turn id (EOS, the checkpoint's `generation_config.json` ids), at the chat
//! template's end marker (Bessie's 🐂), at a token budget or at the model's context length.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};

use crate::config::ModelConfig;
use crate::model::{BitNet, KvCache};
use crate::rng::Rng;
use crate::tokenizer::template::ChatTemplate;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// What ends an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// End-of-turn ids: the tokenizer's `stop_ids`.
    pub ids: Vec<u32>,
    /// A text that ends the answer where it appears: the template's end marker (🐂 for Bessie's).
    pub marker: Option<&'static str>,
}

impl Stop {
    /// The stop rule of answers in `template`'s format from a model with tokenizer `tok`.
    pub fn new(tok: &Tokenizer, template: &ChatTemplate) -> Self {
        Stop { ids: tok.stop_ids().to_vec(), marker: template.end_marker() }
    }
}

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

    /// Picks one token per row of `logits: [batch, vocab]` (f32); greedy picks them in one device call.
    pub fn sample_batch(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        if self.temperature <= 0.0 {
            return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        (0..logits.dim(0)?).map(|r| self.sample(&logits.get(r)?)).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-turn id (`Stop::ids`).
    Eos,
    EndMarker,
    MaxNewTokens,
    /// The model's context (`max_position_embeddings`, with RoPE scaling) is full.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the end-of-turn or marker tokens that stopped it.
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
    /// None when no time was measured.
    pub fn prompt_tokens_per_sec(&self) -> Option<f64> {
        (self.prompt_secs > 0.0).then(|| self.prompt_tokens as f64 / self.prompt_secs)
    }

    /// The tokens after the first (which the prompt's pass picks); None when there are none.
    pub fn decode_tokens_per_sec(&self) -> Option<f64> {
        let n = self.ids.len().saturating_sub(1);
        (n > 0 && self.decode_secs > 0.0).then(|| n as f64 / self.decode_secs)
    }

    /// `[12 prompt tokens at 310.2 tok/s, 20 new tokens at 41.0 tok/s, 0.53 s, stop: Eos]`, each speed only
    /// where it was measured.
    pub fn report(&self) -> String {
        let at = |speed: Option<f64>| speed.map(|s| format!(" at {s:.1} tok/s")).unwrap_or_default();
        format!(
            "[{} prompt tokens{}, {} new tokens{}, {:.2} s, stop: {:?}]",
            self.prompt_tokens,
            at(self.prompt_tokens_per_sec()),
            self.ids.len(),
            at(self.decode_tokens_per_sec()),
            self.prompt_secs + self.decode_secs,
            self.stop
        )
    }
}

/// Refuses a prompt of `prompt_tokens` that leaves the model's `context` no room for an answer, saying by
/// how much it is too long.
pub fn check_prompt_fits(prompt_tokens: usize, context: usize) -> Result<()> {
    ensure!(
        prompt_tokens < context,
        "the prompt is {prompt_tokens} tokens with the chat template, {} too many for the model's context of \
         {context} (max_position_embeddings, with RoPE scaling), which must also hold the answer",
        prompt_tokens + 1 - context
    );
    Ok(())
}

/// Device bytes a batch of `rows` prompts of up to `prompt` tokens needs to generate `new` tokens each,
/// beyond the weights: the KV cache of every layer (candle's cache grows in chunks of 512 columns, and the
/// old buffer lives while the grown one is filled) and the prefill's attention scores (`[rows, heads,
/// prompt, prompt]` as f32 scores, f32 and `dtype` probabilities).
pub fn generation_bytes(cfg: &ModelConfig, dtype: DType, rows: usize, prompt: usize, new: usize) -> u64 {
    let chunk = cfg.max_position_embeddings.min(512);
    let columns = (prompt + new).next_multiple_of(chunk);
    let per_column = 2 * cfg.num_hidden_layers * cfg.num_kv_heads() * cfg.head_dim() * dtype.size_in_bytes();
    let cache = (2 * columns).saturating_sub(chunk) * per_column;
    let scores = cfg.num_attention_heads * prompt * prompt * (8 + dtype.size_in_bytes());
    (rows * (cache + scores)) as u64
}

/// An error unless a batch of `rows` prompts of up to `prompt` tokens and `new` new tokens each fits in
/// `free` bytes of device memory ([`generation_bytes`]); it says which batch size would.
pub fn check_batch_fits(
    cfg: &ModelConfig,
    dtype: DType,
    rows: usize,
    prompt: usize,
    new: usize,
    free: u64,
) -> Result<()> {
    let need = generation_bytes(cfg, dtype, rows, prompt, new);
    if need <= free {
        return Ok(());
    }
    let fits = (free / generation_bytes(cfg, dtype, 1, prompt, new).max(1)) as usize;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let advice = match fits {
        0 => format!("not even one prompt of {prompt} tokens fits: lower --max-new-tokens or use a larger card"),
        n => format!("--batch-size {n} fits"),
    };
    bail!(
        "a batch of {rows} prompts of up to {prompt} tokens, with {new} new tokens each, needs about {:.1} GiB of \
         GPU memory for its KV cache and attention scores, and the card has {:.1} GiB free: {advice}",
        gib(need),
        gib(free)
    )
}

/// `--temperature`: finite and at least 0 (0 is greedy decoding).
pub fn parse_temperature(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("`{s}` is not a temperature: use a finite number >= 0 (0 is greedy decoding)")),
    }
}

/// `--top-p`: in (0, 1] (1 samples from every token).
pub fn parse_top_p(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("`{s}` is not a top-p: use a number in (0, 1] (1 samples from every token)")),
    }
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each piece of answer text as soon
/// as it is final (trailing whitespace is held back until more text follows, so the newline before the
/// end marker is never printed). A batch of one for `generate_batch`.
pub fn generate(
    model: &BitNet,
    tokenizer: &Tokenizer,
    stop: &Stop,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let prompts = [prompt_ids.to_vec()];
    let mut gens = generate_batch(model, tokenizer, stop, &prompts, max_new_tokens, sampler, |_, text| on_text(text))?;
    Ok(gens.pop().expect("one generation per prompt"))
}

/// Generates continuations of several prompts at once, in one batch with a shared KV cache: the prompts
/// are left-padded to the longest (see `KvCache`), then each step adds one token to every row. A row
/// that has stopped keeps computing (its tokens are dropped) until every row has stopped or the token
/// budget or the context is used up. `on_text(row, text)` streams each row's answer as `generate` does.
///
/// Greedy decoding picks the tokens that decoding each prompt alone picks: the logits differ only in
/// rounding (~1e-7 on the CPU; tests/eval.rs checks both). `prompt_secs` of every generation is the batch's time to its first tokens; `decode_secs` runs until
/// that row stopped.
pub fn generate_batch(
    model: &BitNet,
    tokenizer: &Tokenizer,
    stop: &Stop,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(usize, &str) -> Result<()>,
) -> Result<Vec<Generation>> {
    ensure!(!prompts.is_empty(), "no prompts");
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} of the batch is empty");
    }
    let start = Instant::now();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Any id will do for padding: no real token attends to it.
    let pad_id = tokenizer.pad_id().unwrap_or(tokenizer.eos_id());
    let mut input: Vec<u32> =
        prompts.iter().flat_map(|p| std::iter::repeat_n(pad_id, width - p.len()).chain(p.iter().copied())).collect();
    let mut cache = KvCache::left_padded(&model.cfg, prompts.iter().map(|p| width - p.len()).collect());
    let mut rows: Vec<Row> = prompts.iter().map(|p| Row::new(tokenizer, p)).collect();
    let (mut t, mut prompt_secs) = (width, None);
    for step in 0.. {
        if rows.iter().all(|r| r.stop.is_some()) {
            break;
        }
        let limit = if step == max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if cache.len() + t > model.max_positions() {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if let Some(reason) = limit {
            let secs = start.elapsed().as_secs_f64();
            for row in rows.iter_mut().filter(|r| r.stop.is_none()) {
                row.stop = Some((reason, secs));
            }
            break;
        }
        let x = Tensor::from_vec(std::mem::take(&mut input), (rows.len(), t), model.device())?;
        let mut step = || {
            let hidden = model.forward(&x, &mut cache)?;
            model.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
        };
        // On the CPU the step runs on a rayon worker, so that the kernels' parallel loops (about 100 per
        // token) share its thread instead of putting this one to sleep and waking it around each.
        let logits = if model.device().is_cpu() { rayon::scope(|_| step())? } else { step()? };
        input = sampler.sample_batch(&logits)?;
        t = 1;
        let secs = start.elapsed().as_secs_f64();
        prompt_secs.get_or_insert(secs);
        for (r, (row, &id)) in rows.iter_mut().zip(&input).enumerate() {
            if row.stop.is_none() {
                row.push(stop, id, secs, |text| on_text(r, text))?;
            }
        }
    }
    let prompt_secs = prompt_secs.unwrap_or_else(|| start.elapsed().as_secs_f64());
    Ok(rows
        .into_iter()
        .zip(prompts)
        .map(|(row, prompt)| {
            let (stop, secs) = row.stop.expect("every row stops");
            let mut text = row.text;
            text.truncate(text.trim_end().len());
            Generation {
                ids: row.ids,
                text,
                stop,
                prompt_tokens: prompt.len(),
                prompt_secs,
                decode_secs: (secs - prompt_secs).max(0.0),
            }
        })
        .collect())
}

/// One row of a batch being generated: its tokens, its answer text and, once it stopped, why and when.
struct Row<'a> {
    stream: DecodeStream<'a>,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already passed to `on_text`.
    emitted: usize,
    stop: Option<(StopReason, f64)>,
}

impl<'a> Row<'a> {
    fn new(tokenizer: &'a Tokenizer, prompt: &[u32]) -> Self {
        Self {
            stream: DecodeStream::new(tokenizer, prompt),
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stop: None,
        }
    }

    /// Takes the next token `id`, chosen `secs` after the batch started, and streams the text it completes.
    fn push(&mut self, stop: &Stop, id: u32, secs: f64, mut on_text: impl FnMut(&str) -> Result<()>) -> Result<()> {
        self.ids.push(id);
        if stop.ids.contains(&id) {
            self.stop = Some((StopReason::Eos, secs));
            return Ok(());
        }
        if let Some(piece) = self.stream.push(id)? {
            self.text.push_str(&piece);
        }
        let marker = stop.marker.and_then(|m| self.text.find(m));
        if let Some(at) = marker {
            self.text.truncate(at);
        }
        let end = self.text.trim_end().len();
        if end > self.emitted {
            on_text(&self.text[self.emitted..end])?;
            self.emitted = end;
        }
        if marker.is_some() {
            self.stop = Some((StopReason::EndMarker, secs));
        }
        Ok(())
    }
}
