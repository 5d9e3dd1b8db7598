//! The tokenizers and chat templates of the families Bessie fine-tunes, against their peers: LLaMA-3
//! byte-level BPE ids against tiktoken and transformers, the families' own Jinja templates rendered byte
//! for byte as transformers renders them, the loss masks of multi-turn data, the ids generation stops at,
//! and the errors of a tokenizer that does not fit its model. The fixtures are written by
//! tests/reference/bpe_ids.py and tests/reference/chat_templates.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use bessie::data::{check, load_jsonl, DataOptions, LossOn, Overflow};
use bessie::tokenizer::template::{ChatTemplate, Message, SpecialTokens, TemplateChoice};
use bessie::tokenizer::{DecodeStream, Tokenizer};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The LLaMA-3 tokenizer as 2B4T ships it (`../shared`, which CI lays beside the checkout).
fn llama3_json() -> PathBuf {
    let path = root().join("../shared/tokenizers/llama3/tokenizer.json");
    assert!(path.is_file(), "{} is missing: the LLaMA-3 tokenizer is these tests' oracle input", path.display());
    path
}

fn llama3() -> Tokenizer {
    Tokenizer::load(&llama3_json()).unwrap()
}

/// A checkpoint-like directory with the LLaMA-3 tokenizer and the given extra files.
fn llama3_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(llama3_json(), dir.path().join("tokenizer.json")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn llama3_bpe_ids_match_tiktoken_and_transformers() {
    let tok = llama3();
    let f = fixture("llama3_bpe_ids.json");
    assert_eq!(f["agreed"], "transformers+tiktoken");
    assert_eq!(tok.vocab_size(), f["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.bos_id(), 128000);
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode_with_offsets(text, false).unwrap();
        assert_eq!(enc.ids, ids(&case["ids"]), "{text:?}");
        if let Some(decoded) = case.get("decoded") {
            // transformers kept the special tokens; Bessie's decode drops them, as it does for answers.
            let mut expected = decoded.as_str().unwrap().to_string();
            for special in f["special_tokens"].as_object().unwrap().keys() {
                expected = expected.replace(special.as_str(), "");
            }
            assert_eq!(tok.decode(&enc.ids).unwrap(), expected, "{text:?}");
        }
        // Offsets: byte ranges of the text, in order, that together cover all of it.
        let mut covered = 0;
        for r in &enc.offsets {
            assert!(r.start <= covered && r.end <= text.len() && text.is_char_boundary(r.start), "{text:?}: {r:?}");
            covered = covered.max(r.end);
        }
        assert_eq!(covered, text.len(), "{text:?}");
    }
}

#[test]
fn streaming_decode_of_byte_level_tokens_prints_each_character_once_and_whole() {
    let tok = llama3();
    let text = "Moo 🐂! 中文 👨‍👩‍👧, ﷺ and Ünïcödé.";
    let prompt = tok.encode("Q:", true).unwrap();
    let answer = tok.encode(text, false).unwrap();
    // Several tokens are pieces of one character here.
    assert!(answer.len() > text.chars().filter(|c| !c.is_ascii()).count());
    let mut stream = DecodeStream::new(&tok, &prompt);
    let mut pieces = Vec::new();
    for &id in &answer {
        pieces.extend(stream.push(id).unwrap());
    }
    pieces.extend(stream.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
}

/// The families' templates as the fixtures name them, with their special tokens.
fn family_templates() -> Vec<(String, ChatTemplate)> {
    let f = fixture("chat_template_renderings.json");
    let mut out = Vec::new();
    for (name, t) in f["templates"].as_object().unwrap() {
        let path = root().join("tests/fixtures").join(t["file"].as_str().unwrap());
        let special = SpecialTokens {
            bos: t["bos_token"].as_str().map(str::to_string),
            eos: t["eos_token"].as_str().map(str::to_string),
            pad: None,
        };
        let source = std::fs::read_to_string(&path).unwrap();
        out.push((name.clone(), ChatTemplate::jinja(source, path.display().to_string(), &special, None).unwrap()));
    }
    assert_eq!(out.len(), 5);
    out
}

#[test]
fn family_templates_render_byte_for_byte_as_transformers_does() {
    let f = fixture("chat_template_renderings.json");
    let templates = family_templates();
    let renderings = f["renderings"].as_array().unwrap();
    assert_eq!(renderings.len(), 80);
    for r in renderings {
        let (name, conversation) = (r["template"].as_str().unwrap(), r["conversation"].as_str().unwrap());
        let t = &templates.iter().find(|(n, _)| n == name).unwrap().1;
        let m = messages(&f["conversations"][conversation]);
        let generation = r["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            t.render(&m, generation).unwrap(),
            r["text"].as_str().unwrap(),
            "{name} {conversation} {generation}"
        );
    }
}

#[test]
fn assistant_spans_are_the_turns_transformers_renders() {
    let f = fixture("chat_template_renderings.json");
    let templates = family_templates();
    let turns = f["turns"].as_array().unwrap();
    assert!(turns.len() > 40);
    for turn in turns {
        let (name, conversation) = (turn["template"].as_str().unwrap(), turn["conversation"].as_str().unwrap());
        let t = &templates.iter().find(|(n, _)| n == name).unwrap().1;
        let m = messages(&f["conversations"][conversation]);
        let (text, spans) = t.render_with_spans(&m).unwrap();
        let k = turn["turn"].as_u64().unwrap() as usize;
        let nth = m[..k].iter().filter(|m| m.role == "assistant").count();
        let span = spans[nth].clone();
        assert_eq!(&text[span.clone()], turn["assistant"].as_str().unwrap(), "{name} {conversation} turn {k}");
        assert_eq!(&text[..span.start], turn["prompt"].as_str().unwrap());
        assert_eq!(&text[..span.end], turn["full"].as_str().unwrap());
    }
}

/// A data file of `lines` in a temp dir.
fn jsonl(lines: &[Value]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    (dir, path)
}

#[test]
fn multi_turn_loss_covers_every_assistant_turn_and_its_end_of_turn_token_only() {
    let source = std::fs::read_to_string(root().join("tests/fixtures/chat_templates/llama3-instruct.jinja")).unwrap();
    let config = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": source});
    let dir = llama3_dir(&[("tokenizer_config.json", config.to_string())]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let template = ChatTemplate::load(&TemplateChoice::Auto, dir.path(), &tok, None).unwrap();
    assert!(template.origin().contains("tokenizer_config.json") && !template.add_bos());
    let replies = ["Four, in one stomach.", " Rumen first 🐂 "];
    let line = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many compartments?"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "Which is first?"},
        {"role": "assistant", "content": replies[1]},
    ]});
    let (_d, path) = jsonl(&[line.clone(), json!({"prompt": "Hi", "response": "Moo."})]);
    let opts = DataOptions { max_seq_len: 512, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: false };
    let ds = load_jsonl(&path, &tok, &template, &opts, None).unwrap();
    let ex = &ds.examples[0];
    assert_eq!(ex.ids[0], 128000, "the template writes BOS once");
    assert_ne!(ex.ids[1], 128000);
    assert_eq!(ex.trained.len(), 2, "{:?}", ex.trained);
    let eot = tok.token_to_id("<|eot_id|>").unwrap();
    for (range, reply) in ex.trained.iter().zip(replies) {
        // The template trims each message; the trained tokens are the reply and the <|eot_id|> after it.
        assert_eq!(tok.decode(&ex.ids[range.clone()]).unwrap(), reply.trim());
        assert_eq!(ex.ids[range.end - 1], eot);
    }
    let untrained: Vec<u32> = (0..ex.ids.len()).filter(|&t| !ex.is_trained(t)).map(|t| ex.ids[t]).collect();
    let text = tok.decode(&untrained).unwrap();
    assert!(text.contains("How many compartments?") && text.contains("Which is first?") && !text.contains("Rumen"));
    assert_eq!(ds.stats.loss_tokens, ds.examples.iter().map(|e| e.trained_tokens()).sum::<usize>());

    // `bessie-data check` counts both formats and the trained share.
    let report = check(&path, &tok, &template, 512).unwrap();
    assert_eq!(report.formats.values().copied().collect::<Vec<_>>(), [1, 1]);
    assert!(!report.refused());
    let text = report.to_string();
    assert!(text.contains("format messages: 1") && text.contains("format prompt/response: 1"), "{text}");
    assert!(text.contains(&format!("{} trained", report.trained_tokens)), "{text}");
}

#[test]
fn bad_conversations_name_the_line() {
    let tok = llama3();
    let t = ChatTemplate::bessie(None);
    let opts = DataOptions { max_seq_len: 512, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: false };
    let cases = [
        (json!({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
        (json!({"messages": "x"}), "field `messages` must be a list"),
        (json!({"messages": [{"role": "user"}]}), "messages[0]: missing field `content`"),
        (json!({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}), "use one format per line"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            "not the role 'tool'",
        ),
    ];
    for (line, expected) in cases {
        let (_d, path) = jsonl(&[line]);
        let e = format!("{:#}", load_jsonl(&path, &tok, &t, &opts, None).unwrap_err());
        assert!(e.contains("data.jsonl:1") && e.contains(expected), "{e}");
    }
}

#[test]
fn generation_stops_at_the_checkpoint_end_of_turn_ids() {
    let config = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}).to_string();
    let dir = llama3_dir(&[
        ("tokenizer_config.json", config.clone()),
        ("generation_config.json", json!({"eos_token_id": [128001, 128009]}).to_string()),
    ]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    // The 2B4T reference code stops at exactly these (tests/fixtures/generation_configs.json).
    let reference = &fixture("generation_configs.json")["families"]["microsoft/bitnet-b1.58-2B-4T"];
    assert_eq!(tok.stop_ids(), ids(&reference["reference_stop_ids"]));
    let stop = bessie::generate::Stop::new(&tok, &ChatTemplate::bessie(None));
    assert_eq!((stop.ids.as_slice(), stop.marker), (tok.stop_ids(), Some("🐂")));
    let jinja =
        ChatTemplate::jinja("{{ messages[0].content }}".into(), "t".into(), &SpecialTokens::of(&tok), None).unwrap();
    assert_eq!(bessie::generate::Stop::new(&tok, &jinja).marker, None, "🐂 ends answers of the Bessie template only");

    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": 7}"#).unwrap();
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().stop_ids(), [128001, 7]);
    for bad in [r#"{"eos_token_id": 200000}"#, r#"{"eos_token_id": "x"}"#] {
        std::fs::write(dir.path().join("generation_config.json"), bad).unwrap();
        let e = format!("{:#}", Tokenizer::from_dir(dir.path()).err().unwrap());
        assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{e}");
    }
}

#[test]
fn checkpoint_templates_are_found_and_chosen() {
    let tok = llama3();
    let load = |dir: &Path, choice: &str| ChatTemplate::load(&choice.parse().unwrap(), dir, &tok, None);
    let plain = llama3_dir(&[]);
    assert_eq!(load(plain.path(), "auto").unwrap().origin(), "the Bessie template");
    let e = format!("{:#}", load(plain.path(), "checkpoint").err().unwrap());
    assert!(e.contains("has no chat template"), "{e}");
    // A list of named templates (older transformers): the one named "default".
    let listed = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]});
    let dir = llama3_dir(&[("tokenizer_config.json", listed.to_string())]);
    assert_eq!(load(dir.path(), "checkpoint").unwrap().render(&[], false).unwrap(), "D0");
    // chat_template.jinja (transformers 5) comes first.
    std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    assert_eq!(load(dir.path(), "auto").unwrap().render(&[], false).unwrap(), "J");
    assert_eq!(load(dir.path(), "bessie").unwrap().origin(), "the Bessie template");
    let file = dir.path().join("mine.jinja");
    std::fs::write(&file, "{% if %}").unwrap();
    let e = format!("{:#}", load(dir.path(), file.to_str().unwrap()).err().unwrap());
    assert!(e.contains("mine.jinja") && e.contains("line 1"), "{e}");
}

#[test]
fn a_tokenizer_larger_than_the_model_is_an_error_naming_both() {
    let tok = llama3();
    let e = tok.check_fits(1002, Path::new("ckpt/config.json")).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("128256") && e.contains("1002") && e.contains("ckpt/config.json"),
        "{e}"
    );
    tok.check_fits(128256, Path::new("config.json")).unwrap();
}

#[test]
fn bessie_data_tokenize_prints_the_ids() {
    let f = fixture("llama3_bpe_ids.json");
    let cases: Vec<&Value> = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            let t = c["text"].as_str().unwrap();
            !t.is_empty() && !t.contains('\n') && !t.contains('\r')
        })
        .take(20)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, cases.iter().map(|c| format!("{}\n", c["text"].as_str().unwrap())).collect::<String>())
        .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bessie-data")).arg("tokenize").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json = llama3_json();
    let out = run(&["--tokenizer", json.to_str().unwrap(), "--file", file.to_str().unwrap()]);
    let got: Vec<Vec<u32>> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got, cases.iter().map(|c| ids(&c["ids"])).collect::<Vec<_>>());
    let out = run(&["--tokenizer", json.to_str().unwrap(), "--bos", "--text", cases[0]["text"].as_str().unwrap()]);
    let got: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got, [vec![128000], ids(&cases[0]["ids"])].concat());
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused_by_every_program() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let init = Command::new(env!("CARGO_BIN_EXE_bessie-init-model"))
        .args(["--out", ckpt.to_str().unwrap(), "--shape", "tiny"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    // A LLaMA-3 tokenizer in a checkpoint of 1002 rows: ids up to 128255 cannot be embedded.
    for f in ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::remove_file(ckpt.join(f)).ok();
    }
    std::fs::copy(llama3_json(), ckpt.join("tokenizer.json")).unwrap();
    let prompt = Command::new(env!("CARGO_BIN_EXE_bessie-prompt"))
        .args(["-m", ckpt.to_str().unwrap(), "--prompt", "Moo?", "--device", "cpu"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&prompt.stderr);
    assert!(!prompt.status.success() && e.contains("128256") && e.contains("1002") && e.contains("config.json"), "{e}");
    assert!(!e.contains("index-select"), "{e}");
}

/// Tokenizing training data: Bessie's whole path (JSON, template with its assistant spans, ids with offsets,
/// masks) on every core against the `tokenizers` crate encoding the same rendered texts on one thread.
/// Run with `cargo test --release --test chat -- --ignored --nocapture tokenization_speed`.
#[test]
#[ignore]
fn tokenization_speed() {
    // Words of real English and code: this project's README.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let words: Vec<&str> = readme.split_whitespace().collect();
    let mut rng = bessie::rng::Rng::new(7);
    let mut text = |bytes: usize| {
        let mut s = String::new();
        while s.len() < bytes {
            s.push_str(words[(rng.next_u64() % words.len() as u64) as usize]);
            s.push(' ');
        }
        s
    };
    let lines: Vec<String> =
        (0..100_000).map(|_| json!({"prompt": text(700), "response": text(300)}).to_string()).collect();
    let (_d, path) = jsonl(&lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>());
    let megabytes = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
    let tok = llama3();
    let template = ChatTemplate::bessie(None);
    let opts = DataOptions { max_seq_len: 4096, loss_on: LossOn::Response, overflow: Overflow::Truncate, pack: false };

    let start = std::time::Instant::now();
    let ds = load_jsonl(&path, &tok, &template, &opts, None).unwrap();
    let bessie = start.elapsed().as_secs_f64();

    let rendered: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let turn = [
                Message::new("user", v["prompt"].as_str().unwrap()),
                Message::new("assistant", v["response"].as_str().unwrap()),
            ];
            template.render(&turn, false).unwrap()
        })
        .collect();
    let crate_tok = tokenizers::Tokenizer::from_file(llama3_json()).unwrap();
    let start = std::time::Instant::now();
    let mut tokens = 0;
    for t in &rendered {
        tokens += crate_tok.encode(t.as_str(), false).unwrap().len();
    }
    let alone = start.elapsed().as_secs_f64();
    assert_eq!(tokens + ds.examples.len(), ds.stats.tokens, "the same ids, plus BOS");
    let threads = rayon::current_num_threads();
    println!(
        "{megabytes:.1} MB, {} tokens: Bessie {bessie:.2} s ({:.1} MB/s on {threads} threads); tokenizers crate alone, \
         one thread: {alone:.2} s ({:.1} MB/s); ratio {:.2}",
        ds.stats.tokens,
        megabytes / bessie,
        megabytes / alone,
        alone / bessie
    );
    assert!(alone / bessie >= 0.9 * threads as f64, "slower than the crate on one thread times the cores");
}

#[test]
fn the_chat_demo_config_trains_and_answers_in_its_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let set = |kv: String| ["--set".to_string(), kv];
    let train = Command::new(env!("CARGO_BIN_EXE_bessie-train"))
        .args(["--config", root().join("configs/tiny-chat.toml").to_str().unwrap()])
        .args(set(format!("checkpoint.out_dir={}", out.display())))
        .args(set("train.max_steps=30".into()))
        .output()
        .unwrap();
    assert!(train.status.success(), "{}", String::from_utf8_lossy(&train.stderr));
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 30);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(mean(&losses[25..]) < 0.6 * mean(&losses[..5]), "{losses:?}");
    // The checkpoint carries the template it was trained with, so prompting it needs no --template.
    let final_dir = out.join("final_checkpoint");
    let template = std::fs::read_to_string(root().join("configs/chat_template.jinja")).unwrap();
    assert_eq!(std::fs::read_to_string(final_dir.join("chat_template.jinja")).unwrap(), template);
    let prompt = Command::new(env!("CARGO_BIN_EXE_bessie-prompt"))
        .args(["-m", final_dir.to_str().unwrap(), "--device", "cpu", "--max-new-tokens", "40"])
        .args(["--prompt", "Tom asks: what is 2 plus 3?"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&prompt.stderr);
    assert!(prompt.status.success() && err.contains("prompt tokens"), "{err}");

    // A run with the Bessie template saves it whole (its system prompt written in) and reads it back as
    // the Bessie template: answers end at 🐂 as before.
    let tok = Tokenizer::from_dir(&root().join("assets/tokenizer")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), ChatTemplate::bessie(Some("Moo.")).standalone()).unwrap();
    let loaded = ChatTemplate::load(&TemplateChoice::Auto, dir.path(), &tok, None).unwrap();
    assert_eq!((loaded.origin(), loaded.end_marker(), loaded.add_bos()), ("the Bessie template", Some("🐂"), true));
    assert_eq!(loaded.render(&[Message::new("user", "hi")], true).unwrap(), "\nMoo.\n\nUser:\nhi\n\nBessie:\n");
}
