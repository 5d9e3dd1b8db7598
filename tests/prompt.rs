//! `bessie-prompt`'s answers to bad input: a prompt beyond the model's context, sampling settings outside
//! their range, and a damaged model under `RUST_BACKTRACE=1` each get one clear error line.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn prompt(model: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bessie-prompt")).arg("-m").arg(model).args(args).output().unwrap()
}

fn failing(run: &Output) -> String {
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(!run.status.success(), "should have failed:\n{stderr}");
    stderr
}

#[test]
fn a_prompt_beyond_the_context_says_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path(), 1);
    let stderr = failing(&prompt(dir.path(), &["--prompt", &"moo ".repeat(3000)]));
    assert!(stderr.starts_with("error: the prompt is ") && stderr.lines().count() == 1, "{stderr}");
    let (tokens, rest) =
        stderr["error: the prompt is ".len()..].split_once(" tokens with the chat template, ").unwrap();
    let (too_many, rest) = rest.split_once(" too many").unwrap();
    assert!(rest.starts_with(" for the model's context of 2048"), "{stderr}");
    assert_eq!(tokens.parse::<usize>().unwrap() + 1 - 2048, too_many.parse::<usize>().unwrap(), "{stderr}");

    // A short answer reports only speeds it measured.
    let run = prompt(dir.path(), &["--prompt", "Moo?", "--max-new-tokens", "1"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains(", 1 new tokens, ") && !stderr.contains("NaN") && !stderr.contains("inf"), "{stderr}");
}

#[test]
fn sampling_settings_outside_their_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path(), 1);
    for (flag, value, range) in [
        ("--temperature", "nan", "finite number >= 0"),
        ("--temperature", "inf", "finite number >= 0"),
        ("--temperature", "-1", "finite number >= 0"),
        ("--top-p", "-1", "(0, 1]"),
        ("--top-p", "5", "(0, 1]"),
        ("--top-p", "0", "(0, 1]"),
    ] {
        let run = prompt(dir.path(), &["--prompt", "Moo?", &format!("{flag}={value}")]);
        let stderr = failing(&run);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(flag) && stderr.contains(&format!("`{value}`")) && stderr.contains(range), "{stderr}");
    }
    let ok = prompt(dir.path(), &["--prompt", "Moo?", "--temperature", "0.7", "--top-p", "1", "--max-new-tokens", "3"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn a_damaged_model_is_one_error_line_even_with_rust_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path(), 1);
    // Weights of another shape than config.json says: candle's error, which carries a backtrace then.
    let config = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["num_key_value_heads"] = 2.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_bessie-prompt"))
        .arg("-m")
        .arg(dir.path())
        .args(["--prompt", "Moo?"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = failing(&run);
    assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{stderr}");
    assert!(stderr.contains("has shape [64, 64] but config.json implies [32, 64]"), "{stderr}");
}

/// On a terminal (a pseudo-terminal from util-linux `script`), messages are read with line editing: each
/// goes into the history file, and Ctrl-D ends the session on a line of its own.
#[test]
fn a_terminal_gets_line_editing_history_and_a_newline_at_ctrl_d() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` (for a pseudo-terminal) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path(), 1);
    let history = dir.path().join("history.txt");
    let command = format!(
        "{} -m {} --max-new-tokens 2 --history {}",
        env!("CARGO_BIN_EXE_bessie-prompt"),
        dir.path().display(),
        history.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    use std::io::Write;
    stdin.write_all(b"Moo?\n").unwrap();
    // The answer comes before Ctrl-D; typed at once, the terminal would read both as one line.
    std::thread::sleep(std::time::Duration::from_secs(3));
    stdin.write_all(b"\x04").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("User: ") && text.contains("new tokens"), "{text}");
    // Ctrl-D at the last prompt: that prompt's line is ended before the program exits.
    let after_last_prompt = text.rsplit("User: ").next().unwrap();
    assert!(after_last_prompt.contains('\n'), "{text:?}");
    assert_eq!(std::fs::read_to_string(&history).unwrap().lines().last(), Some("Moo?"));
}
