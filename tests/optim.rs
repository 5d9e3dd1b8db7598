//! AdamW, the schedule and clipping against PyTorch's semantics.

use bessie::config::run::{Schedule, TrainSection};
use bessie::train::optim::{clip_grad_norm, learning_rate, AdamW, AdamWHyper};
use bessie::train::params::ParamLayout;
use candle_core::{Device, Tensor};

/// Three steps on the inputs of tests/reference/adamw_torch.py must land where torch.optim.AdamW did.
#[test]
fn adamw_matches_torch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw_torch.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let expected: Vec<f32> = serde_json::from_value(fixture["params"].clone()).unwrap();
    let n = 64;
    let dev = Device::Cpu;
    let p0: Vec<f32> = (0..n).map(|i| (0.37 * i as f64).sin() as f32).collect();
    // A matrix that decays, then a norm that does not, as torch's two parameter groups.
    let layout = ParamLayout::from_shapes(vec![
        ("model.layers.0.mlp.up_proj.weight".into(), vec![4, 8]),
        ("model.layers.0.mlp.ffn_layernorm.weight".into(), vec![32]),
    ]);
    let mut adam = AdamW::zeros(n, &dev).unwrap();
    let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let p = Tensor::new(p0.clone(), &dev).unwrap();
    for k in 0..3 {
        let g: Vec<f32> = (0..n).map(|i| ((0.11 * i as f64 + k as f64).cos() * 0.1 * (k + 1) as f64) as f32).collect();
        adam.step(&p, &Tensor::new(g, &dev).unwrap(), &layout, 1e-3, &h).unwrap();
    }
    let got: Vec<f32> = p.to_vec1().unwrap();
    for i in 0..n {
        // Compare the updates, which are ~1e-3 of the values, not the values themselves.
        let (du, de) = (got[i] - p0[i], expected[i] - p0[i]);
        assert!((du - de).abs() <= 1e-4 * de.abs() + 1e-9, "element {i}: update {du} vs torch {de}");
    }
}

fn section(schedule: Schedule) -> TrainSection {
    TrainSection { lr: 1.0, warmup_steps: 10, schedule, min_lr_ratio: 0.0, ..Default::default() }
}

/// transformers' get_linear/cosine_schedule_with_warmup, stepped after each optimizer step.
#[test]
fn schedules_follow_transformers() {
    let lin = section(Schedule::Linear);
    assert_eq!(learning_rate(&lin, 0, 110), 0.0);
    assert_eq!(learning_rate(&lin, 5, 110), 0.5);
    assert_eq!(learning_rate(&lin, 10, 110), 1.0);
    assert!((learning_rate(&lin, 60, 110) - 0.5).abs() < 1e-12);
    assert_eq!(learning_rate(&lin, 110, 110), 0.0);
    let cos = section(Schedule::Cosine);
    assert!((learning_rate(&cos, 60, 110) - 0.5).abs() < 1e-12);
    assert!((learning_rate(&cos, 35, 110) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12);
    let floor = TrainSection { min_lr_ratio: 0.1, ..section(Schedule::Linear) };
    assert!((learning_rate(&floor, 110, 110) - 0.1).abs() < 1e-12);
    assert_eq!(learning_rate(&section(Schedule::Constant), 100, 110), 1.0);
}

#[test]
fn clipping_scales_to_the_max_norm_like_torch() {
    let mut cfg = bessie::config::ModelConfig::shape("tiny", 10).unwrap();
    cfg.num_hidden_layers = 0; // two parameters: the embedding [10, 64] and the final norm [64]
    let layout = ParamLayout::new(&cfg);
    let mut v = vec![0f32; layout.total];
    (v[0], v[layout.total - 1]) = (3.0, 4.0);
    let g = Tensor::new(v, &Device::Cpu).unwrap();
    let (norm, clipped) = clip_grad_norm(g.clone(), &layout, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let c: Vec<f32> = clipped.to_vec1().unwrap();
    let (first, last) = (c[0], c[layout.total - 1]);
    assert!((first - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-6 && (last - 4.0 / (5.0 + 1e-6) as f32).abs() < 1e-6);
    let (_, untouched) = clip_grad_norm(g.clone(), &layout, 10.0).unwrap();
    assert_eq!(untouched.to_vec1::<f32>().unwrap(), g.to_vec1::<f32>().unwrap());
}
