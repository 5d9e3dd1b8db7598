//! Training data: JSONL lines (`prompt`, `response`) rendered with the chat template and tokenized into
//! examples (with the index where the trained tokens start), a tokenization cache, and each epoch's
//! shuffled, optionally packed rows, their per-rank shards and the micro-batches built from them.
//!
//! `check` measures a file for `bessie-data check`.
//!
//! Packed rows hold several examples; `Batch::segments` and `Batch::positions` keep them apart (attention
//! stays within an example and RoPE positions restart), so packing changes throughput, not the math.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rng::Rng;
use crate::tokenizer::template::ChatTemplate;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// Which predictions the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// The response and its end marker only.
    Response,
    /// Every token after BOS, system prompt included (what the original trained on).
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

/// One tokenized example: BOS and the tokens of the rendered prompt and response (after truncation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Index of the first token whose prediction is trained: the first response token, or 1 (everything
    /// after BOS) with `LossOn::All`.
    pub loss_start: usize,
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

/// Reads a JSONL file (`prompt` and `response` strings required, other fields ignored, blank lines
/// skipped), renders each line with `template` and tokenizes it with BOS.
///
/// Every problem is reported before training starts, naming `FILE:LINE`: malformed JSON, a missing or
/// non-string field, a file without examples, and (with `Overflow::Truncate` and `LossOn::Response`) a
/// prompt so long that not even one response token fits in `max_seq_len`. With `Overflow::Drop` every
/// example longer than `max_seq_len` is left out and counted.
///
/// With `cache_dir`, the result is stored there under a hash of everything it depends on (the file, the
/// tokenizer files, the system prompt, the options) and reused by later runs.
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
    let file = path.display();
    let mut ds = Dataset { examples: Vec::new(), stats: DataStats::default() };
    for line in jsonl_objects(path, bytes) {
        let (location, mut object) = line?;
        let at = || location.clone();
        ds.stats.lines += 1;
        let mut field = |name| take_string(&mut object, name).map_err(|e| anyhow!("{location}: {e}"));
        let (prompt, response) = (field("prompt")?, field("response")?);
        let text = template.render(&prompt, &response);
        let mut ids = tok.encode(&text, true).with_context(at)?;
        let loss_start = match opts.loss_on {
            LossOn::All => 1,
            LossOn::Response => {
                response_start(tok, &ids, &text, &template.generation_prompt(&prompt)).with_context(at)?
            }
        };
        if ids.len() > opts.max_seq_len {
            match opts.overflow {
                Overflow::Drop => {
                    ds.stats.dropped += 1;
                    continue;
                }
                Overflow::Truncate => {
                    ensure!(
                        loss_start < opts.max_seq_len,
                        "{}: the prompt alone is {loss_start} tokens; max_seq_len is {}: raise data.max_seq_len \
                         or set data.overflow = \"drop\"",
                        at(),
                        opts.max_seq_len
                    );
                    ids.truncate(opts.max_seq_len);
                    ds.stats.truncated += 1;
                }
            }
        }
        ds.stats.tokens += ids.len();
        ds.stats.loss_tokens += ids.len() - loss_start;
        ds.examples.push(Example { ids, loss_start });
    }
    if ds.examples.is_empty() {
        match ds.stats.lines {
            0 => bail!("{file}: no examples (the file is empty or has only blank lines)"),
            n => bail!(
                "{file}: all {n} examples are longer than data.max_seq_len = {} and were dropped",
                opts.max_seq_len
            ),
        }
    }
    Ok(ds)
}

/// The non-blank lines of a JSONL file's `bytes`, each as its location `FILE:LINE` (for messages) and its
/// JSON object. A line that is not UTF-8, not JSON or not an object is an error naming its location.
pub fn jsonl_objects<'a>(
    path: &'a Path,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(String, Map<String, Value>)>> + 'a {
    bytes.split(|&b| b == b'\n').enumerate().filter_map(move |(n, line)| {
        let at = format!("{}:{}", path.display(), n + 1);
        let object = match std::str::from_utf8(line) {
            Err(e) => Err(format!("not valid UTF-8: {e}")),
            Ok(line) if line.trim().is_empty() => return None,
            Ok(line) => match serde_json::from_str(line) {
                Err(e) => Err(format!("malformed JSON: {e}")),
                Ok(Value::Object(object)) => Ok(object),
                Ok(_) => Err("expected a JSON object".to_string()),
            },
        };
        Some(object.map(|o| (at.clone(), o)).map_err(|e| anyhow!("{at}: {e}")))
    })
}

/// Takes the string field `name` out of a JSONL object; the error says what is wrong with it.
pub fn take_string(object: &mut Map<String, Value>, name: &str) -> Result<String, String> {
    match object.remove(name) {
        Some(Value::String(s)) => Ok(s),
        None => Err(format!("missing field `{name}`")),
        Some(other) => Err(format!("field `{name}` must be a string, not {}", json_kind(&other))),
    }
}

/// "a number", "an array", ...: what a JSON value is, for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Index of the first token of `ids` (BOS and the tokens of `text`) whose text reaches past `prompt`, the
/// generation prompt `text` starts with; a token straddling the boundary belongs to the response. The
/// whole text is tokenized once because tokens may merge across the boundary, so `encode(prompt)` need
/// not be a prefix of `ids`. `ids.len()` if no token does.
fn response_start(tok: &Tokenizer, ids: &[u32], text: &str, prompt: &str) -> Result<usize> {
    // Decoded byte lengths are compared. Tokenizers that round-trip (LLaMA's byte-fallback SentencePiece
    // does) decode the prompt to itself; for others (an <unk> decodes as " ⁇ ") the prompt's own decoded
    // form is the measure.
    let prompt_len =
        if tok.decode(ids)? == text { prompt.len() } else { tok.decode(&tok.encode(prompt, true)?)?.len() };
    let mut stream = DecodeStream::new(tok, &ids[..1]);
    let (mut len, mut pending) = (0, None);
    for (i, &id) in ids.iter().enumerate().skip(1) {
        // The stream holds text back while a character's bytes are incomplete; the text it then returns
        // starts in the first token it held back.
        let first = *pending.get_or_insert(i);
        if let Some(piece) = stream.push(id)? {
            len += piece.len();
            if len > prompt_len {
                return Ok(first);
            }
            pending = None;
        }
    }
    Ok(ids.len())
}

/// First bytes of a cache file; part of the cache key too, so a format change never reads old files.
const CACHE_MAGIC: &[u8; 8] = b"BSDATA01";

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
    h.field(jsonl);
    for file in tok.files() {
        h.field(file.file_name().unwrap_or_default().as_encoded_bytes());
        h.field(&fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    }
    h.field(template.system.as_bytes());
    h.field(format!("{} {:?} {:?}", opts.max_seq_len, opts.loss_on, opts.overflow).as_bytes());
    Ok(h.0)
}

/// Layout (little-endian): magic, the five stats and the example count as u64, then per example its
/// `loss_start` and length as u32 and its ids as u32.
fn write_cache(path: &Path, ds: &Dataset) -> Result<()> {
    let s = &ds.stats;
    let mut out = Vec::with_capacity(64 + 4 * (s.tokens + 2 * ds.examples.len()));
    out.extend_from_slice(CACHE_MAGIC);
    for n in [s.lines, s.truncated, s.dropped, s.tokens, s.loss_tokens, ds.examples.len()] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for ex in &ds.examples {
        for n in [ex.loss_start as u32, ex.ids.len() as u32].iter().chain(&ex.ids) {
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

fn read_cache(path: &Path) -> Result<Dataset> {
    fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N]> {
        let (head, rest) = r.split_first_chunk::<N>().context("the file ends early")?;
        *r = rest;
        Ok(*head)
    }
    let u64 = |r: &mut &[u8]| take(r).map(|b| u64::from_le_bytes(b) as usize);
    let u32 = |r: &mut &[u8]| take(r).map(u32::from_le_bytes);
    let bytes = fs::read(path)?;
    let mut r = bytes.strip_prefix(CACHE_MAGIC.as_slice()).context("not a Bessie data cache")?;
    let r = &mut r;
    let stats =
        DataStats { lines: u64(r)?, truncated: u64(r)?, dropped: u64(r)?, tokens: u64(r)?, loss_tokens: u64(r)? };
    let n = u64(r)?;
    let mut examples = Vec::with_capacity(n.min(r.len() / 8));
    for _ in 0..n {
        let loss_start = u32(r)? as usize;
        let len = u32(r)?;
        let ids = (0..len).map(|_| u32(r)).collect::<Result<_>>()?;
        examples.push(Example { ids, loss_start });
    }
    ensure!(r.is_empty(), "trailing bytes");
    Ok(Dataset { examples, stats })
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
    /// 1.0 where `targets[t]` is trained (same example and `t + 1 >= loss_start`), else 0.0: padding and
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
                    if t + 1 >= ex.loss_start {
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
    /// Examples (non-blank lines).
    pub examples: usize,
    /// Examples per `source` field; "-" for lines without one.
    pub sources: BTreeMap<String, usize>,
    /// Lines with an `answers` list (dev files): with answers, and with an empty list.
    pub answerable: usize,
    pub unanswerable: usize,
    /// Token lengths under the chat template (BOS to end marker), sorted.
    pub lengths: Vec<usize>,
    /// Tokens from the first response token on (what `loss_on = "response"` trains).
    pub response_tokens: usize,
    pub max_seq_len: usize,
    /// Examples longer than `max_seq_len`: truncated in training (left out with `overflow = "drop"`).
    pub over_max: usize,
    /// Examples whose prompt alone fills `max_seq_len`: training refuses them unless they are dropped.
    pub prompt_over_max: usize,
}

impl DataReport {
    /// The `p`-th percentile (nearest rank) of the token lengths.
    pub fn percentile(&self, p: f64) -> usize {
        let rank = (p / 100.0 * self.lengths.len() as f64).ceil() as usize;
        self.lengths[rank.clamp(1, self.lengths.len()) - 1]
    }
}

/// Validates a JSONL file for training (every error `load_jsonl` would give, and `answers` where present)
/// and measures it under `template` with `tok`.
pub fn check(path: &Path, tok: &Tokenizer, template: &ChatTemplate, max_seq_len: usize) -> Result<DataReport> {
    let whole =
        DataOptions { max_seq_len: usize::MAX, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: false };
    let ds = load_jsonl(path, tok, template, &whole, None)?;
    let mut report = DataReport {
        examples: ds.examples.len(),
        sources: BTreeMap::new(),
        answerable: 0,
        unanswerable: 0,
        lengths: ds.examples.iter().map(|e| e.ids.len()).collect(),
        response_tokens: ds.examples.iter().map(|e| e.ids.len() - e.loss_start).sum(),
        max_seq_len,
        over_max: ds.examples.iter().filter(|e| e.ids.len() > max_seq_len).count(),
        prompt_over_max: ds.examples.iter().filter(|e| e.loss_start >= max_seq_len).count(),
    };
    report.lengths.sort_unstable();
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    for line in jsonl_objects(path, &bytes) {
        let (at, object) = line?;
        let source = object.get("source").and_then(Value::as_str).unwrap_or("-");
        *report.sources.entry(source.to_string()).or_default() += 1;
        if object.contains_key("answers") {
            if crate::eval::answers(&object).map_err(|e| anyhow!("{at}: {e}"))?.is_empty() {
                report.unanswerable += 1;
            } else {
                report.answerable += 1;
            }
        }
    }
    Ok(report)
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let tokens: usize = self.lengths.iter().sum();
        writeln!(f, "{} examples, {tokens} tokens ({} in responses)", self.examples, self.response_tokens)?;
        for (source, n) in &self.sources {
            writeln!(f, "  source {source}: {n}")?;
        }
        if self.answerable + self.unanswerable > 0 {
            writeln!(f, "  answers: {} answerable, {} unanswerable", self.answerable, self.unanswerable)?;
        }
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
                "; {} have a prompt of max_seq_len tokens or more (training refuses them: raise data.max_seq_len \
                 or set data.overflow = \"drop\")",
                self.prompt_over_max
            )?;
        }
        writeln!(f)
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
            examples: vec![Example { ids: vec![1, 5, 7], loss_start: 2 }, Example { ids: vec![1, 9], loss_start: 1 }],
            stats: DataStats { lines: 3, truncated: 1, dropped: 1, tokens: 5, loss_tokens: 2 },
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.tokens");
        write_cache(&path, &ds).unwrap();
        assert_eq!(read_cache(&path).unwrap(), ds);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_cache(&path).is_err());
    }
}
