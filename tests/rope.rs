//! RoPE scaling: frequencies against hand-computed values and transformers' formulas, training tables
//! against the unscaled ones, the inference model with and without scaling, the limit's error, and the
//! scaling written into a saved config.json.

use bessie::config::model::{RopeScaling, RopeScalingType};
use bessie::config::ModelConfig;
use bessie::model::{bitnet::BitNet, hf, KvCache};
use bessie::train::model::RopeTables;
use candle_core::{DType, Device, Tensor};
use tempfile::TempDir;

mod common;

fn scaled(mut cfg: ModelConfig, kind: RopeScalingType, factor: f64) -> ModelConfig {
    cfg.set_rope_scaling(Some(RopeScaling { kind, factor }));
    cfg
}

/// head_dim 4, rope_theta 10000, 2048 positions: `base^(2i/d)` is 1 and 100.
fn small() -> ModelConfig {
    let mut c = ModelConfig::shape("tiny", 97).unwrap();
    c.hidden_size = 8;
    c.num_attention_heads = 2;
    c.num_key_value_heads = Some(2);
    c
}

#[test]
fn frequencies_by_hand() {
    let f = small().rope_frequencies(4096).unwrap();
    assert_eq!((f.denominators.as_slice(), f.position_divisor), (&[1.0, 100.0][..], 1.0));
    let f = scaled(small(), RopeScalingType::Linear, 2.0).rope_frequencies(4096).unwrap();
    assert_eq!((f.denominators.as_slice(), f.position_divisor), (&[1.0, 100.0][..], 2.0));
    // Dynamic at 4096 = 2 x 2048 with factor 2: base = 10000 (2 x 2 - 1)^(4 / 2) = 90000, sqrt 300.
    let f = scaled(small(), RopeScalingType::Dynamic, 2.0).rope_frequencies(4096).unwrap();
    assert!((f.denominators[1] - 300.0).abs() < 1e-9, "{:?}", f.denominators);
    // Within max_position_embeddings dynamic scaling changes nothing.
    assert_eq!(
        scaled(small(), RopeScalingType::Dynamic, 2.0).rope_frequencies(2048).unwrap(),
        small().rope_frequencies(2048).unwrap()
    );
}

/// transformers' `inv_freq` (modeling_rope_utils: `1 / base ** (arange(0, dim, 2) / dim)`, divided by the
/// factor for linear; the dynamic base `base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))`
/// with `seq_len = max(seq_len, max_pos)`), for the large shape's head_dim 96.
fn transformers_inv_freq(cfg: &ModelConfig, kind: RopeScalingType, factor: f64, seq_len: usize) -> Vec<f64> {
    let dim = cfg.head_dim() as f64;
    let max_pos = cfg.max_position_embeddings as f64;
    let mut base = cfg.rope_theta;
    if kind == RopeScalingType::Dynamic {
        let seq_len = (seq_len as f64).max(max_pos);
        base *= ((factor * seq_len / max_pos) - (factor - 1.0)).powf(dim / (dim - 2.0));
    }
    let inv: Vec<f64> = (0..cfg.head_dim()).step_by(2).map(|j| 1.0 / base.powf(j as f64 / dim)).collect();
    match kind {
        RopeScalingType::Linear => inv.iter().map(|x| x / factor).collect(),
        _ => inv,
    }
}

#[test]
fn frequencies_match_transformers() {
    let large = ModelConfig::shape("large", 32002).unwrap();
    for (kind, factor, seq) in [
        (RopeScalingType::Linear, 2.0, 4096),
        (RopeScalingType::Linear, 4.0, 3000),
        (RopeScalingType::Dynamic, 2.0, 4096),
        (RopeScalingType::Dynamic, 4.0, 8192),
        (RopeScalingType::Dynamic, 3.0, 5000),
    ] {
        let f = scaled(large.clone(), kind, factor).rope_frequencies(seq).unwrap();
        let want = transformers_inv_freq(&large, kind, factor, seq);
        for (i, (den, w)) in f.denominators.iter().zip(&want).enumerate() {
            let angle = 1000.0 / f.position_divisor / den;
            assert!((angle - 1000.0 * w).abs() <= 1e-12 * (1000.0 * w), "{kind:?} x{factor} at {seq}, pair {i}");
        }
    }
}

#[test]
fn training_tables_interpolate_positions() {
    let dev = Device::Cpu;
    let plain = RopeTables::new(&small(), 2048, &dev).unwrap();
    // Unscaled angles are p / theta^(2i/d) in f64, rounded once to f32 (the rounding training has always used).
    let d = small().head_dim();
    let want: Vec<f32> = (0..2048)
        .flat_map(|p| (0..d / 2).map(move |i| (p as f64 / 10000f64.powf(2.0 * i as f64 / d as f64)) as f32))
        .collect();
    let want = Tensor::from_vec(want, (2048, d / 2), &dev).unwrap().cos().unwrap();
    assert_eq!(plain.cos.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    // Linear x2: position 2p gets exactly the angles of position p.
    let linear = RopeTables::new(&scaled(small(), RopeScalingType::Linear, 2.0), 4096, &dev).unwrap();
    let even = linear.cos.index_select(&Tensor::arange_step(0u32, 4096, 2, &dev).unwrap(), 0).unwrap();
    assert_eq!(even.to_vec2::<f32>().unwrap(), plain.cos.to_vec2::<f32>().unwrap());
}

#[test]
fn too_long_without_scaling_names_the_limit() {
    let err = RopeTables::new(&small(), 2049, &Device::Cpu).err().unwrap().to_string();
    for want in ["data.max_seq_len", "2049", "max_position_embeddings = 2048", "model.rope_scaling"] {
        assert!(err.contains(want), "`{err}` should contain `{want}`");
    }
    let linear = scaled(small(), RopeScalingType::Linear, 2.0);
    linear.check_positions(4096, "x").unwrap();
    let err = linear.check_positions(4097, "x").unwrap_err().to_string();
    assert!(err.contains("supports 4096"), "{err}");
    scaled(small(), RopeScalingType::Dynamic, 2.0).check_positions(100_000, "x").unwrap();
}

/// Hidden states of a tiny model saved with `scaling`, for `t` tokens; or the error.
fn hidden(dir: &TempDir, scaling: Option<RopeScaling>, t: usize) -> candle_core::Result<Vec<f32>> {
    let mut cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    cfg.max_position_embeddings = 16;
    cfg.set_rope_scaling(scaling);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let model = BitNet::load(vb, &cfg)?;
    let ids = Tensor::arange(3u32, 3 + t as u32, &Device::Cpu)?.unsqueeze(0)?;
    model.forward(&ids, &mut KvCache::new(&cfg))?.flatten_all()?.to_vec1()
}

#[test]
fn inference_with_scaling() {
    let dir = TempDir::new().unwrap();
    common::tiny_checkpoint(dir.path(), 3);
    let plain = hidden(&dir, None, 12).unwrap();
    let linear = |f: f64| Some(RopeScaling { kind: RopeScalingType::Linear, factor: f });
    let dynamic = Some(RopeScaling { kind: RopeScalingType::Dynamic, factor: 2.0 });
    // Factor 1, and dynamic within max_position_embeddings, are the unscaled model exactly.
    assert_eq!(hidden(&dir, linear(1.0), 12).unwrap(), plain);
    assert_eq!(hidden(&dir, dynamic, 12).unwrap(), plain);
    assert_ne!(hidden(&dir, linear(2.0), 12).unwrap(), plain);
    // 24 tokens exceed the 16 positions unless scaled.
    let err = hidden(&dir, None, 24).unwrap_err().to_string();
    assert!(err.contains("needs 24 positions but the model supports 16"), "{err}");
    assert_eq!(hidden(&dir, linear(2.0), 24).unwrap().len(), 24 * 64);
    let long = hidden(&dir, dynamic, 24).unwrap();
    assert!(long.iter().all(|x| x.is_finite()));
    // Dynamic scaling changes every position's rotation once the sequence is longer than 16.
    assert_ne!(long[..12 * 64], plain[..]);
}

#[test]
fn scaling_is_saved_in_config_json() {
    let dir = TempDir::new().unwrap();
    let cfg = scaled(small(), RopeScalingType::Linear, 2.0);
    hf::save(dir.path(), &cfg, &[], DType::F32, hf::Layout::Safetensors, &[]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(json["rope_scaling"], serde_json::json!({"rope_type": "linear", "type": "linear", "factor": 2.0}));
    let back = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(back.rope_scaling().unwrap(), Some(RopeScaling { kind: RopeScalingType::Linear, factor: 2.0 }));
    // transformers' other types are refused by name.
    let mut yarn = small();
    yarn.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    let err = yarn.validate().unwrap_err().to_string();
    assert!(err.contains("`rope_scaling` has rope_type `yarn`"), "{err}");
}

/// transformers' own inverse frequencies (tests/reference/rope_parameters.py) for Llama 3.2's `llama3`
/// scaling, written as the Hub writes it (top-level `rope_scaling`) and as transformers 5 does
/// (`rope_parameters`), and a plain `rope_parameters` with another theta.
#[test]
fn rope_parameters_and_llama3_scaling_match_transformers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rope_parameters.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = TempDir::new().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let mut json = case["config"].clone();
        for (key, value) in [
            ("architectures", serde_json::json!(["LlamaForCausalLM"])),
            ("intermediate_size", 64.into()),
            ("num_hidden_layers", 1.into()),
            ("vocab_size", 100.into()),
        ] {
            json[key] = value;
        }
        let file = dir.path().join("config.json");
        std::fs::write(&file, json.to_string()).unwrap();
        let cfg = ModelConfig::from_file(&file).unwrap();
        let f = cfg.rope_frequencies(16).unwrap();
        let want: Vec<f64> = case["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(f.denominators.len(), want.len(), "{}", case["name"]);
        for (i, (den, w)) in f.denominators.iter().zip(&want).enumerate() {
            let got = 1.0 / den / f.position_divisor;
            // transformers computes in f32.
            assert!((got - w).abs() <= 2e-6 * w.abs(), "{} pair {i}: {got} vs transformers {w}", case["name"]);
        }
        assert_eq!(cfg.max_positions().unwrap(), Some(131072), "{}", case["name"]);
    }
}
