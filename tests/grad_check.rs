//! The explicit backward against candle's autograd: an independent, autograd-friendly forward (plain
//! candle ops on `Var`s, straight-through quantizers as `x + (q(x) - x).detach()`) differentiated by
//! `Tensor::backward`, on tiny models in f32, with packing (two examples and padding in one row),
//! response-only loss masks, grouped-query attention and the quantization warm-up, for every family's block:
//! 1bitLLM's, 2B4T's (relu², GQA) and the Llama layout's (no sub-norms, an untied head, a head_dim unlike
//! hidden / heads). Attention blocks and
//! loss chunks are small here so that both loops run several times with a partial last block. Then the
//! recompute levels and per-block step weights: the same flat gradient buffer, bit for bit, as keeping
//! everything.

use bessie::config::run::{Recompute, StepWeightsPlan};
use bessie::config::ModelConfig;
use bessie::data::{make_batch, DataStats, Dataset, Example, Row};
use bessie::model::arch::{Activation, Role};
use bessie::model::init::random_weights;
use bessie::rng::Rng;
use bessie::train::grads::Gradients;
use bessie::train::model::{backward, forward, shard_abs_sums, BatchTensors, MemoryPlan, RopeTables, StepWeights};
use bessie::train::params::ParamLayout;
use candle_core::{DType, Device, Tensor, Var, D};

fn cfg(shape: &str, kv_heads: usize) -> ModelConfig {
    let mut c = ModelConfig::shape(shape, 97).unwrap();
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(kv_heads);
    c.validate().unwrap();
    c
}

/// Two rows: the first packs two examples (the second response-only from its 4th token), the second
/// holds one short example and padding.
fn batch(vocab: u32) -> bessie::data::Batch {
    let mut rng = Rng::new(11);
    let mut ex = |len: usize, trained: &[(usize, usize)]| Example {
        ids: (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect(),
        trained: trained.iter().map(|&(a, b)| a..b).collect(),
    };
    // The last example has two assistant turns: a gap in the trained tokens, as multi-turn data gives.
    let examples = vec![ex(7, &[(1, 7)]), ex(6, &[(3, 6)]), ex(9, &[(2, 4), (6, 9)])];
    let ds = Dataset { examples, stats: DataStats::default() };
    make_batch(&ds, &[Row { examples: vec![0, 1] }, Row { examples: vec![2] }], 0)
}

fn weight_quant(w: &Tensor) -> Tensor {
    let s = (1.0 / w.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().max(1e-5)) as f64;
    ((w * s).unwrap().round().unwrap().clamp(-1f32, 1f32).unwrap() / s).unwrap()
}

fn act_quant(x: &Tensor) -> Tensor {
    let s = (x.abs().unwrap().max_keepdim(D::Minus1).unwrap().clamp(1e-5f32, f32::INFINITY).unwrap().recip().unwrap()
        * 127.0)
        .unwrap();
    x.broadcast_mul(&s).unwrap().round().unwrap().clamp(-128f32, 127f32).unwrap().broadcast_div(&s).unwrap()
}

/// `x + lambda (q - x).detach()`: the straight-through estimator.
fn ste(x: &Tensor, q: Tensor, lambda: f64) -> Tensor {
    (x + ((q - x).unwrap() * lambda).unwrap().detach()).unwrap()
}

fn bitlinear(x: &Tensor, w: &Tensor, lambda: f64) -> Tensor {
    let x_eff = ste(x, act_quant(&x.detach()), lambda);
    let w_eff = ste(w, weight_quant(&w.detach()), lambda);
    x_eff.broadcast_matmul(&w_eff.t().unwrap()).unwrap()
}

fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
}

fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.dim(D::Minus1).unwrap() / 2;
    Tensor::cat(&[&x.narrow(D::Minus1, d, d).unwrap().neg().unwrap(), &x.narrow(D::Minus1, 0, d).unwrap()], D::Minus1)
        .unwrap()
}

/// The summed masked cross-entropy, through ops autograd knows.
fn reference_loss(c: &ModelConfig, p: &[Var], layout: &ParamLayout, b: &bessie::data::Batch, lambda: f64) -> Tensor {
    let dev = Device::Cpu;
    let (n, t, d) = (b.batch, b.seq, c.head_dim());
    let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
    let w = |name: &str| p[layout.index(name)].as_tensor().clone();
    let family = c.family().unwrap();
    let block =
        |l: usize, role: Role| family.tensor_name(role).map(|name| w(&format!("model.layers.{l}.{name}.weight")));
    let ids = Tensor::new(b.ids.as_slice(), &dev).unwrap();
    // Rotary angles per token from its position, as [n, 1, t, d] for broadcasting over heads.
    let theta = c.rope_theta as f32;
    let angles: Vec<f32> = b
        .positions
        .iter()
        .flat_map(|&pos| (0..d).map(move |i| pos as f32 / theta.powf((2 * (i % (d / 2))) as f32 / d as f32)))
        .collect();
    let angles = Tensor::from_vec(angles, (n, 1, t, d), &dev).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let rope = |x: Tensor| (x.broadcast_mul(&cos).unwrap() + rotate_half(&x).broadcast_mul(&sin).unwrap()).unwrap();
    let mut mask = vec![f32::NEG_INFINITY; n * t * t];
    for r in 0..n {
        for i in 0..t {
            for j in 0..=i {
                let (si, sj) = (b.segments[r * t + i], b.segments[r * t + j]);
                if i == j || (si != 0 && si == sj) {
                    mask[(r * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (n, 1, t, t), &dev).unwrap();
    let heads = |x: Tensor, k: usize| x.reshape((n, t, k, d)).unwrap().transpose(1, 2).unwrap();
    let repeat = |x: Tensor| {
        let g = nh / nkv;
        x.unsqueeze(2).unwrap().broadcast_as((n, nkv, g, t, d)).unwrap().reshape((n, nh, t, d)).unwrap()
    };
    let sub_norm = |x: Tensor, norm: Option<Tensor>| match norm {
        Some(wn) => rmsnorm(&x, &wn, c.rms_norm_eps),
        None => x,
    };
    let act = |g: Tensor| match c.activation().unwrap() {
        Activation::Silu => g.silu().unwrap(),
        Activation::Relu2 => g.relu().unwrap().sqr().unwrap(),
    };
    let bl = |l: usize, role: Role, x: &Tensor| bitlinear(x, &block(l, role).unwrap(), lambda);

    let mut x = w("model.embed_tokens.weight").embedding(&ids).unwrap();
    for l in 0..c.num_hidden_layers {
        let a = rmsnorm(&x, &block(l, Role::InputNorm).unwrap(), c.rms_norm_eps);
        let q = rope(heads(bl(l, Role::Q, &a), nh));
        let k = repeat(rope(heads(bl(l, Role::K, &a), nkv)));
        let v = repeat(heads(bl(l, Role::V, &a), nkv));
        let scores = ((q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap().broadcast_add(&mask)).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let y = probs.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((n * t, nh * d)).unwrap();
        let y = sub_norm(y, block(l, Role::AttnSubNorm));
        x = (x + bl(l, Role::O, &y)).unwrap();
        let a = rmsnorm(&x, &block(l, Role::PostNorm).unwrap(), c.rms_norm_eps);
        let m = sub_norm((act(bl(l, Role::Gate, &a)) * bl(l, Role::Up, &a)).unwrap(), block(l, Role::FfnSubNorm));
        x = (x + bl(l, Role::Down, &m)).unwrap();
    }
    let x = rmsnorm(&x, &w("model.norm.weight"), c.rms_norm_eps);
    let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let logits = x.matmul(&w(head).t().unwrap()).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let targets = Tensor::new(b.targets.as_slice(), &dev).unwrap().unsqueeze(1).unwrap();
    let picked = logp.gather(&targets, 1).unwrap().squeeze(1).unwrap();
    let mask = Tensor::new(b.loss_mask.as_slice(), &dev).unwrap();
    (picked * mask).unwrap().sum_all().unwrap().neg().unwrap()
}

/// Attention blocks of 5 query rows and loss chunks of 7 token rows over 2 x 16 tokens.
fn plan(recompute: Recompute) -> MemoryPlan {
    MemoryPlan { recompute, attention_block: 5, loss_chunk: 7, step_weights: StepWeightsPlan::Kept }
}

/// The summed loss and the flat gradient buffer of Bessie's forward and backward.
fn explicit_grads(
    c: &ModelConfig,
    layout: &ParamLayout,
    flat: &Tensor,
    b: &bessie::data::Batch,
    lambda: f64,
    plan: MemoryPlan,
) -> (f64, Tensor) {
    let w = match plan.step_weights {
        StepWeightsPlan::Kept => StepWeights::new(layout, flat, lambda, DType::F32).unwrap(),
        StepWeightsPlan::PerBlock => {
            let sums = shard_abs_sums(layout, flat, 0..layout.total, DType::F32).unwrap();
            StepWeights::per_block(layout, flat, sums, lambda, DType::F32).unwrap()
        }
    };
    let rope = RopeTables::new(c, b.seq, &Device::Cpu).unwrap();
    let bt = BatchTensors::new(b, &rope, DType::F32, &Device::Cpu).unwrap();
    // A buffer of NaN, as uninitialized as the GPU's: each slot's first gradient must overwrite it.
    let grads = Gradients::over(layout, Tensor::full(f32::NAN, layout.total, &Device::Cpu).unwrap());
    let (loss, saved) = forward(c, layout, &w, &bt, lambda, plan, &grads).unwrap();
    // Every range the backward declares done must hold its final gradients already (the data-parallel sum
    // starts there, once settled as the step settles it), and the ranges must cover the buffer exactly once.
    let mut handed: Vec<(std::ops::Range<usize>, Vec<f32>)> = Vec::new();
    let mut done = |r: std::ops::Range<usize>| {
        grads.settle(layout, r.clone())?;
        handed.push((r.clone(), grads.tensor().narrow(0, r.start, r.len())?.to_vec1()?));
        Ok(())
    };
    backward(c, layout, &w, &bt, plan, saved, &grads, &mut done).unwrap();
    let grads = grads.tensor().clone();
    let values: Vec<f32> = grads.to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "a gradient added to the buffer before it was written");
    let mut covered: Vec<_> = handed.iter().map(|(r, _)| r.clone()).filter(|r| !r.is_empty()).collect();
    covered.sort_by_key(|r| r.start);
    assert_eq!(covered.first().unwrap().start, 0);
    assert!(covered.windows(2).all(|w| w[0].end == w[1].start), "ranges overlap or leave gaps: {covered:?}");
    assert_eq!(covered.last().unwrap().end, layout.total);
    for (r, early) in &handed {
        let last: Vec<f32> = grads.narrow(0, r.start, r.len()).unwrap().to_vec1().unwrap();
        assert!(early == &last, "gradients in {r:?} changed after the backward declared them done");
    }
    (loss.to_scalar::<f64>().unwrap(), grads)
}

/// Random weights, norm weights near one but not one, so their gradients are exercised at a generic point.
fn weights(c: &ModelConfig) -> Vec<Tensor> {
    let mut rng = Rng::new(4);
    random_weights(c, 8)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            if bessie::model::is_norm(&name) {
                let noise: Vec<f32> = (0..t.elem_count()).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
                Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap()
            } else {
                t
            }
        })
        .collect()
}

fn check(shape: &str, kv_heads: usize, lambda: f64) {
    let c = cfg(shape, kv_heads);
    let layout = ParamLayout::new(&c);
    let tensors = weights(&c);
    let flat = layout.flatten(&tensors).unwrap();
    let b = batch(c.vocab_size as u32);

    let flat_grads = explicit_grads(&c, &layout, &flat, &b, lambda, plan(Recompute::None));
    let loss = flat_grads.0;
    let grads: Vec<Tensor> = (0..layout.slots.len()).map(|i| layout.view(&flat_grads.1, i).unwrap()).collect();

    let vars: Vec<Var> = tensors.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ref_loss = reference_loss(&c, &vars, &layout, &b, lambda);
    let store = ref_loss.backward().unwrap();
    let ref_loss = ref_loss.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - ref_loss).abs() <= 1e-4 * ref_loss.abs(), "loss {loss} vs autograd {ref_loss}");
    for (i, slot) in layout.slots.iter().enumerate() {
        let expected =
            store.get(vars[i].as_tensor()).unwrap_or_else(|| panic!("no autograd gradient for {}", slot.name));
        let diff = (&grads[i] - expected).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = expected.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(norm > 0.0, "{}: zero reference gradient", slot.name);
        assert!(
            diff <= 1e-4 * norm,
            "{} ({shape}, kv heads {kv_heads}, lambda {lambda}): relative error {}",
            slot.name,
            diff / norm
        );
    }
}

#[test]
fn explicit_backward_equals_autograd() {
    check("tiny", 4, 1.0);
}

#[test]
fn grouped_query_attention_backward_equals_autograd() {
    check("tiny", 2, 1.0);
}

#[test]
fn quantization_warmup_backward_equals_autograd() {
    check("tiny", 4, 0.5);
}

/// 2B4T's block: relu² gate, GQA 4:1, its sub-norms' names.
#[test]
fn bitnet_2b4t_block_backward_equals_autograd() {
    check("tiny-bitnet", 1, 1.0);
}

/// The Llama layout: no sub-norms, an untied head, head_dim 32 where hidden / heads is 8, GQA 2:1; and a
/// full-precision Llama in its quantization warm-up.
#[test]
fn llama_layout_backward_equals_autograd() {
    check("tiny-llama-bitnet", 2, 1.0);
    check("tiny-llama", 2, 0.5);
}

/// Recomputation re-runs the same ops on the same inputs, and per-block step weights are the same weights
/// built when needed, so every level with either gives the same loss and the same gradients bit for bit (with
/// GQA and the quantization warm-up, whose lambda the recompute must reuse; a tied head before the blocks and
/// an untied one after them).
#[test]
fn recomputation_and_per_block_weights_change_no_gradient() {
    for shape in ["tiny", "tiny-llama"] {
        let c = cfg(shape, 2);
        let layout = ParamLayout::new(&c);
        let flat = layout.flatten(&weights(&c)).unwrap();
        let b = batch(c.vocab_size as u32);
        let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let (loss, grads) = explicit_grads(&c, &layout, &flat, &b, 0.5, plan(Recompute::None));
        for level in [Recompute::None, Recompute::Attention, Recompute::Blocks] {
            for step_weights in [StepWeightsPlan::Kept, StepWeightsPlan::PerBlock] {
                let (l, g) = explicit_grads(&c, &layout, &flat, &b, 0.5, MemoryPlan { step_weights, ..plan(level) });
                let case = format!("{shape}, {level:?}, {step_weights:?}");
                assert_eq!(l.to_bits(), loss.to_bits(), "{case}: loss {l} vs {loss}");
                let differing = bits(&g).iter().zip(bits(&grads)).filter(|(x, y)| **x != *y).count();
                assert_eq!(differing, 0, "{case}: {differing} of {} gradients differ", layout.total);
            }
        }
    }
}
