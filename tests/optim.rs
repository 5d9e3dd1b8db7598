//! AdamW, the schedule and clipping against PyTorch's semantics; ZeRO-1's shards against the whole buffer.

mod common;

use bessie::config::run::{OptimizerState, Schedule, TrainSection};
use bessie::train::optim::{clip_factor, grad_norm, learning_rate, AdamW, AdamWHyper};
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
    let mut adam = AdamW::zeros(0..n, OptimizerState::F32, &dev).unwrap();
    let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let p = Tensor::new(p0.clone(), &dev).unwrap();
    for k in 0..3 {
        let g: Vec<f32> = (0..n).map(|i| ((0.11 * i as f64 + k as f64).cos() * 0.1 * (k + 1) as f64) as f32).collect();
        adam.step(&p, &Tensor::new(g, &dev).unwrap(), &layout, 1e-3, &h, 1.0).unwrap();
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
    let norm = grad_norm(&Tensor::new(v, &Device::Cpu).unwrap(), &layout).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    assert_eq!(clip_factor(norm, 1.0), 1.0 / (5.0 + 1e-6));
    assert_eq!(clip_factor(norm, 10.0), 1.0);
    assert_eq!(clip_factor(norm, 0.0), 1.0, "0 disables clipping");
}

/// The gradient scale is applied inside the update: steps with `g` and scale `s` equal steps with `g s`.
/// (Adam is invariant to one constant scale of every gradient, up to eps, so the two steps differ in scale.)
#[test]
fn adamw_grad_scale_equals_scaled_gradients() {
    let layout = ParamLayout::from_shapes(vec![("model.layers.0.mlp.up_proj.weight".into(), vec![4, 8])]);
    let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let g = Tensor::randn(0f32, 1.0, 32, &Device::Cpu).unwrap();
    // Two steps: (gradient, scale) each.
    let run = |steps: [(&Tensor, f64); 2]| {
        let p = Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut adam = AdamW::zeros(0..32, OptimizerState::F32, &Device::Cpu).unwrap();
        for (g, scale) in steps {
            adam.step(&p, g, &layout, 1e-2, &h, scale).unwrap();
        }
        p.to_vec1::<f32>().unwrap()
    };
    let scaled = (&g * 0.25).unwrap();
    let a = run([(&g, 1.0), (&g, 0.25)]);
    assert_eq!(a, run([(&g, 1.0), (&scaled, 1.0)]));
    assert_ne!(a, run([(&g, 1.0), (&g, 1.0)]), "the scale must change the update");
}

/// A bf16 gradient buffer (`train.grad_buffer`) feeds AdamW its values widened: the step equals the step
/// with those values in f32, with either moments, and the gradient norm is theirs.
#[test]
fn adamw_takes_bf16_gradients_as_their_f32_values() {
    use candle_core::DType;
    let layout = ParamLayout::from_shapes(vec![("model.layers.0.mlp.up_proj.weight".into(), vec![4, 8])]);
    let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let g = Tensor::randn(0f32, 1.0, 32, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let widened = g.to_dtype(DType::F32).unwrap();
    for state in [OptimizerState::F32, OptimizerState::Int8] {
        let run = |g: &Tensor| {
            let p = Tensor::ones(32, DType::F32, &Device::Cpu).unwrap();
            let mut adam = AdamW::zeros(0..32, state, &Device::Cpu).unwrap();
            for _ in 0..2 {
                adam.step(&p, g, &layout, 1e-2, &h, 0.5).unwrap();
            }
            p.to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(&g), run(&widened), "{state:?}");
    }
    assert_eq!(grad_norm(&g, &layout).unwrap(), grad_norm(&widened, &layout).unwrap());
}

/// Runs of slots that share a flag cover the buffer in order, each as long as its slots together.
#[test]
fn layout_runs_group_neighbouring_slots() {
    let layout = ParamLayout::from_shapes(vec![
        ("a.weight".into(), vec![2, 3]),
        ("b.weight".into(), vec![4]),
        ("c_ln.weight".into(), vec![5]),
        ("d.weight".into(), vec![1, 7]),
    ]);
    let runs = layout.runs(|i| i != 2);
    assert_eq!(runs, vec![(0, 10, true), (10, 5, false), (15, 7, true)]);
}

/// ZeRO-1's split: optimizers for the shares of a buffer, each updating only its share, together give the
/// whole buffer's update, for shares that cut through parameters and weight-decay runs.
#[test]
fn sharded_adamw_equals_the_whole() {
    use bessie::train::optim::shard_of;
    let layout = common::mlp_layout(5, 9);
    let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let p0 = Tensor::randn(0f32, 1.0, layout.total, &Device::Cpu).unwrap();
    let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn(0f32, 1.0, layout.total, &Device::Cpu).unwrap()).collect();
    let run = |shards: Vec<std::ops::Range<usize>>| {
        let p = p0.copy().unwrap();
        let mut opts: Vec<AdamW> =
            shards.into_iter().map(|s| AdamW::zeros(s, OptimizerState::F32, &Device::Cpu).unwrap()).collect();
        for g in &grads {
            for adam in &mut opts {
                adam.step(&p, g, &layout, 1e-2, &h, 0.5).unwrap();
            }
        }
        p.to_vec1::<f32>().unwrap()
    };
    #[allow(clippy::single_range_in_vec_init)] // one optimizer for the whole buffer
    let whole = run(vec![0..layout.total]);
    for world in [2, 3, 7] {
        let split = run((0..world).map(|r| shard_of(layout.total, r, world)).collect());
        assert_eq!(split, whole, "{world} shares");
    }
    // A share updates only its own range.
    let p = p0.copy().unwrap();
    let mut first = AdamW::zeros(shard_of(layout.total, 0, 2), OptimizerState::F32, &Device::Cpu).unwrap();
    first.step(&p, &grads[0], &layout, 1e-2, &h, 1.0).unwrap();
    let (after, before) = (p.to_vec1::<f32>().unwrap(), p0.to_vec1::<f32>().unwrap());
    let half = shard_of(layout.total, 0, 2).end;
    assert_eq!(after[half..], before[half..]);
    assert_ne!(after[..half], before[..half]);
}

/// ZeRO-1's step weights: each shard written with the scales of its matrices' absmean sums added up over the
/// shards, put together, are the whole buffer's step weights, for shards that cut through matrices and rows;
/// and the shards' sums of squared gradients add up to the squared norm. Values on a 1/128 grid, whose sums
/// are exact in any order, so the results are too.
#[test]
fn sharded_step_weights_and_grad_norm_equal_the_whole() {
    use bessie::train::model::StepWeights;
    use bessie::train::optim::{grad_squares, shards};
    use candle_core::DType;
    let layout = common::mlp_layout(5, 9);
    let grid: Vec<f32> = (0..layout.total).map(|i| ((i * 7919) % 257) as f32 / 128.0 - 1.0).collect();
    let flat = Tensor::new(grid, &Device::Cpu).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for lambda in [1.0, 0.3, 0.0] {
        let whole = StepWeights::new(&layout, &flat, lambda, DType::F32).unwrap();
        for world in [2, 3, 7] {
            let split = common::sharded_step_weights(&layout, &flat, world, lambda, DType::F32);
            for i in 0..layout.slots.len() {
                let (a, b) = (split.slot(&layout, i).unwrap(), whole.slot(&layout, i).unwrap());
                assert_eq!(values(&a), values(&b), "{}: {world} shards, lambda {lambda}", layout.slots[i].name);
            }
        }
    }
    let norm = grad_norm(&flat, &layout).unwrap();
    for world in [2, 3, 7] {
        let squares: f64 = shards(layout.total, world)
            .into_iter()
            .map(|s| grad_squares(&flat, &layout, s).unwrap().to_scalar::<f64>().unwrap())
            .sum();
        assert_eq!(squares.sqrt(), norm, "{world} shards");
    }
}

/// The 8-bit moments against a plain f64 transcription of their rule (`v` as its block's largest times the
/// nearest power of 2^(1/4), 255 codes and zero; `m` as `u = m / sqrt(v)` in 255 linear levels of the
/// block's largest `|u|`), on the moments of ten Adam steps of gradients spread over twelve orders of
/// magnitude within each block, with a partial last block and a block of zeros. Also the bounds the
/// design promises: `v` within 9%, and every update direction `m / sqrt(v)` within half a level of its
/// block's largest, whatever the parameter's gradient scale; and coding the decoded moments again (a
/// resumed run) gives them back.
#[test]
fn eight_bit_moments_follow_the_reference_code() {
    use bessie::train::moments::{Moments, BLOCK};
    let mut state = 7u64;
    let mut unit = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let n = 6 * BLOCK + 77;
    let scale: Vec<f64> = (0..n).map(|i| 10f64.powi((i / BLOCK) as i32 - 3) * 10f64.powf(-12.0 * unit())).collect();
    let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
    for _ in 0..10 {
        for i in 0..n {
            // A normal deviate (Box-Muller) times the parameter's scale.
            let g = scale[i] * (-2.0 * unit().max(1e-300).ln()).sqrt() * (std::f64::consts::TAU * unit()).cos();
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
        }
    }
    for i in 2 * BLOCK..3 * BLOCK {
        (m[i], v[i]) = (0.0, 0.0);
    }
    let (m, v): (Vec<f32>, Vec<f32>) = (m.iter().map(|&x| x as f32).collect(), v.iter().map(|&x| x as f32).collect());
    let t = |x: &[f32]| Tensor::new(x, &Device::Cpu).unwrap();
    let moments = Moments::from_f32(&t(&m), &t(&v), OptimizerState::Int8, &Device::Cpu).unwrap();
    let (gm, gv) = moments.to_f32().unwrap();
    let (gm, gv): (Vec<f32>, Vec<f32>) = (gm.to_vec1().unwrap(), gv.to_vec1().unwrap());
    assert_eq!((gm.len(), gv.len()), (n, n));
    let (mut ties, mut floored) = (0, 0);
    for b in 0..n.div_ceil(BLOCK) {
        let block = b * BLOCK..((b + 1) * BLOCK).min(n);
        let vmax = block.clone().map(|i| v[i] as f64).fold(0.0, f64::max);
        let exact: Vec<f64> = block.clone().map(|i| 4.0 * (v[i] as f64 / vmax).log2()).collect();
        let code = |e: f64| if e.is_finite() { e.round().clamp(-255.0, 0.0) } else { -255.0 };
        let level = |c: f64| if c <= -255.0 { 0.0 } else { 2f64.powf(c / 4.0) };
        let root = |c: f64| (level(c).max(2f64.powi(-64)) * vmax).sqrt().max(f32::MIN_POSITIVE as f64);
        let u: Vec<f64> = block.clone().zip(&exact).map(|(i, &e)| m[i] as f64 / root(code(e))).collect();
        let umax = u.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        for ((i, &e), &u) in block.zip(&exact).zip(&u) {
            let (want_v, want_m) =
                (level(code(e)) * vmax, (u / umax.max(1e-300) * 127.0).round() / 127.0 * umax * root(code(e)));
            let close = |g: f32, w: f64| (g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-30;
            if !close(gv[i], want_v) {
                // Only a value halfway between two codes may round either way (f32 against f64 logs).
                assert!(
                    ((e - e.trunc()).abs() - 0.5).abs() < 1e-3,
                    "v[{i}] = {} coded as {}, want {want_v}",
                    v[i],
                    gv[i]
                );
                ties += 1;
                continue;
            }
            assert!(close(gm[i], want_m), "m[{i}] = {} coded as {}, want {want_m}", m[i], gm[i]);
            if want_v > 0.0 {
                let err = (gv[i] as f64 - v[i] as f64).abs() / v[i] as f64;
                assert!(err <= 2f64.powf(1.0 / 8.0) - 1.0 + 1e-6, "v[{i}] = {} coded as {}", v[i], gv[i]);
            } else {
                floored += usize::from(v[i] > 0.0);
            }
            let r = root(code(e));
            let du = (gm[i] as f64 - m[i] as f64).abs() / r;
            assert!(du <= umax / 254.0 * (1.0 + 1e-4) + 1e-6, "direction of {i} off by {du}, block's largest {umax}");
        }
    }
    assert!(gm[2 * BLOCK..3 * BLOCK].iter().chain(&gv[2 * BLOCK..3 * BLOCK]).all(|&x| x == 0.0), "zeros stay zeros");
    assert!(ties < 5 && floored > 0, "{ties} ties; {floored} values of v below the code's range");
    // A checkpoint holds the decoded moments; coding them again (a resumed run) gives them back.
    let again = Moments::from_f32(&t(&gm), &t(&gv), OptimizerState::Int8, &Device::Cpu).unwrap().to_f32().unwrap();
    for (first, second) in [(&gm, again.0), (&gv, again.1)] {
        for (i, (a, b)) in first.iter().zip(second.to_vec1::<f32>().unwrap()).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "value {i}: {a} decoded, {b} after coding it again");
        }
    }
}

/// AdamW with 8-bit moments follows AdamW with f32 moments: after 20 steps on gradients of four orders of
/// magnitude its updates differ by the codes' few percent, not more, and not by nothing.
#[test]
fn eight_bit_adamw_follows_f32() {
    let layout = common::mlp_layout(40, 96);
    let h = AdamWHyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
    let p0 = Tensor::randn(0f32, 1.0, layout.total, &Device::Cpu).unwrap();
    let scale = Tensor::randn(0f32, 2.0, layout.total, &Device::Cpu).unwrap().exp().unwrap();
    let grads: Vec<Tensor> =
        (0..20).map(|_| (Tensor::randn(0f32, 1.0, layout.total, &Device::Cpu).unwrap() * &scale).unwrap()).collect();
    let run = |state: OptimizerState| {
        let p = p0.copy().unwrap();
        let mut adam = AdamW::zeros(0..layout.total, state, &Device::Cpu).unwrap();
        for g in &grads {
            adam.step(&p, g, &layout, 1e-3, &h, 1.0).unwrap();
        }
        (p - &p0).unwrap().to_vec1::<f32>().unwrap()
    };
    let (full, eight) = (run(OptimizerState::F32), run(OptimizerState::Int8));
    let num: f64 = full.iter().zip(&eight).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = full.iter().map(|a| (*a as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    println!("8-bit vs f32 moments: update rel L2 {rel:.4}");
    assert!(rel > 1e-4 && rel < 0.05, "{rel}");
}
