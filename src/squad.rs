//! SQuAD v2 in the official JSON (`train-v2.0.json`, `dev-v2.0.json`) to Bessie JSONL, as the original
//! project's training mix used it: the context and the question in one prompt, the answer as response.
//!
//! Each question becomes one line:
//!
//! ```text
//! {"prompt": "Context: {context}\n\nQuestion: {question}", "response": "...", "source": "squad_v2", "id": "..."}
//! ```
//!
//! The response is the question's first answer, or "Not in context." for an unanswerable one. Dev lines
//! (`--dev`) also carry `answers`: every distinct answer text in file order, an empty list for an
//! unanswerable question, which is what `bessie-eval` scores against. Answer texts are trimmed (a few
//! official ones carry stray spaces); `id` is the official question id.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jsonl::json_kind;

/// What Bessie answers when the context does not hold the answer.
pub const NOT_IN_CONTEXT: &str = "Not in context.";

/// The prompt of a SQuAD question.
pub fn prompt(context: &str, question: &str) -> String {
    format!("Context: {context}\n\nQuestion: {question}")
}

#[derive(Deserialize)]
struct SquadFile {
    data: Vec<Article>,
}

#[derive(Deserialize)]
struct Article {
    paragraphs: Vec<Paragraph>,
}

#[derive(Deserialize)]
struct Paragraph {
    context: String,
    qas: Vec<Question>,
}

#[derive(Deserialize)]
struct Question {
    id: String,
    question: String,
    answers: Vec<Answer>,
    /// SQuAD v2 only; v1 files (every question answerable) work too.
    is_impossible: Option<bool>,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
}

/// Counts of a conversion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SquadStats {
    pub articles: usize,
    pub answerable: usize,
    pub unanswerable: usize,
}

impl fmt::Display for SquadStats {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} questions from {} articles: {} answerable, {} unanswerable",
            self.answerable + self.unanswerable,
            self.articles,
            self.answerable,
            self.unanswerable
        )
    }
}

/// Converts the SQuAD JSON file `input` into JSONL at `out` (see the module doc); `dev` adds `answers`.
pub fn convert(input: &Path, out: &Path, dev: bool) -> Result<SquadStats> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let squad: SquadFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not SQuAD JSON ({{\"data\": [{{\"paragraphs\": [...]}}]}})", input.display()))?;
    let mut stats = SquadStats { articles: squad.data.len(), ..Default::default() };
    let mut jsonl = String::new();
    for (paragraph, q) in squad.data.iter().flat_map(|a| &a.paragraphs).flat_map(|p| p.qas.iter().map(move |q| (p, q)))
    {
        let mut answers: Vec<String> = Vec::new();
        for a in &q.answers {
            let a = a.text.trim();
            if !answers.iter().any(|b| b == a) {
                answers.push(a.to_string());
            }
        }
        if q.is_impossible.is_some_and(|impossible| impossible != answers.is_empty()) {
            bail!(
                "{}: question {}: is_impossible is {} but it has {} answers",
                input.display(),
                q.id,
                q.is_impossible.unwrap_or_default(),
                answers.len()
            );
        }
        let response = answers.first().map_or(NOT_IN_CONTEXT, String::as_str);
        let mut line = serde_json::json!({
            "prompt": prompt(&paragraph.context, &q.question),
            "response": response,
            "source": "squad_v2",
            "id": q.id,
        });
        if answers.is_empty() {
            stats.unanswerable += 1;
        } else {
            stats.answerable += 1;
        }
        if dev {
            line["answers"] = answers.into();
        }
        jsonl.push_str(&line.to_string());
        jsonl.push('\n');
    }
    if stats.answerable + stats.unanswerable == 0 {
        bail!("{}: no questions", input.display());
    }
    std::fs::write(out, jsonl).with_context(|| format!("writing {}", out.display()))?;
    Ok(stats)
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
