//! SQuAD v2 scoring, batched generation against one-at-a-time generation, `bessie-eval` end to end
//! (generation, then `--predictions` re-scoring), and the dev-file errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bessie::eval::{self, merge_shards, normalize_answer, score, shard, Score, Summary};
use bessie::generate::{generate, ContinuousBatch, Sampler, Stop, StopReason};
use bessie::model::hf::{self, Layout};
use bessie::model::init::random_weights;
use bessie::model::KvCache;
use bessie::tokenizer::template::{ChatTemplate, Message};
use bessie::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};

fn answers(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// (exact match, F1, original check) of `guess`. Expected normalizations were checked against the
/// official script's `normalize_answer` in Python.
fn s(guess: &str, gold: &[&str]) -> (f64, f64, bool) {
    let Score { exact_match, f1, is_correct } = score(guess, &answers(gold));
    (exact_match, (f1 * 1e6).round() / 1e6, is_correct)
}

#[test]
fn normalization_follows_the_official_script() {
    for (text, normalized) in [
        ("The Denver Broncos!", "denver broncos"),
        ("  a\tan \n the  ", ""),
        ("theater anthem Thebes", "theater anthem thebes"),
        ("A-team's (1983)", "ateams 1983"),
        ("a.k.a. the", "aka"),
        ("the—cat", "—cat"),
        // Curly quotes are not ASCII punctuation but do delimit words.
        ("“The” cow", "“ ” cow"),
        ("ZÜRICH, Straße", "zürich straße"),
        ("東京 the 大学", "東京 大学"),
        ("snake_case", "snakecase"),
        ("", ""),
    ] {
        assert_eq!(normalize_answer(text), normalized, "{text:?}");
    }
}

#[test]
fn exact_match_and_f1_take_the_best_gold_answer() {
    assert_eq!(s("Denver Broncos", &["Broncos", "The Denver Broncos", "Denver"]), (1.0, 1.0, false));
    assert_eq!(s("the broncos", &["Broncos"]), (1.0, 1.0, false));
    assert_eq!(s("broncos", &["BRONCOS"]), (1.0, 1.0, true));
    // guess {broncos, of, denver} against {denver, broncos}: precision 2/3, recall 1.
    assert_eq!(s("the Broncos of Denver", &["Denver Broncos"]), (0.0, 0.8, false));
    assert_eq!(s("the Broncos of Denver", &["Broncos", "Denver Broncos"]), (0.0, 0.8, false));
    // Tokens count as multisets: {x, x, y} against {x, y, y} share two.
    assert_eq!(s("x x y", &["x y y"]), (0.0, 0.666667, false));
    assert_eq!(s("Paris.", &["Paris"]), (1.0, 1.0, false));
    assert_eq!(s("Lisbon", &["Paris"]), (0.0, 0.0, false));
}

#[test]
fn unanswerable_questions_need_not_in_context() {
    assert_eq!(s("Not in context.", &[]), (1.0, 1.0, true));
    assert_eq!(s("  not in CONTEXT ", &[]), (1.0, 1.0, true));
    // The original's check only looks for the phrase; the official one wants the abstention alone.
    assert_eq!(s("It is not in context.", &[]), (0.0, 0.0, true));
    assert_eq!(s("Paris", &[]), (0.0, 0.0, false));
    // Gold answers that normalize to nothing leave the question unanswerable, as in the official script.
    assert_eq!(s("Not in context.", &["The", "."]), (1.0, 1.0, false));
    // Abstaining on an answerable question scores like an empty guess, not partially ("in context").
    assert_eq!(s("Not in context.", &["in context"]), (0.0, 0.0, false));
}

/// An empty guess, or one that normalizes to nothing, is the official empty prediction: right on an
/// unanswerable question (as is the abstention), wrong on an answerable one.
#[test]
fn empty_guesses_abstain_as_in_the_official_script() {
    assert_eq!(s("", &[]), (1.0, 1.0, false));
    assert_eq!(s("The.", &[]), (1.0, 1.0, false));
    assert_eq!(s(" ... ", &["the", "."]), (1.0, 1.0, false));
    assert_eq!(s("", &["Paris"]), (0.0, 0.0, false));
    assert_eq!(s("The.", &["Paris"]), (0.0, 0.0, false));
    // A question that was not answered (its prompt too long) is no prediction: wrong either way.
    let unanswered =
        eval::DevExample { at: "dev.jsonl:1".into(), fields: Default::default(), prompt: "p".into(), answers: vec![] };
    let (line, score) = unanswered.scored(None);
    assert_eq!((score, &line["guess"]), (Score::UNANSWERED, &"".into()));
}

#[test]
fn unicode_answers_match_after_lower_casing() {
    assert_eq!(s("ZÜRICH", &["Zürich"]), (1.0, 1.0, true));
    assert_eq!(s("Lake Zürich", &["Zürich"]), (0.0, 0.666667, false));
    assert_eq!(s("東京", &["東京"]), (1.0, 1.0, true));
    // A final capital sigma lower-cases to ς, as with Python's lower().
    assert_eq!(s("ΟΔΟΣ", &["οδος"]), (1.0, 1.0, true));
}

#[test]
fn summary_splits_and_table() {
    let scores = [
        (true, score("Paris", &answers(&["Paris"]))),
        (true, score("the Broncos of Denver", &answers(&["Denver Broncos"]))),
        (false, score("Not in context.", &[])),
        (false, score("Paris", &[])),
    ];
    let summary = Summary::new(&scores, None).unwrap();
    assert_eq!(summary.overall.count, 4);
    assert!((summary.overall.f1 - 100.0 * (1.0 + 0.8 + 1.0) / 4.0).abs() < 1e-9);
    assert_eq!(summary.overall.exact_match, 50.0);
    let has = summary.has_ans.as_ref().unwrap();
    assert_eq!((has.count, has.exact_match, has.original_accuracy), (2, 50.0, 50.0));
    let no = summary.no_ans.as_ref().unwrap();
    assert_eq!((no.count, no.exact_match, no.f1), (2, 50.0, 50.0));
    let table = summary.to_string();
    for row in ["HasAns", "NoAns", "overall", "90.00"] {
        assert!(table.contains(row), "{table}");
    }
    let json = serde_json::to_string(&summary).unwrap();
    assert_eq!(serde_json::from_str::<Summary>(&json).unwrap(), summary);
    assert!(!json.contains("speed"), "{json}");

    let only_answerable = Summary::new(&scores[..2], None).unwrap();
    assert!(only_answerable.no_ans.is_none() && !only_answerable.to_string().contains("NoAns"));
    assert!(Summary::new(&[], None).is_err());
}

/// What SQuAD v2's official functions (tests/reference/squad_official.py) say of one case.
struct Official {
    exact: f64,
    f1: f64,
    guess_normalized: String,
    answers_normalized: Vec<String>,
}

/// Runs the official functions on `cases` (guess, answers) with Bessie's abstention mapped to the official
/// empty prediction (`--abstention`); returns each case's scores and the official summary of them all.
/// Fails, not skips, without python3 or the script.
fn official(cases: &[(String, Vec<String>)]) -> (Vec<Official>, serde_json::Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/squad_official.py");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.jsonl");
    let text: String =
        cases.iter().map(|(g, a)| serde_json::json!({"guess": g, "answers": a}).to_string() + "\n").collect();
    std::fs::write(&input, text).unwrap();
    let run = Command::new("python3")
        .arg(script)
        .args(["--abstention", bessie::squad::NOT_IN_CONTEXT])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .expect("running python3 (the official SQuAD v2 scoring needs nothing beyond its standard library)");
    assert!(run.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&run.stderr));
    let mut lines: Vec<serde_json::Value> =
        String::from_utf8(run.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.pop().expect("a summary line")["summary"].take();
    assert_eq!(lines.len(), cases.len(), "one line per case");
    let bits = |v: &serde_json::Value| f64::from_bits(v.as_u64().expect("IEEE-754 bits"));
    let lines = lines
        .into_iter()
        .map(|l| Official {
            exact: l["exact"].as_f64().unwrap(),
            f1: bits(&l["f1_bits"]),
            guess_normalized: l["guess_normalized"].as_str().unwrap().into(),
            answers_normalized: serde_json::from_value(l["answers_normalized"].clone()).unwrap(),
        })
        .collect();
    (lines, summary)
}

/// Pieces of the random texts: articles, the abstention's words, ASCII and Unicode punctuation, every
/// character Python's `str.split()` splits on (U+001C..U+001F, U+0085 and U+00A0 among them) and a few
/// it does not (U+200B, U+180E, U+FEFF), accents precomposed and combining, letters that lower-case
/// specially (Σ, İ, ß, ǅ, the Kelvin sign), digits and other numbers, and marks and symbols that Rust
/// calls alphabetic but Python's `\w` does not (ⓐ, the Devanagari vowel sign ा).
const ATOMS: &[&str] = &[
    "a", "an", "the", "The", "THE", "A", "An", "aN", "not", "Not", "in", "context", "Context", "n", "o", "t", "h", "e",
    "x", "é", "É", "e\u{301}", "Zürich", "Σ", "σ", "ς", "ΟΔΟΣ", "ß", "İ", "ǅ", "\u{212a}", "ⓐ", "\u{93e}", "東", "1",
    "9", "²", "½", "Ⅻ", "٣", "_", "'", ".", ",", "-", "!", "(", "\"", "“", "”", "—", "¿", "«", "·", " ", " ", " ",
    "  ", "\t", "\n", "\u{b}", "\u{c}", "\r", "\u{1c}", "\u{1d}", "\u{1e}", "\u{1f}", "\u{85}", "\u{a0}", "\u{1680}",
    "\u{2000}", "\u{2009}", "\u{200a}", "\u{2028}", "\u{2029}", "\u{202f}", "\u{205f}", "\u{3000}", "\u{200b}",
    "\u{180e}", "\u{feff}", "\u{0}",
];

/// Up to `max_atoms` atoms, every other one a space half of the time so that texts have several tokens.
fn random_text(rng: &mut bessie::rng::Rng, max_atoms: u64) -> String {
    let n = rng.next_u64() % (max_atoms + 1);
    (0..n)
        .map(|i| match rng.next_u64() % 4 {
            0 | 1 if i % 2 == 1 => " ",
            _ => ATOMS[(rng.next_u64() % ATOMS.len() as u64) as usize],
        })
        .collect()
}

/// Cases built by hand: empty and empty-normalizing guesses and answers, the abstention's variants,
/// duplicates, Unicode whitespace and punctuation, accents, numbers, mixed case.
fn edge_cases() -> Vec<(String, Vec<String>)> {
    let cases: &[(&str, &[&str])] = &[
        ("", &[]),
        ("", &[""]),
        ("", &["", " ", "\u{a0}"]),
        ("", &["Paris"]),
        ("", &["Paris", "the"]),
        ("The.", &[]),
        ("The.", &["Paris"]),
        ("The.", &["The"]),
        (".", &[]),
        ("a an the", &[]),
        ("!!!", &["..."]),
        ("!!!", &["...", "Paris"]),
        ("Paris", &["the", "."]),
        ("Paris", &[]),
        ("Not in context.", &[]),
        ("Not in context.", &["The", "."]),
        ("Not in context.", &["Paris"]),
        ("Not in context.", &["in context"]),
        ("Not in context.", &["Not in context."]),
        ("not in context", &["not in context", "Paris"]),
        ("NOT IN CONTEXT!!", &[]),
        ("Not in the context.", &[]),
        ("The not in a context", &[]),
        ("Not\u{a0}in\u{3000}context\u{1c}", &[]),
        ("Not in context\u{200b}", &[]),
        ("It is not in context.", &[]),
        ("Not in context. Paris", &["Paris"]),
        ("Not-in-context", &[]),
        ("Paris", &["Paris", "Paris"]),
        ("Paris France", &["paris", "Paris", "france paris", "paris"]),
        ("the Broncos of Denver", &["Denver Broncos", "Denver Broncos", "Broncos"]),
        ("x x y", &["x y y", "x y y"]),
        ("x\u{1c}y", &["x y"]),
        ("x\u{1f}y", &["x y"]),
        ("x\u{85}y", &["x y"]),
        ("x\u{a0}y\u{2028}z", &["x y z"]),
        ("x\u{200b}y", &["x y", "x\u{200b}y"]),
        ("x\u{180e}y", &["x y"]),
        ("x\u{feff}y", &["xy"]),
        ("the\u{1c}cat", &["cat"]),
        ("the\u{200b}cat", &["cat", "\u{200b}cat"]),
        ("Zürich", &["ZÜRICH"]),
        ("Zu\u{308}rich", &["Zürich"]),
        ("café", &["CAFÉ", "cafe"]),
        ("a\u{301} b", &["b"]),
        ("1,000", &["1000"]),
        ("3.14", &["314"]),
        ("½ cup", &["1/2 cup"]),
        ("x²", &["x2"]),
        ("٣ cows", &["3 cows"]),
        ("ThE BeAtLeS", &["beatles"]),
        ("ΟΔΟΣ.", &["οδος"]),
        ("ΑΣ ΣΑ Σ", &["ας σα σ"]),
        ("ΑΣ.Β", &["ασβ", "ας β"]),
        ("İstanbul", &["istanbul", "i\u{307}stanbul"]),
        ("STRASSE", &["straße"]),
        ("ǅemal", &["ǆemal"]),
        ("\u{212a}elvin", &["kelvin"]),
        ("theⓐ", &["ⓐ"]),
        ("aⓐ the", &["ⓐ"]),
        ("a\u{93e}", &["\u{93e}"]),
        ("the_end", &["theend"]),
        ("“The” cow", &["cow", "“ ” cow"]),
        ("the—cat", &["—cat"]),
        ("A-team's (1983)", &["ateams 1983"]),
        ("東京 the 大学", &["東京大学", "東京 大学"]),
        ("Denver Broncos", &["The Denver Broncos!", "Denver Broncos", "The"]),
        ("\u{0}", &["\u{0}"]),
    ];
    cases.iter().map(|(g, a)| (g.to_string(), answers(a))).collect()
}

/// Edge cases and thousands of random ones over a small alphabet (`ATOMS`): random texts, answers that
/// repeat or recase the guess, duplicates, the abstention with noise around it.
fn oracle_cases() -> Vec<(String, Vec<String>)> {
    let mut rng = bessie::rng::Rng::new(2018);
    let mut cases = edge_cases();
    for _ in 0..5000 {
        let mut answers: Vec<String> = Vec::new();
        let n = [0, 0, 1, 1, 2, 3, 4][(rng.next_u64() % 7) as usize];
        for _ in 0..n {
            answers.push(match rng.next_u64() % 4 {
                0 if !answers.is_empty() => answers[(rng.next_u64() % answers.len() as u64) as usize].clone(),
                _ => random_text(&mut rng, 6),
            });
        }
        let guess = match rng.next_u64() % 8 {
            0 => format!("{}Not in context{}", random_text(&mut rng, 2), random_text(&mut rng, 2)),
            1 if !answers.is_empty() => {
                let a = &answers[(rng.next_u64() % answers.len() as u64) as usize];
                let a = if rng.next_u64().is_multiple_of(2) { a.to_uppercase() } else { a.clone() };
                format!("{}{a}{}", random_text(&mut rng, 2), random_text(&mut rng, 2))
            }
            // Some of an answer's words and some others: partial overlaps.
            2 | 3 if !answers.is_empty() => {
                let a = &answers[(rng.next_u64() % answers.len() as u64) as usize];
                let mut words: Vec<String> =
                    a.split(' ').filter(|_| !rng.next_u64().is_multiple_of(3)).map(str::to_string).collect();
                words.push(random_text(&mut rng, 3));
                words.join(" ")
            }
            _ => random_text(&mut rng, 8),
        };
        cases.push((guess, answers));
    }
    cases
}

/// Bessie's normalization, exact match, F1 (to the bit) and summary equal those of SQuAD v2's official
/// evaluation script (its functions transcribed in tests/reference/squad_official.py, run with python3),
/// with "Not in context." mapped to the official empty prediction, on every edge and random case.
#[test]
fn scores_equal_the_official_script() {
    let cases = oracle_cases();
    let (truth, summary) = official(&cases);
    let mut wrong = Vec::new();
    let mut scores = Vec::new();
    for ((guess, gold), want) in cases.iter().zip(&truth) {
        let got = score(guess, gold);
        let normalized: Vec<String> = gold.iter().map(|a| normalize_answer(a)).collect();
        if normalize_answer(guess) != want.guess_normalized
            || normalized != want.answers_normalized
            || got.exact_match != want.exact
            || got.f1.to_bits() != want.f1.to_bits()
        {
            wrong.push(format!(
                "guess {guess:?} answers {gold:?}: Bessie EM {} F1 {} normalized {:?} {normalized:?}, official EM {} \
                 F1 {} normalized {:?} {:?}",
                got.exact_match,
                got.f1,
                normalize_answer(guess),
                want.exact,
                want.f1,
                want.guess_normalized,
                want.answers_normalized
            ));
        }
        scores.push((!gold.is_empty(), got));
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
    // The cases reach every branch: both EM values, fractional F1, abstentions on both kinds of question.
    let has = |f: &dyn Fn(&Official) -> bool| truth.iter().filter(|t| f(t)).count();
    assert!(has(&|t| t.exact == 1.0) > 300 && has(&|t| t.exact == 0.0) > 300, "EM is rarely 0 or 1");
    assert!(has(&|t| t.f1 > 0.0 && t.f1 < 1.0) > 300, "few partial F1 scores");
    assert!(
        cases.iter().zip(&truth).filter(|((g, a), t)| a.is_empty() && t.exact == 1.0 && !g.is_empty()).count() > 100
    );

    let ours = Summary::new(&scores, None).unwrap();
    let splits = [("", Some(&ours.overall)), ("HasAns_", ours.has_ans.as_ref()), ("NoAns_", ours.no_ans.as_ref())];
    for (prefix, split) in splits {
        let split = split.unwrap();
        let bits = |k: &str| f64::from_bits(summary[format!("{prefix}{k}_bits")].as_u64().unwrap());
        assert_eq!(split.count as u64, summary[format!("{prefix}total")].as_u64().unwrap(), "{prefix}total");
        assert_eq!(
            split.exact_match.to_bits(),
            bits("exact").to_bits(),
            "{prefix}exact: {} vs {}",
            split.exact_match,
            bits("exact")
        );
        assert_eq!(split.f1.to_bits(), bits("f1").to_bits(), "{prefix}f1: {} vs {}", split.f1, bits("f1"));
    }
}

#[test]
fn shards_merge_back_in_input_order() {
    let items: Vec<u32> = (0..10).collect();
    for world in 1..=4 {
        let shards: Vec<Vec<u32>> = (0..world).map(|rank| shard(&items, rank, world)).collect();
        assert_eq!(merge_shards(shards), items, "world {world}");
    }
}

/// A random tiny model whose projections are scaled up (sharper attention, larger updates to the
/// residual stream) and whose head is untied, so its greedy tokens depend on the context instead of
/// repeating one token.
fn tiny_model(seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_checkpoint(dir.path(), seed);
    cfg.tie_word_embeddings = false;
    let weights: Vec<_> = random_weights(&cfg, seed)
        .unwrap()
        .into_iter()
        .map(
            |(n, t)| {
                if n.ends_with("proj.weight") || n == "lm_head.weight" {
                    (n, (t * 10.0).unwrap())
                } else {
                    (n, t)
                }
            },
        )
        .collect();
    hf::save(dir.path(), &cfg, &weights, DType::F32, Layout::Safetensors, &[]).unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// The tiny model of `tiny_model(5)` on the CPU, its tokenizer and Bessie's template (the directory kept
/// alive with them).
fn chat_model() -> (tempfile::TempDir, bessie::model::BitNet, Tokenizer, ChatTemplate) {
    let (d, dir) = tiny_model(5);
    let model = bessie::model::load(&dir, &Device::Cpu).unwrap();
    (d, model, Tokenizer::from_dir(&dir).unwrap(), ChatTemplate::bessie(None))
}

/// The logits `[rows][vocab]` after the last column of a forward's hidden states `[rows, t, hidden]`.
fn last_logits(model: &bessie::model::BitNet, hidden: Tensor) -> Vec<Vec<f32>> {
    let last = hidden.narrow(1, hidden.dim(1).unwrap() - 1, 1).unwrap().squeeze(1).unwrap();
    model.logits(&last).unwrap().to_vec2().unwrap()
}

/// The largest difference between two rows of logits.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

const QUESTIONS: [&str; 7] = [
    "Moo?",
    "What do cows eat in winter when the grass is covered by snow?",
    "Name the oxen.",
    "Context: Cattle are large domesticated bovines. The Oxen of Oxford pull carts.\n\nQuestion: What do they pull?",
    "Why?",
    "How many stomachs does a cow have, and what does each of them do?",
    "Say hello to Bessie the BitNet, the cow who answers questions.",
];

/// The logits of a left-padded batch equal each row's alone (up to the summation order of the head's
/// matmul, ~1e-7), after the prompt and after a decoding step: padding is hidden from every real token.
/// (Outputs cannot tell per-row RoPE positions from shared ones: attention depends on relative positions
/// only, and the int8 activation codes absorb the rounding differences.)
#[test]
fn padded_batch_forward_equals_each_row_alone() {
    let (_d, model, _, _) = chat_model();
    let rows: [&[u32]; 3] = [&[1, 50, 60, 70, 80, 90, 100], &[1, 7], &[1, 300, 301, 302]];
    let width = rows.iter().map(|r| r.len()).max().unwrap();
    let padded: Vec<u32> =
        rows.iter().flat_map(|r| std::iter::repeat_n(0, width - r.len()).chain(r.iter().copied())).collect();
    let mut cache = KvCache::left_padded(&model.cfg, rows.iter().map(|r| width - r.len()).collect());
    let last = |h: Tensor| last_logits(&model, h);
    let x = Tensor::from_vec(padded, (rows.len(), width), &Device::Cpu).unwrap();
    let prefill = last(model.forward(&x, &mut cache).unwrap());
    let next = Tensor::new(&[[5u32], [6], [7]], &Device::Cpu).unwrap();
    let step = last(model.forward(&next, &mut cache).unwrap());
    for (r, ids) in rows.iter().enumerate() {
        let mut alone = KvCache::new(&model.cfg);
        let x = Tensor::new(*ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let first = last(model.forward(&x, &mut alone).unwrap());
        let x = Tensor::new(&[[5 + r as u32]], &Device::Cpu).unwrap();
        let second = last(model.forward(&x, &mut alone).unwrap());
        let (d1, d2) = (max_diff(&first[0], &prefill[r]), max_diff(&second[0], &step[r]));
        assert!(d1 < 1e-5 && d2 < 1e-5, "row {r}: logits differ by {d1:e} after the prompt, {d2:e} after a step");
    }
}

/// Rows refilled with new prompts while others decode compute what each prompt computes alone, through
/// every move of the cache: a prompt wider than the cache's columns (which then move right), prompts
/// right-aligned beside rows mid-answer, and a full buffer whose columns before every row's start are
/// dropped (the columns move left). Logits after each prefill and each step, to 1e-5.
#[test]
fn a_refilled_cache_equals_each_prompt_alone() {
    let (_d, model, _, _) = chat_model();
    let cfg = &model.cfg;
    let dev = Device::Cpu;
    let last = |h: Tensor| last_logits(&model, h);
    // Each prompt alone: its cache and the logits after each token fed so far.
    struct Alone {
        cache: KvCache,
        logits: Vec<f32>,
    }
    let alone = |ids: &[u32]| {
        let mut cache = KvCache::new(cfg);
        let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let logits = last(model.forward(&x, &mut cache).unwrap()).remove(0);
        Alone { cache, logits }
    };
    let feed = |a: &mut Alone, id: u32| {
        let x = Tensor::new(&[[id]], &dev).unwrap();
        a.logits = last(model.forward(&x, &mut a.cache).unwrap()).remove(0);
    };
    let check = |what: &str, batched: &[f32], a: &Alone| {
        let d = max_diff(batched, &a.logits);
        assert!(d < 1e-5, "{what}: logits differ by {d:e}");
    };
    // A prompt prefilled alone for admission: its cache (exactly its width) and its last logits.
    let prefill = |ids: &[u32]| {
        let mut cache = KvCache::left_padded(cfg, vec![0]).with_capacity(ids.len());
        let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let logits = last(model.forward(&x, &mut cache).unwrap()).remove(0);
        (cache, logits)
    };
    let (pa, pb, pd, pe): (&[u32], &[u32], &[u32], &[u32]) =
        (&[1, 50, 60, 70, 80, 90, 100], &[1, 7], &[1, 9, 10], &[1, 11]);
    let pc: &[u32] = &[1, 300, 301, 302, 303, 304, 305, 306, 307, 308];
    // Rows A and B, left-padded, in a buffer of 12 columns.
    let mut cache = KvCache::left_padded(cfg, vec![0, 5]).with_capacity(12);
    let x = Tensor::new(&[[1u32, 50, 60, 70, 80, 90, 100], [0, 0, 0, 0, 0, 1, 7]], &dev).unwrap();
    let out = last(model.forward(&x, &mut cache).unwrap());
    let (mut a, mut b) = (alone(pa), alone(pb));
    check("A's prompt", &out[0], &a);
    check("B's prompt", &out[1], &b);
    let step = |cache: &mut KvCache, ids: [u32; 2]| -> Vec<Vec<f32>> {
        let x = Tensor::new(&[[ids[0]], [ids[1]]], &dev).unwrap();
        last(model.forward(&x, cache).unwrap())
    };
    let out = step(&mut cache, [5, 6]);
    feed(&mut a, 5);
    feed(&mut b, 6);
    check("A, step 1", &out[0], &a);
    check("B, step 1", &out[1], &b);
    assert_eq!(cache.len(), 8);
    // B ends; C (10 tokens, wider than the cache's 8 columns) takes its row: the columns move right.
    cache.retire(1);
    let (c_cache, c_logits) = prefill(pc);
    let mut c = alone(pc);
    check("C's prompt, prefilled for admission", &c_logits, &c);
    cache.admit(&[1], &c_cache).unwrap();
    assert_eq!((cache.len(), cache.row_len(0), cache.row_len(1)), (10, 8, 10));
    let out = step(&mut cache, [7, 8]);
    feed(&mut a, 7);
    feed(&mut c, 8);
    check("A beside the admitted C", &out[0], &a);
    check("C admitted beside A", &out[1], &c);
    // A and C end; D and E take their rows, right-aligned to column 11.
    let (mut d, mut e) = (alone(pd), alone(pe));
    for (row, ids) in [(0, pd), (1, pe)] {
        cache.retire(row);
        cache.admit(&[row], &prefill(ids).0).unwrap();
    }
    assert_eq!((cache.len(), cache.row_len(0), cache.row_len(1)), (11, 3, 2));
    // Column 12 fills the buffer; column 13 needs the columns before D's start dropped.
    for (i, ids) in [[20u32, 21], [22, 23], [24, 25], [26, 27]].into_iter().enumerate() {
        let out = step(&mut cache, ids);
        feed(&mut d, ids[0]);
        feed(&mut e, ids[1]);
        check(&format!("D, step {i}"), &out[0], &d);
        check(&format!("E, step {i}"), &out[1], &e);
    }
    assert_eq!((cache.len(), cache.row_len(0), cache.row_len(1)), (7, 7, 6), "the columns before D moved out");
}

/// A prefill run a chunk of columns at a time (what generation does, so that attention's scores stay a
/// chunk's) equals one forward over the whole prompt: left-padded prompts of 1,100 and 700 tokens, chunks
/// of 512 and of 97 columns. The logits after the prefill agree to 1e-4 of the largest; after a step to 2%
/// relative RMS with the same greedy token, as a chunk's sums run in another order and can flip an int8
/// activation code of a cached position at a rounding tie (measured after the step: 1.6e-7 with chunks of 97,
/// 8.8e-3 for one row with chunks of 512; after the prefill, 1.6e-5 of the largest logit on a CPU with
/// AVX-512, whose matrix products sum in another order, against under 1e-6 without it).
#[test]
fn a_prefill_in_chunks_equals_one_forward() {
    let (_d, model, _, _) = chat_model();
    let dev = Device::Cpu;
    let long: Vec<u32> = (0..1100).map(|i| 3 + (i * 37 % 900) as u32).collect();
    let short = &long[..700];
    let x: Vec<u32> = long.iter().copied().chain(std::iter::repeat_n(0, 400)).chain(short.iter().copied()).collect();
    let x = Tensor::from_vec(x, (2, 1100), &dev).unwrap();
    let step = Tensor::new(&[[5u32], [6]], &dev).unwrap();
    let mut whole = KvCache::left_padded(&model.cfg, vec![0, 400]);
    let want = last_logits(&model, model.forward(&x, &mut whole).unwrap());
    let want_step = last_logits(&model, model.forward(&step, &mut whole).unwrap());
    for chunk in [512, 97] {
        let mut cache = KvCache::left_padded(&model.cfg, vec![0, 400]);
        let got = model.logits(&model.forward_last(&x, &mut cache, chunk).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let got_step = last_logits(&model, model.forward(&step, &mut cache).unwrap());
        for r in 0..2 {
            let (d1, d2) = (max_diff(&got[r], &want[r]), max_diff(&got_step[r], &want_step[r]));
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let diff: Vec<f32> = got_step[r].iter().zip(&want_step[r]).map(|(a, b)| a - b).collect();
            let rel = norm(&diff) / norm(&want_step[r]);
            let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let largest = want[r].iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(d1 < 1e-4 * largest, "chunks of {chunk}, row {r}: logits after the prefill differ by {d1:e}");
            assert!(rel < 2e-2, "chunks of {chunk}, row {r}: logits after a step differ by {d2:e} ({rel:e} relative)");
            assert_eq!(argmax(&got_step[r]), argmax(&want_step[r]), "chunks of {chunk}, row {r}");
        }
    }
}

/// Prompts that begin with the same tokens share that prefix's keys and values, run once: each row starts
/// with a copy of them, then its own rest left-padded after them (a gap its tokens skip). Every row's
/// logits equal its prompt's alone, after the prefill, after two steps, and once moved into another cache
/// beside a row mid-answer, to 1e-5.
#[test]
fn a_shared_prefix_equals_each_prompt_alone() {
    let (_d, model, _, _) = chat_model();
    let cfg = &model.cfg;
    let dev = Device::Cpu;
    let last = |h: Tensor| last_logits(&model, h);
    let run = |ids: &[u32], cache: &mut KvCache| {
        last(model.forward(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap(), cache).unwrap())
    };
    let diff = max_diff;
    let prefix: Vec<u32> = (20..31).collect();
    let (a_own, b_own): (&[u32], &[u32]) = (&[40, 41, 42], &[50, 51, 52, 53, 54, 55]);
    let mut shared = KvCache::new(cfg);
    run(&prefix, &mut shared);
    let mut cache = KvCache::from_prefix(cfg, &shared, &[3, 0], 32).unwrap();
    let x = Tensor::new(&[[0u32, 0, 0, 40, 41, 42], [50, 51, 52, 53, 54, 55]], &dev).unwrap();
    let out = last(model.forward(&x, &mut cache).unwrap());
    let mut alone: Vec<(KvCache, Vec<f32>)> = [a_own, b_own]
        .iter()
        .map(|own| {
            let mut c = KvCache::new(cfg);
            let logits = run(&[&prefix[..], own].concat(), &mut c).remove(0);
            (c, logits)
        })
        .collect();
    for (r, (_, want)) in alone.iter().enumerate() {
        let d = diff(&out[r], want);
        assert!(d < 1e-5, "row {r} after the prefill: logits differ by {d:e}");
    }
    assert_eq!((cache.row_len(0), cache.row_len(1)), (14, 17));
    for step in 0..2u32 {
        let out = last(model.forward(&Tensor::new(&[[60 + step], [70 + step]], &dev).unwrap(), &mut cache).unwrap());
        for (r, (c, want)) in alone.iter_mut().enumerate() {
            *want = run(&[[60 + step, 70 + step][r]], c).remove(0);
            let d = diff(&out[r], want);
            assert!(d < 1e-5, "row {r}, step {step}: logits differ by {d:e}");
        }
    }
    // Row 0 (with its gap) moved into a wider cache beside a row of its own.
    let other: Vec<u32> = (100..125).collect();
    let mut other_alone = KvCache::new(cfg);
    run(&other, &mut other_alone);
    let mut wide = KvCache::new(cfg);
    let x = Tensor::new(&other[..], &dev).unwrap().unsqueeze(0).unwrap();
    let x = Tensor::cat(&[&x, &x], 0).unwrap();
    model.forward(&x, &mut wide).unwrap();
    wide.retire(1);
    let mut solo = cache.clone();
    solo.keep_rows(&[0]).unwrap();
    wide.admit(&[1], &solo).unwrap();
    let out = last(model.forward(&Tensor::new(&[[80u32], [81]], &dev).unwrap(), &mut wide).unwrap());
    let want_other = run(&[80], &mut other_alone).remove(0);
    let want_a = run(&[81], &mut alone[0].0).remove(0);
    let (d0, d1) = (diff(&out[0], &want_other), diff(&out[1], &want_a));
    assert!(d0 < 1e-5 && d1 < 1e-5, "after the move: logits differ by {d0:e} and {d1:e}");
}

/// A conversation keeps its KV cache between turns: from the second turn on, only what each prompt adds
/// is processed (the cache keeps the prefix the prompt shares with the last turn's ids, whatever the
/// template did to earlier turns), and every turn's tokens equal those of generating its prompt from
/// scratch. A reset conversation shares only the template's start, and reuses that.
#[test]
fn a_conversation_reuses_its_cache_and_answers_as_from_scratch() {
    use bessie::generate::Session;
    let (_d, model, tok, template) = chat_model();
    let stop = Stop::new(&tok, &template);
    let mut session = Session::new(&model, &tok, &stop);
    let mut conversation = Vec::new();
    for (turn, question) in QUESTIONS.iter().take(4).enumerate() {
        conversation.push(Message::new("user", question));
        let ids = template.prompt_ids(&tok, &conversation).unwrap();
        let fresh = generate(&model, &tok, &stop, &ids, 12, &mut Sampler::greedy(), |_| Ok(())).unwrap();
        let mut streamed = String::new();
        let g = session
            .generate(&ids, 12, &mut Sampler::greedy(), |text| {
                streamed.push_str(text);
                Ok(())
            })
            .unwrap();
        assert_eq!((&g.ids, &g.text, g.stop), (&fresh.ids, &fresh.text, fresh.stop), "turn {turn}");
        assert_eq!(streamed, g.text);
        assert_eq!((fresh.cached_tokens, g.prompt_tokens), (0, ids.len()));
        if turn == 0 {
            assert_eq!(g.cached_tokens, 0);
        } else {
            // At least the last turn's whole prompt (the rest of its answer, re-tokenized, may differ).
            let last = template.prompt_ids(&tok, &conversation[..conversation.len() - 2]).unwrap().len();
            assert!(g.cached_tokens >= last && g.cached_tokens < ids.len(), "turn {turn}: {} cached", g.cached_tokens);
            assert!(g.report().contains(&format!("({} cached)", g.cached_tokens)), "{}", g.report());
        }
        conversation.push(Message::new("assistant", &g.text));
    }
    let alone = template.prompt_ids(&tok, &[Message::new("user", QUESTIONS[5])]).unwrap();
    let g = session.generate(&alone, 12, &mut Sampler::greedy(), |_| Ok(())).unwrap();
    let fresh = generate(&model, &tok, &stop, &alone, 12, &mut Sampler::greedy(), |_| Ok(())).unwrap();
    assert_eq!(g.ids, fresh.ids);
    let system = template.prompt_ids(&tok, &[Message::new("user", "")]).unwrap();
    let shared = system.iter().zip(&alone).take_while(|(a, b)| a == b).count();
    assert!(g.cached_tokens >= shared.min(alone.len() - 1) && g.cached_tokens > 0, "{} cached", g.cached_tokens);
}

/// Continuous batching picks exactly the tokens one-at-a-time generation picks, for prompts of different
/// lengths in any order and batch sizes of 1, 2, 3 and 7, with rows refilled as answers end (one stops
/// early, at EOS) and enough prompts that the cache drops columns; eval's rounds return them in order.
#[test]
fn continuous_batching_equals_one_at_a_time() {
    let (_d, model, tok, template) = chat_model();
    let prompts: Vec<Vec<u32>> =
        QUESTIONS.iter().map(|q| template.prompt_ids(&tok, &[Message::new("user", q)]).unwrap()).collect();
    let stop = Stop::new(&tok, &template);
    let lengths: std::collections::BTreeSet<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lengths.len() >= 5, "prompts of different lengths: {lengths:?}");
    let max_new = 12;
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| generate(&model, &tok, &stop, p, max_new, &mut Sampler::greedy(), |_| Ok(())).unwrap())
        .collect();
    // Every prompt gets its own answer, and one stops early (EOS), so rows are refilled mid-answer.
    let distinct: std::collections::HashSet<&Vec<u32>> = alone.iter().map(|g| &g.ids).collect();
    assert_eq!(distinct.len(), QUESTIONS.len());
    assert!(alone.iter().any(|g| g.stop != StopReason::MaxNewTokens), "no early stop to test");
    // Enough rounds of the questions that a batch of 2 takes more steps than the cache's columns (twice
    // the longest prompt and answer), so its columns move left at least once.
    let (tokens, columns) = (alone.iter().map(|g| g.ids.len()).sum::<usize>(), 2 * (lengths.last().unwrap() + max_new));
    let rounds = (2 * columns).div_ceil(tokens) + 1;
    let many: Vec<Vec<u32>> = prompts.iter().cycle().take(rounds * prompts.len()).cloned().collect();
    assert!(rounds * tokens / 2 > columns);
    // Greedy decoding one step ahead (a GPU's default) takes the same tokens.
    for (batch_size, ahead) in [(1, false), (1, true), (2, false), (3, true), (7, false), (7, true)] {
        let mut streamed = vec![String::new(); many.len()];
        let gens = ContinuousBatch::new(&model, &tok, &stop, &many, batch_size, max_new)
            .unwrap()
            .decode_ahead(ahead)
            .run(&mut Sampler::greedy(), |i, text| {
                streamed[i].push_str(text);
                Ok(())
            })
            .unwrap();
        for (i, (b, text)) in gens.iter().zip(&streamed).enumerate() {
            let a = &alone[i % prompts.len()];
            assert_eq!(a.ids, b.ids, "batch size {batch_size}, ahead {ahead}, prompt {i}");
            assert_eq!((&a.text, a.stop, a.prompt_tokens), (&b.text, b.stop, b.prompt_tokens));
            assert_eq!(text, &a.text, "streamed text of prompt {i}");
        }
    }
    let examples: Vec<eval::DevExample> = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| eval::DevExample {
            at: format!("dev.jsonl:{}", i + 1),
            fields: Default::default(),
            prompt: q.to_string(),
            answers: vec![],
        })
        .collect();
    for batch_size in [1, 3, 7] {
        let settings = eval::Settings { batch_size, max_new_tokens: max_new, model_name: "tiny" };
        let mut answered = 0;
        let guesses = eval::generate_guesses(&model, &tok, &template, &examples, &settings, |n| answered += n).unwrap();
        assert_eq!(answered, QUESTIONS.len());
        for (g, a) in guesses.iter().zip(&alone) {
            assert_eq!((&g.text, g.tokens), (&a.text, a.ids.len()), "batch size {batch_size}");
        }
    }
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path
}

fn dev_lines() -> Vec<String> {
    QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let answers: Vec<&str> = if i % 3 == 0 { vec![] } else { vec!["Hay", "hay and grass"] };
            serde_json::json!({"prompt": q, "response": "Hay", "answers": answers, "id": format!("q{i}")}).to_string()
        })
        .collect()
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn bessie_eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bessie-eval")).args(args).output().unwrap()
}

/// `bessie-eval` on a random model writes one line per question with the input fields and the scores,
/// and the summary; `--predictions` re-scores that file to the same summary, without a model.
#[test]
fn bessie_eval_writes_rows_and_rescoring_reproduces_the_summary() {
    let (_d, model) = tiny_model(1);
    let work = tempfile::tempdir().unwrap();
    let dev = write_lines(work.path(), "dev.jsonl", &dev_lines());
    let out = work.path().join("run/eval.jsonl");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let (m, d, o) = (model.to_str().unwrap(), dev.to_str().unwrap(), out.to_str().unwrap());
    let run = bessie_eval(&["-m", m, "-d", d, "-o", o, "-n", "5", "--batch-size", "2", "--max-new-tokens", "6"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("HasAns") && stdout.contains("NoAns") && stdout.contains("examples/s"), "{stdout}");
    // Without a terminal, progress comes as lines with the rate and the time left, the last at the end.
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("5/5 questions, ") && l.ends_with(" questions/s, 0 s left")),
        "{stderr}"
    );

    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 5);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], format!("q{i}"), "input order is kept");
        assert_eq!(row["prompt"], QUESTIONS[i]);
        assert_eq!(row["model"], m);
        assert!(row["guess"].is_string() && row["is_correct"].is_boolean() && row["time"].as_f64().unwrap() > 0.0);
        let answers: Vec<String> = serde_json::from_value(row["answers"].clone()).unwrap();
        let expected = score(row["guess"].as_str().unwrap(), &answers);
        assert_eq!(row["exact_match"].as_f64().unwrap(), expected.exact_match);
        assert_eq!(row["f1"].as_f64().unwrap(), expected.f1);
    }
    let summary_path = work.path().join("run/eval_summary.json");
    let summary: Summary = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let speed = summary.speed.as_ref().unwrap();
    assert_eq!((summary.overall.count, speed.examples, speed.batch_size), (5, 5, 2));
    assert!(speed.generated_tokens > 0 && speed.generated_tokens <= 5 * 6);

    // Re-score a file whose guesses were edited: one now right for an unanswerable question.
    let mut edited = rows.clone();
    edited[0]["guess"] = "Not in context.".into();
    edited[1]["guess"] = "hay".into();
    let lines: Vec<String> = edited.iter().map(|r| r.to_string()).collect();
    let predictions = write_lines(work.path(), "edited.jsonl", &lines);
    let rescored_out = work.path().join("rescored.jsonl");
    let run = bessie_eval(&["--predictions", predictions.to_str().unwrap(), "-o", rescored_out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rescored = read_jsonl(&rescored_out);
    assert_eq!(
        (&rescored[0]["exact_match"], &rescored[0]["is_correct"], &rescored[1]["f1"]),
        (&1.0.into(), &true.into(), &1.0.into())
    );
    assert_eq!(rescored[2..], rows[2..], "unchanged guesses score the same");
    let again: Summary =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("rescored_summary.json")).unwrap()).unwrap();
    assert!(again.speed.is_none());
    let (_, direct) = eval::rescore(&predictions, None).unwrap();
    assert_eq!(again, direct);

    // Unedited predictions re-score to the generating run's numbers.
    let (_, same) = eval::rescore(&out, None).unwrap();
    assert_eq!((same.overall, same.has_ans, same.no_ans), (summary.overall, summary.has_ans, summary.no_ans));
}

fn dev_error(lines: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_lines(dir.path(), "dev.jsonl", &lines.iter().map(|l| l.to_string()).collect::<Vec<_>>());
    format!("{:#}", eval::read_dev(&path, None).unwrap_err())
}

#[test]
fn dev_file_errors_name_the_line() {
    let good = r#"{"prompt": "Moo?", "answers": ["moo"]}"#;
    let e = dev_error(&[good, "", r#"{"prompt": "Moo?", "response": "moo"}"#]);
    assert!(e.contains("dev.jsonl:3: missing field `answers`") && e.contains("bessie-data squad --dev"), "{e}");
    let e = dev_error(&[good, r#"{"prompt": "Moo?", "answers": "moo"}"#]);
    assert!(e.contains("dev.jsonl:2: field `answers` must be a list of strings, not a string"), "{e}");
    let e = dev_error(&[r#"{"prompt": "Moo?", "answers": ["moo", 7]}"#]);
    assert!(e.contains("dev.jsonl:1: `answers[1]` must be a string, not a number"), "{e}");
    let e = dev_error(&[good, r#"{"prompt": "Moo?", "answers": [}"#]);
    assert!(e.contains("dev.jsonl:2: malformed JSON"), "{e}");
    let e = dev_error(&[r#"{"answers": []}"#]);
    assert!(e.contains("dev.jsonl:1: missing field `prompt`"), "{e}");
    let e = dev_error(&["", "  "]);
    assert!(e.contains("dev.jsonl: no examples (the file is empty"), "{e}");
    let e = dev_error(&[]);
    assert!(e.contains("no examples"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = write_lines(dir.path(), "eval.jsonl", &[good.to_string()]);
    let e = format!("{:#}", eval::rescore(&path, None).unwrap_err());
    assert!(e.contains("eval.jsonl:1: missing field `guess`"), "{e}");
    let run = bessie_eval(&["--predictions", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.starts_with("error: ") && stderr.contains("eval.jsonl:1"), "{stderr}");
}

/// Nothing a user made is lost to a failed, refused or killed evaluation: `--out` is replaced only at the
/// end, never by the dev file's own path (also through links); summaries are named after their output.
#[test]
fn bessie_eval_never_loses_the_output_or_the_dev_set() {
    let (_d, model) = tiny_model(2);
    let work = tempfile::tempdir().unwrap();
    let dev = write_lines(work.path(), "dev.jsonl", &dev_lines());
    let dev_text = std::fs::read(&dev).unwrap();
    let out = work.path().join("a.jsonl");
    std::fs::write(&out, "precious\n").unwrap();
    let (m, d, o) = (model.to_str().unwrap(), dev.to_str().unwrap(), out.to_str().unwrap());
    let fast = ["--max-new-tokens", "4", "--batch-size", "2"];
    let failing = |args: &[&str], wanted: &str| {
        let run = bessie_eval(&[args, &fast].concat());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && stderr.contains(wanted), "{args:?}: should say `{wanted}`:\n{stderr}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n", "{args:?} touched --out");
        assert_eq!(std::fs::read(&dev).unwrap(), dev_text, "{args:?} touched the dev file");
    };
    failing(&["-m", "/no/such/model", "-d", d, "-o", o], "/no/such/model");
    let bad_dev = write_lines(work.path(), "bad.jsonl", &[dev_lines()[0].clone(), "{".into()]);
    failing(&["-m", m, "-d", bad_dev.to_str().unwrap(), "-o", o], "bad.jsonl:2");
    failing(&["-m", m, "-d", d, "-o", d], "is the dev file");
    let (soft, hard) = (work.path().join("soft.jsonl"), work.path().join("hard.jsonl"));
    std::os::unix::fs::symlink(&dev, &soft).unwrap();
    std::fs::hard_link(&dev, &hard).unwrap();
    failing(&["-m", m, "-d", d, "-o", soft.to_str().unwrap()], "is the dev file");
    failing(&["-m", m, "-d", d, "-o", hard.to_str().unwrap()], "is the dev file");
    assert!(!work.path().join("a.jsonl.partial").exists());

    // Two evaluations in one folder keep their own summaries; re-scoring keeps the speed block.
    let b = work.path().join("b.jsonl");
    for o in [&out, &b] {
        let run = bessie_eval(&[&["-m", m, "-d", d, "-o", o.to_str().unwrap(), "-n", "3"][..], &fast].concat());
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let read_summary = |name: &str| -> Summary {
        serde_json::from_str(&std::fs::read_to_string(work.path().join(name)).unwrap()).unwrap()
    };
    let (sa, sb) = (read_summary("a_summary.json"), read_summary("b_summary.json"));
    assert_eq!((sa.overall.count, sb.overall.count), (3, 3));
    let run = bessie_eval(&["--predictions", o]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(
        read_summary("a_summary.json"),
        sa,
        "re-scoring unchanged predictions keeps the summary, speed included"
    );
    assert!(!work.path().join("eval_summary.json").exists());
}

/// A killed evaluation keeps the answers it wrote; `--resume` answers the rest, to the output an
/// uninterrupted run writes.
#[test]
fn a_killed_evaluation_resumes() {
    let (_d, model) = tiny_model(3);
    let work = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..4).flat_map(|_| dev_lines()).collect();
    let dev = write_lines(work.path(), "dev.jsonl", &lines);
    let (m, d) = (model.to_str().unwrap(), dev.to_str().unwrap());
    let args = |out: &Path| -> Vec<String> {
        ["-m", m, "-d", d, "-o", out.to_str().unwrap(), "--batch-size", "1", "--max-new-tokens", "24"]
            .map(String::from)
            .to_vec()
    };
    let reference = work.path().join("reference.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_bessie-eval")).args(args(&reference)).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let out = work.path().join("eval.jsonl");
    std::fs::write(&out, "previous\n").unwrap();
    let partial = work.path().join("eval.jsonl.partial");
    let answers = || std::fs::read_to_string(&partial).map_or(0, |t| t.lines().count().saturating_sub(1));
    let mut child = Command::new(env!("CARGO_BIN_EXE_bessie-eval"))
        .args(args(&out))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while answers() < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the evaluation finished before it could be killed");
        assert!(started.elapsed().as_secs() < 120);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = answers();
    assert!(kept >= 3 && kept < lines.len(), "{kept} answers kept");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n", "a killed evaluation replaced --out");

    let again = Command::new(env!("CARGO_BIN_EXE_bessie-eval")).args(args(&out)).output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && stderr.contains("pass --resume to continue it"), "{stderr}");
    let other_system = ["--resume", "--system", "Moo."];
    let other = Command::new(env!("CARGO_BIN_EXE_bessie-eval")).args(args(&out)).args(other_system).output().unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && stderr.contains("was written by another evaluation"), "{stderr}");
    let resumed = Command::new(env!("CARGO_BIN_EXE_bessie-eval")).args(args(&out)).arg("--resume").output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("--resume: {kept} of {} questions answered already", lines.len())), "{stderr}");
    assert!(!partial.exists(), "the partial output is removed once the output is written");
    let strip_time = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("time");
                r
            })
            .collect()
    };
    assert_eq!(strip_time(read_jsonl(&out)), strip_time(read_jsonl(&reference)));
}

/// A question too long for the model's context is skipped with a warning and a row that says so, and the
/// others are answered. Its empty guess is no prediction: it scores 0 though the question is unanswerable
/// (where an empty prediction scores 1), also when the output is re-scored.
#[test]
fn an_over_long_question_is_skipped_and_counted() {
    let (_d, model) = tiny_model(4);
    let work = tempfile::tempdir().unwrap();
    let mut lines = dev_lines();
    lines[2] = serde_json::json!({"prompt": "moo ".repeat(3000), "answers": []}).to_string();
    let dev = write_lines(work.path(), "dev.jsonl", &lines);
    let out = work.path().join("eval.jsonl");
    let (m, d, o) = (model.to_str().unwrap(), dev.to_str().unwrap(), out.to_str().unwrap());
    let run = bessie_eval(&["-m", m, "-d", d, "-o", o, "--max-new-tokens", "4"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("warning: 1 questions skipped"), "{stderr}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), lines.len());
    let why = rows[2]["skipped"].as_str().unwrap();
    assert!(
        why.contains("dev.jsonl:3: the prompt is") && why.contains("too many for the model's context of 2048"),
        "{why}"
    );
    assert_eq!((&rows[2]["guess"], &rows[2]["exact_match"], &rows[2]["f1"]), (&"".into(), &0.0.into(), &0.0.into()));
    assert!(rows.iter().enumerate().all(|(i, r)| (i == 2) == r.get("skipped").is_some()));
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("eval_summary.json")).unwrap()).unwrap();
    assert_eq!((summary.skipped, summary.overall.count), (1, lines.len()));
    assert!(String::from_utf8_lossy(&run.stdout).contains("1 questions skipped"));
    let (rescored, again) = eval::rescore(&out, None).unwrap();
    assert_eq!((&rescored[2]["exact_match"], &rescored[2]["f1"]), (&0.0.into(), &0.0.into()));
    assert_eq!((again.overall, again.no_ans, again.skipped), (summary.overall, summary.no_ans, 1));
}

/// Before generating on a GPU, the largest batch is checked against the card's free memory: the KV cache
/// of -large is 2 (keys, values) x 24 layers x 16 heads x 96 dims x 2 bytes a column, for twice the
/// longest prompt and answer (rows are refilled) and the prefill's prompt columns, plus the prefill's
/// attention scores (512 queries at a time); too little memory is an error saying which batch size fits.
#[test]
fn a_batch_too_large_for_the_card_says_what_fits() {
    use bessie::generate::{check_batch_fits, generation_bytes};
    let cfg = bessie::config::ModelConfig::shape("large", 32002).unwrap();
    let bf16 = candle_core::DType::BF16;
    let per_column = 2 * 24 * 16 * 96 * 2;
    let row = (2 * 350 + 300) * per_column + 16 * 300 * 300 * 10;
    assert_eq!(generation_bytes(&cfg, bf16, 1, 300, 50), row as u64);
    assert_eq!(generation_bytes(&cfg, bf16, 32, 300, 50), 32 * row as u64);
    // A row never outgrows the context of 2048, and a prefill's scores are those of 512 queries at a time.
    assert_eq!(
        generation_bytes(&cfg, bf16, 1, 1900, 500),
        ((2 * 2048 + 1900) * per_column + 16 * 512 * 1900 * 10) as u64
    );
    let need = generation_bytes(&cfg, bf16, 32, 300, 50);
    assert!(check_batch_fits(&cfg, bf16, 32, 300, 50, need).is_ok());
    let e = format!("{:#}", check_batch_fits(&cfg, bf16, 32, 300, 50, need - 1).unwrap_err());
    assert!(e.contains("batch of 32 prompts of up to 300 tokens") && e.contains("--batch-size 31 fits"), "{e}");
    let e = format!("{:#}", check_batch_fits(&cfg, bf16, 32, 300, 50, (row / 2) as u64).unwrap_err());
    assert!(e.contains("not even one prompt of 300 tokens fits"), "{e}");
}
