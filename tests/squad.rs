//! `bessie-data`: SQuAD v2 JSON to Bessie JSONL (tests/fixtures/squad_v2_tiny.json), and `check`.

use std::path::{Path, PathBuf};

use bessie::squad::{self, SquadStats};
use bessie::tokenizer::template::{ChatTemplate, Message};
use bessie::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn fixture() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/squad_v2_tiny.json"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tokenizer"))).unwrap()
}

fn convert(input: &Path, dev: bool) -> (tempfile::TempDir, PathBuf, anyhow::Result<SquadStats>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let stats = squad::convert(input, &out, dev);
    (dir, out, stats)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn converts_answerable_and_unanswerable_questions() {
    let (_d, out, stats) = convert(&fixture(), false);
    assert_eq!(stats.unwrap(), SquadStats { articles: 2, answerable: 2, unanswerable: 1 });
    let context = "Cattle are large domesticated bovines. The Oxen of Oxford pull carts; a cow eats about 2% of \
                   its body weight in hay each day.";
    assert_eq!(
        lines(&out),
        [
            json!({"prompt": format!("Context: {context}\n\nQuestion: What do the Oxen of Oxford pull?"),
                   "response": "carts", "source": "squad_v2", "id": "q-answerable-dup"}),
            json!({"prompt": format!("Context: {context}\n\nQuestion: How much does a bull weigh?"),
                   "response": "Not in context.", "source": "squad_v2", "id": "q-unanswerable"}),
            json!({"prompt": "Context: Zürich lies on Lake Zürich; its cows say “moo”.\n\nQuestion: Which lake is Zürich on?",
                   "response": "Lake Zürich", "source": "squad_v2", "id": "q-unicode"}),
        ]
    );
}

#[test]
fn dev_lines_keep_every_distinct_answer() {
    let (_d, out, stats) = convert(&fixture(), true);
    assert_eq!(stats.unwrap().to_string(), "3 questions from 2 articles: 2 answerable, 1 unanswerable");
    let answers: Vec<Value> = lines(&out).iter().map(|l| l["answers"].clone()).collect();
    assert_eq!(answers, [json!(["carts", "pull carts"]), json!([]), json!(["Lake Zürich", "Zürich"])]);
    // The dev file is what bessie-eval reads.
    let dev = bessie::eval::read_dev(&out, None).unwrap();
    assert_eq!(dev.len(), 3);
    assert!(dev[1].answers.is_empty() && dev[0].prompt.ends_with("Question: What do the Oxen of Oxford pull?"));
}

#[test]
fn inconsistent_or_foreign_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    let qa = json!({"question": "Q?", "id": "q7", "answers": [], "is_impossible": false});
    std::fs::write(&bad, json!({"data": [{"paragraphs": [{"context": "C.", "qas": [qa]}]}]}).to_string()).unwrap();
    let e = format!("{:#}", convert(&bad, false).2.unwrap_err());
    assert!(e.contains("bad.json: question q7: is_impossible is false but it has 0 answers"), "{e}");

    std::fs::write(&bad, r#"[{"prompt": "x", "response": "y"}]"#).unwrap();
    let e = format!("{:#}", convert(&bad, false).2.unwrap_err());
    assert!(e.contains("bad.json: not SQuAD JSON"), "{e}");

    std::fs::write(&bad, r#"{"data": []}"#).unwrap();
    let e = format!("{:#}", convert(&bad, false).2.unwrap_err());
    assert!(e.contains("bad.json: no questions"), "{e}");
}

#[test]
fn check_reports_counts_lengths_and_truncation() {
    let (_d, out, _) = convert(&fixture(), true);
    let tok = tok();
    let template = ChatTemplate::bessie(None);
    let report = bessie::data::check(&out, &tok, &template, 512).unwrap();
    assert_eq!((report.examples, report.answerable, report.unanswerable), (3, 2, 1));
    assert_eq!(report.sources.get("squad_v2"), Some(&3));
    let ds = lines(&out);
    let mut lengths: Vec<usize> = ds
        .iter()
        .map(|l| {
            let (prompt, response) = (l["prompt"].as_str().unwrap(), l["response"].as_str().unwrap());
            let turn = [Message::new("user", prompt), Message::new("assistant", response)];
            tok.encode(&template.render(&turn, false).unwrap(), true).unwrap().len()
        })
        .collect();
    lengths.sort();
    assert_eq!(report.lengths, lengths);
    assert_eq!((report.percentile(50.0), report.percentile(100.0)), (lengths[1], lengths[2]));
    assert_eq!(report.over_max, 0);

    // At the shortest length the two others are truncated; below every prompt all are refused.
    let report = bessie::data::check(&out, &tok, &template, lengths[0]).unwrap();
    assert_eq!(report.over_max, 2);
    assert!(report.prompt_over_max <= 2);
    let text = report.to_string();
    assert!(text.contains("3 examples") && text.contains("source squad_v2: 3") && text.contains("p99"), "{text}");
    let report = bessie::data::check(&out, &tok, &template, 10).unwrap();
    assert_eq!((report.over_max, report.prompt_over_max), (3, 3));
    assert!(report.to_string().contains("training refuses them"));
}

#[test]
fn check_names_every_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mix.jsonl");
    let good = "{\"prompt\": \"a\", \"response\": \"b\"}\n";
    std::fs::write(&path, format!("{good}{{\"prompt\": \"a\", \"response\": \"b\", \"answers\": 3}}\n{good}")).unwrap();
    let check = || bessie::data::check(&path, &tok(), &ChatTemplate::bessie(None), 512).unwrap();
    let report = check();
    assert_eq!((report.examples, report.problem_count), (2, 1));
    assert!(report.refused());
    assert!(report.problems[0].contains("mix.jsonl:2: field `answers` must be a list of strings"), "{report}");

    // Every problem counts; the first 20 are listed.
    let bad: String = (0..25).map(|i| if i % 2 == 0 { "{\"prompt\": \"a\"}\n" } else { "[1]\n" }).collect();
    std::fs::write(&path, format!("{good}{bad}")).unwrap();
    let report = check();
    assert_eq!((report.examples, report.problem_count, report.problems.len()), (1, 25, 20));
    assert!(report.problems[0].contains("mix.jsonl:2: missing field `response`"), "{report}");
    assert!(report.problems[1].contains("mix.jsonl:3: expected a JSON object"), "{report}");
    assert!(report.to_string().contains("... and 5 more"), "{report}");

    std::fs::write(&path, good).unwrap();
    assert!(!check().refused());
}
