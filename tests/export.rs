//! `bessie-export`: packed ternary checkpoints (round trip, identical generations, the CPU kernel, errors)
//! and GGUF files read back by an independent reader (gguf-py, tests/reference/read_gguf.py; these tests
//! fail without it). transformers' packed bitnet export: tests/hf_bitnet.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bessie::config::model::RopeScalingType;
use bessie::config::ModelConfig;
use bessie::export::gguf::GgufType;
use bessie::export::{export, DenseDtype, Format, Options};
use bessie::generate::{generate, Sampler, Stop};
use bessie::model::hf::{self, Layout};
use bessie::model::init::random_weights;
use bessie::model::ternary::PackedTernary;
use bessie::model::{is_bitlinear, BitNet, KvCache};
use bessie::ops::quantize_weight;
use bessie::tokenizer::{template::ChatTemplate, Tokenizer};
use candle_core::{DType, Device, Tensor};

const IDS: [u32; 16] = [1, 5, 99, 250, 7, 7, 7, 300, 12, 0, 3, 800, 42, 42, 611, 2];

fn load(dir: &Path) -> BitNet {
    bessie::model::load(dir, &Device::Cpu).unwrap()
}

fn logits(model: &BitNet) -> Vec<Vec<f32>> {
    let x = Tensor::new(&IDS, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let h = model.forward(&x, &mut KvCache::new(&model.cfg)).unwrap();
    model.logits(&h.squeeze(0).unwrap()).unwrap().to_vec2().unwrap()
}

fn greedy(dir: &Path, n: usize) -> Vec<u32> {
    let tok = Tokenizer::from_dir(dir).unwrap();
    let prompt = tok.encode("The cow said", true).unwrap();
    let stop = Stop::new(&tok, &ChatTemplate::bessie(None));
    generate(&load(dir), &tok, &stop, &prompt, n, &mut Sampler::greedy(), |_| Ok(())).unwrap().ids
}

fn export_ok(src: &Path, out: &Path, format: Format, dense: DenseDtype) {
    export(src, out, &Options { dense, ..Options::new(format) }).unwrap();
}

fn export_err(src: &Path, out: &Path, format: Format) -> String {
    format!("{:#}", export(src, out, &Options::new(format)).unwrap_err())
}

/// A random checkpoint of `cfg` (shipped tokenizer) saved as `dtype`.
fn checkpoint(dir: &Path, cfg: &ModelConfig, seed: u64, dtype: DType) {
    common::tiny_checkpoint(dir, seed);
    hf::save(dir, cfg, &random_weights(cfg, seed).unwrap(), dtype, Layout::Safetensors, &[]).unwrap();
}

/// The tiny shape with every matrix dimension a multiple of 256, so that GGUF uses TQ2_0 throughout.
fn wide_config(vocab: usize) -> ModelConfig {
    let mut cfg = ModelConfig::shape("tiny", vocab).unwrap();
    (cfg.hidden_size, cfg.intermediate_size) = (256, 512);
    cfg
}

fn read_safetensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn packed_round_trip_gives_identical_ternary_weights_and_generations() {
    let (latent, packed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = common::tiny_checkpoint(latent.path(), 4);
    let out = packed.path().join("packed");
    export_ok(latent.path(), &out, Format::Ternary, DenseDtype::F32);

    // The file holds, for every BitLinear weight, exactly quantize_weight's ternary values and scale.
    let source = read_safetensors(&latent.path().join("model.safetensors"));
    let stored = read_safetensors(&out.join("model.safetensors"));
    let mut bitlinear = 0;
    for (name, shape) in cfg.parameter_shapes() {
        if !is_bitlinear(&name) {
            assert_eq!(stored[&name].dtype(), DType::F32, "{name}");
            continue;
        }
        bitlinear += 1;
        let (ternary, scale) = quantize_weight(&source[&name]).unwrap();
        let codes = &stored[&name];
        assert_eq!((codes.dtype(), codes.dims()), (DType::U8, &[shape[0], shape[1].div_ceil(4)][..]), "{name}");
        let packed =
            PackedTernary::from_codes(codes.flatten_all().unwrap().to_vec1().unwrap(), shape[0], shape[1]).unwrap();
        let expected: Vec<i8> =
            ternary.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as i8).collect();
        assert_eq!(packed.values(), expected, "{name}");
        let stored_scale = &stored[&format!("{name}_scale")];
        assert_eq!(stored_scale.dims(), &[1]);
        assert_eq!(stored_scale.to_vec1::<f32>().unwrap()[0].to_bits(), scale.to_scalar::<f32>().unwrap().to_bits());
    }
    assert_eq!(bitlinear, 7 * cfg.num_hidden_layers);

    // The packed model runs the integer kernel and must compute the very same logits and tokens.
    assert!(logits(&load(&out)) == logits(&load(latent.path())), "logits differ");
    let tokens = greedy(latent.path(), 24);
    assert!(tokens.len() > 1);
    assert_eq!(greedy(&out, 24), tokens);

    // Exporting the packed checkpoint again reads its codes and writes the same bytes.
    let again = packed.path().join("again");
    export_ok(&out, &again, Format::Ternary, DenseDtype::F32);
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&again) == bytes(&out));
}

/// With the default bf16 dense tensors, a latent checkpoint stored in bf16 gives the same logits; the
/// packed file is smaller than even that.
#[test]
fn bf16_packed_checkpoint_matches_a_bf16_latent_one() {
    let (latent, packed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = common::tiny_checkpoint(latent.path(), 6);
    cfg.num_key_value_heads = Some(2);
    checkpoint(latent.path(), &cfg, 6, DType::BF16);
    let out = packed.path().join("packed");
    export_ok(latent.path(), &out, Format::Ternary, DenseDtype::Bf16);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["torch_dtype"], "bfloat16");
    assert_eq!(saved["quantization_config"], ModelConfig::packed_quantization_config());
    assert_eq!(read_safetensors(&out.join("model.safetensors"))["model.embed_tokens.weight"].dtype(), DType::BF16);
    assert!(logits(&load(&out)) == logits(&load(latent.path())), "logits differ");
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    assert!(size(&out) * 2 < size(latent.path()), "{} vs {}", size(&out), size(latent.path()));
}

/// The kernel against the plain product of the unpacked values, on rows shorter and longer than one AVX2
/// step (128 weights), of lengths that are not a multiple of four (padding), and activations at the int8
/// extremes, for one and for several tokens.
#[test]
fn packed_kernel_equals_the_dense_product() {
    let mut rng = bessie::rng::Rng::new(11);
    for (rows, cols) in [(70, 37), (33, 301)] {
        let values: Vec<f32> = (0..rows * cols).map(|_| (rng.normal() * 1.2).round().clamp(-1.0, 1.0) as f32).collect();
        let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let packed = PackedTernary::pack(&w).unwrap();
        let unpacked = packed.to_tensor(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(unpacked.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        for n in [1, 5] {
            let mut q: Vec<f32> =
                (0..n * cols).map(|_| (rng.normal() * 60.0).round().clamp(-128.0, 127.0) as f32).collect();
            (q[0], q[1], q[cols - 1]) = (-128.0, 127.0, -128.0);
            let q = Tensor::from_vec(q, (n, cols), &Device::Cpu).unwrap();
            let expected = q.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(packed.matmul_int8(&q).unwrap().to_vec2::<f32>().unwrap(), expected, "{rows}x{cols}, {n}");
        }
    }
    // Code 3 is invalid, and so is a non-zero weight in the padding of a row.
    let (rows, cols) = (4, 37);
    let packed = PackedTernary::pack(&Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut codes = packed.codes().to_vec();
    codes[3] |= 0b11;
    let e = PackedTernary::from_codes(codes, rows, cols).unwrap_err().to_string();
    assert!(e.contains("invalid 2-bit code 3"), "{e}");
    let mut codes = packed.codes().to_vec();
    codes[cols.div_ceil(4) - 1] = 0b1001_0110; // weights 36 (real, code 2), 37 and 38 (code 1), 39 (code 2)
    let e = PackedTernary::from_codes(codes, rows, cols).unwrap_err().to_string();
    assert!(e.contains("[0, 39]"), "{e}");
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

#[test]
fn export_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    common::tiny_checkpoint(&src, 1);
    let out = dir.path().join("out");

    // An existing output needs --force; the source itself is never the output.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "x").unwrap();
    let e = export_err(&src, &out, Format::Ternary);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    export(&src, &out, &Options { force: true, ..Options::new(Format::Ternary) }).unwrap();
    assert!(out.join("model.safetensors").exists() && !out.join("stale.txt").exists());
    let e = format!("{:#}", export(&src, &src, &Options { force: true, ..Options::new(Format::Ternary) }).unwrap_err());
    assert!(e.contains("is the checkpoint being exported"), "{e}");
    // Nor one of its files, nor a folder holding it, even with --force.
    let weights = src.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let e =
        format!("{:#}", export(&src, &weights, &Options { force: true, ..Options::new(Format::Gguf) }).unwrap_err());
    assert!(e.contains("is inside the checkpoint being exported") && e.contains("--force never"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    // Nor a new file or folder inside it.
    let listing =
        || std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect::<std::collections::BTreeSet<_>>();
    let files = listing();
    for (inside, format) in [(src.join("m.gguf"), Format::Gguf), (src.join("packed"), Format::Ternary)] {
        let e = export_err(&src, &inside, format);
        assert!(e.contains("is inside the checkpoint being exported"), "{e}");
    }
    assert_eq!(listing(), files);
    let e = format!(
        "{:#}",
        export(&src, dir.path(), &Options { force: true, ..Options::new(Format::Ternary) }).unwrap_err()
    );
    assert!(e.contains("holds the checkpoint being exported"), "{e}");
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, "old").unwrap();
    let e = export_err(&src, &gguf, Format::Gguf);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&gguf).unwrap(), b"old");

    // Not a BitNet: another architecture, or BitNet fields that say other bit widths.
    edit_config(&src, |c| c["architectures"] = serde_json::json!(["LlamaForCausalLM"]));
    let e = export_err(&src, &dir.path().join("a"), Format::Ternary);
    assert!(e.contains("config.json") && e.contains("architectures") && e.contains("LlamaForCausalLM"), "{e}");
    edit_config(&src, |c| {
        c["architectures"] = serde_json::json!(["BitnetForCausalLM"]);
        c["weight_bits"] = 2.into();
    });
    let e = export_err(&src, &dir.path().join("b"), Format::Gguf);
    assert!(e.contains("config.json") && e.contains("weight_bits"), "{e}");
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());

    // An unknown format is refused by the command line.
    let bin = env!("CARGO_BIN_EXE_bessie-export");
    let run = Command::new(bin).args(["-m", "x", "-o", "y", "--format", "onnx"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("onnx") && stderr.contains("ternary, gguf"), "{stderr}");
}

#[test]
fn packed_checkpoint_errors_name_file_field_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    common::tiny_checkpoint(&src, 2);
    export_ok(&src, &out, Format::Ternary, DenseDtype::Bf16);
    let load_err = |d: &Path| format!("{:#}", bessie::model::load(d, &Device::Cpu).unwrap_err());

    // A corrupted code (3) names the tensor.
    let victim = "model.layers.1.mlp.down_proj.weight";
    let mut tensors = read_safetensors(&out.join("model.safetensors"));
    let mut codes: Vec<u8> = tensors[victim].flatten_all().unwrap().to_vec1().unwrap();
    codes[5] = 0xff;
    tensors.insert(victim.into(), Tensor::from_vec(codes, tensors[victim].dims(), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    let e = load_err(&out);
    assert!(e.contains(victim) && e.contains("invalid 2-bit code 3"), "{e}");

    // Bessie's codes under transformers' `bitnet` method: its layout's shape is refused naming the tensor.
    edit_config(&out, |c| c["quantization_config"] = serde_json::json!({"quant_method": "bitnet"}));
    let e = load_err(&out);
    assert!(e.contains("model.safetensors") && e.contains("q_proj.weight") && e.contains("[ceil(64/4), 64]"), "{e}");
    // An unknown method is refused naming the file and field.
    edit_config(&out, |c| c["quantization_config"] = serde_json::json!({"quant_method": "gptq"}));
    let e = load_err(&out);
    assert!(e.contains("config.json") && e.contains("quantization_config") && e.contains("bessie_ternary"), "{e}");

    // llama.cpp's bitnet architecture has no separate lm_head.
    edit_config(&src, |c| c["tie_word_embeddings"] = false.into());
    let cfg = ModelConfig::from_file(&src.join("config.json")).unwrap();
    hf::save(&src, &cfg, &random_weights(&cfg, 2).unwrap(), DType::F32, Layout::Safetensors, &[]).unwrap();
    let e = export_err(&src, &dir.path().join("m.gguf"), Format::Gguf);
    assert!(e.contains("tie_word_embeddings"), "{e}");
}

/// Runs tests/reference/read_gguf.py on `file`; fails without Python's gguf (.ci/run installs it).
fn read_gguf(file: &Path) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/read_gguf.py");
    let out =
        Command::new("python3").arg(script).arg(file).output().expect("running python3 (with gguf: pip install gguf)");
    assert!(
        out.status.success(),
        "read_gguf.py failed (it needs python3 with gguf: pip install gguf): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The ternary values llama.cpp's `llama` graph expects of q or k: Hugging Face's rotate-half rows reordered
/// to interleaved pairs, as the converter's numpy `permute` does (reshape, swap, reshape).
fn interleave_rows(values: &[i8], rows: usize, cols: usize, heads: usize) -> Vec<i8> {
    let t =
        Tensor::from_vec(values.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(), (rows, cols), &Device::Cpu).unwrap();
    let t = t.reshape((heads, 2, rows / heads / 2, cols)).unwrap().transpose(1, 2).unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| v as i8).collect()
}

/// Exports `src` as GGUF of `ty` and checks what gguf-py reads: metadata, tensor names, shapes, types, and the
/// ternary values and scale of every BitLinear matrix, decoded outside Bessie. `ternary_type` is the ggml
/// type the matrices should have (F16 where the rows do not fit TQ2_0's blocks).
fn check_gguf(src: &Path, ty: GgufType, ternary_type: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    export(src, &file, &Options { gguf_type: ty, ..Options::new(Format::Gguf) }).unwrap();
    let got = read_gguf(&file);
    let cfg = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let arch = cfg.family().unwrap().gguf_arch.unwrap();
    let tok = Tokenizer::from_dir(src).unwrap();
    let m = &got["metadata"];
    let key = |k: &str| format!("{arch}.{k}");
    let expected_meta = [
        ("GGUF.version".to_string(), serde_json::json!(3)),
        ("general.architecture".into(), arch.into()),
        (
            "general.file_type".into(),
            (match ty {
                GgufType::Tq1_0 => 36,
                GgufType::Tq2_0 => 37,
                GgufType::I2S => 40,
            })
            .into(),
        ),
        ("general.quantization_version".into(), 2.into()),
        (key("vocab_size"), cfg.vocab_size.into()),
        (key("context_length"), cfg.max_position_embeddings.into()),
        (key("embedding_length"), cfg.hidden_size.into()),
        (key("block_count"), cfg.num_hidden_layers.into()),
        (key("feed_forward_length"), cfg.intermediate_size.into()),
        (key("attention.head_count"), cfg.num_attention_heads.into()),
        (key("attention.head_count_kv"), cfg.num_kv_heads().into()),
        (key("attention.key_length"), cfg.head_dim().into()),
        (key("rope.dimension_count"), cfg.head_dim().into()),
        (key("rope.freq_base"), (cfg.rope_theta as f32 as f64).into()),
        ("tokenizer.ggml.bos_token_id".into(), tok.bos_id().into()),
        ("tokenizer.ggml.eos_token_id".into(), tok.eos_id().into()),
        ("tokenizer.ggml.add_bos_token".into(), true.into()),
        ("tokenizer.ggml.add_eos_token".into(), false.into()),
    ];
    for (key, value) in &expected_meta {
        assert_eq!(&m[key], value, "{key}");
    }
    let template = bessie::tokenizer::template::checkpoint_template(src).unwrap().map(|t| t.0);
    assert_eq!(m["tokenizer.chat_template"].as_str(), template.as_deref());
    let eps = m[&key("attention.layer_norm_rms_epsilon")].as_f64().unwrap();
    assert_eq!(eps as f32, cfg.rms_norm_eps as f32);
    let tokens: Vec<&str> =
        m["tokenizer.ggml.tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let types: Vec<i64> = serde_json::from_value(m["tokenizer.ggml.token_type"].clone()).unwrap();
    assert_eq!((tokens.len(), types.len()), (cfg.vocab_size, cfg.vocab_size));
    if let Some(vocab) = tok.sentencepiece_vocab() {
        let pieces = vocab.pieces;
        assert_eq!((&m["tokenizer.ggml.model"], &m["tokenizer.ggml.pre"]), (&"llama".into(), &"default".into()));
        assert_eq!(&tokens[..pieces.len()], pieces.iter().map(|p| p.0.as_str()).collect::<Vec<_>>());
        assert_eq!(&types[..pieces.len()], pieces.iter().map(|p| i64::from(p.2)).collect::<Vec<_>>());
        let scores: Vec<f32> = serde_json::from_value(m["tokenizer.ggml.scores"].clone()).unwrap();
        assert_eq!(&scores[..pieces.len()], pieces.iter().map(|p| p.1).collect::<Vec<_>>());
        assert_eq!(m["tokenizer.ggml.add_space_prefix"], vocab.adds_dummy_prefix);
    } else {
        // A byte-level BPE tokenizer.json: every id's text as the file has it, and its merges in order.
        assert_eq!(m["tokenizer.ggml.model"], "gpt2");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
        let merge_text = |m: &serde_json::Value| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        };
        let merges: Vec<String> = json["model"]["merges"].as_array().unwrap().iter().map(merge_text).collect();
        let got_merges: Vec<String> = serde_json::from_value(m["tokenizer.ggml.merges"].clone()).unwrap();
        assert_eq!(got_merges, merges);
        for (text, id) in json["model"]["vocab"].as_object().unwrap() {
            let id = id.as_u64().unwrap() as usize;
            assert_eq!((tokens[id], types[id]), (text.as_str(), 1), "token {id}");
        }
        for added in json["added_tokens"].as_array().unwrap() {
            let id = added["id"].as_u64().unwrap() as usize;
            let kind = if added["special"].as_bool().unwrap() { 3 } else { 4 };
            assert_eq!((tokens[id], types[id]), (added["content"].as_str().unwrap(), kind), "added token {id}");
        }
    }

    // Tensors: llama.cpp's names, ggml shapes (innermost first) and types.
    let source = bessie::export::Source::open(src).unwrap();
    let tensors = got["tensors"].as_array().unwrap();
    let llama3_rope = cfg.rope_scaling().unwrap().is_some_and(|s| s.kind == RopeScalingType::Llama3);
    assert_eq!(tensors.len(), source.shapes().len() + usize::from(llama3_rope));
    let find = |name: &str| tensors.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    let shape = |t: &serde_json::Value| -> Vec<usize> { serde_json::from_value(t["shape"].clone()).unwrap() };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let typed = |name: &str| (find(name)["type"].as_str().unwrap().to_string(), shape(find(name)));
    assert_eq!(typed("token_embd.weight"), ("F16".into(), vec![h, v]));
    assert_eq!(typed("output_norm.weight"), ("F32".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        assert_eq!(typed("output.weight"), ("F16".into(), vec![h, v]));
    }
    let hf_to_gguf = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.inner_attn_ln", "attn_sub_norm"),
        ("self_attn.attn_sub_norm", "attn_sub_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.ffn_layernorm", "ffn_sub_norm"),
        ("mlp.ffn_sub_norm", "ffn_sub_norm"),
    ];
    for (name, shape_of) in source.shapes() {
        let Some(rest) = name.strip_prefix("model.layers.") else { continue };
        let (layer, module) = rest.split_once('.').unwrap();
        let short = hf_to_gguf.iter().find(|(hf, _)| format!("{hf}.weight") == module).unwrap().1;
        let t = find(&format!("blk.{layer}.{short}.weight"));
        match source.param(&name, &shape_of).unwrap() {
            bessie::export::Param::Dense(d) => {
                assert_eq!((t["type"].as_str(), shape(t)), (Some("F32"), d.dims().to_vec()), "{name}");
            }
            bessie::export::Param::Ternary { codes, scale } => {
                let (rows, cols) = codes.dims();
                assert_eq!((t["type"].as_str(), shape(t)), (Some(ternary_type), vec![cols, rows]), "{name}");
                let mut values = codes.values();
                if arch == "llama" && short == "attn_q" {
                    values = interleave_rows(&values, rows, cols, cfg.num_attention_heads);
                } else if arch == "llama" && short == "attn_k" {
                    values = interleave_rows(&values, rows, cols, cfg.num_kv_heads());
                }
                let count = |x: i8| values.iter().filter(|&&v| v == x).count() as u64;
                let checksum: i64 =
                    values.iter().enumerate().map(|(i, &v)| i64::from(v) * ((i as i64 * 7919) % 10007)).sum();
                assert_eq!(
                    (t["plus"].as_u64(), t["zero"].as_u64(), t["minus"].as_u64(), t["checksum"].as_i64()),
                    (Some(count(1)), Some(count(0)), Some(count(-1)), Some(checksum)),
                    "{name}"
                );
                // I2_S keeps the f32 scale; TQ2_0 (and its F16 fallback) rounds it to f16.
                let expected = if ternary_type == "I2_S" { scale } else { half::f16::from_f32(scale).to_f32() };
                assert_eq!(t["scale"].as_f64().unwrap() as f32, expected, "{name}");
            }
        }
    }
    got
}

/// Rows a multiple of 256: every ternary matrix is TQ2_0, TQ1_0 or I2_S. The tiny shape (rows of 64 and
/// 176): F16 in TQ2_0 and TQ1_0, and an error naming the tensor in I2_S, which cannot hold them.
#[test]
fn gguf_is_read_back_by_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide");
    let vocab = common::tiny_checkpoint(&wide, 0).vocab_size;
    checkpoint(&wide, &wide_config(vocab), 8, DType::F32);
    // A trained checkpoint's template travels in the file.
    std::fs::write(wide.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }}\n{% endfor %}").unwrap();
    check_gguf(&wide, GgufType::Tq2_0, "TQ2_0");
    check_gguf(&wide, GgufType::Tq1_0, "TQ1_0");
    check_gguf(&wide, GgufType::I2S, "I2_S");
    let tiny = dir.path().join("tiny");
    common::tiny_checkpoint(&tiny, 3);
    check_gguf(&tiny, GgufType::Tq2_0, "F16");
    check_gguf(&tiny, GgufType::Tq1_0, "F16");
    let out = dir.path().join("tiny.gguf");
    let e = format!(
        "{:#}",
        export(&tiny, &out, &Options { gguf_type: GgufType::I2S, ..Options::new(Format::Gguf) }).unwrap_err()
    );
    assert!(e.contains("self_attn.q_proj.weight") && e.contains("rows of 64") && e.contains("128"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("gguf")));
}

/// The 2B4T and Llama-layout families, widened so that every matrix is I2_S: `bitnet-b1.58` (I2_S only) and
/// `llama` (q and k rows interleaved, an untied head as `output.weight`, TQ2_0 and I2_S).
#[test]
fn gguf_writes_every_ternary_family() {
    use bessie::model::init::{write_random_checkpoint, TokenizerSource};
    let dir = tempfile::tempdir().unwrap();
    for (shape, types) in
        [("tiny-bitnet", &[GgufType::I2S][..]), ("tiny-llama-bitnet", &[GgufType::Tq2_0, GgufType::I2S])]
    {
        let src = dir.path().join(shape);
        let cfg =
            write_random_checkpoint(&src, shape, TokenizerSource::Shipped, None, 5, DType::F32, Layout::Safetensors)
                .unwrap();
        let mut wide = cfg.clone();
        (wide.hidden_size, wide.intermediate_size) = (256, 512);
        wide.head_dim = Some(64);
        hf::save(&src, &wide, &random_weights(&wide, 6).unwrap(), DType::F32, Layout::Safetensors, &[]).unwrap();
        for &ty in types {
            check_gguf(&src, ty, if ty == GgufType::I2S { "I2_S" } else { "TQ2_0" });
        }
    }
    // llama.cpp has no 2B4T graph: TQ2_0 is refused for it, naming the way out.
    let e = format!(
        "{:#}",
        export(&dir.path().join("tiny-bitnet"), &dir.path().join("b.gguf"), &Options::new(Format::Gguf)).unwrap_err()
    );
    assert!(e.contains("bitnet-b1.58") && e.contains("--type i2_s"), "{e}");
}

/// A random checkpoint of `shape` in `dir` with the tokenizer `../shared/tokenizers/{file}`; None (saying so)
/// where this checkout has no shared tokenizers.
fn shared_tokenizer_checkpoint(dir: &Path, file: &str, shape: &str) -> Option<(PathBuf, ModelConfig)> {
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers").join(file);
    if !tokenizer.exists() {
        println!("skipping: {} not found", tokenizer.display());
        return None;
    }
    let src = dir.join(shape);
    let source = bessie::model::init::TokenizerSource::Path(&tokenizer);
    let cfg =
        bessie::model::init::write_random_checkpoint(&src, shape, source, None, 0, DType::BF16, Layout::Safetensors)
            .unwrap();
    Some((src, cfg))
}

/// The real LLaMA vocabulary (32000 pieces, byte fallback, <pad> and </line> added), when available.
#[test]
fn gguf_embeds_the_llama_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let Some((src, _)) = shared_tokenizer_checkpoint(dir.path(), "llama/tokenizer.model", "tiny") else { return };
    let got = check_gguf(&src, GgufType::Tq2_0, "F16");
    let m = &got["metadata"];
    let token =
        |id: usize| (m["tokenizer.ggml.tokens"][id].as_str().unwrap(), m["tokenizer.ggml.token_type"][id].as_i64());
    assert_eq!(m["tokenizer.ggml.tokens"].as_array().unwrap().len(), 32002);
    assert_eq!(token(0), ("<unk>", Some(2)));
    assert_eq!(token(1), ("<s>", Some(3)));
    assert_eq!(token(3), ("<0x00>", Some(6)));
    assert_eq!(token(32000), ("<pad>", Some(3)));
    assert_eq!(token(32001), ("</line>", Some(3)));
}

/// LLaMA-3's byte-level BPE (2B4T's and Llama3-8B-1.58's tokenizer), when available: `gpt2` with llama.cpp's
/// `llama-bpe` pre-tokenizer, which llama.cpp's converter recognizes by the same hash.
#[test]
fn gguf_embeds_the_llama3_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let Some((src, cfg)) = shared_tokenizer_checkpoint(dir.path(), "llama3/tokenizer.json", "tiny-llama-bitnet") else {
        return;
    };
    assert_eq!(cfg.vocab_size, 128256);
    let got = check_gguf(&src, GgufType::Tq2_0, "F16");
    assert_eq!(got["metadata"]["tokenizer.ggml.pre"], "llama-bpe");
    assert_eq!(got["metadata"]["tokenizer.ggml.tokens"][128000], "<|begin_of_text|>");
}

/// Every ternary family exports as Bessie's packed checkpoint, the Llama layout with transformers' `bitnet`
/// quantization (Falcon3's) included, and the export computes the latent model's logits; a full-precision
/// Llama is refused, naming the field.
#[test]
fn ternary_families_export_and_full_precision_is_refused() {
    use bessie::model::init::{write_random_checkpoint, TokenizerSource};
    let dir = tempfile::tempdir().unwrap();
    for shape in ["tiny-bitnet", "tiny-llama-bitnet"] {
        let (src, out) = (dir.path().join(shape), dir.path().join(format!("{shape}-packed")));
        write_random_checkpoint(&src, shape, TokenizerSource::Shipped, None, 5, DType::F32, Layout::Safetensors)
            .unwrap();
        export_ok(&src, &out, Format::Ternary, DenseDtype::F32);
        assert_eq!(logits(&load(&out)), logits(&load(&src)), "{shape}");
    }
    let src = dir.path().join("tiny-llama");
    write_random_checkpoint(&src, "tiny-llama", TokenizerSource::Shipped, None, 5, DType::F32, Layout::Safetensors)
        .unwrap();
    let e = export_err(&src, &dir.path().join("llama-packed"), Format::Ternary);
    assert!(e.contains("config.json") && e.contains("architectures") && e.contains("full-precision"), "{e}");
}
