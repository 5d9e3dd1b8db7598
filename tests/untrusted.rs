//! Malformed downloaded files (checkpoints, tokenizers, run configs) are refused with an error naming what
//! is wrong, never crash, hang or exhaust memory: one regression test per kind of attack, each building
//! its input here. `tests/fuzz.rs` mutates valid files at random for the same properties.

mod common;

use std::path::Path;

use bessie::config::{ModelConfig, RunConfig};
use bessie::model::hf::{self, Layout, NonFinite, WeightFiles};
use bessie::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use common::{six_floats, state_dict_pickle, torch_zip, Pickle};

fn err<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => format!("{e:#}"),
    }
}

fn shipped_tokenizer() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer")
}

#[test]
fn nested_protobuf_groups_are_an_error_not_a_stack_overflow() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.model"), vec![0x0bu8; 100_000]).unwrap();
    let msg = err(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer.model") && msg.contains("truncated varint"), "{msg}");
}

#[test]
fn empty_or_duplicate_added_tokens_name_the_file_and_id() {
    let model = shipped_tokenizer().join("tokenizer.model");
    let token = |content: &str| serde_json::json!({"content": content, "special": true});
    let cases = [
        (
            "tokenizer_config.json",
            serde_json::json!({"added_tokens_decoder": {"1000": token("")}}),
            "id 1000: the token is empty",
        ),
        ("added_tokens.json", serde_json::json!({"": 1000}), "id 1000: the token is empty"),
        (
            "tokenizer_config.json",
            serde_json::json!({"added_tokens_decoder": {"1000": token("<pad>"), "1001": token("<pad>")}}),
            "id 1001: \"<pad>\" is also added token id 1000",
        ),
        (
            "tokenizer_config.json",
            serde_json::json!({"added_tokens_decoder": {"1000": token("<pad>"), "01000": token("<x>")}}),
            "id 1000",
        ),
    ];
    for (file, json, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&model, dir.path().join("tokenizer.model")).unwrap();
        std::fs::write(dir.path().join(file), json.to_string()).unwrap();
        let msg = err(Tokenizer::from_dir(dir.path()));
        assert!(msg.contains(file) && msg.contains(want), "{file} {json}: {msg}");
    }
    // Both files giving one id two texts is ambiguous too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&model, dir.path().join("tokenizer.model")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"1000": {"content": "<pad>"}}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("added_tokens.json"), r#"{"<pad>": 1000, "<x>": 1000}"#).unwrap();
    let msg = err(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("added_tokens.json: added token id 1000: \"<x>\""), "{msg}");
}

#[test]
fn a_broken_tokenizer_json_is_an_error_not_a_panic() {
    // The `tokenizers` crate panics on a syntax error inside the `decoder` section.
    let json = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shipped_tokenizer_json/tokenizer.json"),
    )
    .unwrap();
    let at = json.find("\"decoder\"").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &json[..at + 20]).unwrap();
    let msg = err(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer.json") && msg.contains("EOF while parsing"), "{msg}");
    // It also panics on a continuing-subword prefix longer than a merged token.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["model"]["continuing_subword_prefix"] = "\u{2581}".into();
    std::fs::write(dir.path().join("tokenizer.json"), value.to_string()).unwrap();
    let msg = err(Tokenizer::from_dir(dir.path()));
    assert!(msg.contains("tokenizer.json: the tokenizers crate failed on it: start byte index 3"), "{msg}");
}

fn open_bin(bytes: &[u8]) -> anyhow::Result<WeightFiles> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), bytes).unwrap();
    WeightFiles::open(dir.path(), NonFinite::Refuse)
}

#[test]
fn torch_save_state_dicts_load() {
    let w = open_bin(&torch_zip(&state_dict_pickle("FloatStorage", [2, 3]), &six_floats())).unwrap();
    let get = |name: &str| w.get_unchecked(name, DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(get("w"), [[1., 2., 3.], [4., 5., 6.]]);
    assert_eq!(get("wt"), [[1., 4.], [2., 5.], [3., 6.]]);
}

#[test]
fn real_torch_save_files_load() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_save");
    let read = |file: &str, name: &str| {
        let w = open_bin(&std::fs::read(fixtures.join(file)).unwrap()).unwrap();
        let t = w.get_unchecked(name, DType::I64, &Device::Cpu).unwrap();
        // Integers are not read as weights.
        let msg = format!("{:#}", w.get_unchecked(name, DType::F32, &Device::Cpu).unwrap_err());
        assert!(msg.contains(&format!("tensor `{name}` is I64, expected F32")), "{msg}");
        (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1::<i64>().unwrap())
    };
    assert_eq!(read("test.pt", "test"), (vec![2, 4], (1..=8).collect()));
    // Fortran order: strides (1, 2, 6), read in row-major order.
    assert_eq!(read("fortran_tensor_3d.pth", "tensor_fortran"), (vec![2, 3, 4], (1..=24).collect()));
}

#[test]
fn malformed_pickles_are_refused_naming_the_problem() {
    let valid = state_dict_pickle("FloatStorage", [2, 3]);
    let mut os_system = Pickle::default();
    os_system.raw(&[0x80, 2]).global("os", "system").str("touch pwned").raw(b"\x85R.");
    // A list memoized and then extended 2000 times through the memo: each extension copies it.
    let mut copies = Pickle::default();
    copies.raw(&[0x80, 2, b']', b'(']);
    (0..2000).for_each(|_| {
        copies.raw(b"K\x01");
    });
    copies.raw(b"e").put(0);
    (0..2000).for_each(|_| {
        copies.get(0).raw(b"K\x01a");
    });
    // Doubling through the memo: t = (t, t), 40 times.
    let mut doubling = Pickle::default();
    doubling.raw(&[0x80, 2, b']']).put(0);
    (0..40).for_each(|_| {
        doubling.get(0).get(0).raw(&[0x86]).put(0);
    });
    let mut nested = vec![0x80, 2];
    nested.extend(std::iter::repeat_n(b']', 100_000));
    nested.extend(std::iter::repeat_n(b'a', 99_999));
    nested.push(b'.');
    let mut short = Pickle::default();
    short.raw(&[0x80, 2, b'}', b'(']).str("w").global("torch._utils", "_rebuild_tensor_v2").raw(b"(K\x00tR").raw(b"u.");
    let mut long_string = vec![0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff];
    long_string.extend_from_slice(b"abc.");
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (os_system.0, six_floats(), "GLOBAL os.system is not one torch.save writes"),
        (copies.0, six_floats(), "copies more values than it holds bytes"),
        (doubling.0, six_floats(), "nest more than 32 deep"),
        (nested, six_floats(), "nest more than 32 deep"),
        (short.0, six_floats(), "RebuildTensor called with arguments torch.save does not write"),
        (long_string, six_floats(), "truncated pickle: 4294967295 bytes needed"),
        (state_dict_pickle("FloatStorage", [1 << 30, 3]), six_floats(), "tensor `w`: offset 0, shape [1073741824, 3]"),
        (state_dict_pickle("HalfStorage", [2, 3]), six_floats(), "holds 24 bytes; 6 F16 elements need 12"),
        (valid.clone(), six_floats()[..20].to_vec(), "holds 20 bytes; 6 F32 elements need 24"),
        (state_dict_pickle("LongStorage", [2, 3]), six_floats(), "6 I64 elements need 48"),
    ];
    for (pickle, storage, want) in cases {
        let msg = err(open_bin(&torch_zip(&pickle, &storage)));
        assert!(msg.contains(want) && msg.contains("pytorch_model.bin"), "want `{want}`: {msg}");
    }
    // A wrong CRC-32: one byte of the storage changed in the archive.
    let mut bytes = torch_zip(&valid, &six_floats());
    let at = bytes.windows(4).position(|w| w == 3f32.to_le_bytes()).unwrap();
    bytes[at + 3] ^= 0x01;
    let msg = err(open_bin(&bytes));
    assert!(msg.contains("archive/data/0") && msg.contains("checksum"), "{msg}");
}

/// A tiny checkpoint (vocabulary 64, no tokenizer files) in `layout`.
fn small_checkpoint(dir: &Path, layout: Layout) -> ModelConfig {
    let cfg = ModelConfig::shape("tiny", 64).unwrap();
    let weights = bessie::model::init::random_weights(&cfg, 1).unwrap();
    hf::save(dir, &cfg, &weights, DType::F32, layout, &[]).unwrap();
    cfg
}

#[test]
fn shard_names_stay_in_the_checkpoint_directory() {
    let root = tempfile::tempdir().unwrap();
    let (dir, other) = (root.path().join("ckpt"), root.path().join("other"));
    small_checkpoint(&dir, Layout::Sharded);
    small_checkpoint(&other, Layout::Safetensors);
    let index_path = dir.join("model.safetensors.index.json");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let with_shard = |name: &str, shard: &str| {
        let mut i = index.clone();
        i["weight_map"][name] = shard.into();
        std::fs::write(&index_path, i.to_string()).unwrap();
        err(WeightFiles::open(&dir, NonFinite::Refuse))
    };
    let embed = "model.embed_tokens.weight";
    for shard in ["../other/model.safetensors", "/etc/passwd", "..", "sub\\file", ""] {
        let msg = with_shard(embed, shard);
        assert!(msg.contains("not a file name in the checkpoint directory") && msg.contains(embed), "{shard}: {msg}");
    }
    // A FIFO is refused without opening it (opening one blocks until a writer comes).
    assert!(std::process::Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success());
    let msg = with_shard(embed, "fifo");
    assert!(msg.contains("fifo is not a regular file"), "{msg}");
    // Nor is a FIFO in place of config.json or the single weight file read.
    for (file, layout) in [("config.json", Layout::Safetensors), ("model.safetensors", Layout::Safetensors)] {
        let single = root.path().join(format!("fifo-{file}"));
        small_checkpoint(&single, layout);
        std::fs::remove_file(single.join(file)).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(single.join(file)).status().unwrap().success());
        let msg = err(hf::open(&single, DType::F32, &Device::Cpu));
        assert!(msg.contains(&format!("{file} is not a regular file")), "{msg}");
    }
    // The tensor exists, but in the other shard.
    let shards: Vec<String> = index["weight_map"].as_object().unwrap().values().map(|v| v.to_string()).collect();
    let (first, second) = (shards.first().unwrap().trim_matches('"'), shards.last().unwrap().trim_matches('"'));
    assert_ne!(first, second);
    let moved = if index["weight_map"][embed] == first { second } else { first };
    let msg = with_shard(embed, moved);
    assert!(msg.contains(&format!("tensor `{embed}` is in")) && msg.contains("not") && msg.contains(moved), "{msg}");
}

#[test]
fn config_sizes_are_checked_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_checkpoint(dir.path(), Layout::Safetensors);
    let config = dir.path().join("config.json");
    let cases: [(&str, u64, &str); 5] = [
        ("hidden_size", 1 << 62, "make more than 1099511627776 parameters"),
        ("hidden_size", 1 << 63, "make more than 1099511627776 parameters"),
        ("num_hidden_layers", 1 << 32, "field `num_hidden_layers` is 4294967296; at most 4096"),
        ("num_hidden_layers", 3, "field(s) `num_hidden_layers` need tensor `model.layers.2.input_layernorm.weight`"),
        (
            "intermediate_size",
            1 << 20,
            "field(s) `intermediate_size` say tensor `model.layers.0.mlp.ffn_layernorm.weight`",
        ),
    ];
    for (key, value, want) in cases {
        let mut json = serde_json::to_value(&cfg).unwrap();
        json[key] = value.into();
        std::fs::write(&config, json.to_string()).unwrap();
        for (what, msg) in [
            ("inference", err(bessie::model::load(dir.path(), &Device::Cpu))),
            ("training", err(hf::open(dir.path(), DType::F32, &Device::Cpu))),
            ("export", err(bessie::export::Source::open(dir.path()))),
        ] {
            assert!(msg.contains(want) && msg.contains("config.json"), "{what}, {key} = {value}: {msg}");
        }
    }
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["num_hidden_layers"] = 1.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let msg = err(bessie::model::load(dir.path(), &Device::Cpu));
    assert!(msg.contains("`num_hidden_layers` is 1 but the weights have `model.layers.1."), "{msg}");
}

#[test]
fn run_config_arithmetic_cannot_overflow_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    for (toml, want) in [
        ("[train]\nmicro_batch = 4294967296\ngrad_accum = 4294967296\n", "train.micro_batch x train.grad_accum"),
        ("[train]\nepochs = 9223372036854775807\nmax_steps = 1\n", "train.epochs is 9223372036854775807"),
    ] {
        std::fs::write(&path, format!("[model]\ninit = \"tiny\"\n[data]\ntrain = \"t.jsonl\"\n{toml}")).unwrap();
        let msg = err(RunConfig::load(Some(&path), &[]));
        assert!(msg.contains(want) && msg.contains("run.toml"), "{msg}");
    }
}

#[test]
fn integer_and_non_finite_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    small_checkpoint(dir.path(), Layout::Safetensors);
    let file = dir.path().join("model.safetensors");
    let original = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let write_with = |name: &str, t: Tensor| {
        let mut tensors = original.clone();
        tensors.insert(name.to_string(), t);
        candle_core::safetensors::save(&tensors, &file).unwrap();
    };
    let norm = "model.layers.1.post_attention_layernorm.weight";
    let q = "model.layers.0.self_attn.q_proj.weight";
    // Integers where floats belong: the embedding as i64, a norm as u8.
    for (name, dtype) in [("model.embed_tokens.weight", DType::I64), (norm, DType::U8)] {
        write_with(name, original[name].to_dtype(dtype).unwrap());
        let msg = err(bessie::model::load(dir.path(), &Device::Cpu));
        assert!(msg.contains(&format!("tensor `{name}` is {dtype:?}, expected F32")), "{msg}");
        write_with(name, original[name].clone());
    }
    // NaN and infinity: refused for training, loaded with a warning for inference.
    let mut v = original[q].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (v[3], v[7], v[9]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
    write_with(q, Tensor::from_vec(v, original[q].shape(), &Device::Cpu).unwrap());
    let (_, vb) = hf::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let msg = format!(
        "{:#}",
        bessie::train::params::ParamLayout::new(&ModelConfig::shape("tiny", 64).unwrap())
            .load(&vb, &Device::Cpu)
            .unwrap_err()
    );
    assert!(msg.contains(&format!("tensor `{q}` has 3 NaN or infinite values")), "{msg}");
    bessie::model::load(dir.path(), &Device::Cpu).unwrap();

    // The warning, from bessie-prompt on a checkpoint with its tokenizer.
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path(), 0);
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let shape = tensors[q].shape().clone();
    tensors.insert(q.into(), Tensor::full(f32::NAN, shape, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bessie-prompt"))
        .args(["--model", dir.path().to_str().unwrap(), "--prompt", "Moo", "--max-new-tokens", "2", "--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let n = 64 * 64;
    assert!(
        stderr.contains(&format!("warning: {}: tensor `{q}` has {n} NaN or infinite values", file.display())),
        "{stderr}"
    );
}
