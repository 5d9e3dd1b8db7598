//! Reading JSONL files, shared by the training data (`data`) and the dev files of evaluation (`eval`): the
//! objects of a file's lines with their `FILE:LINE` locations, and field access whose errors say what is
//! wrong.

use std::path::Path;

use anyhow::{anyhow, Result};
use serde_json::{Map, Value};

/// The non-blank lines of a JSONL file's `bytes`, each as its location `FILE:LINE` (for messages) and its
/// JSON object. A line that is not UTF-8, not JSON or not an object is an error naming its location. A
/// UTF-8 byte-order mark at the start of the file (Windows editors write one) is skipped.
pub fn jsonl_objects<'a>(
    path: &'a Path,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(String, Map<String, Value>)>> + 'a {
    jsonl_lines(bytes).into_iter().map(move |(n, line)| parse_line(path, n, line))
}

/// The non-blank lines of a JSONL file, each with its index (0-based), the byte-order mark skipped.
pub fn jsonl_lines(bytes: &[u8]) -> Vec<(usize, &[u8])> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let blank = |line: &[u8]| line.iter().all(u8::is_ascii_whitespace);
    bytes.split(|&b| b == b'\n').enumerate().filter(|(_, line)| !blank(line)).collect()
}

/// Line `n` (0-based) of a JSONL file as its location and JSON object.
pub fn parse_line(path: &Path, n: usize, line: &[u8]) -> Result<(String, Map<String, Value>)> {
    let at = format!("{}:{}", path.display(), n + 1);
    let object = match std::str::from_utf8(line) {
        Err(e) => Err(format!("not valid UTF-8: {e}")),
        Ok(line) => match serde_json::from_str(line) {
            Err(e) => Err(format!("malformed JSON: {e}")),
            Ok(Value::Object(object)) => Ok(object),
            Ok(_) => Err("expected a JSON object".to_string()),
        },
    };
    object.map(|o| (at.clone(), o)).map_err(|e| anyhow!("{at}: {e}"))
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
