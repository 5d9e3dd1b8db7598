//! Checkpoint loading and the inference forward pass on CPU.

mod common;

use std::path::Path;

use bessie::config::ModelConfig;
use bessie::generate::{generate, Sampler, Stop};
use bessie::model::hf::{self, Layout};
use bessie::model::init::random_weights;
use bessie::model::{BitNet, KvCache};
use bessie::tokenizer::{template::ChatTemplate, Tokenizer};
use candle_core::{DType, Device, Tensor};

const IDS: [u32; 16] = [1, 5, 99, 250, 7, 7, 7, 300, 12, 0, 3, 800, 42, 42, 611, 2];

fn logits(dir: &Path) -> Vec<Vec<f32>> {
    let model = bessie::model::load(dir, &Device::Cpu).unwrap();
    all_logits(&model, &IDS)
}

fn all_logits(model: &BitNet, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let h = model.forward(&x, &mut KvCache::new(&model.cfg)).unwrap();
    model.logits(&h.squeeze(0).unwrap()).unwrap().to_vec2().unwrap()
}

/// Random weights on a grid that f32, f16 and bf16 all represent exactly (8 significant bits, no
/// f16 subnormals), so every dtype must give bit-identical logits.
fn grid_weights(cfg: &ModelConfig) -> Vec<(String, Tensor)> {
    random_weights(cfg, 3)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, ((t * 4096.0).unwrap().round().unwrap().clamp(-255f32, 255f32).unwrap() / 4096.0).unwrap()))
        .map(|(n, t)| if bessie::model::is_norm(&n) { (n, t.ones_like().unwrap()) } else { (n, t) })
        .collect()
}

fn tiny_dir() -> (tempfile::TempDir, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_checkpoint(dir.path(), 0);
    (dir, cfg)
}

#[test]
fn every_layout_and_dtype_gives_identical_logits() {
    let (base, cfg) = tiny_dir();
    let weights = grid_weights(&cfg);
    let mut reference = None;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [Layout::Safetensors, Layout::Sharded, Layout::Pth] {
            let dir = tempfile::tempdir().unwrap();
            hf::save(dir.path(), &cfg, &weights, dtype, layout, &[]).unwrap();
            let got = logits(dir.path());
            assert!(got.iter().flatten().all(|v| v.is_finite()));
            match &reference {
                None => reference = Some(got),
                Some(r) => assert!(r == &got, "{dtype:?} {layout:?} logits differ from f32 safetensors"),
            }
        }
    }
    // Tied lm_head: the saved file has no lm_head.weight, as transformers writes it.
    let st = candle_core::safetensors::load(base.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!st.contains_key("lm_head.weight") && st.contains_key("model.embed_tokens.weight"));
}

#[test]
fn untied_lm_head_is_read_from_the_file() {
    let (_d, mut cfg) = tiny_dir();
    cfg.tie_word_embeddings = false;
    let weights = random_weights(&cfg, 9).unwrap();
    let dir = tempfile::tempdir().unwrap();
    hf::save(dir.path(), &cfg, &weights, DType::F32, Layout::Safetensors, &[]).unwrap();
    let with_head = logits(dir.path());
    // The same weights with the embedding as head must differ: the head really came from lm_head.weight.
    cfg.tie_word_embeddings = true;
    hf::save(dir.path(), &cfg, &weights, DType::F32, Layout::Safetensors, &[]).unwrap();
    assert_ne!(with_head, logits(dir.path()));
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", bessie::model::load(dir, &Device::Cpu).unwrap_err())
}

#[test]
fn broken_config_names_the_file_and_field() {
    let (dir, _) = tiny_dir();
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, json.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    std::fs::write(&path, "{\"hidden_size\": 64,").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("line 1"), "{e}");

    json["hidden_size"] = 64.into();
    json["hidden_act"] = "gelu".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("hidden_act"), "{e}");
}

#[test]
fn unknown_config_fields_are_kept_when_saving() {
    let (dir, _) = tiny_dir();
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["my_custom_field"] = "kept".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let cfg = ModelConfig::from_file(&path).unwrap();
    let out = tempfile::tempdir().unwrap();
    hf::save(out.path(), &cfg, &random_weights(&cfg, 1).unwrap(), DType::BF16, Layout::Safetensors, &[]).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["my_custom_field"], "kept");
    assert_eq!(saved["torch_dtype"], "bfloat16");
    assert_eq!(saved["architectures"][0], "BitnetForCausalLM");
}

#[test]
fn missing_or_misshapen_tensors_name_file_and_tensor() {
    let (_d, cfg) = tiny_dir();
    let weights = random_weights(&cfg, 1).unwrap();
    let victim = "model.layers.1.mlp.up_proj.weight";
    for layout in [Layout::Safetensors, Layout::Sharded, Layout::Pth] {
        let dir = tempfile::tempdir().unwrap();
        let without: Vec<_> = weights.iter().filter(|(n, _)| n != victim).cloned().collect();
        hf::save(dir.path(), &cfg, &without, DType::F32, layout, &[]).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains(victim)
                && e.contains("missing")
                && e.contains(".json") | e.contains(".safetensors") | e.contains(".bin"),
            "{layout:?}: {e}"
        );

        let misshapen: Vec<_> = weights
            .iter()
            .map(|(n, t)| if n == victim { (n.clone(), t.narrow(0, 0, 3).unwrap()) } else { (n.clone(), t.clone()) })
            .collect();
        hf::save(dir.path(), &cfg, &misshapen, DType::F32, layout, &[]).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains(victim) && e.contains("[3, 64]") && (e.contains(".safetensors") || e.contains(".bin")),
            "{layout:?}: {e}"
        );
    }
    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(_d.path().join("config.json"), empty.path().join("config.json")).unwrap();
    let e = load_err(empty.path());
    assert!(e.contains("no weights") && e.contains("model.safetensors"), "{e}");
}

/// Greedy decoding with the KV cache must pick exactly the tokens that recomputing the whole prefix picks.
#[test]
fn kv_cache_generation_equals_full_recompute() {
    for kv_heads in [4, 2] {
        let (dir, mut cfg) = tiny_dir();
        cfg.num_key_value_heads = Some(kv_heads);
        hf::save(dir.path(), &cfg, &random_weights(&cfg, 5).unwrap(), DType::F32, Layout::Safetensors, &[]).unwrap();
        let model = bessie::model::load(dir.path(), &Device::Cpu).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let prompt = tok.encode("The cow said", true).unwrap();
        let stop = Stop::new(&tok, &ChatTemplate::bessie(None));
        let g = generate(&model, &tok, &stop, &prompt, 24, &mut Sampler::greedy(), |_| Ok(())).unwrap();
        let mut ids = prompt.clone();
        for _ in 0..g.ids.len() {
            let last = all_logits(&model, &ids).pop().unwrap();
            let next = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            ids.push(next);
        }
        assert_eq!(&ids[prompt.len()..], g.ids.as_slice(), "kv heads {kv_heads}");
        assert!(g.ids.len() > 1);
    }
}

/// Logits of a small random model against an independent PyTorch implementation of the architecture
/// (tests/reference/bitnet_torch.py, run on the GPU machine's CPU in f32; its output is the fixture).
#[test]
fn logits_match_pytorch_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_logits.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (dir, _) = tiny_dir();
    let ids: Vec<u32> = serde_json::from_value(fixture["ids"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(fixture["logits"].clone()).unwrap();
    let model = bessie::model::load(dir.path(), &Device::Cpu).unwrap();
    let got = all_logits(&model, &ids);
    let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
    for (g, e) in got.iter().flatten().zip(expected.iter().flatten()) {
        num += ((g - e) as f64).powi(2);
        den += (*e as f64).powi(2);
        worst = worst.max(((g - e).abs() / (e.abs() + 1e-3)) as f64);
    }
    let rel = (num / den).sqrt();
    assert!(rel < 1e-4, "relative L2 error {rel:e}, worst element {worst:e}");
}

/// What no family reads is refused naming config.json and the field, before any weight is read: an unknown
/// class or model type, a class and model type that disagree, an unknown activation or quantization
/// method, transformers' BitLinear options Bessie does not implement, a sub-norm family whose heads do not
/// make the hidden size.
#[test]
fn unknown_families_and_options_name_the_field() {
    let (dir, _) = tiny_dir();
    let path = dir.path().join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "architectures",
            Box::new(|j| j["architectures"] = serde_json::json!(["MistralForCausalLM"])),
            "BitNetForCausalLM",
        ),
        ("model_type", Box::new(|j| j["model_type"] = "gpt2".into()), "BitnetForCausalLM"),
        ("hidden_act", Box::new(|j| j["hidden_act"] = "gelu".into()), "relu2"),
        (
            "quant_method",
            Box::new(|j| j["quantization_config"] = serde_json::json!({"quant_method": "gptq"})),
            "bitnet",
        ),
        (
            "use_rms_norm",
            Box::new(|j| {
                j["quantization_config"] = serde_json::json!({"quant_method": "bitnet", "use_rms_norm": true})
            }),
            "not supported",
        ),
        (
            "linear_class",
            Box::new(|j| j["quantization_config"] = serde_json::json!({"quant_method": "bitnet", "linear_class": "x"})),
            "autobitlinear",
        ),
        (
            "modules_to_not_convert",
            Box::new(|j| {
                j["quantization_config"] =
                    serde_json::json!({"quant_method": "bitnet", "modules_to_not_convert": ["model.layers.0.mlp"]})
            }),
            "lm_head",
        ),
        ("head_dim", Box::new(|j| j["head_dim"] = 32.into()), "hidden_size"),
    ];
    for (field, edit, hint) in cases {
        let mut json = original.clone();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("config.json") && e.contains(field) && e.contains(hint), "{field}: {e}");
    }
}
