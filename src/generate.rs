//! Text generation: greedy or nucleus sampling with a KV cache, streaming text as it becomes final, and
//! stopping at an end-of-turn id (EOS, the checkpoint's `generation_config.json` ids), at the chat
//! template's end marker (Bessie's 🐂), at a token budget or at the model's context length.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};

use crate::config::ModelConfig;
use crate::kernels::readback::{Readback, Ticket};
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
    /// Of `prompt_tokens`, those whose keys and values came from the conversation's cache ([`Session`]):
    /// not processed again.
    pub cached_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prompt_secs: f64,
    /// Time for the remaining tokens.
    pub decode_secs: f64,
}

impl Generation {
    /// The generation of a prompt that could not start, for `stop`: no tokens, no time.
    fn empty(prompt_tokens: usize, stop: StopReason) -> Self {
        let (ids, text, cached_tokens) = (Vec::new(), String::new(), 0);
        Self { ids, text, stop, prompt_tokens, cached_tokens, prompt_secs: 0.0, decode_secs: 0.0 }
    }

    /// The prompt tokens processed (those not cached) a second; None when no time was measured.
    pub fn prompt_tokens_per_sec(&self) -> Option<f64> {
        (self.prompt_secs > 0.0).then(|| (self.prompt_tokens - self.cached_tokens) as f64 / self.prompt_secs)
    }

    /// The tokens after the first (which the prompt's pass picks); None when there are none.
    pub fn decode_tokens_per_sec(&self) -> Option<f64> {
        let n = self.ids.len().saturating_sub(1);
        (n > 0 && self.decode_secs > 0.0).then(|| n as f64 / self.decode_secs)
    }

    /// `[12 prompt tokens at 310.2 tok/s, 20 new tokens at 41.0 tok/s, 0.53 s, stop: Eos]`, each speed only
    /// where it was measured, and `(8 cached)` after the prompt tokens where the cache held some.
    pub fn report(&self) -> String {
        let at = |speed: Option<f64>| speed.map(|s| format!(" at {s:.1} tok/s")).unwrap_or_default();
        let cached = match self.cached_tokens {
            0 => String::new(),
            n => format!(" ({n} cached)"),
        };
        format!(
            "[{} prompt tokens{cached}{}, {} new tokens{}, {:.2} s, stop: {:?}]",
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

/// The columns of the KV cache that generating `new` tokens after prompts of up to `prompt` tokens needs:
/// the longest row (prompt and answer, at most the model's `context`), twice that when rows take new
/// prompts as others finish (`refills`), so that the columns before every row's start are dropped only
/// once per that many steps ([`KvCache`]'s `reserve`).
pub fn cache_columns(prompt: usize, new: usize, context: usize, refills: bool) -> usize {
    let row = prompt.saturating_add(new).min(context);
    if refills {
        2 * row
    } else {
        row
    }
}

/// Device bytes beyond the weights that generating `new` tokens each for prompts of up to `prompt` tokens,
/// `rows` at a time with rows refilled as they finish, needs: the KV cache of every layer
/// ([`cache_columns`]), and a prefill of `rows` prompts: its own cache and its attention scores (`[rows,
/// heads, chunk, prompt]` for [`PREFILL_CHUNK`] queries at a time, as f32 scores, f32 and `dtype`
/// probabilities).
pub fn generation_bytes(cfg: &ModelConfig, dtype: DType, rows: usize, prompt: usize, new: usize) -> u64 {
    let context = cfg.max_positions().ok().flatten().unwrap_or(usize::MAX);
    let per_column = 2 * cfg.num_hidden_layers * cfg.num_kv_heads() * cfg.head_dim() * dtype.size_in_bytes();
    let columns = cache_columns(prompt, new, context, true) + prompt;
    let scores = cfg.num_attention_heads * prompt.min(PREFILL_CHUNK) * prompt * (8 + dtype.size_in_bytes());
    (rows * (columns * per_column + scores)) as u64
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
/// end marker is never printed). A [`Session`] of one turn.
pub fn generate(
    model: &BitNet,
    tokenizer: &Tokenizer,
    stop: &Stop,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    Session::new(model, tokenizer, stop).generate(prompt_ids, max_new_tokens, sampler, on_text)
}

/// A conversation's generations, which keep the KV cache between turns: a turn's prompt (the chat
/// template's rendering of the conversation so far) begins with the ids of the last one and its answer,
/// so only what it adds is processed; the cache keeps the longest prefix the two share, whatever the
/// template did to earlier turns. A [`ContinuousBatch`] of one row a turn.
pub struct Session<'a> {
    model: &'a BitNet,
    tokenizer: &'a Tokenizer,
    stop: &'a Stop,
    /// The cache of the last turn, and the ids whose keys and values it holds.
    cache: Option<(KvCache, Vec<u32>)>,
}

impl<'a> Session<'a> {
    pub fn new(model: &'a BitNet, tokenizer: &'a Tokenizer, stop: &'a Stop) -> Self {
        Self { model, tokenizer, stop, cache: None }
    }

    /// The next turn: the continuation of `prompt_ids`, streamed to `on_text` as [`generate`] does.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        max_new_tokens: usize,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let prompts = [prompt_ids.to_vec()];
        let mut batch = ContinuousBatch::new(self.model, self.tokenizer, self.stop, &prompts, 1, max_new_tokens)?;
        if let Some((mut cache, ids)) = self.cache.take() {
            // At least the prompt's last token is run: its logits pick the first new token.
            let shared = shared_prefix(&ids, prompt_ids).min(prompt_ids.len() - 1);
            if shared > 0 {
                cache.reuse_prefix(shared)?;
                batch.reuse = Some((cache, shared));
            }
        }
        let g = batch.run(sampler, |_, text| on_text(text))?.pop().expect("one generation per prompt");
        // The cache holds the prompt and every new token but the last, which was never run.
        if let (Some(cache), Some((_, fed))) = (batch.cache, g.ids.split_last()) {
            self.cache = Some((cache, [prompt_ids, fed].concat()));
        }
        Ok(g)
    }
}

/// Free rows take the next prompts only once a quarter of the batch is free (or nothing else is left to
/// run): every admission is a forward of its own, whose fixed cost (the weights read once, on a GPU the
/// kernel launches) is paid per admission, not per row, so it is shared by several rows.
const ADMIT_WHEN_FREE: usize = 4;

/// Columns a prefill runs at a time ([`BitNet::forward_last`]): its attention scores stay those of this many
/// queries, so long prompts fit larger batches.
const PREFILL_CHUNK: usize = 512;

/// Prompts share the keys and values of the first tokens they all begin with (the chat template's system
/// prompt) when there are at least this many: one forward over them instead of one per prompt.
const MIN_SHARED: usize = 8;

/// Generation for many prompts, at most `rows` at a time, with continuous batching: the rows share one KV
/// cache and one forward per token, and a row whose answer ends (EOS, the end marker, the token budget,
/// the context) takes the next prompt, prefilled beside the cache and moved into the row
/// ([`KvCache::admit`]), so the batch stays full instead of waiting for its longest answer. Once no prompt
/// is left, the batch drops its free rows each time half of them are free. The first tokens that every
/// prompt begins with are run once, and every prefill starts from their keys and values
/// ([`KvCache::from_prefix`]).
///
/// Greedy decoding picks the tokens that decoding each prompt alone picks: the logits differ only in
/// rounding (~1e-7 on the CPU; tests/eval.rs checks both).
pub struct ContinuousBatch<'a> {
    model: &'a BitNet,
    tokenizer: &'a Tokenizer,
    stop: &'a Stop,
    prompts: &'a [Vec<u32>],
    max_new_tokens: usize,
    rows: usize,
    /// Prompts not started yet, in order.
    queue: VecDeque<usize>,
    /// What each row of the cache generates (None: free). Empty until the first prefill, which sets the
    /// batch's rows.
    slots: Vec<Option<Slot<'a>>>,
    cache: Option<KvCache>,
    /// The token each row of the cache takes next.
    next: Vec<u32>,
    /// The cache's columns ([`cache_columns`]).
    columns: usize,
    /// A one-prompt batch's cache from an earlier turn, and how many of the prompt's first tokens it holds
    /// ([`Session`]): the first prefill runs only the rest.
    reuse: Option<(KvCache, usize)>,
    /// How many first tokens every prompt shares (0: fewer than [`MIN_SHARED`], or one prompt), and their
    /// cache once the first prefill has run them.
    shared: usize,
    prefix: Option<KvCache>,
    clock: Instant,
    /// Whether greedy steps run one ahead ([`Self::decode_ahead`]), the step launched ahead whose picks the
    /// rows take next, and the copies that bring picks to the host.
    ahead: bool,
    pending: Option<Picks>,
    readback: Readback,
}

/// A decoding step's picks, one a row: read already, or (greedy on a GPU) still on the device, on their way
/// to the host.
enum Picks {
    Read(Vec<u32>),
    Copying { ids: Tensor, ticket: Ticket },
}

impl Picks {
    /// The picks as the next step's input `[rows, 1]`, without waiting for them where they are on the device.
    fn as_input(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(match self {
            Picks::Read(ids) => Tensor::from_vec(ids.clone(), (ids.len(), 1), device)?,
            Picks::Copying { ids, .. } => ids.clone(),
        })
    }

    fn read(self, readback: &mut Readback) -> Result<Vec<u32>> {
        Ok(match self {
            Picks::Read(ids) => ids,
            Picks::Copying { ticket, .. } => readback.read(ticket)?,
        })
    }
}

/// A row of a [`ContinuousBatch`] at work: its prompt, its answer so far, and when it was admitted and
/// its first token picked (seconds on the batch's clock).
struct Slot<'a> {
    prompt: usize,
    row: Row<'a>,
    /// The prompt's first tokens that came from a cache ([`Generation::cached_tokens`]).
    cached: usize,
    admitted: f64,
    first: f64,
}

impl<'a> ContinuousBatch<'a> {
    /// `prompts` in the order they are started (put the longest first: the cache is sized by the longest,
    /// and a later prompt longer than the rows in flight moves the cache's columns).
    pub fn new(
        model: &'a BitNet,
        tokenizer: &'a Tokenizer,
        stop: &'a Stop,
        prompts: &'a [Vec<u32>],
        rows: usize,
        max_new_tokens: usize,
    ) -> Result<Self> {
        ensure!(rows > 0, "the batch size must be positive");
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} is empty");
        }
        let context = model.max_positions();
        let fitting: Vec<&Vec<u32>> = prompts.iter().filter(|p| p.len() <= context).collect();
        let longest = fitting.iter().map(|p| p.len()).max().unwrap_or(0);
        // Each prompt keeps at least one token of its own: its last, whose logits pick the first new token.
        let shared = match fitting.as_slice() {
            [first, _, ..] => fitting.iter().map(|p| shared_prefix(first, p).min(p.len() - 1)).min().unwrap_or(0),
            _ => 0,
        };
        Ok(Self {
            model,
            tokenizer,
            stop,
            prompts,
            max_new_tokens,
            rows,
            queue: (0..prompts.len()).collect(),
            slots: Vec::new(),
            cache: None,
            next: Vec::new(),
            columns: cache_columns(longest, max_new_tokens, context, prompts.len() > rows),
            reuse: None,
            shared: if shared >= MIN_SHARED { shared } else { 0 },
            prefix: None,
            clock: Instant::now(),
            ahead: model.device().is_cuda() && std::env::var("BESSIE_DECODE_AHEAD").map_or(true, |v| v != "0"),
            pending: None,
            readback: Readback::new(),
        })
    }

    /// Greedy decoding one step ahead (the default on a GPU; `BESSIE_DECODE_AHEAD=0` turns it off): the next
    /// step is launched from this step's picks on the device before the host reads them, so the GPU never
    /// waits for the host's work between tokens (the picks' copy, the stop checks, the text, the next launch).
    /// The tokens are the same; where an answer stops at an end-of-turn id, the step run ahead for it is
    /// thrown away (its cache column is never read). On the CPU it only costs that step, which is why it is
    /// off there.
    pub fn decode_ahead(mut self, on: bool) -> Self {
        self.ahead = on;
        self
    }

    /// Runs every prompt to its end; the generations in prompt order. `on_text(prompt, text)` streams each
    /// answer as [`generate`] does.
    pub fn run(
        &mut self,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(usize, &str) -> Result<()>,
    ) -> Result<Vec<Generation>> {
        let mut gens: Vec<Option<Generation>> = vec![None; self.prompts.len()];
        while !self.is_done() {
            for (i, g) in self.step(sampler, &mut on_text)? {
                gens[i] = Some(g);
            }
        }
        Ok(gens.into_iter().map(|g| g.expect("every prompt ends")).collect())
    }

    /// Whether every prompt has ended.
    pub fn is_done(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(Option::is_none)
    }

    /// One forward: the prefill of the next prompts into free rows when that is due, else one token for
    /// every row at work. Returns the generations that ended, with their prompts' indices.
    pub fn step(
        &mut self,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(usize, &str) -> Result<()>,
    ) -> Result<Vec<(usize, Generation)>> {
        let mut ended = Vec::new();
        let free: Vec<usize> = match self.slots.is_empty() {
            true => (0..self.rows).collect(),
            false => (0..self.slots.len()).filter(|&r| self.slots[r].is_none()).collect(),
        };
        let busy = self.slots.iter().flatten().count();
        let due = !free.is_empty()
            && !self.queue.is_empty()
            && (busy == 0 || free.len() * ADMIT_WHEN_FREE >= self.rows || self.queue.len() <= free.len());
        let shrinks = !due && busy > 0 && self.queue.is_empty() && 2 * busy <= self.slots.len();
        if let Some(picks) = self.pending.take_if(|_| due || shrinks) {
            // The step launched ahead is taken before the batch changes its rows.
            self.take_picks(picks, &mut on_text, &mut ended)?;
        } else if due {
            self.admit(&free, sampler, &mut on_text, &mut ended)?;
        } else if busy > 0 {
            if shrinks {
                self.shrink()?;
            }
            self.decode(sampler, &mut on_text, &mut ended)?;
        }
        Ok(ended)
    }

    /// Drops the free rows once no prompt is left to fill them, so the last answers stop paying for rows
    /// that no longer answer (one copy of the cache each time half the rows are free).
    fn shrink(&mut self) -> Result<()> {
        let keep: Vec<usize> = (0..self.slots.len()).filter(|&r| self.slots[r].is_some()).collect();
        self.cache.as_mut().expect("rows at work were prefilled").keep_rows(&keep)?;
        self.next = keep.iter().map(|&r| self.next[r]).collect();
        let mut slots = std::mem::take(&mut self.slots);
        self.slots = keep.iter().map(|&r| slots[r].take()).collect();
        Ok(())
    }

    /// Prefills the next prompts into the rows `free` (those that cannot start end at once: a prompt
    /// beyond the context, a budget of no tokens) and picks their first tokens.
    fn admit(
        &mut self,
        free: &[usize],
        sampler: &mut Sampler,
        on_text: &mut impl FnMut(usize, &str) -> Result<()>,
        ended: &mut Vec<(usize, Generation)>,
    ) -> Result<()> {
        let admitted = self.clock.elapsed().as_secs_f64();
        let mut take = Vec::new();
        while take.len() < free.len() {
            let Some(i) = self.queue.pop_front() else { break };
            let never = if self.max_new_tokens == 0 {
                Some(StopReason::MaxNewTokens)
            } else if self.prompts[i].len() > self.model.max_positions() {
                Some(StopReason::ContextFull)
            } else {
                None
            };
            match never {
                Some(stop) => ended.push((i, Generation::empty(self.prompts[i].len(), stop))),
                None => take.push(i),
            }
        }
        if take.is_empty() {
            return Ok(());
        }
        // Any id will do for padding: no real token attends to it.
        let pad_id = self.tokenizer.pad_id().unwrap_or(self.tokenizer.eos_id());
        let first_prefill = self.cache.is_none();
        // The prompts' first tokens whose keys are cached already: an earlier turn's, or the shared prefix.
        let reuse = self.reuse.take().filter(|_| first_prefill && take.len() == 1);
        let skip = reuse.as_ref().map_or(self.shared, |(_, cached)| *cached);
        let own = |i: usize| &self.prompts[i][skip..];
        let width = take.iter().map(|&i| own(i).len()).max().unwrap_or(0);
        let input: Vec<u32> = take
            .iter()
            .flat_map(|&i| std::iter::repeat_n(pad_id, width - own(i).len()).chain(own(i).iter().copied()))
            .collect();
        let pad: Vec<usize> = take.iter().map(|&i| width - own(i).len()).collect();
        let columns = if first_prefill { self.columns.max(skip + width) } else { skip + width };
        let mut prefill = match reuse {
            Some((cache, _)) => cache,
            None if skip > 0 => KvCache::from_prefix(&self.model.cfg, self.prefix(take[0])?, &pad, columns)?,
            None => KvCache::left_padded(&self.model.cfg, pad).with_capacity(columns),
        };
        let x = Tensor::from_vec(input, (take.len(), width), self.model.device())?;
        let ids = sampler.sample_batch(&last_logits(self.model, &x, &mut prefill)?)?;
        let rows: Vec<usize> = match first_prefill {
            true => {
                self.slots = (0..take.len()).map(|_| None).collect();
                self.next = vec![pad_id; take.len()];
                self.cache = Some(prefill);
                (0..take.len()).collect()
            }
            false => {
                let rows = free[..take.len()].to_vec();
                self.cache.as_mut().expect("made by the first prefill").admit(&rows, &prefill)?;
                rows
            }
        };
        let first = self.clock.elapsed().as_secs_f64();
        for ((&r, &i), &id) in rows.iter().zip(&take).zip(&ids) {
            let row = Row::new(self.tokenizer, &self.prompts[i]);
            self.slots[r] = Some(Slot { prompt: i, row, cached: skip, admitted, first });
            self.take_token(r, id, first, on_text, ended)?;
        }
        Ok(())
    }

    /// One token for every row at work (after ending those whose context is full): the picks of the step
    /// launched ahead, or of a step launched now; with [`Self::decode_ahead`], the next step is launched from
    /// them before they are read.
    fn decode(
        &mut self,
        sampler: &mut Sampler,
        on_text: &mut impl FnMut(usize, &str) -> Result<()>,
        ended: &mut Vec<(usize, Generation)>,
    ) -> Result<()> {
        let picks = match self.pending.take() {
            Some(picks) => picks,
            None => {
                let now = self.clock.elapsed().as_secs_f64();
                let cache = self.cache.as_ref().expect("rows at work were prefilled");
                let full: Vec<usize> = (0..self.slots.len())
                    .filter(|&r| self.slots[r].is_some() && cache.row_len(r) + 1 > self.model.max_positions())
                    .collect();
                for r in full {
                    self.end(r, StopReason::ContextFull, now, ended);
                }
                if self.slots.iter().all(Option::is_none) {
                    return Ok(());
                }
                let x = Tensor::from_vec(self.next.clone(), (self.slots.len(), 1), self.model.device())?;
                self.launch(&x, sampler)?
            }
        };
        if self.runs_ahead(sampler) {
            let x = picks.as_input(self.model.device())?;
            self.pending = Some(self.launch(&x, sampler)?);
        }
        self.take_picks(picks, on_text, ended)
    }

    /// A decoding step over the cache on input `x: [rows, 1]`, and its picks: greedy ones taken on the device
    /// (inside the step's graph), left there and copied to the host behind the step where the model is on a
    /// GPU.
    fn launch(&mut self, x: &Tensor, sampler: &mut Sampler) -> Result<Picks> {
        let cache = self.cache.as_mut().expect("rows at work were prefilled");
        if sampler.temperature > 0.0 {
            let logits = on_worker(self.model, || Ok(self.model.step_logits(x, cache)?))?;
            return Ok(Picks::Read(sampler.sample_batch(&logits)?));
        }
        // `[rows, 1]`: with a graph, its own ids buffer, which the copy to the host reads before the next step
        // overwrites it (the stream's order).
        let ids = on_worker(self.model, || Ok(self.model.step_picks(x, cache)?))?;
        Ok(match self.readback.try_start(&ids)? {
            Some(ticket) => Picks::Copying { ids, ticket },
            None => Picks::Read(ids.flatten_all()?.to_vec1()?),
        })
    }

    /// Whether the next step is launched before this one's picks are read: greedy decoding one step ahead,
    /// with room in every row's context for it and a row that will still be generating after these picks.
    fn runs_ahead(&self, sampler: &Sampler) -> bool {
        let cache = self.cache.as_ref().expect("rows at work were prefilled");
        let at_work = || (0..self.slots.len()).filter_map(|r| Some((r, self.slots[r].as_ref()?)));
        self.ahead
            && sampler.temperature <= 0.0
            && at_work().all(|(r, _)| cache.row_len(r) < self.model.max_positions())
            && at_work().any(|(_, slot)| slot.row.ids.len() + 1 < self.max_new_tokens)
    }

    /// Every row at work takes its pick of `picks`.
    fn take_picks(
        &mut self,
        picks: Picks,
        on_text: &mut impl FnMut(usize, &str) -> Result<()>,
        ended: &mut Vec<(usize, Generation)>,
    ) -> Result<()> {
        let ids = picks.read(&mut self.readback)?;
        let secs = self.clock.elapsed().as_secs_f64();
        for (r, &id) in ids.iter().enumerate() {
            if self.slots[r].is_some() {
                self.take_token(r, id, secs, on_text, ended)?;
            }
        }
        Ok(())
    }

    /// The cache of the first tokens every prompt shares, taken from prompt `i`: run at the first call.
    fn prefix(&mut self, i: usize) -> Result<&KvCache> {
        if self.prefix.is_none() {
            let ids = Tensor::new(&self.prompts[i][..self.shared], self.model.device())?.unsqueeze(0)?;
            let mut cache = KvCache::new(&self.model.cfg).with_capacity(self.shared);
            on_worker(self.model, || Ok(self.model.forward_last(&ids, &mut cache, PREFILL_CHUNK)?))?;
            self.prefix = Some(cache);
        }
        Ok(self.prefix.as_ref().expect("made above"))
    }

    /// Row `r` takes token `id`, picked `secs` into the batch; it ends on a stop or at its token budget.
    fn take_token(
        &mut self,
        r: usize,
        id: u32,
        secs: f64,
        on_text: &mut impl FnMut(usize, &str) -> Result<()>,
        ended: &mut Vec<(usize, Generation)>,
    ) -> Result<()> {
        let slot = self.slots[r].as_mut().expect("a row at work");
        let prompt = slot.prompt;
        slot.row.push(self.stop, id, |text| on_text(prompt, text))?;
        self.next[r] = id;
        let reason = match slot.row.stop {
            None if slot.row.ids.len() >= self.max_new_tokens => Some(StopReason::MaxNewTokens),
            reason => reason,
        };
        if let Some(reason) = reason {
            self.end(r, reason, secs, ended);
        }
        Ok(())
    }

    /// Ends row `r`'s generation for `reason` at `secs` and frees the row.
    fn end(&mut self, r: usize, reason: StopReason, secs: f64, ended: &mut Vec<(usize, Generation)>) {
        let slot = self.slots[r].take().expect("a row at work");
        self.cache.as_mut().expect("rows at work were prefilled").retire(r);
        let mut text = slot.row.text;
        text.truncate(text.trim_end().len());
        let generation = Generation {
            ids: slot.row.ids,
            text,
            stop: reason,
            prompt_tokens: self.prompts[slot.prompt].len(),
            cached_tokens: slot.cached,
            prompt_secs: slot.first - slot.admitted,
            decode_secs: (secs - slot.first).max(0.0),
        };
        ended.push((slot.prompt, generation));
    }
}

/// The logits `[rows, vocab]` after the last column of `x: [rows, t]`, run after `cache`'s columns
/// ([`PREFILL_CHUNK`] columns at a time).
fn last_logits(model: &BitNet, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
    on_worker(model, || Ok(model.logits(&model.forward_last(x, cache, PREFILL_CHUNK)?)?))
}

/// Runs `step`, a forward of `model`, where its kernels run best. On the CPU that is a rayon worker, so that
/// the kernels' parallel loops (about 100 per token) share its thread instead of putting this one to sleep
/// and waking it around each.
fn on_worker<T: Send>(model: &BitNet, step: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match model.device().is_cpu() {
        true => rayon::scope(|_| step()),
        false => step(),
    }
}

/// How many first ids `a` and `b` share.
fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One row of a batch being generated: its tokens, its answer text and, once it stopped, why.
struct Row<'a> {
    stream: DecodeStream<'a>,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already passed to `on_text`.
    emitted: usize,
    /// Set once a stop id or the end marker ended the answer.
    stop: Option<StopReason>,
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

    /// Takes the next token `id` and streams the text it completes.
    fn push(&mut self, stop: &Stop, id: u32, mut on_text: impl FnMut(&str) -> Result<()>) -> Result<()> {
        self.ids.push(id);
        if stop.ids.contains(&id) {
            self.stop = Some(StopReason::Eos);
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
            self.stop = Some(StopReason::EndMarker);
        }
        Ok(())
    }
}
