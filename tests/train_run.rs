//! End-to-end runs of the `bessie-train` binary on the built-in tiny demo (CPU, deterministic): reproducible
//! runs (also with activation recomputation and other attention blocks), resuming after SIGKILL at arbitrary moments, stopping on a non-finite loss, and bad input failing
//! before any training. Each run is kept short with `--set` overrides (a few steps, a short system prompt,
//! small micro-batches, no dev set).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tempfile::TempDir;

const TRAIN: &str = env!("CARGO_BIN_EXE_bessie-train");
const INIT_MODEL: &str = env!("CARGO_BIN_EXE_bessie-init-model");
const EXPORT: &str = env!("CARGO_BIN_EXE_bessie-export");
/// Optimizer steps of the runs whose results are compared.
const STEPS: usize = 12;
/// What every complete `checkpoint-STEP/` holds (besides config, tokenizer and run config).
const CHECKPOINT_FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "trainer_state.json"];

/// `bessie-train` writing to `out`, `steps` steps, with `extra` overrides (`section.key=value`) after the fast
/// defaults.
fn train(out: &Path, steps: usize, extra: &[&str]) -> Command {
    let fast = [
        format!("checkpoint.out_dir={}", out.display()),
        format!("train.max_steps={steps}"),
        "checkpoint.every=1".into(),
        "checkpoint.keep=2".into(),
        "log.dev_every=0".into(),
        "data.dev=".into(),
        "data.system_prompt=You are Bessie.".into(),
        "train.micro_batch=4".into(),
    ];
    let mut cmd = Command::new(TRAIN);
    for s in fast.iter().map(String::as_str).chain(extra.iter().copied()) {
        cmd.arg("--set").arg(s);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn describe(what: &str, status: ExitStatus, stderr: &[u8]) -> String {
    format!("{what}: {status}\n--- stderr ---\n{}", String::from_utf8_lossy(stderr))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("starting bessie-train");
    assert!(out.status.success(), "{}", describe("bessie-train failed", out.status, &out.stderr));
    out
}

fn run_failing(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("starting bessie-train");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}", describe("bessie-train should have failed", out.status, &out.stderr));
    (out, stderr)
}

fn load_tensors(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap_or_else(|e| panic!("loading {}: {e}", file.display()))
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype(), DType::F32);
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn final_weights(out: &Path) -> PathBuf {
    out.join("final_checkpoint").join("model.safetensors")
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (ta, tb) = (load_tensors(a), load_tensors(b));
    let mut names: Vec<&String> = ta.keys().collect();
    names.sort();
    let mut names_b: Vec<&String> = tb.keys().collect();
    names_b.sort();
    assert_eq!(names, names_b, "{} and {} hold different tensors", a.display(), b.display());
    for name in names {
        let (x, y) = (&ta[name], &tb[name]);
        assert_eq!(x.dims(), y.dims(), "`{name}`: shapes differ");
        let (vx, vy) = (f32_values(x), f32_values(y));
        let differing = vx.iter().zip(&vy).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(
            differing,
            0,
            "`{name}`: {differing} of {} values differ between {} and {}",
            vx.len(),
            a.display(),
            b.display()
        );
    }
}

/// `(step, loss, grad_norm)` of each line of `OUT/metrics.jsonl`, in file order.
fn metrics(out: &Path) -> Vec<(u64, f64, f64)> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line `{l}`: {e}", path.display()));
            // serde_json writes a non-finite float as null.
            let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            (v["step"].as_u64().unwrap(), num("loss"), num("grad_norm"))
        })
        .collect()
}

/// Steps must be 1..=n in order, with bit-identical losses and gradient norms.
fn assert_same_metrics(got: &[(u64, f64, f64)], want: &[(u64, f64, f64)]) {
    let steps: Vec<u64> = got.iter().map(|m| m.0).collect();
    assert_eq!(steps, (1..=want.len() as u64).collect::<Vec<_>>(), "metrics.jsonl steps");
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.1.to_bits() == w.1.to_bits() && g.2.to_bits() == w.2.to_bits(),
            "step {}: (loss, grad_norm) = ({}, {}), reference ({}, {})",
            g.0,
            g.1,
            g.2,
            w.1,
            w.2
        );
    }
}

/// Names in `out` (empty when it does not exist) that start with `prefix`, sorted.
fn entries(out: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(out) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    };
    names.retain(|n| n.starts_with(prefix));
    names.sort();
    names
}

/// Every `checkpoint-STEP/` in `out` is complete and its trainer state says STEP; returns the steps.
fn assert_checkpoints_complete(out: &Path) -> Vec<usize> {
    let mut steps = vec![];
    let all = entries(out, "checkpoint-");
    for name in &all {
        let dir = out.join(name);
        for f in CHECKPOINT_FILES {
            assert!(dir.join(f).is_file(), "{} lacks {f}; it has {:?}; all: {all:?}", dir.display(), entries(&dir, ""));
        }
        let step: usize = name["checkpoint-".len()..].parse().unwrap_or_else(|_| panic!("odd name {name}"));
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["step"].as_u64(), Some(step as u64), "{}/trainer_state.json", dir.display());
        steps.push(step);
    }
    steps.sort();
    steps
}

#[test]
fn fixed_seed_run_is_reproducible() {
    let started = Instant::now();
    let (a, b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    run_ok(&mut train(a.path(), STEPS, &[]));
    run_ok(&mut train(b.path(), STEPS, &[]));
    assert_same_weights(&final_weights(a.path()), &final_weights(b.path()));
    let (ma, mb) = (metrics(a.path()), metrics(b.path()));
    assert_eq!(ma.len(), STEPS);
    assert_same_metrics(&mb, &ma);
    let (first, last) = (ma[0].1, ma[STEPS - 1].1);
    assert!(last < first, "the loss should fall: step 1 {first}, step {STEPS} {last}");
    // The loss picture lies beside the metrics, a PNG of the plot's size.
    let png = png::Decoder::new(std::fs::File::open(a.path().join("loss.png")).unwrap()).read_info().unwrap();
    assert_eq!((png.info().width, png.info().height), bessie::plot::SIZE);

    // Recomputing whole blocks runs the same ops again, and per-block step weights are the same weights built
    // when needed: the same run, bit for bit.
    let c = TempDir::new().unwrap();
    run_ok(&mut train(c.path(), STEPS, &["train.recompute=blocks", "train.step_weights=per_block"]));
    assert_same_weights(&final_weights(a.path()), &final_weights(c.path()));
    assert_same_metrics(&metrics(c.path()), &ma);
    // Other attention blocks and loss chunks sum in another order: the same first step to rounding (which
    // can flip an activation's int8 rounding, hence the looser gradient norm), then a trajectory that drifts
    // as training amplifies it (measured: 2e-5 relative at step 12). Linear RoPE scaling by 1 changes no
    // angle but is written into the saved config.json.
    let d = TempDir::new().unwrap();
    let small = ["train.recompute=attention", "train.attention_block=16", "train.loss_chunk=100"];
    let rope = ["model.rope_scaling=linear", "model.rope_scaling_factor=1"];
    run_ok(&mut train(d.path(), STEPS, &[&small[..], &rope[..]].concat()));
    let md = metrics(d.path());
    let close = |x: f64, y: f64, tol: f64| (x - y).abs() <= tol * y.abs();
    assert!(close(md[0].1, ma[0].1, 1e-5) && close(md[0].2, ma[0].2, 1e-3), "step 1: {:?} vs {:?}", md[0], ma[0]);
    assert!(close(md[STEPS - 1].1, ma[STEPS - 1].1, 1e-3), "step {STEPS}: {:?} vs {:?}", md[STEPS - 1], ma[STEPS - 1]);
    let config = std::fs::read_to_string(d.path().join("final_checkpoint").join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["rope_scaling"]["rope_type"], "linear", "{config}");
    eprintln!("fixed_seed_run_is_reproducible: {:.1?}", started.elapsed());
}

/// splitmix64: the deterministic randomness of the kill schedule.
fn next_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// When an attempt is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A fixed time after the start.
    Time(Duration),
    /// `extra` after the attempt's temporary directory for a checkpoint newer than `after` (or for
    /// `final_checkpoint`) shows up: in the middle of writing it.
    Writing { after: usize, extra: Duration },
    /// `extra` after `checkpoint-N` with N > `after` shows up: just after the rename, while older checkpoints
    /// are being removed.
    Renamed { after: usize, extra: Duration },
}

impl KillAt {
    fn due(&self, out: &Path, pid: u32, since: Instant) -> bool {
        let newer = |n: &str, after: usize| n.parse::<usize>().is_ok_and(|n| n > after);
        match *self {
            KillAt::Time(d) => since.elapsed() >= d,
            KillAt::Writing { after, .. } => entries(out, ".").iter().any(|name| {
                let Some((what, owner)) = name[1..].split_once(".tmp-") else { return false };
                owner == pid.to_string()
                    && (what == "final_checkpoint" || what.strip_prefix("checkpoint-").is_some_and(|n| newer(n, after)))
            }),
            KillAt::Renamed { after, .. } => {
                entries(out, "checkpoint-").iter().any(|name| newer(&name["checkpoint-".len()..], after))
            }
        }
    }

    fn extra(&self) -> Duration {
        match *self {
            KillAt::Time(_) => Duration::ZERO,
            KillAt::Writing { extra, .. } | KillAt::Renamed { extra, .. } => extra,
        }
    }
}

#[test]
fn killed_runs_resume_to_the_same_weights() {
    let started = Instant::now();
    let root = TempDir::new().unwrap();
    let reference = root.path().join("reference");
    let t = Instant::now();
    run_ok(&mut train(&reference, STEPS, &[]));
    let run_time = t.elapsed();
    // Kills during start-up (base model, data cache), then in turn: at a time that is a fraction of an
    // uninterrupted run (so it suits any machine), while a checkpoint is being written, and just after
    // one is renamed into place (while old ones are removed).
    const STARTUP_KILLS_MS: [u64; 4] = [3, 6, 9, 12];
    const ATTEMPTS: usize = 40;
    let out = root.path().join("killed");
    let log = root.path().join("attempt.stderr");
    let mut rng = 0x5EED_u64;
    let (mut kills, mut startup_kills, mut in_writes) = (0, 0, 0);
    let mut history = vec![];
    let mut finished = false;
    for attempt in 0..ATTEMPTS {
        let newest = assert_checkpoints_complete(&out).last().copied().unwrap_or(0);
        let extra = Duration::from_micros((3000.0 * next_unit(&mut rng)) as u64);
        let skip = (next_unit(&mut rng) * 2.0) as usize;
        let kill_at = match (STARTUP_KILLS_MS.get(attempt), attempt % 3) {
            (Some(&ms), _) => KillAt::Time(Duration::from_millis(ms)),
            (None, 0) => KillAt::Time(run_time.mul_f64(0.05 + 0.45 * next_unit(&mut rng))),
            // Let one or two checkpoints complete first, so that every attempt gets somewhere.
            (None, 1) => KillAt::Writing { after: newest + 1 + skip, extra },
            (None, _) => KillAt::Renamed { after: newest + skip, extra },
        };
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = train(&out, STEPS, &[])
            .arg("--resume")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting bessie-train");
        let spawned = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if kill_at.due(&out, child.id(), spawned) {
                std::thread::sleep(kill_at.extra());
                child.kill().unwrap();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_micros(300));
        };
        if status.signal() != Some(9) {
            let text = std::fs::read(&log).unwrap();
            assert!(status.success(), "{}", describe(&format!("attempt {attempt} ({kill_at:?})"), status, &text));
            finished = true;
            break;
        }
        match attempt < STARTUP_KILLS_MS.len() {
            true => startup_kills += 1,
            false => kills += 1,
        }
        let pid_suffix = format!(".tmp-{}", child.id());
        if entries(&out, ".").iter().any(|n| n.ends_with(&pid_suffix) && n.contains("checkpoint")) {
            in_writes += 1;
        }
        // Whatever the moment of the kill, every checkpoint-* is whole (temporary directories aside).
        let steps = assert_checkpoints_complete(&out);
        history.push(steps.last().copied().unwrap_or(0));
    }
    assert!(finished, "no run finished in {ATTEMPTS} attempts (newest checkpoint after each kill: {history:?})");
    assert!(kills >= 2, "only {kills} kills after start-up before a run finished (run time {run_time:?})");

    assert_same_weights(&final_weights(&out), &final_weights(&reference));
    assert_same_metrics(&metrics(&out), &metrics(&reference));
    assert_checkpoints_complete(&out);
    let leftovers: Vec<String> = entries(&out, ".").into_iter().filter(|n| n.contains(".tmp-")).collect();
    eprintln!(
        "killed_runs_resume_to_the_same_weights: {:.1?}; uninterrupted run {run_time:.1?}; {startup_kills} start-up \
         kills, {kills} later kills ({in_writes} during checkpoint writes); newest checkpoint after each kill \
         {history:?}; temporary directories left in the output: {leftovers:?}",
        started.elapsed()
    );
}

#[test]
fn nan_loss_stops_with_last_checkpoint_intact() {
    let started = Instant::now();
    let out = TempDir::new().unwrap();
    // Adam moves every weight by about lr per step whatever the gradient: weights of ~1e30 overflow the
    // f32 activations within a few steps.
    let huge_lr = ["train.lr=1e30", "train.warmup_steps=0"];
    let (_, stderr) = run_failing(&mut train(out.path(), STEPS, &huge_lr));
    let steps = assert_checkpoints_complete(out.path());
    let newest = *steps.last().unwrap_or_else(|| panic!("no checkpoint before the NaN; stderr:\n{stderr}"));
    // A non-finite loss, or (a step earlier) a non-finite gradient at a still finite loss.
    let non_finite = ["loss is NaN", "loss is inf", "gradient norm is NaN", "gradient norm is inf"];
    assert!(non_finite.iter().any(|m| stderr.contains(m)), "stderr: {stderr}");
    // The failing step is the one after the newest checkpoint, numbered as metrics.jsonl numbers steps.
    assert!(stderr.contains(&format!("at step {}", newest + 1)), "newest checkpoint {newest}; stderr: {stderr}");
    let good = out.path().join(format!("checkpoint-{newest}"));
    assert!(stderr.contains(&format!("the last good checkpoint is {}", good.display())), "{stderr}");
    assert!(!out.path().join("final_checkpoint").exists());
    let logged = metrics(out.path());
    assert_eq!(logged.len(), newest, "metrics.jsonl should end at the last good step");
    assert!(logged.iter().all(|m| m.1.is_finite() && m.2.is_finite()), "{logged:?}");

    let dir = out.path().join(format!("checkpoint-{newest}"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        for (name, t) in load_tensors(&dir.join(file)) {
            assert!(f32_values(&t).iter().all(|v| v.is_finite()), "{}/{file}: `{name}` is not finite", dir.display());
        }
    }
    // The trainer itself loads it: resuming gets past loading and fails at the same step again.
    let (_, again) = run_failing(train(out.path(), STEPS, &huge_lr).arg("--resume"));
    assert!(again.contains(&format!("step {newest})")), "should resume from step {newest}: {again}");
    assert!(again.contains(&format!("at step {}", newest + 1)), "{again}");
    eprintln!("nan_loss_stops_with_last_checkpoint_intact: {:.1?}; newest checkpoint {newest}", started.elapsed());
}

#[test]
fn bad_input_fails_before_training() {
    let started = Instant::now();
    let root = TempDir::new().unwrap();
    let write = |name: &str, text: &str| -> PathBuf {
        let p = root.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = r#"{"prompt": "How many cows are in the barn?", "response": "There are 3 cows in the barn."}"#;
    let malformed = write("malformed.jsonl", &format!("{good}\n{{\"prompt\": \"Hi\", \"response\": \"Moo\n{good}\n"));
    let no_response = write("no_response.jsonl", &format!("{good}\n{good}\n{{\"prompt\": \"Hi\"}}\n"));
    let empty = write("empty.jsonl", "");
    let missing = root.path().join("missing.jsonl");
    // A model directory with a config.json and no weights.
    let full = root.path().join("full-model");
    let init = Command::new(INIT_MODEL).arg("--out").arg(&full).args(["--shape", "tiny"]).output().unwrap();
    assert!(init.status.success(), "{}", describe("bessie-init-model", init.status, &init.stderr));
    let no_weights = root.path().join("no-weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::copy(full.join("config.json"), no_weights.join("config.json")).unwrap();
    let packed = root.path().join("packed");
    let export = Command::new(EXPORT).arg("-m").arg(&full).arg("-o").arg(&packed).args(["-f", "ternary"]).output();
    let export = export.unwrap();
    assert!(export.status.success(), "{}", describe("bessie-export", export.status, &export.stderr));

    let data = |p: &Path| format!("data.train={}", p.display());
    let model = format!("model.path={}", no_weights.display());
    let packed_model = format!("model.path={}", packed.display());
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        ("malformed line", vec![data(&malformed)], vec![format!("{}:2", malformed.display()), "malformed JSON".into()]),
        ("no response", vec![data(&no_response)], vec![format!("{}:3", no_response.display()), "`response`".into()]),
        ("empty file", vec![data(&empty)], vec![empty.display().to_string(), "no examples".into()]),
        ("missing file", vec![data(&missing)], vec![missing.display().to_string()]),
        ("unknown key", vec!["train.lrr=1".into()], vec!["unknown config key `train.lrr`".into()]),
        ("no weights", vec!["model.init=".into(), model], vec![no_weights.display().to_string(), "no weights".into()]),
        (
            "packed",
            vec!["model.init=".into(), packed_model],
            vec![packed.display().to_string(), "packed ternary".into()],
        ),
    ];
    for (what, overrides, wanted) in cases {
        let out = root.path().join(format!("out-{}", what.replace(' ', "-")));
        let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
        let (output, stderr) = run_failing(&mut train(&out, STEPS, &overrides));
        assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
        for w in &wanted {
            assert!(stderr.contains(w.as_str()), "{what}: stderr should mention `{w}`:\n{stderr}");
        }
        assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{what}: one error line:\n{stderr}");
        assert_eq!(entries(&out, "checkpoint-"), Vec::<String>::new(), "{what}: checkpoints written");
        assert!(!out.join("metrics.jsonl").exists(), "{what}: metrics.jsonl written");
    }
    eprintln!("bad_input_fails_before_training: {:.1?}", started.elapsed());
}

#[test]
fn the_demo_finds_its_config_in_the_checkout_or_says_how_to_run_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A checkout elsewhere, with the program in its target/release/ and the demo config but no data.
    let checkout = tmp.path().join("checkout");
    let (configs, release, elsewhere) =
        (checkout.join("configs"), checkout.join("target/release"), tmp.path().join("x"));
    for d in [&configs, &release, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml"), configs.join("tiny.toml")).unwrap();
    let exe = release.join("bessie-train");
    std::fs::copy(TRAIN, &exe).unwrap();
    let data = configs.join("../data/tiny/train.jsonl").display().to_string();
    // Found above the program, from any directory: training then wants that checkout's data.
    let (_, err) = run_failing(Command::new(&exe).current_dir(&elsewhere));
    assert!(err.contains(&data), "{err}");
    // Found in the current directory, whatever program runs.
    let other = elsewhere.join("bessie-train");
    std::fs::copy(TRAIN, &other).unwrap();
    let (_, err) = run_failing(Command::new(&other).current_dir(&checkout));
    assert!(err.contains(&data), "{err}");
    // Found nowhere: the error says where it looked and how to run the demo.
    let (_, err) = run_failing(Command::new(&other).current_dir(&elsewhere));
    let looked = [elsewhere.display().to_string(), other.display().to_string()];
    assert!(err.contains("configs/tiny.toml") && looked.iter().all(|p| err.contains(p.as_str())), "{err}");
    assert!(err.contains("cargo run --release --bin bessie-train") && err.contains("--config FILE"), "{err}");
}

#[test]
fn resume_without_checkpoint_starts_fresh() {
    let started = Instant::now();
    let (resumed, fresh) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let out = run_ok(train(resumed.path(), 3, &[]).arg("--resume"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no checkpoint in"), "{stderr}");
    let out = run_ok(&mut train(fresh.path(), 3, &[]));
    // The run names its gradient buffer: `auto` keeps f32 on the CPU.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("x 1 ranks); gradient buffer f32 (auto)"), "{stderr}");
    assert_same_weights(&final_weights(resumed.path()), &final_weights(fresh.path()));
    assert_same_metrics(&metrics(resumed.path()), &metrics(fresh.path()));
    eprintln!("resume_without_checkpoint_starts_fresh: {:.1?}", started.elapsed());
}

/// Bytes of every file under `dir`, by path relative to it: what must survive a refused run unchanged.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            match p.is_dir() {
                true => todo.push(p),
                false => drop(files.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap())),
            }
        }
    }
    files
}

#[test]
fn a_fresh_run_refuses_another_runs_directory_and_overwrite_moves_it_aside() {
    let out = TempDir::new().unwrap();
    run_ok(&mut train(out.path(), 3, &[]));
    let before = snapshot(out.path());
    let (_, stderr) = run_failing(&mut train(out.path(), 3, &["train.lr=1e-3"]));
    assert!(stderr.contains("holds another run (checkpoint-1, checkpoint-2, final_checkpoint"), "{stderr}");
    assert!(stderr.contains("--resume") && stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(snapshot(out.path()), before, "a refused run changed the directory");

    run_ok(train(out.path(), 3, &["train.lr=1e-3"]).arg("--overwrite"));
    let aside = out.path().join("previous-run-1");
    for (name, bytes) in &before {
        // The earlier run's files are all kept (the data cache stays where it was, for the new run).
        let moved = match name.starts_with("cache") {
            true => out.path().join(name),
            false => aside.join(name),
        };
        assert_eq!(&std::fs::read(&moved).unwrap(), bytes, "{} after --overwrite", moved.display());
    }
    assert_eq!(metrics(out.path()).len(), 3);
    assert_checkpoints_complete(out.path());
}

#[test]
fn one_run_at_a_time_and_a_killed_runs_lock_is_taken_over() {
    let out = TempDir::new().unwrap();
    let lock = out.path().join("bessie-train.lock");
    let long = ["train.epochs=1000"];
    let first = train(out.path(), 10_000, &long).stderr(Stdio::null()).spawn().unwrap();
    let mut first = wait_for_steps(first, out.path(), 1);
    let held: serde_json::Value = serde_json::from_slice(&std::fs::read(&lock).unwrap()).unwrap();
    assert_eq!(held["pid"].as_u64(), Some(first.id() as u64));
    let (_, stderr) = run_failing(train(out.path(), 10_000, &long).arg("--resume"));
    assert!(stderr.contains(&format!("in use by another bessie-train run (pid {},", first.id())), "{stderr}");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(lock.exists(), "a killed run leaves its lock");
    let out2 = run_ok(train(out.path(), 2, &[]).arg("--overwrite"));
    let stderr = String::from_utf8_lossy(&out2.stderr);
    assert!(
        stderr.contains(&format!("taking over the lock of a run that no longer runs (pid {}", first.id())),
        "{stderr}"
    );
    assert!(!lock.exists(), "a finished run releases its lock");
}

fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// Returns `run` (just started, writing to `out`) once it has logged `steps` more steps (2 minutes at most).
fn wait_for_steps(run: std::process::Child, out: &Path, steps: usize) -> std::process::Child {
    let (started, before) = (Instant::now(), metrics_lines(out));
    while metrics_lines(out) < before + steps {
        assert!(started.elapsed() < Duration::from_secs(120), "no steps logged in 2 minutes");
        std::thread::sleep(Duration::from_millis(10));
    }
    run
}

#[test]
fn resuming_a_changed_run_is_refused_unless_accepted() {
    let out = TempDir::new().unwrap();
    run_ok(&mut train(out.path(), 4, &[]));
    // checkpoint-3 is the newest (the last step writes final_checkpoint only).
    let refused = [
        (vec!["train.lr=1e-3"], vec!["train.lr: 0.003 in the checkpoint, 0.001 now"]),
        (vec!["train.micro_batch=2"], vec!["global batch: 4 sequences per step in the checkpoint", "2 now (1 rank x"]),
        (
            vec!["data.system_prompt=You are a cow."],
            vec!["data.system_prompt", "data: the tokenized training examples differ"],
        ),
        (vec!["train.seed=7"], vec!["train.seed: 42 in the checkpoint, 7 now"]),
    ];
    for (changes, wanted) in refused {
        let (_, stderr) = run_failing(train(out.path(), 4, &changes).arg("--resume"));
        for w in wanted {
            assert!(stderr.contains(w), "{changes:?}: should say `{w}`:\n{stderr}");
        }
        assert!(stderr.contains("checkpoint-3 was saved by a different run") && stderr.contains("--resume-changed"));
    }
    // The same global batch split otherwise (as on another number of ranks) passes with a notice.
    let ok = run_ok(train(out.path(), 4, &["train.micro_batch=2", "train.grad_accum=2"]).arg("--resume"));
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(stderr.contains("the same global batch of 4 sequences per step"), "{stderr}");

    let ok = run_ok(train(out.path(), 4, &["train.lr=1e-3"]).args(["--resume", "--resume-changed"]));
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(stderr.contains("resuming with changes (--resume-changed): train.lr"), "{stderr}");
    let log = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let event: serde_json::Value = serde_json::from_str(log.lines().nth(3).unwrap()).unwrap();
    assert_eq!((event["step"].as_u64(), event["event"].as_str()), (Some(3), Some("resumed with changes")), "{log}");
    assert!(event["changes"][0].as_str().unwrap().starts_with("train.lr"), "{event}");
    let config = std::fs::read_to_string(out.path().join("run_config.toml")).unwrap();
    assert!(config.starts_with("# resumed at step 3 with changes: train.lr"), "{config}");
}

#[test]
fn a_damaged_checkpoint_is_named_and_the_previous_one_offered() {
    let out = TempDir::new().unwrap();
    run_ok(&mut train(out.path(), 4, &[]));
    let newest = out.path().join("checkpoint-3");
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    std::fs::write(&weights, &bytes).unwrap();
    let (_, stderr) = run_failing(train(out.path(), 4, &[]).arg("--resume"));
    let want = [
        format!("the newest checkpoint {} is damaged", newest.display()),
        format!("the previous one, {}, is intact", out.path().join("checkpoint-2").display()),
        format!("{}: checksum", weights.display()),
    ];
    for w in &want {
        assert!(stderr.contains(w.as_str()), "should say `{w}`:\n{stderr}");
    }
    let elsewhere = TempDir::new().unwrap();
    let dev = elsewhere.path().join("dev.jsonl");
    std::fs::write(&dev, "{\"prompt\": \"Moo?\", \"answers\": [\"moo\"]}\n").unwrap();
    let eval_out = elsewhere.path().join("eval.jsonl");
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_bessie-prompt"), vec!["--prompt", "Moo?"]),
        (env!("CARGO_BIN_EXE_bessie-eval"), vec!["-d", dev.to_str().unwrap(), "-o", eval_out.to_str().unwrap()]),
        (env!("CARGO_BIN_EXE_bessie-export"), vec!["-f", "ternary", "-o", "/nonexistent/x"]),
    ] {
        let run = Command::new(bin).arg("-m").arg(&newest).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && stderr.contains(&want[2]), "{bin}: {stderr}");
    }
    // As the message says: the damaged one moved aside, resuming continues from the previous one.
    std::fs::rename(&newest, out.path().join("damaged-checkpoint-3")).unwrap();
    let ok = run_ok(train(out.path(), 4, &[]).arg("--resume"));
    assert!(String::from_utf8_lossy(&ok.stderr).contains("(step 2)"));
}

#[test]
fn a_resumed_state_or_cache_that_does_not_fit_the_run_is_refused() {
    let out = TempDir::new().unwrap();
    run_ok(&mut train(out.path(), 3, &[]));
    // A checkpoint without checksums (as older versions wrote) whose state was edited.
    let newest = out.path().join("checkpoint-2");
    std::fs::remove_file(newest.join("checksums.json")).unwrap();
    let state_file = newest.join("trainer_state.json");
    let state = std::fs::read_to_string(&state_file).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&state).unwrap();
    edited["step"] = (i64::MAX as u64).into();
    std::fs::write(&state_file, edited.to_string()).unwrap();
    let (_, stderr) = run_failing(train(out.path(), 3, &[]).arg("--resume"));
    assert!(stderr.contains("trainer_state.json: the trainer state does not fit this run: step 9223372036854775807 is beyond this run's 3 steps"), "{stderr}");
    std::fs::write(&state_file, &state).unwrap();
    edited = serde_json::from_str(&state).unwrap();
    edited["epoch_rows_done"] = (u64::MAX - 3).into();
    std::fs::write(&state_file, edited.to_string()).unwrap();
    let (_, stderr) = run_failing(train(out.path(), 3, &[]).arg("--resume"));
    assert!(stderr.contains("rows of epoch 0 done, but the epoch has"), "{stderr}");
    std::fs::write(&state_file, &state).unwrap();

    // A data cache whose first token id is beyond the vocabulary (its structure intact, which the cache
    // reader checks): after the magic and six counts, the first example's length and number of trained
    // ranges, its ranges, then its ids.
    let cache = std::fs::read_dir(out.path().join("cache")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&cache).unwrap();
    let ranges = u32::from_le_bytes(bytes[60..64].try_into().unwrap()) as usize;
    let first_id = 64 + 8 * ranges;
    bytes[first_id..first_id + 4].copy_from_slice(&4_000_000u32.to_le_bytes());
    std::fs::write(&cache, &bytes).unwrap();
    let (_, stderr) = run_failing(train(out.path(), 3, &[]).arg("--resume"));
    assert!(
        stderr.contains("example 1 (of") && stderr.contains("token id 4000000, beyond the model's vocabulary"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("the data cache in {} is damaged", out.path().join("cache").display())),
        "{stderr}"
    );
}

#[test]
fn symbolic_links_out_of_the_run_directory_are_refused() {
    let (out, elsewhere) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let victim = elsewhere.path().join("notes.txt");
    std::fs::write(&victim, "mine").unwrap();
    for name in ["run_config.toml", "metrics.jsonl"] {
        let link = out.path().join(name);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let (_, stderr) = run_failing(&mut train(out.path(), 2, &[]));
        assert!(stderr.contains(&format!("{} is a symbolic link", link.display())), "{stderr}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine");
        std::fs::remove_file(&link).unwrap();
    }
}

/// Sends `signal` (`INT`, `TERM`) to a process.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_says_how_to_resume() {
    let out = TempDir::new().unwrap();
    // No periodic checkpoints: the one after the signal is the run's only one.
    let args = ["checkpoint.every=0", "train.epochs=1000"];
    let resumed = || train(out.path(), 10_000, &args).arg("--resume").stderr(Stdio::piped()).spawn().unwrap();
    for sig in ["INT", "TERM"] {
        let child = wait_for_steps(resumed(), out.path(), 2);
        signal(child.id(), sig);
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(130), "SIG{sig}: {stderr}");
        let steps = assert_checkpoints_complete(out.path());
        let step = *steps.last().unwrap();
        assert_eq!(metrics_lines(out.path()), step, "SIG{sig}: the checkpoint is at the last logged step");
        assert!(stderr.contains(&format!("interrupted after step {step} of 10000")), "{stderr}");
        assert!(stderr.contains("continue with: ") && stderr.trim_end().ends_with("--resume"), "{stderr}");
        assert!(!out.path().join("final_checkpoint").exists());
    }
    // A second signal exits at once, without saving.
    let before = assert_checkpoints_complete(out.path());
    let child = wait_for_steps(resumed(), out.path(), 1);
    signal(child.id(), "INT");
    // Two signals sent at once can merge into one (a pending signal is not queued twice): the second goes
    // once the first has left the process's pending set.
    let status = format!("/proc/{}/status", child.id());
    let pending = || {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
            .any(|l| u64::from_str_radix(l.split_whitespace().nth(1).unwrap_or("0"), 16).unwrap_or(0) & 2 != 0)
    };
    let start = std::time::Instant::now();
    while pending() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    signal(child.id(), "INT");
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    assert!(!stderr.contains("interrupted after step"), "{stderr}");
    assert_eq!(assert_checkpoints_complete(out.path()), before);
}

/// Without a terminal (logs, CI, Slurm) a progress line is printed at every dev loss, with it.
#[test]
fn headless_progress_lines_show_every_dev_loss() {
    let out = TempDir::new().unwrap();
    let dev = concat!("data.dev=", env!("CARGO_MANIFEST_DIR"), "/data/tiny/dev.jsonl");
    let done = run_ok(&mut train(out.path(), 40, &["checkpoint.every=0", dev, "log.dev_every=7"]));
    let stderr = String::from_utf8_lossy(&done.stderr);
    for step in [7, 14, 21, 28, 35, 40] {
        let line =
            stderr.lines().find(|l| l.starts_with(&format!("step {step}/40 "))).unwrap_or_else(|| panic!("{stderr}"));
        assert!(line.contains(" dev "), "step {step}: {line}");
    }
}

/// Each family's tiny shape fine-tunes end to end on the CPU: the loss falls, and the final checkpoint is in
/// the family the model is saved as, with latent weights transformers reads (a full-precision Llama comes out
/// as a `bitnet` Llama) and the names of that family's blocks.
#[test]
fn every_family_fine_tunes_with_a_falling_loss() {
    for (shape, architecture, sub_norm) in [
        ("tiny-bitnet", "BitNetForCausalLM", Some("model.layers.0.mlp.ffn_sub_norm.weight")),
        ("tiny-llama-bitnet", "LlamaForCausalLM", None),
        ("tiny-llama", "LlamaForCausalLM", None),
    ] {
        let out = TempDir::new().unwrap();
        let init = format!("model.init={shape}");
        run_ok(&mut train(out.path(), 30, &[&init, "checkpoint.every=0", "train.quant_warmup_steps=5"]));
        let m = metrics(out.path());
        let mean = |part: &[(u64, f64, f64)]| part.iter().map(|x| x.1).sum::<f64>() / part.len() as f64;
        let (first, last) = (mean(&m[..5]), mean(&m[m.len() - 5..]));
        assert!(last < 0.8 * first, "{shape}: loss {first:.3} over the first 5 steps, {last:.3} over the last 5");

        let dir = out.path().join("final_checkpoint");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], architecture, "{shape}");
        assert_eq!(cfg["quantization_config"]["quant_method"], "bitnet", "{shape}");
        assert_eq!(cfg["quantization_config"]["quantization_mode"], "online", "{shape}");
        let names = load_tensors(&final_weights(out.path()));
        assert_eq!(sub_norm.is_some_and(|n| names.contains_key(n)), sub_norm.is_some(), "{shape}");
        assert!(!names.keys().any(|n| n.contains("inner_attn_ln") || n.contains("ffn_layernorm")), "{shape}");
        let tied = cfg["tie_word_embeddings"].as_bool().unwrap();
        assert_eq!(names.contains_key("lm_head.weight"), !tied, "{shape}");
    }
}

/// A checkpoint in transformers' packed `bitnet` layout (as Falcon3's and 2B4T's Hub repos ship; here
/// `bessie-init-model --packed`) fine-tunes:
/// its codes load as latent weights, the loss falls, and what the run saves is latent weights with the online
/// quantization config transformers reads as such.
#[test]
fn a_packed_bitnet_checkpoint_fine_tunes_and_is_saved_latent() {
    let dir = TempDir::new().unwrap();
    let (packed, out) = (dir.path().join("packed"), dir.path().join("run"));
    let mut init = Command::new(INIT_MODEL);
    let init = init.arg("--out").arg(&packed).args(["--shape", "tiny-llama-bitnet", "--packed"]).output().unwrap();
    assert!(init.status.success(), "{}", describe("bessie-init-model", init.status, &init.stderr));
    let offline: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packed.join("config.json")).unwrap()).unwrap();
    assert_eq!(offline["quantization_config"]["quantization_mode"], "offline");

    let path = format!("model.path={}", packed.display());
    let run = run_ok(&mut train(&out, 20, &[&path, "model.init=", "checkpoint.every=0", "train.lr=3e-3"]));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("latent weights"), "the load should say what it did: {stderr}");
    let m = metrics(&out);
    assert!(m.last().unwrap().1 < 0.8 * m[0].1, "loss {} -> {}", m[0].1, m.last().unwrap().1);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final_checkpoint/config.json")).unwrap()).unwrap();
    assert_eq!(saved["quantization_config"]["quantization_mode"], "online");
    assert_eq!(saved["quantization_config"]["linear_class"], "autobitlinear");
    assert_eq!(load_tensors(&final_weights(&out))["model.layers.0.self_attn.q_proj.weight"].dtype(), DType::F32);
}

/// The memory savings train the demo as the full-precision state does: over 300 steps from two seeds (data
/// order and initial weights), the loss curve of each seed with 8-bit moments, and with every saving (8-bit
/// moments, per-block step weights, a bf16 gradient buffer summed over 2 micro-batches a step), is as close to
/// the same seed's f32 curve as the two seeds' f32 curves are to each other (within twice that), and neither
/// ends worse. Curves are compared as means over 20 steps.
#[test]
fn memory_savings_train_within_the_noise_of_two_seeds() {
    let dir = TempDir::new().unwrap();
    let curve = |name: &str, settings: &[&str], seed: u64| -> Vec<f64> {
        let out = dir.path().join(format!("{name}-{seed}"));
        let sets = [
            format!("train.seed={seed}"),
            format!("model.init_seed={seed}"),
            "checkpoint.every=0".into(),
            "train.micro_batch=4".into(),
            "train.grad_accum=2".into(),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).chain(settings.iter().copied()).collect();
        run_ok(&mut train(&out, 300, &sets));
        let losses: Vec<f64> = metrics(&out).iter().map(|m| m.1).collect();
        assert_eq!(losses.len(), 300);
        losses.chunks(20).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect()
    };
    let rms =
        |a: &[f64], b: &[f64]| (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    let (f32_a, f32_b) = (curve("f32", &[], 1), curve("f32", &[], 2));
    let seeds = rms(&f32_a, &f32_b);
    let all = ["train.optimizer_state=int8", "train.step_weights=per_block", "train.grad_buffer=bf16"];
    for (name, settings) in [("8-bit moments", &all[..1]), ("every saving", &all[..])] {
        let (a, b) = (curve(name, settings, 1), curve(name, settings, 2));
        let (da, db) = (rms(&f32_a, &a), rms(&f32_b, &b));
        println!("loss-curve RMS: seeds {seeds:.4}, {name} against f32 {da:.4} and {db:.4}");
        println!("last 20 steps: f32 {:.4} {:.4}, {name} {:.4} {:.4}", f32_a[14], f32_b[14], a[14], b[14]);
        assert!(da <= 2.0 * seeds && db <= 2.0 * seeds, "{name} moved the curve by {da:.4}, {db:.4}; seeds {seeds:.4}");
        let (end_f32, end) = ((f32_a[14] + f32_b[14]) / 2.0, (a[14] + b[14]) / 2.0);
        assert!(
            end <= end_f32 + (f32_a[14] - f32_b[14]).abs().max(0.02),
            "{name} ends at {end:.4}, f32 at {end_f32:.4}"
        );
    }
}

/// A run with 8-bit moments resumes from its checkpoint (which holds them decoded to f32) to the weights
/// and losses of the uninterrupted run, to f32 rounding: coding the decoded moments again gives them back.
#[test]
fn eight_bit_moments_resume() {
    let root = TempDir::new().unwrap();
    let (whole, resumed) = (root.path().join("whole"), root.path().join("resumed"));
    run_ok(&mut train(&whole, STEPS, &["train.optimizer_state=int8"]));
    // The same run, cut back to its checkpoint before the last step.
    run_ok(&mut train(&resumed, STEPS, &["train.optimizer_state=int8"]));
    std::fs::remove_dir_all(resumed.join("final_checkpoint")).unwrap();
    assert_eq!(assert_checkpoints_complete(&resumed).last(), Some(&(STEPS - 1)));
    let out = run_ok(train(&resumed, STEPS, &["train.optimizer_state=int8"]).arg("--resume"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("(step {})", STEPS - 1)), "{said}");
    let (a, b) = (metrics(&whole), metrics(&resumed));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 1e-5 * x.1.abs(), "step {}: loss {} resumed, {} uninterrupted", x.0, y.1, x.1);
    }
    let (wa, wb) = (load_tensors(&final_weights(&whole)), load_tensors(&final_weights(&resumed)));
    for (name, t) in &wa {
        let (x, y) = (f32_values(t), f32_values(&wb[name]));
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: resumed weights differ by {worst}");
    }
}
