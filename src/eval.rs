//! SQuAD v2 evaluation: dev JSONL reading, batched greedy answers, the official metrics (normalized exact
//! match and token F1, maximum over the gold answers, split into HasAns / NoAns) beside the original
//! project's looser check, and the summary `bessie-eval` prints and writes.
//!
//! Bessie abstains by answering "Not in context." (what its SQuAD data trains it to say), where the
//! official script's abstention is the empty string. So an unanswerable question (`answers` empty) scores
//! 1 only when the guess normalizes to "not in context", an abstention on an answerable question scores
//! like an empty guess (0), and an empty guess is wrong for both kinds.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::{json_kind, jsonl_objects, take_string};
use crate::dist::Communicator;
use crate::generate::{generate_batch, Sampler, Stop};
use crate::model::BitNet;
use crate::squad::NOT_IN_CONTEXT;
use crate::tokenizer::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

/// SQuAD v2's `normalize_answer`: lower-case, remove ASCII punctuation (Python's `string.punctuation`),
/// replace the articles a, an, the by a space where they are whole words (`\b(a|an|the)\b`), and
/// collapse whitespace.
pub fn normalize_answer(text: &str) -> String {
    let text: String = text.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // Runs of word characters are what `\b...\b` delimits (Python's Unicode `\w`: alphanumerics and `_`).
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        let run = rest.find(|d| is_word(d) != is_word(c)).unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(run);
        out.push_str(if is_word(c) && matches!(piece, "a" | "an" | "the") { " " } else { piece });
        rest = tail;
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD's token F1 between normalized texts: the harmonic mean of the precision and recall of the
/// shared tokens (as multisets). When either side has no tokens, 1 if both have none, else 0.
fn token_f1(gold: &str, guess: &str) -> f64 {
    let (gold, guess): (Vec<&str>, Vec<&str>) = (gold.split_whitespace().collect(), guess.split_whitespace().collect());
    if gold.is_empty() || guess.is_empty() {
        return f64::from(u8::from(gold == guess));
    }
    let mut unmatched: HashMap<&str, usize> = HashMap::new();
    for t in &gold {
        *unmatched.entry(t).or_default() += 1;
    }
    let same = guess
        .iter()
        .filter(|t| match unmatched.get_mut(*t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count();
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / guess.len() as f64, same as f64 / gold.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// The original project's check: the guess equals one of the answers ignoring case (and surrounding
/// whitespace); for an unanswerable question, it contains "not in context" ignoring case.
pub fn original_is_correct(guess: &str, answers: &[String]) -> bool {
    let guess = guess.trim().to_lowercase();
    if answers.is_empty() {
        return guess.contains("not in context");
    }
    answers.iter().any(|a| a.trim().to_lowercase() == guess)
}

/// How one guess scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// 1.0 when the normalized guess equals a normalized gold answer, else 0.0.
    pub exact_match: f64,
    /// Best token F1 over the gold answers, 0 to 1.
    pub f1: f64,
    /// The original project's looser check.
    pub is_correct: bool,
}

/// Scores `guess` against `answers` (empty: unanswerable). As in the official script, gold answers that
/// normalize to nothing are ignored, and a question left without any is scored as unanswerable.
pub fn score(guess: &str, answers: &[String]) -> Score {
    let guess_norm = normalize_answer(guess);
    let abstains = guess_norm == normalize_answer(NOT_IN_CONTEXT);
    let golds: Vec<String> = answers.iter().map(|a| normalize_answer(a)).filter(|a| !a.is_empty()).collect();
    let (exact_match, f1) = if golds.is_empty() {
        let right = f64::from(u8::from(abstains));
        (right, right)
    } else {
        let guess = if abstains { "" } else { guess_norm.as_str() };
        golds.iter().fold((0.0, 0.0), |(em, f1), gold| {
            (f64::max(em, f64::from(u8::from(gold == guess))), f64::max(f1, token_f1(gold, guess)))
        })
    };
    Score { exact_match, f1, is_correct: original_is_correct(guess, answers) }
}

/// One line of a dev (or predictions) file: all its fields, and the ones evaluation reads.
#[derive(Debug, Clone, PartialEq)]
pub struct DevExample {
    /// `FILE:LINE`, for messages.
    pub at: String,
    pub fields: Map<String, Value>,
    pub prompt: String,
    /// Acceptable answers; empty for an unanswerable question.
    pub answers: Vec<String>,
}

impl DevExample {
    /// The `guess` field of a `bessie-eval` output line.
    pub fn guess(&self) -> Result<&str> {
        match self.fields.get("guess") {
            Some(Value::String(s)) => Ok(s),
            None => bail!("{}: missing field `guess` (is this a bessie-eval output file?)", self.at),
            Some(other) => bail!("{}: field `guess` must be a string, not {}", self.at, json_kind(other)),
        }
    }

    /// The output line: the input fields with `guess` and its scores (`is_correct`, `exact_match`, `f1`).
    pub fn scored(&self, guess: &str) -> (Map<String, Value>, Score) {
        let s = score(guess, &self.answers);
        let mut fields = self.fields.clone();
        fields.insert("guess".into(), guess.into());
        fields.insert("is_correct".into(), s.is_correct.into());
        fields.insert("exact_match".into(), s.exact_match.into());
        fields.insert("f1".into(), s.f1.into());
        (fields, s)
    }
}

/// The `answers` field of a JSONL object: a list of strings, empty for an unanswerable question.
pub fn answers(object: &Map<String, Value>) -> Result<Vec<String>, String> {
    match object.get("answers") {
        None => Err("missing field `answers`: a dev file lists the acceptable answers of each question \
                     (an empty list for an unanswerable one); bessie-data squad --dev writes them"
            .into()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`answers[{i}]` must be a string, not {}", json_kind(a)))
            })
            .collect(),
        Some(other) => Err(format!("field `answers` must be a list of strings, not {}", json_kind(other))),
    }
}

/// Reads the first `limit` (all with None) examples of a dev JSONL file: each line an object with a
/// `prompt` string and an `answers` list; other fields are kept for the output. Errors name `FILE:LINE`.
pub fn read_dev(path: &Path, limit: Option<usize>) -> Result<Vec<DevExample>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in jsonl_objects(path, &bytes).take(limit.unwrap_or(usize::MAX)) {
        let (at, mut fields) = line?;
        let prompt = take_string(&mut fields, "prompt").map_err(|e| anyhow!("{at}: {e}"))?;
        fields.insert("prompt".into(), prompt.clone().into());
        let answers = answers(&fields).map_err(|e| anyhow!("{at}: {e}"))?;
        out.push(DevExample { at, fields, prompt, answers });
    }
    if out.is_empty() {
        bail!("{}: no examples (the file is empty or has only blank lines)", path.display());
    }
    Ok(out)
}

/// A generated answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guess {
    pub text: String,
    /// Tokens generated, the stopping EOS or end marker included.
    pub tokens: usize,
    /// Seconds from the start of its batch until it was complete.
    pub secs: f64,
}

/// Greedy answers to the examples' prompts (rendered with `template`), `batch_size` prompts at a time,
/// in input order. Prompts of similar token length are batched together, longest first, so padding is
/// small and running out of memory shows at once. `on_batch(n)` follows each batch of `n` answers.
pub fn generate_guesses(
    model: &BitNet,
    tok: &Tokenizer,
    template: &ChatTemplate,
    examples: &[DevExample],
    batch_size: usize,
    max_new_tokens: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Guess>> {
    anyhow::ensure!(batch_size > 0, "the batch size must be positive");
    let context = model.max_positions();
    let stop = Stop::new(tok, template);
    let prompts = examples
        .iter()
        .map(|ex| {
            let ids = template.prompt_ids(tok, &[Message::new("user", &ex.prompt)]).with_context(|| ex.at.clone())?;
            anyhow::ensure!(
                ids.len() < context,
                "{}: the prompt is {} tokens under the chat template; the model's context \
                 (max_position_embeddings, with RoPE scaling) is {context}",
                ex.at,
                ids.len()
            );
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut guesses = vec![None; prompts.len()];
    for batch in order.chunks(batch_size) {
        let batch_prompts: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].clone()).collect();
        let gens =
            generate_batch(model, tok, &stop, &batch_prompts, max_new_tokens, &mut Sampler::greedy(), |_, _| Ok(()))?;
        for (&i, g) in batch.iter().zip(gens) {
            guesses[i] = Some(Guess { text: g.text, tokens: g.ids.len(), secs: g.prompt_secs + g.decode_secs });
        }
        on_batch(batch.len());
    }
    Ok(guesses.into_iter().map(|g| g.expect("every prompt is in one batch")).collect())
}

/// The items rank `rank` of `world` evaluates: every `world`-th from `rank`. `merge_shards` undoes it.
pub fn shard<T: Clone>(items: &[T], rank: usize, world: usize) -> Vec<T> {
    assert!(rank < world, "rank {rank} of a world of {world}");
    items.iter().skip(rank).step_by(world).cloned().collect()
}

/// Input order from the shards of every rank (`shards[rank]` as `shard` cut them).
pub fn merge_shards<T>(shards: Vec<Vec<T>>) -> Vec<T> {
    let total = shards.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = shards.into_iter().map(Vec::into_iter).collect();
    let world = iters.len();
    (0..total).filter_map(|i| iters[i % world].next()).collect()
}

/// Metrics of one split, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitScores {
    pub count: usize,
    pub exact_match: f64,
    pub f1: f64,
    /// Share the original project's check counts correct.
    pub original_accuracy: f64,
}

impl SplitScores {
    /// None for a split without questions.
    fn new<'a>(scores: impl Iterator<Item = &'a Score>) -> Option<Self> {
        let scores: Vec<&Score> = scores.collect();
        let mean = |f: fn(&Score) -> f64| 100.0 * scores.iter().map(|s| f(s)).sum::<f64>() / scores.len() as f64;
        (!scores.is_empty()).then(|| Self {
            count: scores.len(),
            exact_match: mean(|s| s.exact_match),
            f1: mean(|s| s.f1),
            original_accuracy: mean(|s| f64::from(u8::from(s.is_correct))),
        })
    }
}

/// How fast the guesses were generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speed {
    pub model: String,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub examples: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub examples_per_sec: f64,
    pub generated_tokens_per_sec: f64,
}

impl Speed {
    pub fn new(model: &str, batch_size: usize, max_new_tokens: usize, guesses: &[Guess], seconds: f64) -> Self {
        let generated_tokens = guesses.iter().map(|g| g.tokens).sum();
        Self {
            model: model.to_string(),
            batch_size,
            max_new_tokens,
            examples: guesses.len(),
            generated_tokens,
            seconds,
            examples_per_sec: guesses.len() as f64 / seconds,
            generated_tokens_per_sec: generated_tokens as f64 / seconds,
        }
    }
}

/// What `eval_summary.json` holds and the terminal table shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub overall: SplitScores,
    /// Questions with answers; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_ans: Option<SplitScores>,
    /// Unanswerable questions; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_ans: Option<SplitScores>,
    /// Absent when existing predictions were re-scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<Speed>,
}

impl Summary {
    /// From each question's score and whether it has answers (the official split goes by the raw
    /// `answers` list).
    pub fn new(scores: &[(bool, Score)], speed: Option<Speed>) -> Result<Self> {
        let split = |has: Option<bool>| {
            SplitScores::new(scores.iter().filter(move |(h, _)| has.is_none_or(|has| *h == has)).map(|(_, s)| s))
        };
        Ok(Self {
            overall: split(None).context("no scores to summarize")?,
            has_ans: split(Some(true)),
            no_ans: split(Some(false)),
            speed,
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "{:<8} {:>7} {:>12} {:>7} {:>15}", "split", "count", "exact match", "F1", "original check")?;
        let rows =
            [("HasAns", self.has_ans.as_ref()), ("NoAns", self.no_ans.as_ref()), ("overall", Some(&self.overall))];
        for (name, s) in rows.into_iter().filter_map(|(name, s)| Some((name, s?))) {
            writeln!(
                f,
                "{name:<8} {:>7} {:>12.2} {:>7.2} {:>15.2}",
                s.count, s.exact_match, s.f1, s.original_accuracy
            )?;
        }
        if let Some(s) = &self.speed {
            writeln!(
                f,
                "{} examples in {:.1} s: {:.2} examples/s, {} generated tokens at {:.1} tokens/s (batch {})",
                s.examples, s.seconds, s.examples_per_sec, s.generated_tokens, s.generated_tokens_per_sec, s.batch_size
            )?;
        }
        Ok(())
    }
}

/// Output lines (see `DevExample::scored`) and their summary.
pub type Scored = (Vec<Map<String, Value>>, Summary);

/// Scores each example's guess.
pub fn score_all<'a>(
    guesses: impl IntoIterator<Item = (&'a DevExample, &'a str)>,
    speed: Option<Speed>,
) -> Result<Scored> {
    let (lines, scores): (Vec<_>, Vec<_>) = guesses
        .into_iter()
        .map(|(ex, guess)| {
            let (line, score) = ex.scored(guess);
            (line, (!ex.answers.is_empty(), score))
        })
        .unzip();
    Ok((lines, Summary::new(&scores, speed)?))
}

/// Answers and scores `examples` with `model` (see `generate_guesses`); each line also gets `model`
/// (`model_name`) and `time` (`Guess::secs`). Under several ranks each answers its `shard` and rank 0
/// alone returns the scored lines, in input order; the others return None.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &BitNet,
    tok: &Tokenizer,
    template: &ChatTemplate,
    examples: &[DevExample],
    batch_size: usize,
    max_new_tokens: usize,
    model_name: &str,
    comm: &Communicator,
    on_batch: impl FnMut(usize),
) -> Result<Option<Scored>> {
    let start = std::time::Instant::now();
    // Each rank answers its shard; rank 0 gathers the answers back into input order and scores them all.
    let mine = shard(examples, comm.rank(), comm.world());
    let guesses = generate_guesses(model, tok, template, &mine, batch_size, max_new_tokens, on_batch)?;
    let Some(shards) = comm.gather_bytes(&serde_json::to_vec(&guesses)?)? else { return Ok(None) };
    let shards = shards.iter().map(|b| serde_json::from_slice(b)).collect::<serde_json::Result<Vec<Vec<Guess>>>>()?;
    let guesses = merge_shards(shards);
    let speed = Speed::new(model_name, batch_size, max_new_tokens, &guesses, start.elapsed().as_secs_f64());
    let (mut lines, summary) = score_all(examples.iter().zip(guesses.iter().map(|g| g.text.as_str())), Some(speed))?;
    for (line, guess) in lines.iter_mut().zip(&guesses) {
        line.insert("model".into(), model_name.into());
        line.insert("time".into(), guess.secs.into());
    }
    Ok(Some((lines, summary)))
}

/// Re-scores the first `limit` lines of a `bessie-eval` output (their `guess` against their `answers`).
pub fn rescore(predictions: &Path, limit: Option<usize>) -> Result<Scored> {
    let examples = read_dev(predictions, limit)?;
    let guesses = examples.iter().map(DevExample::guess).collect::<Result<Vec<_>>>()?;
    score_all(examples.iter().zip(guesses), None)
}

/// Writes one JSON object a line.
pub fn write_lines(out: &Path, lines: &[Map<String, Value>]) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(line)?);
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}

/// Writes `eval_summary.json` beside the output file `out`; returns its path.
pub fn write_summary(out: &Path, summary: &Summary) -> Result<PathBuf> {
    let path = out.with_file_name("eval_summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
