//! Training data: JSONL lines, each one conversation (`prompt`/`response`, or TRL's `messages`), rendered
//! with the chat template and tokenized into examples (with the tokens the loss covers), a tokenization
//! cache, and each epoch's shuffled, optionally packed rows, their per-rank shards and the micro-batches
//! built from them.
//!
//! `check` measures a file for `bessie-data check`.
//!
//! Packed rows hold several examples; `Batch::segments` and `Batch::positions` keep them apart (attention
//! stays within an example and RoPE positions restart), so packing changes throughput, not the math.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::jsonl::{json_kind, jsonl_lines, parse_line, take_string};
use crate::rng::Rng;
use crate::tokenizer::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

/// Which predictions the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// The assistant turns, each with what closes it (the end marker, `<|eot_id|>`).
    Response,
    /// Every token after the first, system prompt included (what the original trained on).
    All,
}

/// What happens to an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Keep the first `max_seq_len` tokens, as the original did.
    Truncate,
    /// Leave the example out.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOptions {
    pub max_seq_len: usize,
    pub loss_on: LossOn,
    pub overflow: Overflow,
    pub pack: bool,
}

/// Bytes of rendered text per allowed token that are tokenized at most: a line of 50 MB must not cost
/// minutes and gigabytes before it is truncated. No real tokenizer averages 64 bytes a token, so this
/// changes no real example; a longer text is cut there first and counts as longer than `max_seq_len`.
const BYTES_PER_TOKEN_BOUND: usize = 64;

/// Where problems are listed in full before the rest are only counted.
const PROBLEMS_LISTED: usize = 20;

/// One tokenized example: the tokens of the rendered conversation (after truncation) and which of them
/// the loss trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Ascending, disjoint ranges of token indices whose prediction (from the tokens before) is trained;
    /// never index 0, which nothing predicts.
    pub trained: Vec<Range<usize>>,
}

impl Example {
    /// An example trained from token `loss_start` to its end (a single-turn response).
    pub fn from_loss_start(ids: Vec<u32>, loss_start: usize) -> Self {
        let start = loss_start.max(1);
        let trained = Some(start..ids.len()).filter(|r| !r.is_empty()).into_iter().collect();
        Example { ids, trained }
    }

    /// The number of trained predictions.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().map(|r| r.len()).sum()
    }

    /// Whether token `t`'s prediction is trained.
    pub fn is_trained(&self, t: usize) -> bool {
        self.trained.iter().any(|r| r.contains(&t))
    }

    fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.trained.retain(|r| r.start < len);
        if let Some(last) = self.trained.last_mut() {
            last.end = last.end.min(len);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub stats: DataStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Non-blank lines read.
    pub lines: usize,
    pub truncated: usize,
    pub dropped: usize,
    /// Tokens of the kept examples.
    pub tokens: usize,
    /// Trained predictions of the kept examples.
    pub loss_tokens: usize,
}

/// How a JSONL line gives its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LineFormat {
    /// `prompt` and `response` strings: one user turn and the assistant's reply.
    PromptResponse,
    /// `messages`: a list of `{role, content}` turns (TRL's conversational format), system prompt included.
    Messages,
}

impl fmt::Display for LineFormat {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            LineFormat::PromptResponse => "prompt/response",
            LineFormat::Messages => "messages",
        })
    }
}

/// The conversation of a JSONL object: `messages`, or `prompt` and `response`; other fields are ignored.
/// The error says what is wrong, for the caller to prefix with the line.
pub fn conversation(object: &mut Map<String, Value>) -> Result<(LineFormat, Vec<Message>), String> {
    if let Some(messages) = object.remove("messages") {
        if object.contains_key("prompt") || object.contains_key("response") {
            return Err("has both `messages` and `prompt`/`response`: use one format per line".into());
        }
        let Value::Array(list) = messages else {
            return Err(format!(
                "field `messages` must be a list of {{role, content}} objects, not {}",
                json_kind(&messages)
            ));
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.into_iter().enumerate() {
            let Value::Object(mut m) = m else {
                return Err(format!(
                    "messages[{i}] must be an object with `role` and `content`, not {}",
                    json_kind(&m)
                ));
            };
            let role = take_string(&mut m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
            let content = take_string(&mut m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
            out.push(Message { role, content });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no assistant turn, so nothing would be trained".into());
        }
        return Ok((LineFormat::Messages, out));
    }
    let prompt = take_string(object, "prompt")?;
    let response = take_string(object, "response")?;
    Ok((LineFormat::PromptResponse, vec![Message::new("user", &prompt), Message::new("assistant", &response)]))
}

/// A line's example before the length limit, or why it cannot be one.
struct Tokenized {
    format: LineFormat,
    example: Example,
    /// Whether the text was cut at `BYTES_PER_TOKEN_BOUND` before tokenizing.
    cut: bool,
    /// Whether that cut came before the first assistant turn, which counts as a text before the first
    /// reply longer than `max_seq_len` tokens.
    reply_cut_off: bool,
    /// The line's other fields (`source`, `answers`, ...).
    rest: Map<String, Value>,
}

impl Tokenized {
    /// How long the text before the first reply is, when no trained token falls within `max_seq_len`:
    /// with `Overflow::Truncate` training refuses such an example.
    fn first_reply_beyond(&self, max_seq_len: usize) -> Option<String> {
        if self.reply_cut_off {
            return Some(format!("longer than max_seq_len x {BYTES_PER_TOKEN_BOUND} bytes"));
        }
        self.example.trained.first().filter(|r| r.start >= max_seq_len).map(|r| format!("{} tokens", r.start))
    }
}

/// Renders one line's conversation and tokenizes it, its trained tokens those that overlap an assistant
/// turn (a token straddling a turn's edge is trained: it is part of what the model must write).
fn tokenize_line(
    mut object: Map<String, Value>,
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &DataOptions,
) -> Result<Tokenized> {
    let (format, messages) = conversation(&mut object).map_err(|e| anyhow!(e))?;
    let (mut text, spans) = template.render_with_spans(&messages)?;
    let bound = opts.max_seq_len.saturating_mul(BYTES_PER_TOKEN_BOUND);
    let cut = text.len() > bound;
    if cut {
        let mut at = bound;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    let enc = tok.encode_with_offsets(&text, template.add_bos())?;
    let trained = match opts.loss_on {
        LossOn::All => Some(1..enc.ids.len()).filter(|r| !r.is_empty()).into_iter().collect(),
        LossOn::Response => {
            let mut trained: Vec<Range<usize>> = Vec::new();
            let mut spans = spans.iter().peekable();
            for (t, off) in enc.offsets.iter().enumerate().skip(1) {
                while spans.next_if(|s| s.end <= off.start && !off.is_empty()).is_some() {}
                let Some(span) = spans.peek() else { break };
                if off.start < span.end && off.end > span.start {
                    match trained.last_mut() {
                        Some(last) if last.end == t => last.end = t + 1,
                        _ => trained.push(t..t + 1),
                    }
                }
            }
            trained
        }
    };
    let reply_cut_off = cut && spans.first().is_some_and(|s| s.start >= text.len());
    Ok(Tokenized { format, example: Example { ids: enc.ids, trained }, cut, reply_cut_off, rest: object })
}

/// The examples of a JSONL file, tokenized on every core; each line's result in file order, with its
/// location `FILE:LINE`.
fn tokenize_lines(
    path: &Path,
    bytes: &[u8],
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &DataOptions,
) -> Vec<(String, Result<Tokenized>)> {
    let lines = jsonl_lines(bytes);
    // Contiguous chunks, a few per thread for balance, each tokenized with its own copy of the tokenizer:
    // the `tokenizers` crate's BPE cache is behind a lock that threads sharing one copy contend for.
    let chunk = lines.len().div_ceil(4 * rayon::current_num_threads()).max(1);
    lines
        .par_chunks(chunk)
        .flat_map_iter(|chunk| {
            let tok = tok.clone();
            chunk
                .iter()
                .map(|&(n, line)| match parse_line(path, n, line) {
                    Err(e) => (String::new(), Err(e)),
                    Ok((at, object)) => {
                        let result = tokenize_line(object, &tok, template, opts).with_context(|| at.clone());
                        (at, result)
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reads a JSONL file of conversations (see `conversation`; blank lines skipped), renders each with
/// `template` and tokenizes it.
///
/// Every problem is reported before training starts, each naming `FILE:LINE` (the first
/// `PROBLEMS_LISTED`, and how many more): malformed JSON, a missing or non-string field, a file without
/// examples, and (with `Overflow::Truncate` and `LossOn::Response`) an example of which not even one
/// trained token fits in `max_seq_len`. With `Overflow::Drop` every example longer than `max_seq_len` is
/// left out and counted.
///
/// With `cache_dir`, the result is stored there under a hash of everything it depends on (the file, the
/// tokenizer files and code, the template and system prompt, the options) and reused by later runs.
pub fn load_jsonl(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &DataOptions,
    cache_dir: Option<&Path>,
) -> Result<Dataset> {
    ensure!(opts.max_seq_len >= 2, "data.max_seq_len is {}: an example needs at least 2 tokens", opts.max_seq_len);
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cache = match cache_dir {
        Some(dir) => Some(dir.join(format!("{:016x}.tokens", cache_key(&bytes, tok, template, opts)?))),
        None => None,
    };
    // A cache file that does not read back (say, cut short by a full disk) is simply rebuilt.
    if let Some(ds) = cache.as_deref().and_then(|file| read_cache(file).ok()) {
        return Ok(ds);
    }
    let ds = tokenize(path, &bytes, tok, template, opts)?;
    if let Some(file) = &cache {
        write_cache(file, &ds)?;
    }
    Ok(ds)
}

fn tokenize(
    path: &Path,
    bytes: &[u8],
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &DataOptions,
) -> Result<Dataset> {
    let mut ds = Dataset { examples: Vec::new(), stats: DataStats::default() };
    let mut problems = Problems::default();
    for (at, line) in tokenize_lines(path, bytes, tok, template, opts) {
        ds.stats.lines += 1;
        let t = match line {
            Ok(t) => t,
            Err(e) => {
                problems.add(format!("{e:#}"));
                continue;
            }
        };
        let over = t.cut || t.example.ids.len() > opts.max_seq_len;
        if over && opts.overflow == Overflow::Drop {
            ds.stats.dropped += 1;
            continue;
        }
        if let Some(first) = t.first_reply_beyond(opts.max_seq_len) {
            problems.add(format!(
                "{at}: the text before the first reply is {first}; max_seq_len is {}: raise data.max_seq_len or \
                 set data.overflow = \"drop\"",
                opts.max_seq_len
            ));
            continue;
        }
        let mut example = t.example;
        if over {
            example.truncate(opts.max_seq_len);
            ds.stats.truncated += 1;
        }
        ds.stats.tokens += example.ids.len();
        ds.stats.loss_tokens += example.trained_tokens();
        ds.examples.push(example);
    }
    problems.into_result(path)?;
    if ds.examples.is_empty() {
        match ds.stats.lines {
            0 => bail!("{}: no examples (the file is empty or has only blank lines)", path.display()),
            n => bail!(
                "{}: all {n} examples are longer than data.max_seq_len = {} and were dropped",
                path.display(),
                opts.max_seq_len
            ),
        }
    }
    Ok(ds)
}

/// The problems found in a file: the first `PROBLEMS_LISTED` in full, the rest counted.
#[derive(Default)]
struct Problems {
    listed: Vec<String>,
    count: usize,
}

impl Problems {
    fn add(&mut self, problem: String) {
        self.count += 1;
        if self.listed.len() < PROBLEMS_LISTED {
            self.listed.push(problem);
        }
    }

    fn into_result(self, path: &Path) -> Result<()> {
        match self.count {
            0 => Ok(()),
            1 => bail!("{}", self.listed[0]),
            n => {
                let more = n - self.listed.len();
                let more = if more > 0 { format!("\n  ... and {more} more") } else { String::new() };
                bail!("{}: {n} lines have problems:\n  {}{more}", path.display(), self.listed.join("\n  "))
            }
        }
    }
}

/// First bytes of a cache file; part of the cache key too, so a format change never reads old files.
const CACHE_MAGIC: &[u8; 8] = b"BSDATA02";

/// FNV-1a (64-bit), a cache key: it guards against stale caches, not against crafted collisions.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Hashes the length first, so consecutive fields cannot run into each other.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Hash of everything the examples depend on. `pack` is left out: it acts later, on whole examples.
fn cache_key(jsonl: &[u8], tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> Result<u64> {
    let mut h = Fnv::new();
    h.field(CACHE_MAGIC);
    h.field(&crate::tokenizer::CODE_VERSION.to_le_bytes());
    h.field(jsonl);
    for file in tok.files() {
        h.field(file.file_name().unwrap_or_default().as_encoded_bytes());
        h.field(&fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    }
    h.field(template.identity().as_bytes());
    h.field(format!("{} {:?} {:?}", opts.max_seq_len, opts.loss_on, opts.overflow).as_bytes());
    Ok(h.0)
}

/// Layout (little-endian): magic, the five stats and the example count as u64, then per example its
/// length and number of trained ranges as u32, the ranges' starts and ends as u32, and its ids as u32.
fn write_cache(path: &Path, ds: &Dataset) -> Result<()> {
    let s = &ds.stats;
    let mut out = Vec::with_capacity(64 + 4 * (s.tokens + 4 * ds.examples.len()));
    out.extend_from_slice(CACHE_MAGIC);
    for n in [s.lines, s.truncated, s.dropped, s.tokens, s.loss_tokens, ds.examples.len()] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for ex in &ds.examples {
        let ranges = ex.trained.iter().flat_map(|r| [r.start as u32, r.end as u32]);
        for n in [ex.ids.len() as u32, ex.trained.len() as u32].into_iter().chain(ranges).chain(ex.ids.iter().copied())
        {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating the data cache directory {}", dir.display()))?;
    // Several ranks may write the same cache at once: each writes its own temporary file, and the renames
    // replace one complete file with another.
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(format!(".tmp{}", std::process::id()));
    fs::write(&tmp, &out).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads a cache file back, checking every field against what it must be (ranges ascending, disjoint,
/// within the example and past index 0): a damaged or crafted file is an error, never a wrong dataset.
fn read_cache(path: &Path) -> Result<Dataset> {
    fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N]> {
        let (head, rest) = r.split_first_chunk::<N>().context("the file ends early")?;
        *r = rest;
        Ok(*head)
    }
    let u64 = |r: &mut &[u8]| take(r).map(|b| u64::from_le_bytes(b) as usize);
    let u32 = |r: &mut &[u8]| take(r).map(|b| u32::from_le_bytes(b) as usize);
    let bytes = fs::read(path)?;
    let mut r = bytes.strip_prefix(CACHE_MAGIC.as_slice()).context("not a Bessie data cache")?;
    let r = &mut r;
    let stats =
        DataStats { lines: u64(r)?, truncated: u64(r)?, dropped: u64(r)?, tokens: u64(r)?, loss_tokens: u64(r)? };
    let n = u64(r)?;
    let mut examples = Vec::with_capacity(n.min(r.len() / 8));
    for _ in 0..n {
        let (len, ranges) = (u32(r)?, u32(r)?);
        ensure!(ranges <= len && 8 * ranges + 4 * len <= r.len(), "the file ends early");
        let mut trained: Vec<Range<usize>> = Vec::with_capacity(ranges);
        for _ in 0..ranges {
            let range = u32(r)?..u32(r)?;
            let after = trained.last().map_or(1, |last| last.end);
            ensure!(after <= range.start && range.start < range.end && range.end <= len, "a bad trained range");
            trained.push(range);
        }
        let ids = (0..len).map(|_| u32(r).map(|id| id as u32)).collect::<Result<_>>()?;
        examples.push(Example { ids, trained });
    }
    ensure!(r.is_empty(), "trailing bytes");
    let ds = Dataset { examples, stats };
    ensure!(
        ds.stats.tokens == ds.examples.iter().map(|e| e.ids.len()).sum::<usize>()
            && ds.stats.loss_tokens == ds.examples.iter().map(Example::trained_tokens).sum::<usize>(),
        "counts that disagree with the examples"
    );
    Ok(ds)
}

/// One training sequence: indices into `Dataset::examples` of the examples packed into it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub examples: Vec<u32>,
}

impl Row {
    /// The number of tokens in this row.
    pub fn tokens(&self, ds: &Dataset) -> usize {
        self.examples.iter().map(|&e| ds.examples[e as usize].ids.len()).sum()
    }
}

/// The rows of one epoch: all examples in an order shuffled by (`seed`, `epoch`), then, with
/// `opts.pack`, packed in that order into rows of at most `max_seq_len` tokens (a new row starts when the
/// next example does not fit), else one example per row.
pub fn epoch_rows(ds: &Dataset, epoch: usize, seed: u64, opts: &DataOptions) -> Vec<Row> {
    let mut order: Vec<u32> = (0..ds.examples.len() as u32).collect();
    // The golden-ratio multiplier spreads consecutive epochs over distant seeds.
    let mut rng = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..order.len()).rev() {
        // Fisher-Yates; the high half of a 64x64-bit product maps a random word onto 0..=i.
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    if !opts.pack {
        return order.into_iter().map(|e| Row { examples: vec![e] }).collect();
    }
    let mut rows = Vec::new();
    let (mut row, mut len) = (Vec::new(), 0);
    for e in order {
        let n = ds.examples[e as usize].ids.len();
        if !row.is_empty() && len + n > opts.max_seq_len {
            rows.push(Row { examples: std::mem::take(&mut row) });
            len = 0;
        }
        row.push(e);
        len += n;
    }
    if !row.is_empty() {
        rows.push(Row { examples: row });
    }
    rows
}

/// The rows rank `rank` of `world` trains on: the `rank`-th of `world` equal contiguous blocks (up to
/// `world - 1` rows at the end are left out), so all ranks take the same number of steps. Contiguous
/// blocks make N ranks with accumulation A see exactly the micro-batches one rank with accumulation N*A
/// sees, so the two runs compute the same gradients, not merely gradients of the same rows.
pub fn shard(rows: Vec<Row>, rank: usize, world: usize) -> Vec<Row> {
    assert!(rank < world, "rank {rank} of a world of {world}");
    let per_rank = rows.len() / world;
    rows.into_iter().skip(rank * per_rank).take(per_rank).collect()
}

/// A micro-batch, each field flattened row-major as `[batch, seq]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    /// The longest row of this batch; shorter rows are padded to it.
    pub seq: usize,
    /// Token ids; `pad_id` on padding.
    pub ids: Vec<u32>,
    /// `targets[t] = ids[t + 1]` where both belong to the same example, else 0.
    pub targets: Vec<u32>,
    /// 1.0 where `targets[t]` is trained (same example and `Example::is_trained(t + 1)`), else 0.0: padding and
    /// each example's last token have 0.
    pub loss_mask: Vec<f32>,
    /// Position within the token's own example: RoPE restarts with each example.
    pub positions: Vec<u32>,
    /// Which example of its row a token belongs to (1, 2, ...); 0 on padding. Attention is allowed only
    /// between tokens of equal, nonzero segment, and causally.
    pub segments: Vec<u32>,
    /// The number of 1.0s in `loss_mask`.
    pub loss_tokens: usize,
}

pub fn make_batch(ds: &Dataset, rows: &[Row], pad_id: u32) -> Batch {
    let seq = rows.iter().map(|r| r.tokens(ds)).max().unwrap_or(0);
    let n = rows.len() * seq;
    let mut b = Batch {
        batch: rows.len(),
        seq,
        ids: vec![pad_id; n],
        targets: vec![0; n],
        loss_mask: vec![0.0; n],
        positions: vec![0; n],
        segments: vec![0; n],
        loss_tokens: 0,
    };
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * seq;
        for (segment, &e) in row.examples.iter().enumerate() {
            let ex = &ds.examples[e as usize];
            for (t, &id) in ex.ids.iter().enumerate() {
                b.ids[at] = id;
                b.positions[at] = t as u32;
                b.segments[at] = segment as u32 + 1;
                if let Some(&next) = ex.ids.get(t + 1) {
                    b.targets[at] = next;
                    if ex.is_trained(t + 1) {
                        b.loss_mask[at] = 1.0;
                        b.loss_tokens += 1;
                    }
                }
                at += 1;
            }
        }
    }
    b
}

/// What `bessie-data check` reports about a JSONL file of examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataReport {
    /// Examples (non-blank lines without problems).
    pub examples: usize,
    /// Examples per line format.
    pub formats: BTreeMap<LineFormat, usize>,
    /// Examples per `source` field; "-" for lines without one.
    pub sources: BTreeMap<String, usize>,
    /// Lines with an `answers` list (dev files): with answers, and with an empty list.
    pub answerable: usize,
    pub unanswerable: usize,
    /// Token lengths under the chat template, sorted.
    pub lengths: Vec<usize>,
    /// Tokens the loss trains on (`loss_on = "response"`: the assistant turns).
    pub trained_tokens: usize,
    pub max_seq_len: usize,
    /// Examples longer than `max_seq_len`: truncated in training (left out with `overflow = "drop"`).
    pub over_max: usize,
    /// Examples with no trained token within `max_seq_len`: training refuses them unless they are dropped.
    pub prompt_over_max: usize,
    /// Problems that make training refuse the file, each naming its line: the first `PROBLEMS_LISTED`.
    pub problems: Vec<String>,
    /// All problems, listed or not.
    pub problem_count: usize,
}

impl DataReport {
    /// The `p`-th percentile (nearest rank) of the token lengths; 0 without examples.
    pub fn percentile(&self, p: f64) -> usize {
        let rank = (p / 100.0 * self.lengths.len() as f64).ceil() as usize;
        self.lengths.get(rank.clamp(1, self.lengths.len().max(1)) - 1).copied().unwrap_or(0)
    }

    /// Whether `bessie-train` would refuse this file with `data.overflow = "truncate"`.
    pub fn refused(&self) -> bool {
        self.problem_count > 0 || self.prompt_over_max > 0 || self.examples == 0
    }
}

/// Validates a JSONL file for training and measures it under `template` with `tok`: every problem
/// `load_jsonl` would report (all of them, the first `PROBLEMS_LISTED` in full), and `answers` where
/// present. Lines are tokenized up to `max_seq_len` x `BYTES_PER_TOKEN_BOUND` bytes, as in training.
pub fn check(path: &Path, tok: &Tokenizer, template: &ChatTemplate, max_seq_len: usize) -> Result<DataReport> {
    let opts = DataOptions { max_seq_len, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: false };
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut report = DataReport {
        examples: 0,
        formats: BTreeMap::new(),
        sources: BTreeMap::new(),
        answerable: 0,
        unanswerable: 0,
        lengths: Vec::new(),
        trained_tokens: 0,
        max_seq_len,
        over_max: 0,
        prompt_over_max: 0,
        problems: Vec::new(),
        problem_count: 0,
    };
    let mut problems = Problems::default();
    for (at, tokenized) in tokenize_lines(path, &bytes, tok, template, &opts) {
        let t = match tokenized {
            Ok(t) => t,
            Err(e) => {
                problems.add(format!("{e:#}"));
                continue;
            }
        };
        if t.rest.contains_key("answers") {
            match crate::squad::answers(&t.rest) {
                Err(e) => {
                    problems.add(format!("{at}: {e}"));
                    continue;
                }
                Ok(a) if a.is_empty() => report.unanswerable += 1,
                Ok(_) => report.answerable += 1,
            }
        }
        let source = t.rest.get("source").and_then(Value::as_str).unwrap_or("-");
        *report.sources.entry(source.to_string()).or_default() += 1;
        *report.formats.entry(t.format).or_default() += 1;
        report.examples += 1;
        report.lengths.push(t.example.ids.len());
        report.trained_tokens += t.example.trained_tokens();
        if t.cut || t.example.ids.len() > max_seq_len {
            report.over_max += 1;
        }
        if t.first_reply_beyond(max_seq_len).is_some() {
            report.prompt_over_max += 1;
        }
    }
    report.lengths.sort_unstable();
    report.problem_count = problems.count;
    report.problems = problems.listed;
    Ok(report)
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let tokens: usize = self.lengths.iter().sum();
        writeln!(
            f,
            "{} examples, {tokens} tokens, {} trained ({:.1}%; the rest is masked out of the loss)",
            self.examples,
            self.trained_tokens,
            100.0 * self.trained_tokens as f64 / tokens.max(1) as f64
        )?;
        for (format, n) in &self.formats {
            writeln!(f, "  format {format}: {n}")?;
        }
        for (source, n) in &self.sources {
            writeln!(f, "  source {source}: {n}")?;
        }
        if self.answerable + self.unanswerable > 0 {
            writeln!(f, "  answers: {} answerable, {} unanswerable", self.answerable, self.unanswerable)?;
        }
        if self.examples > 0 {
            writeln!(
                f,
                "tokens per example under the chat template: p50 {}, p90 {}, p99 {}, max {}",
                self.percentile(50.0),
                self.percentile(90.0),
                self.percentile(99.0),
                self.percentile(100.0)
            )?;
            write!(
                f,
                "max_seq_len {}: {} examples ({:.2}%) are longer (truncated in training, left out with \
                 data.overflow = \"drop\")",
                self.max_seq_len,
                self.over_max,
                100.0 * self.over_max as f64 / self.examples as f64
            )?;
            if self.prompt_over_max > 0 {
                write!(
                    f,
                    "; {} have no trained token within max_seq_len (training refuses them: raise data.max_seq_len \
                     or set data.overflow = \"drop\")",
                    self.prompt_over_max
                )?;
            }
            writeln!(f)?;
        }
        if self.problem_count > 0 {
            writeln!(f, "{} lines have problems (training refuses the file):", self.problem_count)?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            if self.problem_count > self.problems.len() {
                writeln!(f, "  ... and {} more", self.problem_count - self.problems.len())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        for (text, hash) in
            [("", 0xcbf2_9ce4_8422_2325), ("a", 0xaf63_dc4c_8601_ec8c), ("foobar", 0x8594_4171_f739_67e8)]
        {
            let mut h = Fnv::new();
            h.bytes(text.as_bytes());
            assert_eq!(h.0, hash, "{text:?}");
        }
    }

    #[test]
    fn cache_file_round_trips_and_rejects_damage() {
        let ds = Dataset {
            examples: vec![
                Example { ids: vec![1, 5, 7, 8, 9], trained: vec![1..2, 3..5] },
                Example::from_loss_start(vec![1, 9], 1),
            ],
            stats: DataStats { lines: 3, truncated: 1, dropped: 1, tokens: 7, loss_tokens: 4 },
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.tokens");
        write_cache(&path, &ds).unwrap();
        assert_eq!(read_cache(&path).unwrap(), ds);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_cache(&path).is_err());
        // Ranges out of order, overlapping, past the end or at index 0, and counts that disagree: refused.
        let cases: [&[(usize, usize)]; 5] = [&[(3, 5), (1, 2)], &[(1, 3), (2, 4)], &[(1, 9)], &[(0, 2)], &[(2, 2)]];
        for trained in cases {
            let trained: Vec<Range<usize>> = trained.iter().map(|&(a, b)| a..b).collect();
            let mut bad = ds.clone();
            bad.stats.loss_tokens =
                4 - bad.examples[0].trained_tokens() + trained.iter().map(|r| r.len()).sum::<usize>();
            bad.examples[0].trained = trained;
            write_cache(&path, &bad).unwrap();
            assert!(read_cache(&path).is_err(), "{:?}", bad.examples[0].trained);
        }
        let mut bad = ds.clone();
        bad.stats.tokens += 1;
        write_cache(&path, &bad).unwrap();
        assert!(read_cache(&path).is_err());
    }
}
