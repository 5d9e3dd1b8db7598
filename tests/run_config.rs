//! The run config: the shipped files, `--set` overrides, error messages, paths and the saved form.

use std::path::{Path, PathBuf};

use bessie::config::model::{RopeScaling, RopeScalingType};
use bessie::config::run::{GradDtype, LossOn, Overflow, Recompute, Schedule};
use bessie::config::{ModelConfig, RunConfig};
use bessie::train::memory::{self, StepShape};
use bessie::train::model::MemoryPlan;
use candle_core::DType;

const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");

fn sets(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// The whole error chain, where the file name, key and line live.
fn load_err(path: Option<&Path>, overrides: &[&str]) -> String {
    format!("{:#}", RunConfig::load(path, &sets(overrides)).unwrap_err())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const MINIMAL: &str = "[model]\ninit = \"tiny\"\n[data]\ntrain = \"train.jsonl\"\n";

#[test]
fn demo_default_is_configs_tiny() {
    let cfg = RunConfig::load(None, &[]).unwrap();
    assert_eq!(cfg, RunConfig::load(Some(&Path::new(CONFIGS).join("tiny.toml")), &[]).unwrap());
    assert_eq!(cfg.model.init, "tiny");
    assert_eq!((cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.epochs, cfg.data.pack), (8, 1, 10, false));
    assert_eq!((cfg.train.lr, cfg.train.device.as_str()), (3e-3, "cpu"));
    assert_eq!(cfg.data.train, Path::new(CONFIGS).join("../data/tiny/train.jsonl"));
    assert_eq!(cfg.checkpoint.out_dir, Path::new(CONFIGS).join("../runs/tiny"));
    // Keys the file leaves out keep the recipe's defaults.
    assert_eq!((cfg.train.grad_clip, cfg.train.schedule, cfg.data.loss_on), (1.0, Schedule::Linear, LossOn::Response));
}

#[test]
fn every_shipped_config_loads() {
    let mut n = 0;
    for entry in std::fs::read_dir(CONFIGS).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = RunConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(cfg.data.train.is_absolute(), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3);
    let large = RunConfig::load(Some(&Path::new(CONFIGS).join("large.toml")), &[]).unwrap();
    assert_eq!((large.data.max_seq_len, large.train.micro_batch, large.train.grad_accum), (768, 1, 4));
    assert_eq!(large.model.path, Path::new(CONFIGS).join("../models/bitnet_b1_58-large"));
    let h100 = RunConfig::load(Some(&Path::new(CONFIGS).join("h100.toml")), &[]).unwrap();
    assert_eq!((h100.data.max_seq_len, h100.train.micro_batch, h100.train.grad_accum), (2048, 4, 1));
    // 4096 tokens of the large model on a 24 GB card: what the memory estimate says fits 22 GiB.
    let long = RunConfig::load(Some(&Path::new(CONFIGS).join("long.toml")), &[]).unwrap();
    assert_eq!((long.data.max_seq_len, long.train.micro_batch, long.train.recompute), (4096, 1, Recompute::None));
    let model = ModelConfig::shape("large", 32002).unwrap();
    let estimate_of = |model: &ModelConfig, cfg: &RunConfig| {
        let plan = MemoryPlan::new(&cfg.train);
        let shape = StepShape {
            model,
            micro_batch: 1,
            seq: cfg.data.max_seq_len,
            plan,
            dtype: DType::BF16,
            cuda: true,
            optimizer_shards: 1,
            optimizer_state: cfg.train.optimizer_state,
            grad_buffer: cfg.train.grad_buffer_dtype(true, 1),
        };
        memory::estimate(&shape).gib()
    };
    let estimate = |cfg: &RunConfig| estimate_of(&model, cfg);
    // 2B4T on a 24 GB card, with every memory saving.
    let small = RunConfig::load(Some(&Path::new(CONFIGS).join("2b4t-24gb.toml")), &[]).unwrap();
    let two_b = ModelConfig::shape("2b4t", 128256).unwrap();
    assert_eq!((small.data.max_seq_len, small.train.micro_batch), (2048, 1));
    assert!(estimate_of(&two_b, &small) <= 22.0, "{}", estimate_of(&two_b, &small));
    let big = RunConfig::load(Some(&Path::new(CONFIGS).join("2b4t.toml")), &[]).unwrap();
    assert!(estimate_of(&two_b, &big) > 22.0, "{}", estimate_of(&two_b, &big));
    assert!(estimate(&long) <= 22.0, "{}", estimate(&long));
    let blocks =
        RunConfig::load(Some(&Path::new(CONFIGS).join("long.toml")), &sets(&["train.recompute=blocks"])).unwrap();
    assert!(estimate(&blocks) < estimate(&long), "{} vs {}", estimate(&blocks), estimate(&long));
    let mut scaled = ModelConfig::shape("large", 32002).unwrap();
    scaled.set_rope_scaling(long.model.rope());
    scaled.check_positions(long.data.max_seq_len, "data.max_seq_len").unwrap();
    // The RoPE keys take --set like any other.
    let dynamic = RunConfig::load(
        Some(&Path::new(CONFIGS).join("long.toml")),
        &sets(&["model.rope_scaling=dynamic", "model.rope_scaling_factor=4"]),
    )
    .unwrap();
    assert_eq!(dynamic.model.rope(), Some(RopeScaling { kind: RopeScalingType::Dynamic, factor: 4.0 }));
}

#[test]
fn overrides_change_every_kind_of_value() {
    let cfg = RunConfig::load(
        None,
        &sets(&[
            "train.lr=1e-4",
            "train.max_steps=7",
            "train.grad_clip=2", // an integer where a float is expected
            "data.pack=false",
            "data.loss_on=all",
            "data.overflow=\"drop\"",
            "train.schedule=cosine",
            "train.grad_dtype=bf16",
            "data.system_prompt=You are a cow.",
            "model.init=large",
            "train.device = cuda:1",
        ]),
    )
    .unwrap();
    assert_eq!((cfg.train.lr, cfg.train.max_steps, cfg.train.grad_clip), (1e-4, 7, 2.0));
    assert!(!cfg.data.pack);
    assert_eq!((cfg.data.loss_on, cfg.data.overflow), (LossOn::All, Overflow::Drop));
    assert_eq!((cfg.train.schedule, cfg.train.grad_dtype), (Schedule::Cosine, GradDtype::Bf16));
    assert_eq!(cfg.system_prompt(), Some("You are a cow."));
    assert_eq!((cfg.model.init.as_str(), cfg.train.device.as_str()), ("large", "cuda:1"));
    // The last override of a key wins.
    let cfg = RunConfig::load(None, &sets(&["train.epochs=5", "train.epochs=6"])).unwrap();
    assert_eq!(cfg.train.epochs, 6);
}

#[test]
fn unknown_key_in_a_file_names_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "typo.toml", &format!("{MINIMAL}[train]\nepochs = 1\nlrr = 0.1\n"));
    let err = load_err(Some(&p), &[]);
    for want in ["typo.toml", "lrr", "line 7"] {
        assert!(err.contains(want), "`{err}` should contain `{want}`");
    }
    let p = write(dir.path(), "section.toml", &format!("{MINIMAL}[trian]\nepochs = 1\n"));
    let err = load_err(Some(&p), &[]);
    assert!(err.contains("section.toml") && err.contains("trian"), "{err}");
}

#[test]
fn bad_overrides_name_the_key() {
    let err = load_err(None, &["train.lrr=1"]);
    assert!(err.contains("unknown config key `train.lrr`"), "{err}");
    assert!(err.contains("grad_accum") && err.contains("warmup_steps"), "should list [train]'s keys: {err}");
    let err = load_err(None, &["trian.lr=1"]);
    assert!(err.contains("unknown config key `trian.lr`") && err.contains("checkpoint"), "{err}");
    let err = load_err(None, &["train.lr"]);
    assert!(err.contains("malformed override `train.lr`"), "{err}");
    let err = load_err(None, &["lr=1"]);
    assert!(err.contains("malformed override `lr=1`"), "{err}");
    let err = load_err(None, &["train.lr=fast"]);
    assert!(err.contains("`train.lr`") && err.contains("fast"), "{err}");
    let err = load_err(None, &["train.epochs=-1"]);
    assert!(err.contains("`train.epochs`"), "{err}");
    let err = load_err(None, &["data.loss_on=prompt"]);
    assert!(err.contains("`data.loss_on`") && err.contains("response"), "{err}");
    let err = load_err(None, &["train.micro_batch=0"]);
    assert!(err.contains("train.micro_batch must be positive"), "{err}");
}

#[test]
fn wrong_type_in_a_file_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "type.toml", &format!("{MINIMAL}[train]\nlr = \"fast\"\n"));
    let err = load_err(Some(&p), &[]);
    assert!(err.contains("type.toml") && err.contains("lr") && err.contains("line 6"), "{err}");
}

#[test]
fn to_toml_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let original = RunConfig::load(
        None,
        &sets(&["train.eps=1e-12", "train.min_lr_ratio=0.1", "data.system_prompt=\"Moo.\\nMoo.\"", "log.dev_every=0"]),
    )
    .unwrap();
    // Saved elsewhere, as beside a checkpoint: the paths are absolute, so they still point at the same files.
    let saved = write(dir.path(), "config.toml", &original.to_toml());
    assert_eq!(RunConfig::load(Some(&saved), &[]).unwrap(), original);
    for name in ["large.toml", "h100.toml"] {
        let original = RunConfig::load(Some(&Path::new(CONFIGS).join(name)), &[]).unwrap();
        let saved = write(dir.path(), name, &original.to_toml());
        assert_eq!(RunConfig::load(Some(&saved), &[]).unwrap(), original);
    }
}

#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let text = "[model]\npath = \"m\"\n[data]\ntrain = \"../t.jsonl\"\n[checkpoint]\nout_dir = \"/abs/out\"\n";
    let cfg = RunConfig::load(Some(&write(&dir.path().join("sub"), "run.toml", text)), &[]).unwrap();
    assert_eq!(cfg.model.path, dir.path().join("sub/m"));
    assert_eq!(cfg.data.train, dir.path().join("sub/../t.jsonl"));
    assert_eq!(cfg.data.dev, PathBuf::new(), "an unset path stays unset");
    assert_eq!(cfg.checkpoint.out_dir, Path::new("/abs/out"));
    // A config path relative to the current directory (the package root under `cargo test`) works too.
    let cfg = RunConfig::load(Some(Path::new("configs/tiny.toml")), &[]).unwrap();
    assert!(cfg.data.train.is_absolute() && cfg.data.train.ends_with("configs/../data/tiny/train.jsonl"));
    // Paths typed on the command line are relative to the current directory, like any shell argument.
    let cfg = RunConfig::load(None, &sets(&["data.train=foo.jsonl", "data.dev="])).unwrap();
    assert_eq!(cfg.data.train, std::env::current_dir().unwrap().join("foo.jsonl"));
    assert_eq!(cfg.data.dev, PathBuf::new());
}

#[test]
fn model_path_and_init_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let both = write(dir.path(), "both.toml", "[model]\npath = \"m\"\ninit = \"tiny\"\n[data]\ntrain = \"t\"\n");
    let neither = write(dir.path(), "neither.toml", "[data]\ntrain = \"t\"\n");
    for p in [both, neither] {
        let err = load_err(Some(&p), &[]);
        assert!(err.contains("model.path") && err.contains("model.init"), "{err}");
        assert!(err.contains(p.file_name().unwrap().to_str().unwrap()), "{err}");
    }
    // Switching the embedded demo to a checkpoint needs both keys set.
    let err = load_err(None, &["model.path=/m"]);
    assert!(err.contains("model.path") && err.contains("model.init"), "{err}");
    let cfg = RunConfig::load(None, &sets(&["model.path=/m", "model.init="])).unwrap();
    assert_eq!(cfg.model.path, Path::new("/m"));
    let err = load_err(None, &["model.init=huge"]);
    assert!(err.contains("model.init `huge`") && err.contains("3b"), "{err}");
    let err = load_err(Some(&write(dir.path(), "empty.toml", "[model]\ninit = \"tiny\"\n")), &[]);
    assert!(err.contains("data.train is empty"), "{err}");
}

/// MFU's peak comes from the datasheet of the card the driver names, matched on whole words (an A100 is not
/// an A10, an L40S not an L4), and is unknown for a card not in the table rather than a guess.
#[test]
fn peak_tflops_follow_the_card_name() {
    use bessie::device::peak_bf16_tflops;
    let cases = [
        ("NVIDIA H200", Some(989.0)),
        ("NVIDIA H200 NVL", Some(835.0)),
        ("NVIDIA H100 80GB HBM3", Some(989.0)),
        ("NVIDIA H100 PCIe", Some(756.0)),
        ("NVIDIA H100 NVL", Some(835.0)),
        ("NVIDIA A100-SXM4-80GB", Some(312.0)),
        ("NVIDIA A100 80GB PCIe", Some(312.0)),
        ("NVIDIA A10", Some(125.0)),
        ("NVIDIA A10G", None),
        ("NVIDIA L4", Some(121.0)),
        ("NVIDIA L40", Some(181.0)),
        ("NVIDIA L40S", Some(362.0)),
        ("NVIDIA GeForce RTX 4090", Some(165.2)),
        ("NVIDIA RTX A6000", Some(154.8)),
        ("Tesla V100-SXM2-16GB", None),
        ("NVIDIA GeForce RTX 3060", None),
    ];
    for (name, peak) in cases {
        assert_eq!(peak_bf16_tflops(name), peak, "{name}");
    }
    assert_eq!(bessie::device::gpu_name(&candle_core::Device::Cpu), None);
}
