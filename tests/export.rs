//! `bessie-export`: packed ternary checkpoints (round trip, identical generations, the CPU kernel, errors)
//! and GGUF files read back by an independent reader (gguf-py, tests/reference/read_gguf.py; these tests
//! fail without it). transformers' packed bitnet export: tests/hf_bitnet.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bessie::config::ModelConfig;
use bessie::export::{export, DenseDtype, Format};
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
    export(src, out, format, dense, false).unwrap();
}

fn export_err(src: &Path, out: &Path, format: Format) -> String {
    format!("{:#}", export(src, out, format, DenseDtype::Bf16, false).unwrap_err())
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
    export(&src, &out, Format::Ternary, DenseDtype::Bf16, true).unwrap();
    assert!(out.join("model.safetensors").exists() && !out.join("stale.txt").exists());
    let e = format!("{:#}", export(&src, &src, Format::Ternary, DenseDtype::Bf16, true).unwrap_err());
    assert!(e.contains("is the checkpoint being exported"), "{e}");
    // Nor one of its files, nor a folder holding it, even with --force.
    let weights = src.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let e = format!("{:#}", export(&src, &weights, Format::Gguf, DenseDtype::Bf16, true).unwrap_err());
    assert!(e.contains("is a file of the checkpoint being exported") && e.contains("--force never"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    let e = format!("{:#}", export(&src, dir.path(), Format::Ternary, DenseDtype::Bf16, true).unwrap_err());
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

/// Exports `src` as GGUF and checks what gguf-py reads: metadata, tensor names, shapes, types, and the
/// ternary values and scale of every BitLinear matrix, decoded by gguf-py itself.
fn check_gguf(src: &Path, ternary_type: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    export_ok(src, &file, Format::Gguf, DenseDtype::Bf16);
    let got = read_gguf(&file);
    let cfg = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let tok = Tokenizer::from_dir(src).unwrap();
    let m = &got["metadata"];
    let expected_meta = serde_json::json!({
        "GGUF.version": 3,
        "general.architecture": "bitnet",
        "general.file_type": 37,
        "general.quantization_version": 2,
        "bitnet.vocab_size": cfg.vocab_size,
        "bitnet.context_length": cfg.max_position_embeddings,
        "bitnet.embedding_length": cfg.hidden_size,
        "bitnet.block_count": cfg.num_hidden_layers,
        "bitnet.feed_forward_length": cfg.intermediate_size,
        "bitnet.attention.head_count": cfg.num_attention_heads,
        "bitnet.attention.head_count_kv": cfg.num_kv_heads(),
        "bitnet.rope.freq_base": cfg.rope_theta,
        "bitnet.rope.scaling.type": "linear",
        "bitnet.rope.scaling.factor": 1.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": tok.bos_id(),
        "tokenizer.ggml.eos_token_id": tok.eos_id(),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": tok.pad_id().unwrap(),
        "tokenizer.ggml.add_bos_token": true,
        "tokenizer.ggml.add_eos_token": false,
        "tokenizer.ggml.add_space_prefix": true,
    });
    for (key, value) in expected_meta.as_object().unwrap() {
        assert_eq!(&m[key], value, "{key}");
    }
    let eps = m["bitnet.attention.layer_norm_rms_epsilon"].as_f64().unwrap();
    assert_eq!(eps as f32, cfg.rms_norm_eps as f32);
    let pieces = tok.sentencepiece_vocab().unwrap().pieces;
    let tokens: Vec<&str> =
        m["tokenizer.ggml.tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens, pieces.iter().map(|p| p.0.as_str()).collect::<Vec<_>>());
    let types: Vec<i64> = serde_json::from_value(m["tokenizer.ggml.token_type"].clone()).unwrap();
    assert_eq!(types, pieces.iter().map(|p| i64::from(p.2)).collect::<Vec<_>>());
    let scores: Vec<f32> = serde_json::from_value(m["tokenizer.ggml.scores"].clone()).unwrap();
    assert_eq!(scores, pieces.iter().map(|p| p.1).collect::<Vec<_>>());

    // Tensors: llama.cpp's names, ggml shapes (innermost first) and types.
    let source = bessie::export::Source::read(src).unwrap();
    let tensors = got["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), source.params.len());
    let find = |name: &str| tensors.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    let shape = |t: &serde_json::Value| -> Vec<usize> { serde_json::from_value(t["shape"].clone()).unwrap() };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    assert_eq!(
        (find("token_embd.weight")["type"].as_str(), shape(find("token_embd.weight"))),
        (Some("F16"), vec![h, v])
    );
    assert_eq!(
        (find("output_norm.weight")["type"].as_str(), shape(find("output_norm.weight"))),
        (Some("F32"), vec![h])
    );
    let hf_to_gguf = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.inner_attn_ln", "attn_sub_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.ffn_layernorm", "ffn_sub_norm"),
    ];
    for (name, param) in &source.params {
        let Some(rest) = name.strip_prefix("model.layers.") else { continue };
        let (layer, module) = rest.split_once('.').unwrap();
        let short = hf_to_gguf.iter().find(|(hf, _)| format!("{hf}.weight") == module).unwrap().1;
        let t = find(&format!("blk.{layer}.{short}.weight"));
        match param {
            bessie::export::Param::Dense(d) => {
                assert_eq!((t["type"].as_str(), shape(t)), (Some("F32"), d.dims().to_vec()), "{name}");
            }
            bessie::export::Param::Ternary { codes, scale } => {
                let (rows, cols) = codes.dims();
                assert_eq!((t["type"].as_str(), shape(t)), (Some(ternary_type), vec![cols, rows]), "{name}");
                let values = codes.values();
                let count = |x: i8| values.iter().filter(|&&v| v == x).count() as u64;
                let checksum: i64 =
                    values.iter().enumerate().map(|(i, &v)| i64::from(v) * ((i as i64 * 7919) % 10007)).sum();
                assert_eq!(
                    (t["plus"].as_u64(), t["zero"].as_u64(), t["minus"].as_u64(), t["checksum"].as_i64()),
                    (Some(count(1)), Some(count(0)), Some(count(-1)), Some(checksum)),
                    "{name}"
                );
                assert_eq!(t["scale"].as_f64().unwrap() as f32, half::f16::from_f32(*scale).to_f32(), "{name}");
            }
        }
    }
    got
}

/// Rows a multiple of 256: every ternary matrix is TQ2_0. The tiny shape (rows of 64 and 176): F16.
#[test]
fn gguf_is_read_back_by_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide");
    let vocab = common::tiny_checkpoint(&wide, 0).vocab_size;
    checkpoint(&wide, &wide_config(vocab), 8, DType::F32);
    check_gguf(&wide, "TQ2_0");
    let tiny = dir.path().join("tiny");
    common::tiny_checkpoint(&tiny, 3);
    check_gguf(&tiny, "F16");
}

/// The real LLaMA vocabulary (32000 pieces, byte fallback, <pad> and </line> added), when available.
#[test]
fn gguf_embeds_the_llama_tokenizer() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/llama/tokenizer.model");
    if !model.exists() {
        println!("skipping: ../shared/tokenizers/llama/tokenizer.model not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("llama");
    let source = bessie::model::init::TokenizerSource::Path(&model);
    bessie::model::init::write_random_checkpoint(&src, "tiny", source, None, 0, DType::BF16, Layout::Safetensors)
        .unwrap();
    let got = check_gguf(&src, "F16");
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
