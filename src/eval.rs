//! SQuAD v2 evaluation: dev JSONL reading, batched greedy answers, the official metrics (normalized exact
//! match and token F1, maximum over the gold answers, split into HasAns / NoAns) beside the original
//! project's looser check, and the summary `bessie-eval` prints and writes.
//!
//! `exact_match` and `f1` are those of SQuAD v2's official `evaluate-v2.0.py` for every guess and answers
//! list (tests/eval.rs checks them against a transcription of its functions in
//! tests/reference/squad_official.py), with one mapping: Bessie abstains by answering "Not in context."
//! (what its SQuAD data trains it to say) where the official script's abstention is the empty prediction,
//! so a guess that normalizes to "not in context" is scored as the empty prediction. Hence, as in the
//! official script:
//!
//! - Gold answers that normalize to the empty string are dropped; a question left without any (every
//!   unanswerable one, `answers` empty) has the single gold answer "".
//! - The abstention and any guess that normalizes to "" ("", "The.", "...") score exact match 1 and F1 1
//!   on such a question, and 0 on a question with gold answers left; any other guess scores 0 on such a
//!   question.
//! - Otherwise the scores are the best over the gold answers (duplicates change nothing).
//!
//! The HasAns / NoAns split goes by whether the raw `answers` list is empty, and each split's numbers are
//! the mean over its questions times 100, as the script's `make_eval_dict`. A question Bessie did not
//! answer (its prompt does not fit the model's context, `Guess::skipped`) scores 0 on both measures, also
//! when it is unanswerable: it is no prediction, and the official script has no score for a missing one.
//!
//! Equal means equal for the characters that the Python running the script knows: its Unicode database
//! (14.0 in Python 3.11) decides lower-casing and `\w`, where Rust's standard library and regex-syntax
//! carry newer versions, so characters assigned since can normalize differently.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::dist::Communicator;
use crate::generate::{check_batch_fits, check_prompt_fits, ContinuousBatch, Sampler, Stop};
use crate::jsonl::{json_kind, jsonl_objects, take_string};
use crate::model::BitNet;
use crate::squad::answers;
use crate::squad::NOT_IN_CONTEXT;
use crate::tokenizer::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

/// Python's `\w` on `str` (the `re` module's Unicode word characters: `str.isalnum()` or `_`), which is
/// what delimits `\b`: the general categories L (letters) and N (numbers). Rust's `char::is_alphanumeric`
/// also counts the marks and symbols with Unicode's Other_Alphabetic property (Devanagari vowel signs, ⓐ),
/// which Python does not.
fn is_python_word(c: char) -> bool {
    static LETTERS_AND_NUMBERS: LazyLock<Vec<(char, char)>> = LazyLock::new(|| {
        let hir = regex_syntax::parse(r"[\p{L}\p{N}]").expect("a valid character class");
        match hir.kind() {
            regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(class)) => {
                class.ranges().iter().map(|r| (r.start(), r.end())).collect()
            }
            other => unreachable!("[\\p{{L}}\\p{{N}}] parsed to {other:?}"),
        }
    });
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let ranges = &*LETTERS_AND_NUMBERS;
    let i = ranges.partition_point(|&(_, end)| end < c);
    ranges.get(i).is_some_and(|&(start, _)| start <= c)
}

/// Python's `str.isspace()`, where `str.split()` splits: Unicode's White_Space (Rust's
/// `char::is_whitespace`) and the information separators U+001C to U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `text.split()`: the runs between whitespace (`is_python_space`).
fn python_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space).filter(|t| !t.is_empty())
}

/// SQuAD v2's `normalize_answer`: lower-case (Python's `str.lower`, full Unicode lower-casing with the
/// final sigma), remove ASCII punctuation (Python's `string.punctuation`), replace the articles a, an, the
/// by a space where they are whole words (`re.sub(r'\b(a|an|the)\b', ' ', text)` with Python's Unicode
/// `\b`, see `is_python_word`), and join the whitespace-separated tokens (Python's `str.split()`, see
/// `is_python_space`) with single spaces.
pub fn normalize_answer(text: &str) -> String {
    let text: String = text.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // `\b(a|an|the)\b` matches exactly the maximal runs of word characters that are an article.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        let run = rest.find(|d| is_python_word(d) != is_python_word(c)).unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(run);
        out.push_str(if is_python_word(c) && matches!(piece, "a" | "an" | "the") { " " } else { piece });
        rest = tail;
    }
    python_split(&out).collect::<Vec<_>>().join(" ")
}

/// SQuAD's `compute_f1` between normalized texts: the harmonic mean of the precision and recall of the
/// shared tokens (as multisets). When either side has no tokens, 1 if both have none, else 0.
fn token_f1(gold: &str, guess: &str) -> f64 {
    let (gold, guess): (Vec<&str>, Vec<&str>) = (python_split(gold).collect(), python_split(guess).collect());
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
    // The script's operations in its order, so the result is the same double.
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
    /// The original project's check.
    pub is_correct: bool,
}

impl Score {
    /// A question that was not answered (`Guess::skipped`): wrong by every measure.
    pub const UNANSWERED: Score = Score { exact_match: 0.0, f1: 0.0, is_correct: false };
}

/// Scores `guess` against `answers` (empty: unanswerable) as SQuAD v2's official script scores the
/// prediction `guess`, or the empty prediction when `guess` is Bessie's abstention (see the module doc).
pub fn score(guess: &str, answers: &[String]) -> Score {
    static ABSTENTION: LazyLock<String> = LazyLock::new(|| normalize_answer(NOT_IN_CONTEXT));
    let mut prediction = normalize_answer(guess);
    if prediction == *ABSTENTION {
        prediction.clear();
    }
    let mut golds: Vec<String> = answers.iter().map(|a| normalize_answer(a)).filter(|a| !a.is_empty()).collect();
    if golds.is_empty() {
        golds.push(String::new());
    }
    let exact_match = golds.iter().map(|gold| f64::from(u8::from(*gold == prediction))).fold(0.0, f64::max);
    let f1 = golds.iter().map(|gold| token_f1(gold, &prediction)).fold(0.0, f64::max);
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
    /// None: the question was not answered (`Guess::skipped`); its guess is empty and scores
    /// `Score::UNANSWERED`.
    pub fn scored(&self, guess: Option<&str>) -> (Map<String, Value>, Score) {
        let s = guess.map_or(Score::UNANSWERED, |guess| score(guess, &self.answers));
        let mut fields = self.fields.clone();
        fields.insert("guess".into(), guess.unwrap_or_default().into());
        fields.insert("is_correct".into(), s.is_correct.into());
        fields.insert("exact_match".into(), s.exact_match.into());
        fields.insert("f1".into(), s.f1.into());
        (fields, s)
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

/// A question's answer, or why it has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guess {
    pub text: String,
    /// Tokens generated, the stopping EOS or end marker included.
    pub tokens: usize,
    /// Seconds from the start of its prefill until it was complete.
    pub secs: f64,
    /// Why the question was not answered (its prompt does not fit the model's context); the guess is
    /// empty and scores 0 (`Score::UNANSWERED`), not as an empty prediction (which is right on an
    /// unanswerable question): the official script has no score for a missing prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl Guess {
    /// The answer to score: None when the question was not answered.
    pub fn answer(&self) -> Option<&str> {
        self.skipped.is_none().then_some(self.text.as_str())
    }
}

/// Questions ready to answer: prompts that do not fit the model's context are skipped (with the reason),
/// the rest encoded and sorted by token length, longest first, so the KV cache is sized by the first
/// prompts and running out of memory shows at once.
struct Plan {
    skipped: Vec<(usize, Guess)>,
    /// The dev-file index of each prompt in `prompts`.
    questions: Vec<usize>,
    prompts: Vec<Vec<u32>>,
}

impl Plan {
    /// `questions`: each with its index in the dev file.
    fn new(
        model: &BitNet,
        tok: &Tokenizer,
        template: &ChatTemplate,
        questions: &[(usize, &DevExample)],
        settings: &Settings,
    ) -> Result<Self> {
        anyhow::ensure!(settings.batch_size > 0, "the batch size must be positive");
        let (mut skipped, mut prompts) = (Vec::new(), Vec::new());
        for &(i, ex) in questions {
            let ids = template.prompt_ids(tok, &[Message::new("user", &ex.prompt)]).with_context(|| ex.at.clone())?;
            match check_prompt_fits(ids.len(), model.max_positions()) {
                Ok(()) => prompts.push((i, ids)),
                Err(e) => {
                    let why = format!("{}: {e}", ex.at);
                    skipped.push((i, Guess { text: String::new(), tokens: 0, secs: 0.0, skipped: Some(why) }))
                }
            }
        }
        prompts.sort_by_key(|(_, ids)| std::cmp::Reverse(ids.len()));
        if let (Some(free), Some((_, longest))) = (crate::device::gpu_free_memory(model.device())?, prompts.first()) {
            let rows = settings.batch_size.min(prompts.len());
            check_batch_fits(&model.cfg, model.dtype(), rows, longest.len(), settings.max_new_tokens, free)?;
        }
        let (questions, prompts) = prompts.into_iter().unzip();
        Ok(Self { skipped, questions, prompts })
    }

    /// Greedy answers, `settings.batch_size` prompts at a time (continuous batching), handed to `round` in
    /// `rounds` rounds of at least a batch of answers each (the skipped questions count in the first) until
    /// all are answered, then with none.
    fn answer(
        self,
        model: &BitNet,
        tok: &Tokenizer,
        stop: &Stop,
        settings: &Settings,
        rounds: usize,
        mut round: impl FnMut(Vec<(usize, Guess)>) -> Result<()>,
    ) -> Result<()> {
        let mut batch =
            ContinuousBatch::new(model, tok, stop, &self.prompts, settings.batch_size, settings.max_new_tokens)?;
        let mut sampler = Sampler::greedy();
        let mut answered = self.skipped;
        for _ in 0..rounds {
            while answered.len() < settings.batch_size && !batch.is_done() {
                for (p, g) in batch.step(&mut sampler, |_, _| Ok(()))? {
                    let secs = g.prompt_secs + g.decode_secs;
                    answered
                        .push((self.questions[p], Guess { text: g.text, tokens: g.ids.len(), secs, skipped: None }));
                }
            }
            round(std::mem::take(&mut answered))?;
        }
        anyhow::ensure!(batch.is_done(), "{rounds} rounds did not answer every question");
        Ok(())
    }
}

/// Greedy answers to the examples' prompts (rendered with `template`), `batch_size` at a time, in input
/// order (see `Plan`; a prompt beyond the model's context is skipped). `on_answers(n)` follows each round
/// of `n` answers.
pub fn generate_guesses(
    model: &BitNet,
    tok: &Tokenizer,
    template: &ChatTemplate,
    examples: &[DevExample],
    settings: &Settings,
    mut on_answers: impl FnMut(usize),
) -> Result<Vec<Guess>> {
    let questions: Vec<(usize, &DevExample)> = examples.iter().enumerate().collect();
    let plan = Plan::new(model, tok, template, &questions, settings)?;
    let stop = Stop::new(tok, template);
    let mut guesses = vec![None; examples.len()];
    let rounds = examples.len().div_ceil(settings.batch_size);
    plan.answer(model, tok, &stop, settings, rounds, |answers| {
        on_answers(answers.len());
        for (i, g) in answers {
            guesses[i] = Some(g);
        }
        Ok(())
    })?;
    Ok(guesses.into_iter().map(|g| g.expect("every question is answered or skipped")).collect())
}

/// The line `bessie-eval` logs as it goes without a terminal (where the bar would show the same): `done` of
/// `total` questions answered in `secs`, their rate and the time left at that rate.
pub fn progress_line(done: usize, total: usize, secs: f64) -> String {
    let rate = done as f64 / secs.max(1e-3);
    let left = match done {
        0 => "unknown".to_string(),
        _ => {
            let s = (total.saturating_sub(done) as f64 / rate).round() as u64;
            match s {
                0..60 => format!("{s} s"),
                60..3600 => format!("{} min {:02} s", s / 60, s % 60),
                _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
            }
        }
    };
    format!("{done}/{total} questions, {rate:.1} questions/s, {left} left")
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
    /// Of the answers generated in this run (`guesses`) in `seconds`.
    pub fn new(settings: &Settings, guesses: &[Guess], seconds: f64) -> Self {
        let generated_tokens = guesses.iter().map(|g| g.tokens).sum();
        Self {
            model: settings.model_name.to_string(),
            batch_size: settings.batch_size,
            max_new_tokens: settings.max_new_tokens,
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
    /// Absent when existing predictions were re-scored (unless their own summary had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<Speed>,
    /// Questions not answered because their prompt does not fit the model's context (scored as wrong).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
            skipped: 0,
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
        if self.skipped > 0 {
            writeln!(
                f,
                "{} questions skipped: their prompts do not fit the model's context (scored as wrong; see `skipped` \
                 in the output)",
                self.skipped
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

/// Scores each example's guess (None: not answered, see `DevExample::scored`).
pub fn score_all<'a>(
    guesses: impl IntoIterator<Item = (&'a DevExample, Option<&'a str>)>,
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

/// How `evaluate` answers.
pub struct Settings<'a> {
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Goes into each line's `model` field and the speed block.
    pub model_name: &'a str,
}

/// Answers and scores `examples` with `model` (see `generate_guesses`), keeping the answers in `done` (by
/// index: those an interrupted run wrote). Each line also gets `model` and `time` (`Guess::secs`), and
/// `skipped` for a question that was not answered. The ranks share the questions left (`shard`) and
/// answer them in rounds of at least a batch of answers each; after every round rank 0 gathers the
/// round's answers and hands them to `record` (the partial output, so that a killed evaluation keeps what
/// it answered). `on_answers(n)` follows each round of `n` of this rank's answers (skipped questions
/// included). Rank 0 alone returns the scored lines,
/// in input order; the others return None.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &BitNet,
    tok: &Tokenizer,
    template: &ChatTemplate,
    examples: &[DevExample],
    mut done: BTreeMap<usize, Guess>,
    settings: &Settings,
    comm: &Communicator,
    mut record: impl FnMut(&[(usize, Guess)]) -> Result<()>,
    mut on_answers: impl FnMut(usize),
) -> Result<Option<Scored>> {
    let start = std::time::Instant::now();
    // Only rank 0 read the partial output: the others learn which questions are left from it.
    let mut left = vec![1.0; examples.len()];
    if comm.is_main() {
        done.keys().for_each(|&i| left[i] = 0.0);
    }
    comm.all_reduce_sum_f64(&mut left)?;
    let todo: Vec<(usize, &DevExample)> =
        examples.iter().enumerate().filter(|(i, _)| left[*i] == comm.world() as f64).collect();
    let questions = shard(&todo, comm.rank(), comm.world());
    let plan = Plan::new(model, tok, template, &questions, settings)?;
    let stop = Stop::new(tok, template);
    // Every rank takes part in every round, with no answers when its share is done.
    let rounds = todo.len().div_ceil(comm.world()).div_ceil(settings.batch_size).max(1);
    let mut fresh = Vec::new();
    plan.answer(model, tok, &stop, settings, rounds, |answers| {
        on_answers(answers.len());
        let Some(shards) = comm.gather_bytes(&serde_json::to_vec(&answers)?)? else { return Ok(()) };
        let mut gathered = Vec::new();
        for bytes in shards {
            gathered.extend(serde_json::from_slice::<Vec<(usize, Guess)>>(&bytes)?);
        }
        record(&gathered)?;
        fresh.extend(gathered);
        Ok(())
    })?;
    if !comm.is_main() {
        return Ok(None);
    }
    let answered: Vec<Guess> = fresh.iter().filter(|(_, g)| g.skipped.is_none()).map(|(_, g)| g.clone()).collect();
    let speed = Speed::new(settings, &answered, start.elapsed().as_secs_f64());
    done.extend(fresh);
    let guesses: Vec<Guess> = (0..examples.len())
        .map(|i| done.remove(&i).with_context(|| format!("question {} was not answered", i + 1)))
        .collect::<Result<_>>()?;
    let (mut lines, mut summary) = score_all(examples.iter().zip(guesses.iter().map(Guess::answer)), Some(speed))?;
    for (line, guess) in lines.iter_mut().zip(&guesses) {
        line.insert("model".into(), settings.model_name.into());
        line.insert("time".into(), guess.secs.into());
        if let Some(why) = &guess.skipped {
            line.insert("skipped".into(), why.clone().into());
        }
    }
    summary.skipped = guesses.iter().filter(|g| g.skipped.is_some()).count();
    Ok(Some((lines, summary)))
}

/// Answers every question of the dev file `dev` with the checkpoint in `model_dir` (greedily, with the chat
/// template it carries, `bessie-eval`'s settings) and scores them: how the demo shows what its model learned.
pub fn evaluate_checkpoint(model_dir: &Path, dev: &Path, device: &candle_core::Device) -> Result<Summary> {
    let examples = read_dev(dev, None)?;
    let model = crate::model::load(model_dir, device)?;
    let tok = Tokenizer::from_dir(model_dir)?;
    tok.check_fits(model.cfg.vocab_size, &model_dir.join("config.json"))?;
    let choice = crate::tokenizer::template::TemplateChoice::Auto;
    let template = ChatTemplate::load(&choice, model_dir, &tok, None)?;
    let name = model_dir.display().to_string();
    let settings = Settings { batch_size: 32, max_new_tokens: 50, model_name: &name };
    let comm = Communicator::Single;
    let scored = evaluate(&model, &tok, &template, &examples, BTreeMap::new(), &settings, &comm, |_| Ok(()), |_| {})?;
    Ok(scored.context("a single process scores its own answers")?.1)
}

/// Re-scores the first `limit` lines of a `bessie-eval` output (their `guess` against their `answers`; a
/// line with a `skipped` field was not answered and scores `Score::UNANSWERED`).
pub fn rescore(predictions: &Path, limit: Option<usize>) -> Result<Scored> {
    let examples = read_dev(predictions, limit)?;
    let guesses = examples
        .iter()
        .map(|ex| if ex.fields.contains_key("skipped") { Ok(None) } else { ex.guess().map(Some) })
        .collect::<Result<Vec<_>>>()?;
    let (lines, mut summary) = score_all(examples.iter().zip(guesses), None)?;
    summary.skipped = examples.iter().filter(|ex| ex.fields.contains_key("skipped")).count();
    Ok((lines, summary))
}

/// Writes one JSON object a line, replacing `out` only once all is written.
pub fn write_lines(out: &Path, lines: &[Map<String, Value>]) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(line)?);
        text.push('\n');
    }
    crate::model::hf::write_atomic(out, |tmp| Ok(std::fs::write(tmp, text)?))
}

/// Where the summary of the output `out` goes: beside it, named after it (`eval.jsonl` ->
/// `eval_summary.json`), so that two evaluations in one folder keep their own.
pub fn summary_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}_summary.json"))
}

/// Writes the summary of the output `out` (`summary_path`); returns its path.
pub fn write_summary(out: &Path, summary: &Summary) -> Result<PathBuf> {
    let path = summary_path(out);
    let text = serde_json::to_string_pretty(summary)? + "\n";
    crate::model::hf::write_atomic(&path, |tmp| Ok(std::fs::write(tmp, text)?))?;
    Ok(path)
}

/// The speed block of the summary an earlier run wrote for `out`, if any: re-scoring its predictions
/// keeps how fast they were generated.
pub fn earlier_speed(out: &Path) -> Option<Speed> {
    let text = std::fs::read(summary_path(out)).ok()?;
    serde_json::from_slice::<Summary>(&text).ok()?.speed
}

/// Whether two paths name the same file, also through links (None when either does not exist).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// What an evaluation's partial output must share with the run that continues it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialHeader {
    pub model: String,
    pub dev: String,
    pub max_new_tokens: usize,
    /// The chat template chosen (`--template`).
    pub template: String,
    pub system: Option<String>,
}

/// One answer in the partial output.
#[derive(Serialize, Deserialize)]
struct PartialLine {
    index: usize,
    #[serde(flatten)]
    guess: Guess,
}

/// `OUT.partial`: the answers of an evaluation in progress, one JSON line each as soon as its batch is
/// done (after a header line), so that `--resume` continues a killed evaluation; removed once `OUT` is
/// written.
pub struct PartialOutput {
    path: PathBuf,
    file: std::fs::File,
}

impl PartialOutput {
    pub fn path_for(out: &Path) -> PathBuf {
        let mut p = out.as_os_str().to_owned();
        p.push(".partial");
        PathBuf::from(p)
    }

    /// Starts the partial output of `out`, or with `resume` continues an existing one; returns the
    /// answers it holds (those of the first `questions` questions). An existing one without `resume` is
    /// an error: it holds answers a new run would throw away.
    pub fn open(
        out: &Path,
        header: &PartialHeader,
        resume: bool,
        questions: usize,
    ) -> Result<(Self, BTreeMap<usize, Guess>)> {
        use std::io::Write;
        let path = Self::path_for(out);
        let mut done = BTreeMap::new();
        let existing = match std::fs::read(&path) {
            // Killed before its header was complete: it holds no answers.
            Ok(bytes) if !bytes.contains(&b'\n') => {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                None
            }
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let Some(bytes) = existing else {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(file, "{}", serde_json::json!({ "bessie_eval": header }))?;
            return Ok((Self { path, file }, done));
        };
        let count = bytes.iter().filter(|&&b| b == b'\n').count().saturating_sub(1);
        if !resume {
            bail!(
                "{} holds {count} answers of an interrupted evaluation: pass --resume to continue it, or delete \
                 it to start over",
                path.display()
            );
        }
        // Complete lines only: a kill mid-write leaves a partial last line, which is answered again.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut lines = std::str::from_utf8(&bytes[..complete])
            .with_context(|| format!("{}: not UTF-8", path.display()))?
            .lines()
            .enumerate();
        #[derive(Deserialize)]
        struct Header {
            bessie_eval: PartialHeader,
        }
        let saved: Header = lines
            .next()
            .and_then(|(_, l)| serde_json::from_str(l).ok())
            .with_context(|| format!("{}:1: not the header of a bessie-eval partial output", path.display()))?;
        let saved = saved.bessie_eval;
        if &saved != header {
            bail!(
                "{} was written by another evaluation ({}); resume with the same model, dev file, \
                 --max-new-tokens, --template and --system, or delete it to start over",
                path.display(),
                serde_json::to_string(&saved)?
            );
        }
        for (n, line) in lines {
            let l: PartialLine = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: malformed answer", path.display(), n + 1))?;
            if l.index < questions {
                done.insert(l.index, l.guess);
            }
        }
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        file.set_len(complete as u64)?;
        let mut file = std::fs::OpenOptions::new().append(true).open(&path)?;
        file.flush()?;
        Ok((Self { path, file }, done))
    }

    /// Appends answers, on disk before it returns.
    pub fn append(&mut self, answers: &[(usize, Guess)]) -> Result<()> {
        use std::io::Write;
        let mut text = String::new();
        for (index, guess) in answers {
            text += &serde_json::to_string(&PartialLine { index: *index, guess: guess.clone() })?;
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Removes the partial output once the output holds everything.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_file(&self.path).with_context(|| format!("removing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::progress_line;

    #[test]
    fn progress_lines_give_the_rate_and_the_time_left() {
        assert_eq!(progress_line(0, 512, 0.0), "0/512 questions, 0.0 questions/s, unknown left");
        assert_eq!(progress_line(32, 512, 4.0), "32/512 questions, 8.0 questions/s, 1 min 00 s left");
        assert_eq!(progress_line(100, 11873, 10.0), "100/11873 questions, 10.0 questions/s, 19 min 37 s left");
        assert_eq!(progress_line(3, 11873, 10.0), "3/11873 questions, 0.3 questions/s, 10 h 59 min left");
        assert_eq!(progress_line(512, 512, 4.7), "512/512 questions, 108.9 questions/s, 0 s left");
    }
}
