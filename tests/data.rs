//! The data pipeline: JSONL errors with line numbers, the response boundary, truncation and dropping, the
//! tokenization cache, epoch shuffling and packing, per-rank shards, micro-batches, and the shipped tiny set.

use bessie::data::{
    epoch_rows, load_jsonl, make_batch, shard, DataOptions, DataStats, Dataset, Example, LossOn, Overflow, Row,
};
use bessie::tokenizer::template::{ChatTemplate, Message};
use bessie::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&root().join("assets/tokenizer")).unwrap()
}

fn opts(max_seq_len: usize) -> DataOptions {
    DataOptions { max_seq_len, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: true }
}

/// A temp dir holding `data.jsonl` with the given lines.
fn jsonl(lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    (dir, path)
}

fn line(prompt: &str, response: &str) -> String {
    serde_json::json!({"prompt": prompt, "response": response}).to_string()
}

fn load(path: &Path, opts: &DataOptions) -> anyhow::Result<Dataset> {
    load_jsonl(path, &tok(), &ChatTemplate::bessie(None), opts, None)
}

/// The full error message of loading these lines with `opts`.
fn load_error(lines: &[&str], opts: &DataOptions) -> String {
    let (_dir, path) = jsonl(lines);
    format!("{:#}", load(&path, opts).unwrap_err())
}

/// One user turn and the reply.
fn turn(prompt: &str, response: &str) -> Vec<Message> {
    vec![Message::new("user", prompt), Message::new("assistant", response)]
}

/// The Bessie text of a single-turn example.
fn rendered(t: &ChatTemplate, prompt: &str, response: &str) -> String {
    t.render(&turn(prompt, response), false).unwrap()
}

/// The Bessie generation prompt of `prompt`.
fn gen_prompt(t: &ChatTemplate, prompt: &str) -> String {
    t.generation_prompt(&[Message::new("user", prompt)]).unwrap()
}

/// Where a single-turn example's trained tokens start; they run to its end.
fn loss_start(ex: &Example) -> usize {
    assert_eq!(ex.trained.len(), 1, "{:?}", ex.trained);
    assert_eq!(ex.trained[0].end, ex.ids.len());
    ex.trained[0].start
}

/// The trained tokens start at the first token whose text reaches past the generation prompt `gp`.
fn check_boundary(tok: &Tokenizer, ex: &Example, gp: &str) {
    let before = tok.decode(&ex.ids[..loss_start(ex)]).unwrap();
    let with = tok.decode(&ex.ids[..=loss_start(ex)]).unwrap();
    assert!(gp.starts_with(&before) && with.len() > gp.len(), "{before:?} / {with:?} around {gp:?}");
}

#[test]
fn malformed_json_names_the_line() {
    let good = line("How many cows?", "Seven.");
    let e = load_error(&[&good, "", "{\"prompt\": \"x\", \"response\": }"], &opts(256));
    assert!(e.contains("data.jsonl:3: malformed JSON"), "{e}");
    let e = load_error(&["[1, 2]"], &opts(256));
    assert!(e.contains("data.jsonl:1: expected a JSON object"), "{e}");
}

#[test]
fn missing_and_non_string_fields_name_the_line_and_field() {
    let good = line("How many cows?", "Seven.");
    let e = load_error(&[&good, r#"{"prompt": "How many cows?"}"#], &opts(256));
    assert!(e.ends_with("data.jsonl:2: missing field `response`"), "{e}");
    let e = load_error(&[r#"{"response": "Seven."}"#], &opts(256));
    assert!(e.ends_with("data.jsonl:1: missing field `prompt`"), "{e}");
    let e = load_error(&[&good, &good, r#"{"prompt": "How many cows?", "response": 7}"#], &opts(256));
    assert!(e.ends_with("data.jsonl:3: field `response` must be a string, not a number"), "{e}");
}

#[test]
fn empty_blank_and_missing_files_are_errors() {
    for lines in [&[][..], &["", "   ", "\r"][..]] {
        let e = load_error(lines, &opts(256));
        assert!(e.contains("data.jsonl: no examples"), "{e}");
    }
    let e = format!("{:#}", load(Path::new("/nonexistent/train.jsonl"), &opts(256)).unwrap_err());
    assert!(e.contains("reading /nonexistent/train.jsonl"), "{e}");
}

#[test]
fn blank_lines_are_skipped_and_extra_fields_ignored() {
    let plain = line("How many cows are in the barn?", "There are 7 cows in the barn.");
    let extra = r#"{"prompt": "How many cows are in the barn?", "response": "There are 7 cows in the barn.", "source": "squad", "answers": ["7"]}"#;
    let (_d, a) = jsonl(&["", &plain, "  ", &plain]);
    let (_e, b) = jsonl(&[extra, extra]);
    let (a, b) = (load(&a, &opts(256)).unwrap(), load(&b, &opts(256)).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.stats.lines, 2);
}

#[test]
fn loss_starts_at_the_first_response_token() {
    let tok = tok();
    let t = ChatTemplate::bessie(None);
    let (prompt, response) = ("How many cows are in the barn?", "There are 7 cows in the barn.");
    let (_d, path) = jsonl(&[&line(prompt, response)]);
    let ds = load(&path, &opts(256)).unwrap();
    let ex = &ds.examples[0];
    assert_eq!(ex.ids, tok.encode(&rendered(&t, prompt, response), true).unwrap());
    assert_eq!(tok.decode(&ex.ids[..loss_start(ex)]).unwrap(), gen_prompt(&t, prompt));
    assert!(tok.decode(&ex.ids[loss_start(ex)..]).unwrap().starts_with(response));
    assert_eq!(ds.stats.loss_tokens, ex.ids.len() - loss_start(ex));
    assert_eq!(ds.stats.tokens, ex.ids.len());

    // Responses that start with a multi-byte character (byte-fallback tokens), whitespace or a newline.
    for response in ["🐄 moo", "é", " Seven.", "\nSeven.", "\n\n🐂"] {
        let (_d, path) = jsonl(&[&line(prompt, response)]);
        let ex = &load(&path, &opts(256)).unwrap().examples[0];
        check_boundary(&tok, ex, &gen_prompt(&t, prompt));
    }

    // Text that does not decode back to itself: a literal `<pad>` becomes the pad token, which decodes to
    // nothing, so the boundary is found in the decoded prompt.
    let prompt = "Say <pad> twice.";
    let (_d, path) = jsonl(&[&line(prompt, "Moo moo.")]);
    let ex = &load(&path, &opts(256)).unwrap().examples[0];
    let gp = tok.decode(&tok.encode(&gen_prompt(&t, prompt), true).unwrap()).unwrap();
    assert!(!gp.contains("<pad>"));
    assert_eq!(tok.decode(&ex.ids[..loss_start(ex)]).unwrap(), gp);
    assert!(tok.decode(&ex.ids[loss_start(ex)..]).unwrap().starts_with("Moo moo."));
}

#[test]
fn loss_on_all_starts_after_bos() {
    let (_d, path) = jsonl(&[&line("How many cows?", "Seven."), &line("And goats?", "Two.")]);
    let ds = load(&path, &DataOptions { loss_on: LossOn::All, ..opts(256) }).unwrap();
    assert!(ds.examples.iter().all(|e| loss_start(e) == 1));
    assert_eq!(ds.stats.loss_tokens, ds.stats.tokens - 2);
}

#[test]
fn truncation_keeps_the_first_tokens_and_counts() {
    let (prompt, response) =
        ("How many cows are in the barn?", "There are 7 cows in the barn, and 3 goats in the shed.");
    let full = tok().encode(&rendered(&ChatTemplate::bessie(None), prompt, response), true).unwrap();
    let short = line("Hi", "Moo.");
    let (_d, path) = jsonl(&[&line(prompt, response), &short]);
    let ds = load(&path, &opts(256)).unwrap();
    let start = loss_start(&ds.examples[0]);
    let max = start + 3;
    assert!(full.len() > max && ds.examples[1].ids.len() <= max);
    let ds = load(&path, &opts(max)).unwrap();
    assert_eq!(ds.examples[0], Example::from_loss_start(full[..max].to_vec(), start));
    assert_eq!(ds.stats.truncated, 1);
    assert_eq!(ds.stats.tokens, max + ds.examples[1].ids.len());
    assert_eq!(ds.stats.loss_tokens, 3 + ds.examples[1].ids.len() - loss_start(&ds.examples[1]));
}

#[test]
fn a_prompt_without_room_for_a_response_token_is_an_error_or_dropped() {
    let long_prompt = "The cows walk to the barn. ".repeat(30);
    let long = line(&long_prompt, "Yes.");
    let long_response = line("Hi", &"The cows walk to the barn. ".repeat(30));
    let short = line("Hi", "Moo.");
    let lines = [short.as_str(), long.as_str(), long_response.as_str(), short.as_str()];
    let e = load_error(&lines, &opts(200));
    let prompt_tokens = tok().encode(&gen_prompt(&ChatTemplate::bessie(None), &long_prompt), true).unwrap().len();
    assert!(
        e.ends_with(&format!(
            "data.jsonl:2: the text before the first reply is {prompt_tokens} tokens; max_seq_len is 200: raise \
             data.max_seq_len or set data.overflow = \"drop\""
        )),
        "{e}"
    );

    // Drop leaves out every example that is too long, the response's fault or the prompt's.
    let drop = DataOptions { overflow: Overflow::Drop, ..opts(200) };
    let (_d, path) = jsonl(&lines);
    let ds = load(&path, &drop).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!((ds.stats.lines, ds.stats.dropped, ds.stats.truncated), (4, 2, 0));
    let e = load_error(&[&long], &drop);
    assert!(e.contains("data.jsonl: all 1 examples are longer than data.max_seq_len = 200"), "{e}");
}

#[test]
fn cache_is_reused_and_keyed_on_options_and_system_prompt() {
    let tok = tok();
    let cache = tempfile::tempdir().unwrap();
    let files = || std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    let (_d, path) = jsonl(&[&line("How many cows?", "Seven."), &line("And goats?", "Two.")]);
    let t = ChatTemplate::bessie(None);
    let load = |t: &ChatTemplate, o: &DataOptions| load_jsonl(&path, &tok, t, o, Some(cache.path())).unwrap();
    let first = load(&t, &opts(256));
    assert_eq!(first, load_jsonl(&path, &tok, &t, &opts(256), None).unwrap());
    let cached = files();
    assert_eq!(cached.len(), 1);
    assert_eq!(load(&t, &opts(256)), first);

    // Proof that the second load read the file: a stat edited in it shows up (`lines` follows the magic).
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    bytes[8] += 40;
    std::fs::write(&cached[0], &bytes).unwrap();
    assert_eq!(load(&t, &opts(256)).stats.lines, first.stats.lines + 40);
    assert_eq!(load(&t, &DataOptions { pack: false, ..opts(256) }).stats.lines, first.stats.lines + 40);

    // Anything the tokens depend on misses.
    assert_eq!(load(&t, &opts(255)).stats, first.stats);
    assert_eq!(load(&t, &DataOptions { loss_on: LossOn::All, ..opts(256) }).stats.lines, first.stats.lines);
    assert_eq!(load(&ChatTemplate::bessie(Some("Be brief.")), &opts(256)).stats.lines, first.stats.lines);
    assert_eq!(files().len(), 4);
    let (_e, other) = jsonl(&[&line("How many cows?", "Eight."), &line("And goats?", "Two.")]);
    assert_ne!(load_jsonl(&other, &tok, &t, &opts(256), Some(cache.path())).unwrap().examples, first.examples);
    assert_eq!(files().len(), 5);
}

/// Examples of lengths 3..=40 with loss from token 2; only lengths matter to packing.
fn synthetic(n: usize) -> Dataset {
    let examples: Vec<Example> =
        (0..n).map(|i| Example::from_loss_start((0..3 + (i * 7) % 38).map(|t| t as u32).collect(), 2)).collect();
    let tokens = examples.iter().map(|e| e.ids.len()).sum();
    Dataset { stats: DataStats { lines: n, tokens, ..DataStats::default() }, examples }
}

#[test]
fn epoch_rows_are_seeded_shuffles_covering_every_example_once() {
    let ds = synthetic(101);
    for pack in [true, false] {
        let o = DataOptions { pack, ..opts(64) };
        let rows = epoch_rows(&ds, 0, 42, &o);
        assert_eq!(rows, epoch_rows(&ds, 0, 42, &o));
        assert_ne!(rows, epoch_rows(&ds, 1, 42, &o));
        assert_ne!(rows, epoch_rows(&ds, 0, 43, &o));
        let mut all: Vec<u32> = rows.iter().flat_map(|r| r.examples.clone()).collect();
        assert_ne!(all, (0..101).collect::<Vec<_>>(), "not shuffled");
        all.sort();
        assert_eq!(all, (0..101).collect::<Vec<_>>());
        assert!(rows.iter().all(|r| r.tokens(&ds) <= 64));
        if pack {
            // Next-fit: each row is full up to the first example of the next one.
            for w in rows.windows(2) {
                let next = ds.examples[w[1].examples[0] as usize].ids.len();
                assert!(w[0].tokens(&ds) + next > 64);
            }
            assert!(rows.len() < 101 / 2);
        } else {
            assert!(rows.iter().all(|r| r.examples.len() == 1));
        }
    }
}

#[test]
fn shards_are_disjoint_and_equal() {
    let rows: Vec<Row> = (0..11).map(|i| Row { examples: vec![i] }).collect();
    let shards: Vec<Vec<Row>> = (0..3).map(|rank| shard(rows.clone(), rank, 3)).collect();
    assert!(shards.iter().all(|s| s.len() == 3));
    let mut all: Vec<u32> = shards.iter().flatten().map(|r| r.examples[0]).collect();
    assert_eq!(shards[1].iter().map(|r| r.examples[0]).collect::<Vec<_>>(), [3, 4, 5]);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 9);
    assert_eq!(shard(rows.clone(), 0, 1), rows);
}

#[test]
fn batch_of_a_packed_row_and_a_padded_row() {
    let ds = Dataset {
        examples: vec![Example::from_loss_start(vec![1, 10, 11, 12], 2), Example::from_loss_start(vec![1, 20, 21], 2)],
        stats: DataStats::default(),
    };
    let b = make_batch(&ds, &[Row { examples: vec![0, 1] }, Row { examples: vec![1] }], 99);
    assert_eq!((b.batch, b.seq), (2, 7));
    #[rustfmt::skip]
    let expected = (
        [1, 10, 11, 12, 1, 20, 21,   1, 20, 21, 99, 99, 99, 99],
        [10, 11, 12, 0, 20, 21, 0,   20, 21, 0, 0, 0, 0, 0],
        [0., 1., 1., 0., 0., 1., 0.,   0., 1., 0., 0., 0., 0., 0.],
        [0, 1, 2, 3, 0, 1, 2,   0, 1, 2, 0, 0, 0, 0],
        [1, 1, 1, 1, 2, 2, 2,   1, 1, 1, 0, 0, 0, 0],
    );
    assert_eq!(b.ids, expected.0);
    assert_eq!(b.targets, expected.1);
    assert_eq!(b.loss_mask, expected.2);
    assert_eq!(b.positions, expected.3);
    assert_eq!(b.segments, expected.4);
    assert_eq!(b.loss_tokens, 4);
}

#[test]
fn tiny_demo_set_loads_whole_with_exact_boundaries() {
    let tok = tok();
    let t = ChatTemplate::bessie(None);
    for (name, lines) in [("train.jsonl", 2000), ("dev.jsonl", 40)] {
        let path = root().join("data/tiny").join(name);
        let ds = load_jsonl(&path, &tok, &t, &opts(256), None).unwrap();
        let s = &ds.stats;
        assert_eq!((s.lines, s.truncated, s.dropped, ds.examples.len()), (lines, 0, 0, lines));
        let text = std::fs::read_to_string(&path).unwrap();
        for (ex, line) in ds.examples.iter().zip(text.lines()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (prompt, response) = (v["prompt"].as_str().unwrap(), v["response"].as_str().unwrap());
            assert_eq!(tok.decode(&ex.ids[..loss_start(ex)]).unwrap(), gen_prompt(&t, prompt));
            assert!(tok.decode(&ex.ids[loss_start(ex)..]).unwrap().starts_with(response));
            if name == "dev.jsonl" {
                assert!(v["answers"].is_array(), "{line}");
            }
        }
        let longest = ds.examples.iter().map(|e| e.ids.len()).max().unwrap();
        println!(
            "{name}: {} lines, {} tokens ({:.1} per example, longest {longest}), {} trained",
            s.lines,
            s.tokens,
            s.tokens as f64 / s.lines as f64,
            s.loss_tokens
        );
    }
}

/// A huge line costs no more than `max_seq_len` x 64 bytes of tokenizing: a 20 MB response is truncated
/// (or dropped) in well under a second, and a 20 MB prompt is the too-long-prompt error, not minutes of work.
#[test]
fn huge_lines_are_bounded() {
    let huge = "moo ".repeat(5 << 20);
    let (_d, path) = jsonl(&[&line("How many cows?", &huge), &line("Hi", "Moo.")]);
    let start = std::time::Instant::now();
    let ds = load(&path, &opts(256)).unwrap();
    assert_eq!((ds.stats.truncated, ds.examples[0].ids.len()), (1, 256));
    let ds = load(&path, &DataOptions { overflow: Overflow::Drop, ..opts(256) }).unwrap();
    assert_eq!((ds.stats.dropped, ds.examples.len()), (1, 1));
    let (_e, path) = jsonl(&[&line(&huge, "Seven.")]);
    let e = format!("{:#}", load(&path, &opts(256)).unwrap_err());
    assert!(e.contains("data.jsonl:1: the text before the first reply is longer than max_seq_len x 64 bytes"), "{e}");
    assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let (_d, path) = jsonl(&[&format!("\u{FEFF}{}", line("How many cows?", "Seven."))]);
    assert_eq!(load(&path, &opts(256)).unwrap().examples.len(), 1);
}
