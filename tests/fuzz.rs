//! A mutation fuzzer over Bessie's readers of downloaded files: tokenizer.model, tokenizer_config.json,
//! added_tokens.json, tokenizer.json, generation_config.json, model.safetensors and its sharded index,
//! pytorch_model.bin (as Bessie and as torch.save write it), config.json, the run config and a training
//! checkpoint's trainer_state.json, optimizer.safetensors and checksums.json.
//!
//! Valid seed files are built here; each case copies one seed directory, mutates one file with a small
//! deterministic mutator, and runs the real reader on it in a child process (this binary again) under a
//! time limit and a virtual memory cap. A case fails when the child panics, dies by a signal (a stack
//! overflow or an allocation beyond the cap aborts), runs past the limit, or any file under the case's
//! root changes (readers write nothing; a sibling `outside/` directory is there to be left alone).
//! Otherwise the reader accepted the input or refused it with an error; both are fine.
//!
//! `cargo test --release --test fuzz` runs `DEFAULT_CASES` cases; `BESSIE_FUZZ_CASES=N` runs N,
//! `BESSIE_FUZZ_SEED` shifts the cases, `BESSIE_FUZZ_JOBS` sets the parallel children (default 2), and
//! `BESSIE_FUZZ_VERBOSE=1` prints every case's outcome.
//! Failing inputs are kept under the test's temporary directory, and the summary says where.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bessie::checkpoint::{CheckpointWriter, RunIdentity, TrainerState};
use bessie::config::{ModelConfig, RunConfig};
use bessie::model::hf::{self, Layout};
use bessie::tokenizer::Tokenizer;
use bessie::train::params::ParamLayout;
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;

const DEFAULT_CASES: usize = 2400;
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// The child's virtual memory cap in KiB (`ulimit -v`): 4 GiB.
const MEMORY_CAP_KIB: u64 = 4 << 20;
const CHILD_ENV: &str = "BESSIE_FUZZ_CHILD";

/// A reader under test: the seed directory it reads, the file mutated in it, and what the child runs.
struct Target {
    name: &'static str,
    seed: &'static str,
    file: &'static str,
}

const TARGETS: &[Target] = &[
    Target { name: "tokenizer.model", seed: "tokenizer", file: "tokenizer.model" },
    Target { name: "tokenizer_config.json", seed: "tokenizer", file: "tokenizer_config.json" },
    Target { name: "added_tokens.json", seed: "tokenizer", file: "added_tokens.json" },
    Target { name: "tokenizer.json", seed: "tokenizer-json", file: "tokenizer.json" },
    Target { name: "generation_config.json", seed: "tokenizer-json", file: "generation_config.json" },
    Target { name: "model.safetensors", seed: "safetensors", file: "model.safetensors" },
    Target { name: "config.json", seed: "safetensors", file: "config.json" },
    Target { name: "model.safetensors.index.json", seed: "sharded", file: "model.safetensors.index.json" },
    Target { name: "model-00001-of-00002.safetensors", seed: "sharded", file: "model-00001-of-00002.safetensors" },
    Target { name: "pytorch_model.bin", seed: "pth", file: "pytorch_model.bin" },
    Target { name: "torch.save state dict", seed: "torch-save", file: "pytorch_model.bin" },
    Target { name: "run config", seed: "run", file: "run.toml" },
    Target { name: "trainer_state.json", seed: "checkpoint", file: "trainer_state.json" },
    Target { name: "optimizer.safetensors", seed: "checkpoint", file: "optimizer.safetensors" },
    Target { name: "checksums.json", seed: "checkpoint-sums", file: "checksums.json" },
];

/// What the child does with a case directory: read it as the named seed kind, the way Bessie does.
fn read_case(seed: &str, dir: &Path) -> anyhow::Result<()> {
    let cpu = Device::Cpu;
    match seed {
        "tokenizer" | "tokenizer-json" => {
            let tok = Tokenizer::from_dir(dir)?;
            let text = "Moo, said  the   cow.</line>\u{2581}ünï 🐂<pad>\n\t".repeat(20);
            let ids = tok.encode(&text, true)?;
            tok.decode(&ids)?;
        }
        "safetensors" | "sharded" | "pth" => {
            bessie::model::load(dir, &cpu)?;
            // Training's and export's paths: all parameters as f32 latents.
            let (cfg, vb) = hf::open(dir, DType::F32, &cpu)?;
            ParamLayout::new(&cfg).load(&vb, &cpu)?;
        }
        "torch-save" => {
            // The `_metadata`, memo gets and strided views of torch.save's own output, read as any dtype.
            let weights = hf::WeightFiles::open(dir, hf::NonFinite::Warn)?;
            for name in weights.names() {
                weights.get_unchecked(name, DType::F32, &cpu)?;
            }
        }
        "run" => {
            RunConfig::load(Some(&dir.join("run.toml")), &[])?;
        }
        "checkpoint" | "checkpoint-sums" => {
            // As resuming reads one: checksums (when there is a manifest) first.
            bessie::manifest::verify(dir)?;
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            bessie::checkpoint::load(dir, &ParamLayout::new(&cfg), &cpu)?;
        }
        other => anyhow::bail!("unknown seed {other}"),
    }
    Ok(())
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (seed, dir) = spec.split_once('\t').expect("seed TAB dir");
        match read_case(seed, Path::new(dir)) {
            Ok(()) => println!("FUZZ-ACCEPTED"),
            Err(e) => println!("FUZZ-REFUSED: {e:#}"),
        }
        return;
    }
    let env = |key: &str, default: usize| std::env::var(key).ok().map_or(default, |v| v.parse().expect(key));
    let (cases, first, jobs) =
        (env("BESSIE_FUZZ_CASES", DEFAULT_CASES), env("BESSIE_FUZZ_SEED", 0), env("BESSIE_FUZZ_JOBS", 2));
    let verbose = std::env::var_os("BESSIE_FUZZ_VERBOSE").is_some();
    let seeds = tempfile::tempdir().unwrap();
    build_seeds(seeds.path());
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");

    let next = AtomicUsize::new(0);
    let tally: Mutex<BTreeMap<&str, [usize; 3]>> = Mutex::new(BTreeMap::new());
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cases {
                    break;
                }
                let case = first + i;
                let target = &TARGETS[case % TARGETS.len()];
                let outcome = run_case(seeds.path(), target, case as u64, &kept);
                if verbose {
                    let what = match &outcome {
                        Outcome::Refused(why) => format!("refused: {why}"),
                        Outcome::Accepted => "accepted".into(),
                        Outcome::Failed(why) => format!("FAILED: {why}"),
                    };
                    println!("case {case} ({}): {what}", target.name);
                }
                let slot = match &outcome {
                    Outcome::Refused(_) => 0,
                    Outcome::Accepted => 1,
                    Outcome::Failed(why) => {
                        failures.lock().unwrap().push(format!("case {case} ({}): {why}", target.name));
                        2
                    }
                };
                let mut tally = tally.lock().unwrap();
                tally.entry(target.name).or_default()[slot] += 1;
                let done = totals(&tally);
                // Progress for long runs, which may be stopped before their summary.
                if done.iter().sum::<usize>() % 10_000 == 0 {
                    println!(
                        "after {} cases: {} refused, {} accepted, {} failed",
                        done.iter().sum::<usize>(),
                        done[0],
                        done[1],
                        done[2]
                    );
                }
            });
        }
    });
    let tally = tally.into_inner().unwrap();
    let total = totals(&tally);
    println!(
        "fuzz: {cases} cases (seed {first}) in {:.0} s: refused / accepted / failed",
        start.elapsed().as_secs_f64()
    );
    for (name, [r, a, f]) in &tally {
        println!("  {name:34} {r:6} {a:6} {f:6}");
    }
    println!("  {:34} {:6} {:6} {:6}", "all", total[0], total[1], total[2]);
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        eprintln!("{} failures (inputs kept in {}):", failures.len(), kept.display());
        failures.iter().for_each(|f| eprintln!("  {f}"));
        std::process::exit(1);
    }
    // A mutator that never gets past the parsers tests nothing: some inputs must be accepted and some refused.
    for (name, [r, a, _]) in &tally {
        assert!(cases < 10 * TARGETS.len() || (*r > 0 && *a > 0), "{name}: {r} refused, {a} accepted");
    }
}

/// Refused, accepted and failed cases over all targets.
fn totals(tally: &BTreeMap<&str, [usize; 3]>) -> [usize; 3] {
    tally.values().fold([0; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]])
}

enum Outcome {
    /// With the error's first line.
    Refused(String),
    Accepted,
    Failed(String),
}

/// Runs one case: copy the seed, mutate, read in a child, compare the files before and after.
fn run_case(seeds: &Path, target: &Target, case: u64, kept: &Path) -> Outcome {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("case");
    copy_dir(&seeds.join(target.seed), &dir);
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("model.safetensors"), b"not yours").unwrap();
    let file = dir.join(target.file);
    let mut rng = Rng(case.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let bytes = mutated(&std::fs::read(&file).unwrap(), target.file, &mut rng);
    std::fs::write(&file, bytes).unwrap();

    let before = snapshot(root.path());
    let outcome = run_child(target.seed, &dir);
    if !matches!(outcome, Outcome::Failed(_)) && snapshot(root.path()) != before {
        return keep(Outcome::Failed("files under the case root changed".into()), &dir, kept, target, case);
    }
    keep(outcome, &dir, kept, target, case)
}

fn keep(outcome: Outcome, dir: &Path, kept: &Path, target: &Target, case: u64) -> Outcome {
    if let Outcome::Failed(why) = &outcome {
        let to = kept.join(format!("{case}-{}", target.seed));
        let _ = std::fs::remove_dir_all(&to);
        copy_dir(dir, &to);
        return Outcome::Failed(format!("{why} (input kept in {})", to.display()));
    }
    outcome
}

fn run_child(seed: &str, dir: &Path) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -v {MEMORY_CAP_KIB} && exec \"$0\""), exe.to_str().unwrap()])
        .env(CHILD_ENV, format!("{seed}\t{}", dir.display()))
        .env("RUST_BACKTRACE", "0")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let (out, err) = (drain(Box::new(child.stdout.take().unwrap())), drain(Box::new(child.stderr.take().unwrap())));
    let deadline = Instant::now() + TIME_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return Outcome::Failed(format!("no result within {} s", TIME_LIMIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let tail = |s: &str| s.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    if let (true, Some((_, why))) = (status.success(), out.split_once("FUZZ-REFUSED: ")) {
        Outcome::Refused(why.lines().next().unwrap_or_default().to_string())
    } else if status.success() && out.contains("FUZZ-ACCEPTED") {
        Outcome::Accepted
    } else if err.contains("memory allocation of") {
        Outcome::Failed(format!("allocation beyond the {} GiB cap: {}", MEMORY_CAP_KIB >> 20, tail(&err)))
    } else {
        use std::os::unix::process::ExitStatusExt;
        let how = status.signal().map_or(format!("exit {status}"), |s| format!("signal {s}"));
        Outcome::Failed(format!("{how}: {}", tail(&err)))
    }
}

/// Every file under `root` with its size and modification time.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.insert(e.path(), (m.len(), m.modified().unwrap()));
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The seed directories, one per kind of input, all valid.
fn build_seeds(root: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = root.join("tokenizer");
    copy_dir(&repo.join("assets/tokenizer"), &tok);
    std::fs::write(tok.join("added_tokens.json"), r#"{"<pad>": 1000, "</line>": 1001}"#).unwrap();
    let tok_json = root.join("tokenizer-json");
    copy_dir(&repo.join("tests/fixtures/shipped_tokenizer_json"), &tok_json);
    std::fs::write(tok_json.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 1001]}"#)
        .unwrap();

    let cfg = ModelConfig::shape("tiny", 64).unwrap();
    let weights = bessie::model::init::random_weights(&cfg, 7).unwrap();
    for (name, layout) in [("safetensors", Layout::Safetensors), ("sharded", Layout::Sharded), ("pth", Layout::Pth)] {
        hf::save(&root.join(name), &cfg, &weights, DType::F32, layout, &[]).unwrap();
    }
    let torch_save = root.join("torch-save");
    std::fs::create_dir(&torch_save).unwrap();
    let state_dict = common::torch_zip(&common::state_dict_pickle("FloatStorage", [2, 3]), &common::six_floats());
    std::fs::write(torch_save.join("pytorch_model.bin"), state_dict).unwrap();
    let run = root.join("run");
    std::fs::create_dir(&run).unwrap();
    let toml = std::fs::read_to_string(repo.join("configs/tiny.toml")).unwrap();
    std::fs::write(run.join("run.toml"), toml).unwrap();

    let out = root.join("out");
    let layout = ParamLayout::new(&cfg);
    let params = Tensor::zeros(layout.total, DType::F32, &Device::Cpu).unwrap();
    let writer = CheckpointWriter {
        out_dir: &out,
        model_cfg: &cfg,
        layout: &layout,
        tokenizer_files: &[],
        chat_template: "",
        run_config: "",
        keep: 1,
        every: 1,
    };
    let run = RunIdentity {
        data_fingerprint: "0123abcd".into(),
        data_examples: 40,
        world_size: 1,
        micro_batch: 4,
        grad_accum: 1,
    };
    let state = TrainerState { step: 3, epoch: 0, epoch_rows_done: 12, seed: 42, run: Some(run) };
    let saved = writer.save(&params, &params, &params, &state).unwrap();
    // With its checksums, and without them for the files behind (as an attacker would recompute them).
    copy_dir(&saved, &root.join("checkpoint-sums"));
    std::fs::rename(saved, root.join("checkpoint")).unwrap();
    std::fs::remove_file(root.join("checkpoint").join(bessie::manifest::MANIFEST_FILE)).unwrap();
    for seed in [
        "tokenizer",
        "tokenizer-json",
        "safetensors",
        "sharded",
        "pth",
        "torch-save",
        "run",
        "checkpoint",
        "checkpoint-sums",
    ] {
        read_case(seed, &root.join(seed)).unwrap_or_else(|e| panic!("seed {seed} does not load: {e:#}"));
    }
}

/// xorshift64*: deterministic, so a case number reproduces its input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// `bytes` with one to four mutations. Zip archives are also mutated inside (an entry changed and the
/// archive rewritten with valid checksums, so the mutation reaches the pickle); safetensors files favour
/// their JSON header.
fn mutated(bytes: &[u8], name: &str, rng: &mut Rng) -> Vec<u8> {
    if name.ends_with(".bin") && rng.below(4) != 0 {
        return mutated_zip(bytes, rng);
    }
    // Half the JSON and TOML cases (and a third of the safetensors headers) change values, not syntax, so
    // they get past the parser to the checks behind it.
    let structural = match name.rsplit('.').next() {
        Some("json" | "toml") => rng.below(2) == 0,
        Some("safetensors") => rng.below(3) == 0,
        _ => false,
    };
    if let Some(out) = structural.then(|| mutated_document(bytes, name, rng)).flatten() {
        return out;
    }
    let focus = if name.ends_with(".safetensors") && bytes.len() >= 8 {
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    } else {
        bytes.len()
    };
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        mutate(&mut out, focus.min(bytes.len()), rng);
    }
    out
}

/// `bytes` (JSON, TOML, or a safetensors file's JSON header) with one to three values changed; None
/// when the result cannot be written in the file's syntax (TOML has no null).
fn mutated_document(bytes: &[u8], name: &str, rng: &mut Rng) -> Option<Vec<u8>> {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let mut doc: serde_json::Value = if name.ends_with(".toml") {
        serde_json::to_value(text(bytes)?.parse::<toml::Table>().ok()?).ok()?
    } else if name.ends_with(".safetensors") {
        serde_json::from_slice(&bytes[8..8 + u64::from_le_bytes(bytes[..8].try_into().ok()?) as usize]).ok()?
    } else {
        serde_json::from_slice(bytes).ok()?
    };
    let strings = {
        let mut all = vec![];
        collect_strings(&doc, &mut all);
        all
    };
    for _ in 0..1 + rng.below(3) {
        mutate_value(&mut doc, &strings, rng);
    }
    Some(if name.ends_with(".toml") {
        toml::to_string(&toml::Value::try_from(&doc).ok()?).ok()?.into_bytes()
    } else if name.ends_with(".safetensors") {
        let header = serde_json::to_vec(&doc).ok()?;
        let data = &bytes[8 + u64::from_le_bytes(bytes[..8].try_into().ok()?) as usize..];
        [&(header.len() as u64).to_le_bytes()[..], &header, data].concat()
    } else {
        serde_json::to_vec_pretty(&doc).ok()?
    })
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| {
            out.push(k.clone());
            collect_strings(v, out)
        }),
        _ => {}
    }
}

/// Walks to a random node of `v` and changes it: an extreme number, an empty or borrowed string (duplicates),
/// another type, a removed key or element, a repeated element, or a key renamed to another string.
fn mutate_value(v: &mut serde_json::Value, strings: &[String], rng: &mut Rng) {
    use serde_json::Value;
    let children = match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if children > 0 && rng.below(4) != 0 {
        let i = rng.below(children);
        match v {
            Value::Array(a) => match rng.below(8) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let copy = a[i].clone();
                    a.insert(i, copy);
                }
                _ => mutate_value(&mut a[i], strings, rng),
            },
            Value::Object(o) => {
                let key = o.keys().nth(i).unwrap().clone();
                match rng.below(8) {
                    0 => {
                        o.remove(&key);
                    }
                    1 if !strings.is_empty() => {
                        let value = o.remove(&key).unwrap();
                        o.insert(rng.pick(strings).clone(), value);
                    }
                    _ => mutate_value(o.get_mut(&key).unwrap(), strings, rng),
                }
            }
            _ => unreachable!(),
        }
        return;
    }
    *v = match rng.below(6) {
        0 | 1 => {
            let n =
                *rng.pick(&[0i128, -1, 1, 2, 3, 65_536, 1 << 30, 1 << 31, 1 << 32, 1 << 62, 1 << 63, u64::MAX as i128]);
            serde_json::from_str(&n.to_string()).unwrap_or(Value::Null)
        }
        2 => Value::String(String::new()),
        3 if !strings.is_empty() => Value::String(rng.pick(strings).clone()),
        4 => rng.pick(&[Value::Null, Value::Bool(true), serde_json::json!(1e308), serde_json::json!(-0.5)]).clone(),
        _ => rng.pick(&[serde_json::json!([]), serde_json::json!({}), serde_json::json!([[1, 2]])]).clone(),
    };
}

fn mutated_zip(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut entries: Vec<(String, Vec<u8>)> = (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect();
    let pickle = entries.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let i = if rng.below(4) != 0 { pickle } else { rng.below(entries.len()) };
    let (name, data) = &mut entries[i];
    if rng.below(8) == 0 {
        // Renamed entries: another storage key, a path, a second pickle.
        *name = rng.pick(&["archive/data/99", "../data.pkl", "other/data.pkl", "archive/data/0"]).to_string();
    } else {
        for _ in 0..1 + rng.below(4) {
            let len = data.len();
            mutate(data, len, rng);
        }
    }
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in &entries {
        // A duplicate name is refused by the writer; drop it.
        if w.start_file(name.as_str(), opts).is_ok() {
            w.write_all(data).unwrap();
        }
    }
    w.finish().unwrap().into_inner()
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "65536",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "1e308",
    "-0.0",
    "nan",
    "340282366920938463463374607431768211456",
];

/// Chunks that readers nest or repeat (protobuf group keys, pickle lists, marks and memo gets, JSON
/// arrays and objects), inserted many times over.
const NESTERS: &[&[u8]] = &[b"\x0b", b"]", b"(", b"h\x00", b"(h\x00h\x00\x86", b"[", b"{\"a\":", b"\x1a\x7f"];

/// Words swapped for one another where the file has them: storage classes and rebuild functions in
/// pickles, dtypes, token texts and shard names in JSON, GLOBALs no state dict has.
const WORDS: &[&str] = &[
    "FloatStorage",
    "HalfStorage",
    "LongStorage",
    "ByteStorage",
    "_rebuild_tensor_v2",
    "_rebuild_parameter",
    "collections\nOrderedDict",
    "os\nsystem",
    "builtins\neval",
    "\"F32\"",
    "\"F16\"",
    "\"I64\"",
    "\"U8\"",
    "<pad>",
    "</line>",
    "<s>",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "../outside/model.safetensors",
    "/dev/zero",
    "model.embed_tokens.weight",
    "model.layers.1.mlp.down_proj.weight",
    "true",
    "false",
    "null",
];

/// One mutation of `data`, at a position within `focus` half of the time.
fn mutate(data: &mut Vec<u8>, focus: usize, rng: &mut Rng) {
    let len = data.len();
    let pos = if rng.below(2) == 0 { rng.below(focus) } else { rng.below(len) }.min(len);
    match rng.below(11) {
        9 => {
            // At the very start a quarter of the time, where the outermost parser sees it.
            let pos = if rng.below(4) == 0 { 0 } else { pos };
            let chunk = rng.pick(NESTERS);
            let most = *rng.pick(&[10, 1000, 100_000]);
            let times = 1 + rng.below(most);
            let repeated: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            data.splice(pos..pos, repeated);
        }
        10 => {
            let present: Vec<&str> =
                WORDS.iter().copied().filter(|w| data.windows(w.len()).any(|x| x == w.as_bytes())).collect();
            if let (Some(from), to) = (present.get(rng.below(present.len())), rng.pick(WORDS)) {
                let starts: Vec<usize> =
                    (0..=len - from.len()).filter(|&i| &data[i..i + from.len()] == from.as_bytes()).collect();
                let start = *rng.pick(&starts);
                data.splice(start..start + from.len(), to.bytes());
            }
        }
        0 if pos < len => data[pos] ^= 1 << rng.below(8),
        1 if pos < len => {
            data[pos] = *rng.pick(&[0, 1, 0x0b, 0x7f, 0x80, 0xff, b'"', b'{', b'[', b'-', b'0', b'9', b'('])
        }
        2 => {
            let v = *rng.pick(&[0u64, 1, 0xffff_ffff, 0x7fff_ffff, 1 << 30, 1 << 31, u64::MAX, 1 << 62, 1 << 63]);
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let end = (pos + width).min(len);
            data[pos..end].copy_from_slice(&v.to_le_bytes()[..end - pos]);
        }
        3 => {
            let end = (pos + 1 + rng.below(16)).min(len);
            data.drain(pos..end);
        }
        4 => {
            let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
            data.splice(pos..pos, junk);
        }
        5 => {
            // A chunk repeated many times: nesting and repetition bombs.
            let chunk: Vec<u8> = data[pos..(pos + 1 + rng.below(8)).min(len)].to_vec();
            let most = if rng.below(4) == 0 { 100_000 } else { 100 };
            let times = 1 + rng.below(most);
            let times = times.min((1 << 20) / chunk.len().max(1));
            let repeated: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            data.splice(pos..pos, repeated);
        }
        6 => data.truncate(pos),
        7 => {
            // A run of digits replaced by an extreme number.
            if let Some(start) = (pos..len).find(|&i| data[i].is_ascii_digit()) {
                let end = (start..len).find(|&i| !data[i].is_ascii_digit()).unwrap_or(len);
                data.splice(start..end, rng.pick(NUMBERS).bytes());
            }
        }
        _ => {
            // A quoted string emptied, or replaced by another string of the file (duplicates).
            let quotes: Vec<usize> = (0..len).filter(|&i| data[i] == b'"').collect();
            if quotes.len() >= 4 {
                let q = rng.below(quotes.len() / 2) * 2;
                let (start, end) = (quotes[q] + 1, quotes[q + 1]);
                let other = rng.below(quotes.len() / 2) * 2;
                let with = if rng.below(2) == 0 { vec![] } else { data[quotes[other] + 1..quotes[other + 1]].to_vec() };
                data.splice(start..end, with);
            }
        }
    }
}
