//! CUDA checks (feature `cuda`, run on a GPU machine): the bf16 forward against the CPU f32 forward and
//! against transformers' own models on the GPU, and each fused kernel against its reference.
#![cfg(feature = "cuda")]

mod common;

use bessie::model::KvCache;
use candle_core::{Device, Tensor};

/// The checkout whose files the tests read (configs, reference scripts): `BESSIE_CHECKOUT` where set (a test
/// binary built on another machine and run on a GPU machine's copy of the checkout), else this one.
fn checkout() -> std::path::PathBuf {
    std::env::var_os("BESSIE_CHECKOUT").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

/// The `bessie-train` the tests run: `BESSIE_TRAIN` where set (as [`checkout`]), else the one built beside them.
fn bessie_train() -> std::path::PathBuf {
    std::env::var_os("BESSIE_TRAIN").map_or_else(|| env!("CARGO_BIN_EXE_bessie-train").into(), Into::into)
}

fn logits(dir: &std::path::Path, device: &Device, ids: &[u32]) -> Vec<f32> {
    let model = bessie::model::load(dir, device).unwrap();
    let x = Tensor::new(ids, device).unwrap().unsqueeze(0).unwrap();
    let h = model.forward(&x, &mut KvCache::new(&model.cfg)).unwrap();
    model.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Early launches (on Hopper every kernel starts beside the last blocks of the one before it and waits for its
/// inputs first) against none (`BESSIE_PDL=0`): 12 training steps of a random bitnet_b1_58-large on the demo
/// data give the same losses and gradient norms bit for bit. The step's kernels are deterministic, so any
/// difference is a kernel that read or wrote before the one before it had finished. (On cards before Hopper
/// both runs launch alike.)
#[test]
fn early_launches_change_no_bit_of_training() {
    let root = checkout();
    let run = |pdl: &str| -> Vec<(f64, f64)> {
        let out = tempfile::tempdir().unwrap();
        let run = std::process::Command::new(bessie_train())
            .env("BESSIE_PDL", pdl)
            .arg("--config")
            .arg(root.join("configs/tiny.toml"))
            .args(["--set", "model.init=large", "--set", "train.device=cuda", "--set", "train.max_steps=12"])
            .args(["--set", "train.lr=3e-4", "--set", "log.dev_every=0"])
            .arg("--set")
            .arg(format!("checkpoint.out_dir={}", out.path().display()))
            .output()
            .unwrap();
        assert!(run.status.success(), "BESSIE_PDL={pdl}: {}", String::from_utf8_lossy(&run.stderr));
        let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
        let field = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
        metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .map(|v| (field(&v, "loss"), field(&v, "grad_norm")))
            .collect()
    };
    let (early, after) = (run("1"), run("0"));
    println!("12 steps with early launches and without: last loss {:?} and {:?}", early.last(), after.last());
    assert_eq!(early.len(), 12);
    assert_eq!(early, after, "(loss, gradient norm) a step, with early launches and without");
}

/// bf16 rounding of activations moves some int8 codes by one, so agreement is statistical: relative L2
/// error of the logits within a few bf16 ulps' worth and the same greedy choice at almost every position.
#[test]
fn cuda_bf16_forward_matches_cpu_f32() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    for seed in [0u64, 1] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::tiny_checkpoint(dir.path(), seed);
        let ids: Vec<u32> = (0..64u32).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
        let cpu = logits(dir.path(), &Device::Cpu, &ids);
        let cuda = logits(dir.path(), &gpu, &ids);
        let num: f64 = cpu.iter().zip(&cuda).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = cpu.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let v = cfg.vocab_size;
        let same =
            (0..ids.len()).filter(|&t| argmax(&cpu[t * v..(t + 1) * v]) == argmax(&cuda[t * v..(t + 1) * v])).count();
        println!("tiny seed {seed}: relative L2 error {rel:.2e}, greedy agreement {same}/{}", ids.len());
        assert!(rel < 3e-2, "relative L2 error {rel}");
        assert!(same * 10 >= ids.len() * 9, "greedy agreement {same}/{}", ids.len());
    }
}

/// Prefill through the flash kernel (an empty cache; SmolLM-135M's shape, head dim 64, grouped heads 9:3,
/// random weights): a left-padded batch of two prompts of 300 and 170 tokens in one forward, each row's last
/// logits against the prompt alone on the CPU in f32, within bf16 tolerance.
#[test]
fn flash_prefill_matches_cpu_f32() {
    use bessie::model::hf::Layout;
    use bessie::model::init::{write_random_checkpoint, TokenizerSource};
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let dir = tempfile::tempdir().unwrap();
    let f32 = candle_core::DType::F32;
    let cfg =
        write_random_checkpoint(dir.path(), "smollm-135m", TokenizerSource::Shipped, None, 5, f32, Layout::Safetensors)
            .unwrap();
    let probe = Tensor::zeros(1, candle_core::DType::BF16, &gpu).unwrap();
    assert!(bessie::kernels::flash_attention::takes_heads(&probe, cfg.head_dim()), "the flash kernel must take it");
    let prompts: Vec<Vec<u32>> =
        [300u32, 170].iter().map(|&n| (0..n).map(|i| (i * 37 + 11 + n) % cfg.vocab_size as u32).collect()).collect();
    let model = bessie::model::load(dir.path(), &gpu).unwrap();
    let width = prompts[0].len();
    let padded: Vec<u32> =
        prompts.iter().flat_map(|p| std::iter::repeat_n(0, width - p.len()).chain(p.iter().copied())).collect();
    let ids = Tensor::from_vec(padded, (2, width), &gpu).unwrap();
    let mut cache = KvCache::left_padded(&model.cfg, prompts.iter().map(|p| width - p.len()).collect());
    let got: Vec<f32> = model
        .logits(&model.forward_last(&ids, &mut cache, 512).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let v = cfg.vocab_size;
    for (r, p) in prompts.iter().enumerate() {
        let want = logits(dir.path(), &Device::Cpu, p);
        let (a, b) = (&want[(p.len() - 1) * v..], &got[r * v..(r + 1) * v]);
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let rel = (num / a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()).sqrt();
        println!("flash prefill, row {r} ({} tokens): relative L2 error {rel:.2e} against the CPU", p.len());
        assert!(rel < 3e-2, "row {r}: relative L2 error {rel}");
    }
}

/// How the GPU's logits at generated positions agree with the CPU's.
#[derive(Default)]
struct Agreement {
    positions: usize,
    /// The same greedy choice where the CPU's is clear.
    agree: usize,
    /// Positions whose top two CPU logits are closer than four times the GPU's deviation there.
    ties: usize,
    /// The largest relative RMS deviation of a position's logits.
    worst: f64,
}

impl Agreement {
    fn add(&mut self, cpu: &[f32], gpu: &[f32]) {
        let v = cpu.len() as f64;
        let diff = (cpu.iter().zip(gpu).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / v).sqrt();
        let rms = (cpu.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / v).sqrt();
        self.worst = self.worst.max(diff / rms);
        let mut sorted = cpu.to_vec();
        sorted.sort_by(|p, q| q.total_cmp(p));
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        self.positions += 1;
        if ((sorted[0] - sorted[1]) as f64) < 4.0 * diff {
            self.ties += 1;
        } else if argmax(cpu) == argmax(gpu) {
            self.agree += 1;
        }
    }

    /// At least 64 positions, the same choice wherever the CPU's is clear, few near ties, and every position
    /// within bf16 tolerance.
    fn check(&self, what: &str) {
        let Self { positions, agree, ties, worst } = *self;
        println!(
            "{what}: {positions} generated positions, greedy choice equal to the CPU's at {agree}, {ties} near \
             ties; worst relative RMS deviation of a position's logits {worst:.2e}"
        );
        assert!(positions >= 64, "{what}: only {positions} generated tokens");
        assert_eq!(agree + ties, positions, "{what}: the GPU chose otherwise where the CPU's choice was clear");
        assert!(ties * 10 <= positions, "{what}: {ties} near ties of {positions}: the model is not decisive enough");
        assert!(worst < 5e-2, "{what}: relative RMS deviation {worst}");
    }
}

/// The GPU path (stacked projections; the fused kernels norm, gate and quantize the BitLinear inputs) on a
/// model that learned something (the tiny demo, 300 steps on the GPU): along the CPU f32 reference's greedy
/// answers to dev questions (at least 64 generated tokens in all), the GPU's logits at every position are
/// within bf16 tolerance and its greedy choice is the reference's wherever the reference's choice is not a
/// near tie (its top two logits closer than four times the GPU's deviation at that position).
#[test]
fn cuda_generation_matches_cpu_on_a_trained_model() {
    use bessie::generate::{generate, Sampler, Stop};
    use bessie::tokenizer::template::{ChatTemplate, Message, TemplateChoice};
    use bessie::tokenizer::Tokenizer;
    use candle_core::D;
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let root = checkout();
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(bessie_train())
        .arg("--config")
        .arg(root.join("configs/tiny.toml"))
        .args(["--set", "train.device=cuda", "--set", "train.max_steps=300", "--set", "log.dev_every=0"])
        .arg("--set")
        .arg(format!("checkpoint.out_dir={}", out.path().display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let dir = out.path().join("final_checkpoint");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::load(&TemplateChoice::Auto, &dir, &tok, None).unwrap();
    let stop = Stop::new(&tok, &template);
    let cpu = bessie::model::load(&dir, &Device::Cpu).unwrap();
    let dev = std::fs::read_to_string(root.join("data/tiny/dev.jsonl")).unwrap();
    // The GPU's forward over each whole sequence; and the decode kernels (one token per step: the
    // matrix-vector products with their residual adds, attention over the cache with RoPE and the cache
    // write) along the same answers, one token at a time after the prompt's prefill. Both against the CPU's
    // logits of the whole sequence: within bf16 tolerance at every position, the same greedy choice wherever
    // the CPU's is not a near tie.
    let model = bessie::model::load(&dir, &gpu).unwrap();
    let (mut full, mut steps) = (Agreement::default(), Agreement::default());
    for line in dev.lines().take(8) {
        let q = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"].as_str().unwrap().to_string();
        let prompt = template.prompt_ids(&tok, &[Message::new("user", &q)]).unwrap();
        let answer = generate(&cpu, &tok, &stop, &prompt, 64, &mut Sampler::greedy(), |_| Ok(())).unwrap().ids;
        let ids = [&prompt[..], &answer[..]].concat();
        let (x, y) = (logits(&dir, &Device::Cpu, &ids), logits(&dir, &gpu, &ids));
        let v = x.len() / ids.len();
        let mut cache = KvCache::new(&model.cfg);
        let prefill = Tensor::new(&prompt[..], &gpu).unwrap().unsqueeze(0).unwrap();
        let mut h = model.forward_last(&prefill, &mut cache, 512).unwrap();
        // Position p's logits choose token p + 1: the answer's tokens are chosen at prompt.len() - 1 ...
        for p in prompt.len() - 1..ids.len() - 1 {
            full.add(&x[p * v..(p + 1) * v], &y[p * v..(p + 1) * v]);
            if p >= prompt.len() {
                let step = Tensor::new(&[ids[p]], &gpu).unwrap().unsqueeze(0).unwrap();
                h = model.forward(&step, &mut cache).unwrap().squeeze(1).unwrap();
            }
            let b: Vec<f32> = model.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            steps.add(&x[p * v..(p + 1) * v], &b);
        }
    }
    full.check("the GPU's forward over each whole sequence");
    steps.check("the decode kernels, a token at a time");

    // The decoding step replayed from its CUDA graph (step_logits) gives the logits of the same step run
    // without one (forward), bit for bit, along an answer: the graph replays exactly the kernels it captured,
    // with each step's ids, spans and column. The first step of the cache captures; the others replay.
    let line = dev.lines().next().unwrap();
    let q = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"].as_str().unwrap().to_string();
    let prompt = template.prompt_ids(&tok, &[Message::new("user", &q)]).unwrap();
    let answer = generate(&cpu, &tok, &stop, &prompt, 64, &mut Sampler::greedy(), |_| Ok(())).unwrap().ids;
    let (mut graphed, mut eager) = (KvCache::new(&model.cfg), KvCache::new(&model.cfg));
    let prefill = Tensor::new(&prompt[..], &gpu).unwrap().unsqueeze(0).unwrap();
    for cache in [&mut graphed, &mut eager] {
        *cache = KvCache::new(&model.cfg).with_capacity(prompt.len() + answer.len());
        model.forward_last(&prefill, cache, 512).unwrap();
    }
    let before = model.decode_graph_replays();
    for &id in &answer {
        let step = Tensor::new(&[id], &gpu).unwrap().unsqueeze(0).unwrap();
        let a: Vec<f32> = model.step_logits(&step, &mut graphed).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let h = model.forward(&step, &mut eager).unwrap().squeeze(1).unwrap();
        let b: Vec<f32> = model.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "a replayed step differs from the eager one"
        );
    }
    let replays = model.decode_graph_replays() - before;
    println!("CUDA graph: {replays} of {} steps replayed, equal to the eager steps bit for bit", answer.len());
    assert_eq!(replays, answer.len() - 1, "every step after the first should replay the captured graph");

    // Greedy picks taken inside the graph (step_picks), each step's fed back as the next one's ids in place
    // (the graph's own buffer), are the eager steps' argmax along the model's greedy answer.
    let (mut fed, mut eager) = (KvCache::new(&model.cfg), KvCache::new(&model.cfg));
    let mut first = 0;
    for cache in [&mut fed, &mut eager] {
        *cache = KvCache::new(&model.cfg).with_capacity(prompt.len() + answer.len() + 1);
        let h = model.forward_last(&prefill, cache, 512).unwrap();
        first =
            model.logits(&h).unwrap().argmax(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()[0];
    }
    let (mut ids, mut want) = (Tensor::new(&[[first]], &gpu).unwrap(), first);
    let before = model.decode_graph_replays();
    for step in 0..answer.len() {
        let picks = model.step_picks(&ids, &mut fed).unwrap();
        let h = model.forward(&Tensor::new(&[[want]], &gpu).unwrap(), &mut eager).unwrap().squeeze(1).unwrap();
        want = model.logits(&h).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        assert_eq!(picks.flatten_all().unwrap().to_vec1::<u32>().unwrap(), [want], "step {step}'s pick");
        ids = picks;
    }
    let replays = model.decode_graph_replays() - before;
    println!("greedy picks in the graph, fed back in place: {replays} of {} steps replayed", answer.len());
    assert_eq!(replays, answer.len() - 1, "every step after the first should replay the captured graph");

    // Continuous batching on the GPU (3 rows for 16 prompts: rows refilled mid-answer, the template's shared
    // prefix run once; and 12 rows, whose steps' products are cuBLAS GEMMs, captured too) answers as one prompt
    // at a time on the GPU, but where bf16 rounding, which differs between batch shapes, meets a near tie. The
    // steps replay their graphs between the cache's changes of layout.
    use bessie::generate::ContinuousBatch;
    let prompts: Vec<Vec<u32>> = dev
        .lines()
        .take(16)
        .map(|line| {
            let q = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"].as_str().unwrap().to_string();
            template.prompt_ids(&tok, &[Message::new("user", &q)]).unwrap()
        })
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate(&model, &tok, &stop, p, 64, &mut Sampler::greedy(), |_| Ok(())).unwrap().ids)
        .collect();
    for rows in [3, 12] {
        let before = model.decode_graph_replays();
        let mut batch = ContinuousBatch::new(&model, &tok, &stop, &prompts, rows, 64).unwrap();
        let batch = batch.run(&mut Sampler::greedy(), |_, _| Ok(())).unwrap();
        let same = batch.iter().zip(&alone).filter(|(b, a)| &b.ids == *a).count();
        let replays = model.decode_graph_replays() - before;
        println!(
            "continuous batching on the GPU, {rows} rows: {same} of {} answers equal to one prompt at a time; \
             {replays} steps replayed from graphs",
            prompts.len()
        );
        assert!(same >= 13, "{rows} rows: only {same} of {} answers equal", prompts.len());
        assert!(replays > 0, "{rows} rows: no step replayed a graph");
    }

    // Greedy decoding one step ahead (the default on a GPU: the next step launched from the picks still on
    // the device) picks exactly the tokens of reading each step's picks before the next: the same kernels on
    // the same rows, whatever step a row is admitted or dropped at.
    for rows in [1, 3] {
        let run = |ahead: bool| {
            let mut batch = ContinuousBatch::new(&model, &tok, &stop, &prompts, rows, 64).unwrap().decode_ahead(ahead);
            batch.run(&mut Sampler::greedy(), |_, _| Ok(())).unwrap()
        };
        let (ahead, waiting) = (run(true), run(false));
        for (i, (a, w)) in ahead.iter().zip(&waiting).enumerate() {
            assert_eq!((&a.ids, &a.stop), (&w.ids, &w.stop), "{rows} rows, prompt {i}: one step ahead differs");
        }
        let stops = ahead.iter().filter(|g| g.stop != bessie::generate::StopReason::MaxNewTokens).count();
        println!("decoding ahead, {rows} rows: the {} answers equal ({stops} ended before the budget)", prompts.len());
    }
}

/// Every family's bf16 forward on the GPU against transformers' own `BitNetForCausalLM` / `LlamaForCausalLM`
/// in bf16 on the same GPU (tests/reference/hf_logits.py), latent checkpoints (transformers' online
/// AutoBitLinear) and the packed 2B4T and Llama layouts (`bessie-export -f hf-bitnet`), both measured against
/// the f32 logits that Bessie's CPU forward and transformers agree on to 1e-6 (tests/hf_bitnet.rs).
/// transformers rounds the dequantized weights and activations to bf16 before its GEMM; Bessie multiplies
/// the exact int8 and ternary values and applies the scales in f32, so its bf16 error must be no larger.
#[test]
fn cuda_bf16_forward_matches_transformers() {
    use bessie::model::hf::Layout;
    use bessie::model::init::{write_random_checkpoint, TokenizerSource};
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let root = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 37 + 11) % 900).collect();
    let mut dirs = Vec::new();
    for shape in ["tiny-bitnet", "tiny-llama-bitnet"] {
        let latent = root.path().join(shape);
        let f32 = candle_core::DType::F32;
        write_random_checkpoint(&latent, shape, TokenizerSource::Shipped, None, 3, f32, Layout::Safetensors).unwrap();
        let packed = root.path().join(format!("{shape}-packed"));
        std::fs::create_dir_all(&packed).unwrap();
        let source = bessie::export::Source::open(&latent).unwrap();
        bessie::export::hf_bitnet::write(&packed, &source, candle_core::DType::BF16).unwrap();
        dirs.extend([latent, packed]);
    }
    let script = checkout().join("tests/reference/hf_logits.py");
    let run = std::process::Command::new("python3")
        .arg(script)
        .args([serde_json::to_string(&ids).unwrap(), "0".into()])
        .args(&dirs)
        .env("HF_LOGITS_DEVICE", "cuda")
        .output()
        .expect("running python3 with torch and transformers");
    assert!(run.status.success(), "hf_logits.py failed:\n{}", String::from_utf8_lossy(&run.stderr));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    };
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    for dir in &dirs {
        let hf: Vec<Vec<f32>> = serde_json::from_value(out["models"][dir.to_str().unwrap()]["logits"].clone()).unwrap();
        let hf: Vec<f32> = hf.concat();
        let (ours, truth) = (logits(dir, &gpu, &ids), logits(dir, &Device::Cpu, &ids));
        let v = ours.len() / ids.len();
        let agree = |x: &[f32]| {
            (0..ids.len()).filter(|&t| argmax(&truth[t * v..(t + 1) * v]) == argmax(&x[t * v..(t + 1) * v])).count()
        };
        let (same, same_hf) = (agree(&ours), agree(&hf));
        let (e_ours, e_hf, between) = (rel(&ours, &truth), rel(&hf, &truth), rel(&ours, &hf));
        let name = dir.file_name().unwrap().to_string_lossy();
        println!(
            "{name}: relative L2 to the f32 logits: Bessie bf16 {e_ours:.2e}, transformers bf16 {e_hf:.2e} (between \
             them {between:.2e}); greedy choice equal to f32's at {same}/{} (transformers {same_hf})",
            ids.len()
        );
        assert!(e_ours < 5e-2 && e_ours <= 1.25 * e_hf + 1e-2, "{name}: Bessie {e_ours}, transformers {e_hf}");
        // A random model's logits are nearly tied: bf16 flips some choices on either side.
        assert!(same * 5 >= ids.len() * 4 && same + 3 >= same_hf, "{name}: greedy {same}, transformers {same_hf}");
    }
}

// Each fused kernel against its candle-op reference (the `_reference` function beside it in
// `train::layers`) on the same GPU tensors, on fresh random inputs made in the dtype the kernel takes (bf16
// activations, f32 flat buffers). The reference rounds to bf16 where the kernel does, so what differs is the
// order of f32 sums, and with it, rarely, an int8 or ternary code one step away.

mod fused {
    use bessie::config::run::OptimizerState;
    use bessie::model::arch::Activation;
    use bessie::train::layers::*;
    use bessie::train::optim::{grad_norm, AdamW, AdamWHyper};
    use bessie::train::params::ParamLayout;
    use candle_core::{DType, Device, Tensor};

    fn gpu() -> Device {
        Device::new_cuda(0).expect("a CUDA device")
    }

    /// A fresh standard normal tensor on the GPU in `dtype`.
    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(&gpu()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
        let (g, w) = (values(got), values(want));
        assert_eq!(g.len(), w.len());
        let num: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = w.iter().map(|b| b * b).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// A weight gradient of `n` elements added into ones the way the step adds it into its gradient buffer:
    /// through the kernels, or (`reference`) in candle ops.
    fn dense(g: &WeightGrad, n: usize, reference: bool) -> Tensor {
        let flat = Tensor::ones(n, DType::F32, &gpu()).unwrap();
        match reference {
            true => g.add_to_reference(&flat, 0..n, Mode::Add).unwrap(),
            false => g.add_to(&flat, 0..n, Mode::Add).unwrap(),
        }
        flat
    }

    /// Random ternary weights `[n, k]` (bf16 -1, 0, 1, each about a third of them) and their packed codes.
    fn ternary(n: usize, k: usize) -> (Tensor, Tensor) {
        let t = (randn(&[n, k], DType::F32) * 1.5).unwrap().round().unwrap().clamp(-1f32, 1f32).unwrap();
        let t = t.to_dtype(DType::BF16).unwrap();
        let codes = bessie::kernels::decode::pack_ternary(&t).unwrap().expect("packs");
        (t, codes)
    }

    /// Fraction of elements that differ at all.
    fn mismatched(got: &Tensor, want: &Tensor) -> f64 {
        let (g, w) = (values(got), values(want));
        g.iter().zip(&w).filter(|(a, b)| a != b).count() as f64 / w.len() as f64
    }

    /// [`mismatched`] for two quantized BitLinear inputs `got` and `want` (rows `[n, c]`), over the rows whose
    /// largest magnitude before the quantization (`got_pre`, `want_pre`) is the same, and how many rows it is
    /// not. One bf16 unit apart there (where the kernel's and the reference's sums of squares round apart) a
    /// row has another int8 scale, and every value of it moves by a rounding: such rows are left to the
    /// relative L2 bound.
    fn mismatched_same_scale(got: &Tensor, want: &Tensor, got_pre: &Tensor, want_pre: &Tensor) -> (f64, usize) {
        let c = *want.dims().last().unwrap();
        let (g, w, gp, wp) = (values(got), values(want), values(got_pre), values(want_pre));
        let row_max = |x: &[f64]| x.iter().fold(0f64, |m, v| m.max(v.abs()));
        let same: Vec<bool> = gp.chunks(c).zip(wp.chunks(c)).map(|(a, b)| row_max(a) == row_max(b)).collect();
        let kept = same.iter().filter(|&&s| s).count() * c;
        let differ = g.chunks(c).zip(w.chunks(c)).zip(&same).filter(|(_, &s)| s);
        let differ: usize = differ.map(|((a, b), _)| a.iter().zip(b).filter(|(x, y)| x != y).count()).sum();
        (differ as f64 / kept.max(1) as f64, same.iter().filter(|&&s| !s).count())
    }

    /// What an int8 operand stands for: each code (u8 holding int8) times its row's scale, rounded to bf16.
    fn int8_values(op: &Int8Operand) -> Tensor {
        let c = op.codes.to_dtype(DType::F32).unwrap();
        let negative = c.ge(128f64).unwrap().to_dtype(DType::F32).unwrap();
        let c = (c - (negative * 256.0).unwrap()).unwrap();
        c.broadcast_mul(&op.scales.unsqueeze(1).unwrap()).unwrap().to_dtype(DType::BF16).unwrap()
    }

    /// A norm's output and its int8 form (lambda 1): the codes times the scales are the output, bit for bit.
    fn assert_int8_form(y: &Tensor, int8: Option<&Int8Operand>) {
        let op = int8.expect("the kernel wrote the int8 form");
        let m = mismatched(&int8_values(op), &y.reshape(op.codes.dims()).unwrap());
        assert_eq!(m, 0.0, "{m} of the int8 form's values differ from the bf16 output");
    }

    /// The share of values further apart than one bf16 unit in the last place of the wanted value.
    fn beyond_one_ulp(got: &Tensor, want: &Tensor) -> f64 {
        let (g, w) = (values(got), values(want));
        g.iter().zip(&w).filter(|(a, b)| (*a - *b).abs() > b.abs() * 2f64.powi(-7)).count() as f64 / w.len() as f64
    }

    /// The head's matrix-vector product of a decoding step (`kernels::decode::try_gemv`, also the BitLinear's
    /// where its weights are not packed) against candle's GEMM, scale and residual add on the same bf16
    /// tensors, for 1 to 8 rows.
    #[test]
    fn decode_gemv_matches_reference() {
        use bessie::kernels::decode::try_gemv;
        for (n, k) in [(4608, 1536), (2560, 6912)] {
            for rows in [1, 3, 8] {
                let (x, w) = (randn(&[rows, 1, k], DType::BF16), randn(&[n, k], DType::BF16));
                let scale = (randn(&[n], DType::BF16).abs().unwrap() * 0.01).unwrap();
                let residual = randn(&[rows, 1, n], DType::BF16);
                let plain = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_mul(&scale).unwrap();
                let got = try_gemv(&x, &w, Some(&scale), None).unwrap().expect("the kernel takes it");
                let (e, m) = (rel_l2(&got, &plain), mismatched(&got, &plain));
                let with = try_gemv(&x, &w, Some(&scale), Some(&residual)).unwrap().expect("the kernel takes it");
                let want = (&residual + &plain).unwrap();
                let (er, mr) = (rel_l2(&with, &want), mismatched(&with, &want));
                println!(
                    "gemv {rows} x {k} -> {n}: rel L2 {e:.2e} ({m:.2e} differ), with residual {er:.2e} ({mr:.2e})"
                );
                // The sums' order differs from cuBLAS's: a bf16 rounding step apart at most, rarely.
                assert!(e < 4e-3 && er < 4e-3 && m < 0.05 && mr < 0.05, "{rows} x {k} -> {n}");
            }
        }
        // Nine rows are a GEMM's work.
        let x = randn(&[9, 1536], DType::BF16);
        assert!(try_gemv(&x, &randn(&[64, 1536], DType::BF16), None, None).unwrap().is_none());
        // The head: no scale, the vocabulary's rows (32002: not a multiple of 8).
        let (h, head) = (randn(&[1, 1536], DType::BF16), randn(&[32002, 1536], DType::BF16));
        let got = try_gemv(&h, &head, None, None).unwrap().expect("the kernel takes the head");
        let e = rel_l2(&got, &h.matmul(&head.t().unwrap()).unwrap());
        println!("gemv head 1 x 1536 -> 32002: rel L2 {e:.2e}");
        assert!(e < 4e-3, "head: {e}");
    }

    /// A decoding step's BitLinear in one launch (`kernels::decode::try_bitlinear_step`: norm, int8
    /// quantization, packed ternary product, scales, residual) against the model's reference on the same bf16
    /// tensors: `sub_norm_quant_forward_reference` (the norm and the fake-quantized input), then candle's
    /// product with the unpacked ternary weights. 1, 3 and 8 rows at the projections of -large, 2B4T, Falcon3-1B
    /// and Llama 3 8B (down_proj's 14,336 inputs: eight rows need shared memory beyond 48 KB, and a block's
    /// codes come in stages), with and without a norm, the gated activations of the MLP's down_proj; and 9
    /// outputs of 48 inputs, whose blocks' codes are not 16-byte aligned.
    #[test]
    fn bitlinear_step_matches_reference() {
        use bessie::kernels::decode::try_bitlinear_step;
        use bessie::kernels::shapes::BitLinearStep;
        let cases: [(usize, usize, Option<Activation>, bool); 10] = [
            (4608, 1536, None, true),
            (1536, 1536, None, true),
            (1536, 4096, Some(Activation::Silu), true),
            (3840, 2560, None, true),
            (13824, 2560, None, true),
            (2560, 6912, Some(Activation::Relu2), true),
            (2048, 8192, Some(Activation::Silu), false),
            (3072, 2048, None, false),
            (4096, 14336, Some(Activation::Silu), true),
            (9, 48, Some(Activation::Relu2), true),
        ];
        for (n, k, glu, normed) in cases {
            for rows in [1, 3, 8] {
                let width = if glu.is_some() { 2 * k } else { k };
                let x = randn(&[rows, 1, width], DType::BF16);
                let norm = normed.then(|| randn(&[k], DType::BF16));
                let (t, codes) = ternary(n, k);
                let scales = (randn(&[n], DType::BF16).abs().unwrap() * 0.01).unwrap();
                let residual = randn(&[rows, 1, n], DType::BF16);
                let step = BitLinearStep {
                    x: &x,
                    norm: norm.as_ref(),
                    eps: 1e-6,
                    glu,
                    codes: &codes,
                    scales: &scales,
                    residual: Some(&residual),
                    out: None,
                };
                let got = try_bitlinear_step(&step).unwrap().expect("the kernel takes it");
                let rows2 = x.reshape((rows, width)).unwrap();
                let (q, _) = sub_norm_quant_forward_reference(&rows2, glu, norm.as_ref(), 1e-6, 1.0).unwrap();
                let plain = q.matmul(&t.t().unwrap()).unwrap().broadcast_mul(&scales).unwrap();
                let want = (&residual + plain.reshape((rows, 1, n)).unwrap()).unwrap();
                let e = rel_l2(&got, &want);
                println!("bitlinear step {rows} x {k} -> {n} ({glu:?}, norm {normed}): rel L2 {e:.2e}");
                // The kernel multiplies the int8 codes and applies the input's scale once; the reference
                // multiplies the codes times the scale rounded to bf16: about 2^-9 relative apart per input.
                assert!(e < 5e-3, "{rows} x {k} -> {n}: {e}");
                // Without the residual, the branch alone: the same check where it is not dwarfed by the
                // residual's magnitude; written into a buffer given (a captured step's).
                let buffer = Tensor::zeros((rows, 1, n), DType::BF16, &gpu()).unwrap();
                let alone = BitLinearStep { residual: None, out: Some(&buffer), ..step };
                let alone = try_bitlinear_step(&alone).unwrap().expect("takes it");
                // Each output within its rounding bound: every input at most 2^-8 of |q| apart (the scale's
                // rounding) and the output at most three bf16 roundings (the reference's product and its
                // scaling, the kernel's result). Relative L2 measures that rounding only over long sums: over
                // 48 inputs a sum that cancels came out at 6.3e-3 in one run.
                let f64_cpu = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_device(&Device::Cpu).unwrap();
                let spread = f64_cpu(&q.abs().unwrap()).matmul(&f64_cpu(&t.abs().unwrap()).t().unwrap()).unwrap();
                let spread = values(&spread.broadcast_mul(&f64_cpu(&scales.abs().unwrap())).unwrap());
                let (g, w) = (values(&buffer), values(&plain));
                let bound = |(w, s): (&f64, &f64)| s / 256.0 + 3.0 * w.abs() / 256.0;
                let worst = g.iter().zip(w.iter().zip(&spread)).map(|(g, ws)| (g - ws.0).abs() / bound(ws));
                let worst = worst.fold(0f64, f64::max);
                assert!(worst <= 1.0, "{rows} x {k} -> {n} without the residual: {worst} of the rounding bound");
                let e = rel_l2(&buffer, &plain.reshape((rows, 1, n)).unwrap());
                assert!(k < 256 || e < 5e-3, "{rows} x {k} -> {n} without the residual: {e}");
                assert_eq!(mismatched(&alone, &buffer), 0.0, "the output is the buffer given");
            }
        }
        // Nine rows are a GEMM's work.
        let (x, (_, codes)) = (randn(&[9, 1536], DType::BF16), ternary(64, 1536));
        let scales = randn(&[64], DType::BF16);
        let (scales, codes) = (&scales, &codes);
        let step = BitLinearStep { x: &x, norm: None, eps: 1e-6, glu: None, codes, scales, residual: None, out: None };
        assert!(try_bitlinear_step(&step).unwrap().is_none());
    }

    /// Random inputs of a decoding step's attention: `rows` rows of the stacked q, k, v projection (`heads`
    /// query heads, `kv_heads` for keys and values, of `d`), caches `width` columns wide, RoPE's inverse
    /// frequencies (base 10,000) and zero join counts.
    struct AttentionInputs {
        qkv: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        inv_freq: Tensor,
        done: Tensor,
        heads: usize,
        kv_heads: usize,
        d: usize,
        width: usize,
    }

    impl AttentionInputs {
        fn new(rows: usize, heads: usize, kv_heads: usize, d: usize, width: usize) -> Self {
            use bessie::kernels::decode::join_counts;
            let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
            Self {
                qkv: randn(&[rows, (heads + 2 * kv_heads) * d], DType::BF16),
                k_cache: randn(&[rows, kv_heads, width, d], DType::BF16),
                v_cache: randn(&[rows, kv_heads, width, d], DType::BF16),
                inv_freq: Tensor::new(inv.as_slice(), &gpu()).unwrap(),
                done: Tensor::zeros(join_counts(rows, heads), DType::U32, &gpu()).unwrap(),
                heads,
                kv_heads,
                d,
                width,
            }
        }

        /// The step over these inputs with `meta` (`DecodeAttention::meta`).
        fn step<'a>(&'a self, meta: &'a Tensor) -> bessie::kernels::shapes::DecodeAttention<'a> {
            bessie::kernels::shapes::DecodeAttention {
                qkv: &self.qkv,
                k_cache: &self.k_cache,
                v_cache: &self.v_cache,
                done: &self.done,
                meta,
                inv_freq: &self.inv_freq,
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.d,
                width: self.width,
                out: None,
                partial: None,
            }
        }
    }

    /// Random int8 values (u8 bit patterns, two's complement) `[rows, cols]` on the GPU, the extremes
    /// -128 and 127 in the first row, and the same values as i8 on the host.
    fn int8s(rows: usize, cols: usize, seed: u64) -> (Tensor, Vec<i8>) {
        let mut rng = bessie::rng::Rng::new(seed);
        let host: Vec<i8> = (0..rows * cols)
            .map(|i| match i {
                i if i < cols => [-128i8, 127][i % 2],
                _ => (rng.next_u64() >> 56) as u8 as i8,
            })
            .collect();
        let bytes: Vec<u8> = host.iter().map(|&v| v as u8).collect();
        (Tensor::from_vec(bytes, (rows, cols), &gpu()).unwrap(), host)
    }

    /// The shapes of the supported families whose BitLinear GEMMs the int8 tests run.
    const FAMILY_SHAPES: [&str; 4] = ["large", "2b4t", "falcon3-1b", "llama3-8b-1.58"];

    /// The forward's four BitLinear GEMMs at family shape `name`: what each is, its inputs, and the outputs of
    /// the matrices it stacks (q, k and v; gate and up), as the training forward runs them.
    fn bitlinear_gemms(name: &str) -> [(&'static str, usize, Vec<usize>); 4] {
        let c = bessie::config::ModelConfig::shape(name, 1000).unwrap();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim(), c.num_kv_heads() * c.head_dim());
        [("q/k/v", h, vec![q, kv, kv]), ("o_proj", q, vec![h]), ("gate/up", h, vec![i, i]), ("down", i, vec![h])]
    }

    /// The int8 GEMM (`kernels::int8_gemm`, Hopper's wgmma) against the same products in integers on the
    /// host, bit for bit after the scales (f32, in the kernel's order) and the bf16 rounding: every kernel at
    /// the forward BitLinears' shapes of each family (q/k/v and gate/up stacked, as the forward runs them) at
    /// 300 tokens (a partial tile of rows; a cluster's lower tile past the end), with and without scales, with
    /// a residual added in the epilogue where the tile adds one (rounded after the product and after the add),
    /// and a block of 128 rows whose sums are all at their extremes; 200 outputs (the last tile's and its
    /// last output buffer's columns partly past the end); and no launch where the outputs are not a multiple
    /// of 8 (the rows' stores need them 16-byte aligned).
    #[test]
    fn int8_gemm_matches_integer_products() {
        use bessie::kernels::int8_gemm::{try_int8_gemm, Tile};
        let (a, _) = int8s(64, 128, 5);
        let (b, _) = int8s(202, 128, 6);
        for tile in Tile::ALL {
            assert!(try_int8_gemm(&a, &b, None, None, None, tile).unwrap().is_none(), "202 outputs on {tile:?}");
        }
        let mut shapes: Vec<(usize, usize)> = vec![(200, 256)];
        for name in FAMILY_SHAPES {
            for (_, k, rows) in bitlinear_gemms(name) {
                let nk = (rows.iter().sum(), k);
                if !shapes.contains(&nk) {
                    shapes.push(nk);
                }
            }
        }
        for (i, &(n, k)) in shapes.iter().enumerate() {
            let m = 300;
            let (a, ha) = int8s(m, k, 2 * i as u64);
            let (b, hb) = int8s(n, k, 2 * i as u64 + 1);
            let sa: Vec<f32> = (0..m).map(|r| 0.01 + r as f32 * 1e-3).collect();
            let sb: Vec<f32> = (0..n).map(|c| 0.5 + (c % 7) as f32 * 0.03).collect();
            let (ta, tb) = (Tensor::new(&sa[..], &gpu()).unwrap(), Tensor::new(&sb[..], &gpu()).unwrap());
            let residual = randn(&[m, n], DType::BF16);
            let hr: Vec<f32> = residual.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Every output of the first and last rows (the extremes and the partial tile), and a sample, with
            // its integer product, computed once for the eight launches.
            let mut rng = bessie::rng::Rng::new(99);
            let sample =
                (0..4000).map(|_| ((rng.next_u64() % m as u64) as usize, (rng.next_u64() % n as u64) as usize));
            let checks: Vec<(usize, usize, i32)> = (0..n)
                .flat_map(|c| [(0, c), (m - 1, c)])
                .chain(sample)
                .map(|(r, c)| (r, c, (0..k).map(|j| ha[r * k + j] as i32 * hb[c * k + j] as i32).sum()))
                .collect();
            let cases = Tile::ALL.into_iter().flat_map(|t| [(false, false, t), (true, false, t), (true, true, t)]);
            for (scaled, added, tile) in cases.filter(|&(_, added, t)| !added || t.adds_residual()) {
                let (x, y) = if scaled { (Some(&ta), Some(&tb)) } else { (None, None) };
                let r = added.then_some(&residual);
                let got = try_int8_gemm(&a, &b, x, y, r, tile).unwrap().expect("a Hopper GPU takes it");
                let got: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for &(r, c, dot) in &checks {
                    let want = match scaled {
                        true => dot as f32 * sa[r] * sb[c],
                        false => dot as f32,
                    };
                    let mut want = half::bf16::from_f32(want).to_f32();
                    if added {
                        want = half::bf16::from_f32(want + hr[r * n + c]).to_f32();
                    }
                    assert_eq!(
                        got[r * n + c].to_bits(),
                        want.to_bits(),
                        "{n} x {k}, [{r}, {c}], {tile:?}, scaled {scaled}, residual {added}"
                    );
                }
                println!(
                    "int8 GEMM {m} x {n} x {k}, {tile:?} (scaled {scaled}, residual {added}): {} outputs equal to \
                     the integer products",
                    checks.len()
                );
            }
        }
        // Column scales as a view one float in (off the 8-byte grid): the same outputs as from their copy.
        let (a, _) = int8s(128, 128, 7);
        let (b, _) = int8s(256, 128, 8);
        let scales = randn(&[257], DType::F32);
        let odd = scales.narrow(0, 1, 256).unwrap();
        for tile in Tile::ALL {
            let (from_view, from_copy) = (
                try_int8_gemm(&a, &b, None, Some(&odd), None, tile).unwrap().expect("takes it"),
                try_int8_gemm(&a, &b, None, Some(&odd.copy().unwrap()), None, tile).unwrap().expect("takes it"),
            );
            assert_eq!(values(&from_view), values(&from_copy), "a column-scale view one float in, {tile:?}");
        }
        // Sums at their extremes: every a = -128 against every b = -128 and 127.
        let (m, n, k) = (128, 256, 4096);
        let a = Tensor::from_vec(vec![128u8; m * k], (m, k), &gpu()).unwrap();
        let b: Vec<u8> = (0..n * k).map(|i| if i / k % 2 == 0 { 128u8 } else { 127 }).collect();
        let b = Tensor::from_vec(b, (n, k), &gpu()).unwrap();
        for tile in Tile::ALL {
            let got = try_int8_gemm(&a, &b, None, None, None, tile).unwrap().expect("takes it");
            let got: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (i, v) in got.iter().enumerate() {
                let want = if i % n % 2 == 0 { 128.0 * 128.0 * k as f32 } else { -128.0 * 127.0 * k as f32 };
                assert_eq!(*v, half::bf16::from_f32(want).to_f32(), "extreme sums, {tile:?}, output {i}");
            }
        }
    }

    /// The int8 GEMM writing the q/k/v projection as attention's heads, q and k turned by RoPE: at each family's
    /// q/k/v shape (and heads of 64), 2 x 150 tokens (a partial tile of rows), every heads tile, equal bit for bit
    /// to the rows' GEMM followed by the RoPE kernel (`try_qkv_heads`), which the unfused forward runs.
    #[test]
    fn int8_gemm_into_heads_matches_rows_then_rope() {
        use bessie::kernels::int8_gemm::{try_int8_gemm, try_int8_gemm_heads, Tile};
        use bessie::kernels::{rope::try_qkv_heads, shapes::HeadShape};
        let (batch, seq) = (2, 150);
        let m = batch * seq;
        let mut shapes: Vec<(usize, usize, usize, usize)> = FAMILY_SHAPES
            .iter()
            .map(|name| {
                let c = bessie::config::ModelConfig::shape(name, 1000).unwrap();
                (c.hidden_size, c.num_attention_heads, c.num_kv_heads(), c.head_dim())
            })
            .collect();
        shapes.push((1024, 8, 4, 64));
        for (i, &(k, q_heads, kv_heads, head_dim)) in shapes.iter().enumerate() {
            let shape = HeadShape { batch, seq, q_heads, kv_heads, head_dim };
            let n = (q_heads + 2 * kv_heads) * head_dim;
            let (a, _) = int8s(m, k, 20 + 2 * i as u64);
            let (b, _) = int8s(n, k, 21 + 2 * i as u64);
            let (sa, sb) = ((randn(&[m], DType::F32) * 0.01).unwrap(), (randn(&[n], DType::F32) * 0.1).unwrap());
            let angles = (randn(&[batch, seq, head_dim / 2], DType::F32) * 3.0).unwrap();
            let cos = angles.cos().unwrap().to_dtype(DType::BF16).unwrap();
            let sin = angles.sin().unwrap().to_dtype(DType::BF16).unwrap();
            let rows = try_int8_gemm(&a, &b, Some(&sa), Some(&sb), None, Tile::for_shape(m, n)).unwrap().unwrap();
            let want = try_qkv_heads(&rows, shape, &cos, &sin).unwrap().expect("the RoPE kernel takes it");
            let tiles = Tile::all_heads(head_dim);
            assert!(!tiles.is_empty(), "a heads kernel for heads of {head_dim}");
            for tile in tiles {
                let got = try_int8_gemm_heads(&a, &b, Some(&sa), Some(&sb), shape, (&cos, &sin), tile)
                    .unwrap()
                    .expect("a Hopper GPU takes it");
                let differ = [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)].map(|(g, w)| mismatched(g, w));
                println!("int8 GEMM into heads, {shape:?}, {tile:?}: q/k/v values differing {differ:?}");
                assert_eq!(differ, [0.0; 3], "{shape:?} on {tile:?}");
            }
        }
    }

    /// The q/k/v projection into heads (`try_bitlinear_heads`' kernel) against the rows' GEMM and then the RoPE
    /// kernel, at -large's shapes of 768 (`configs/large.toml`'s micro-batch, where 192-column tiles make 144 for
    /// 132 SMs), 6,144 and 8,192 tokens and 2B4T's and Falcon3-1B's of 8,192: microseconds. Prints; asserts
    /// nothing.
    #[test]
    #[ignore = "timing: run with --ignored on a GPU machine"]
    fn int8_gemm_heads_timing() {
        use bessie::kernels::int8_gemm::{try_int8_gemm, try_int8_gemm_heads, Tile};
        use bessie::kernels::{rope::try_qkv_heads, shapes::HeadShape};
        let shapes =
            [("large", 768, 1), ("large", 768, 8), ("large", 2048, 4), ("2b4t", 2048, 4), ("falcon3-1b", 2048, 4)];
        for (name, seq, batch) in shapes {
            let c = bessie::config::ModelConfig::shape(name, 1000).unwrap();
            let (q_heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
            let shape = HeadShape { batch, seq, q_heads, kv_heads, head_dim };
            let (m, n, k) = (batch * seq, (q_heads + 2 * kv_heads) * head_dim, c.hidden_size);
            let (a, _) = int8s(m, k, 1);
            let (b, _) = int8s(n, k, 2);
            let (sa, sb) = (randn(&[m], DType::F32), randn(&[n], DType::F32));
            let cos = randn(&[batch, seq, head_dim / 2], DType::BF16);
            let sin = randn(&[batch, seq, head_dim / 2], DType::BF16);
            let rows_tile = Tile::for_shape(m, n);
            let apart = mean_us(&|| {
                let rows = try_int8_gemm(&a, &b, Some(&sa), Some(&sb), None, rows_tile).unwrap().unwrap();
                drop(try_qkv_heads(&rows, shape, &cos, &sin).unwrap().unwrap())
            });
            let gemm =
                mean_us(&|| drop(try_int8_gemm(&a, &b, Some(&sa), Some(&sb), None, rows_tile).unwrap().unwrap()));
            for tile in Tile::all_heads(head_dim) {
                let heads = mean_us(&|| {
                    drop(try_int8_gemm_heads(&a, &b, Some(&sa), Some(&sb), shape, (&cos, &sin), tile).unwrap().unwrap())
                });
                println!(
                    "q/k/v {name} {m} x {n} x {k}: into heads {tile:?} {heads:.1} us; rows {rows_tile:?} {gemm:.1} us, \
                     then RoPE {apart:.1} us in all{}",
                    if tile == Tile::for_heads(m, n, head_dim).unwrap() { " (picked)" } else { "" }
                );
            }
        }
    }

    /// The int8 GEMM, with its row and column scales as a BitLinear calls it, against cuBLAS's bf16 GEMM
    /// (candle's matmul, f32 sums) at the forward BitLinears' shapes of bitnet_b1_58-large and 2B4T, 6,144
    /// tokens (768 x 8), 2,048 (a micro-batch of one 2,048-token row) and -large's at 768
    /// (`configs/large.toml`'s micro-batch), each tile: microseconds and tera-operations a second. Prints a
    /// table; asserts nothing.
    #[test]
    #[ignore = "timing: run with --ignored on a GPU machine"]
    fn int8_gemm_timing() {
        use bessie::kernels::int8_gemm::{try_int8_gemm, Tile};
        let large = [(4608, 1536), (1536, 1536), (8192, 1536), (1536, 4096)];
        let bitnet_2b4t = [(3840, 2560), (13824, 2560), (2560, 6912)];
        let both = || large.iter().chain(&bitnet_2b4t);
        let shapes =
            both().map(|&s| (6144, s)).chain(both().map(|&s| (2048, s))).chain(large.iter().map(|&s| (768, s)));
        for (m, (n, k)) in shapes {
            let (a, _) = int8s(m, k, 1);
            let (b, _) = int8s(n, k, 2);
            let (sa, sb) = (randn(&[m], DType::F32), randn(&[n], DType::F32));
            let (xa, wb) = (randn(&[m, k], DType::BF16), randn(&[n, k], DType::BF16));
            let bf16 = mean_us(&|| drop(xa.matmul(&wb.t().unwrap()).unwrap()));
            let ops = 2.0 * (m * n * k) as f64;
            for tile in Tile::ALL {
                let int8 = |scales: bool| {
                    let (sa, sb) = if scales { (Some(&sa), Some(&sb)) } else { (None, None) };
                    mean_us(&|| drop(try_int8_gemm(&a, &b, sa, sb, None, tile).unwrap().expect("takes it")))
                };
                let (scaled, unscaled) = (int8(true), int8(false));
                println!(
                    "GEMM {m} x {n} x {k}: int8 {tile:?} {scaled:.1} us ({:.0} TOP/s; without scales {unscaled:.1} us), \
                     bf16 {bf16:.1} us ({:.0} TFLOP/s): {:.2}x",
                    ops / scaled / 1e6,
                    ops / bf16 / 1e6,
                    bf16 / scaled
                );
                if tile.adds_residual() {
                    // The residual stream's add in the epilogue against the residual kernel after the GEMM.
                    let residual = randn(&[m, n], DType::BF16);
                    let fused = mean_us(&|| {
                        drop(try_int8_gemm(&a, &b, Some(&sa), Some(&sb), Some(&residual), tile).unwrap().unwrap())
                    });
                    let apart = mean_us(&|| {
                        let y = try_int8_gemm(&a, &b, Some(&sa), Some(&sb), None, tile).unwrap().unwrap();
                        drop(bessie::kernels::residual::try_residual_add(&residual, &y).unwrap().unwrap())
                    });
                    println!("GEMM {m} x {n} x {k}: {tile:?} with the residual added {fused:.1} us, then added {apart:.1} us");
                }
            }
        }
    }

    /// Microseconds per call of `f` (work queued on the GPU's stream), over 20 calls after one to warm up.
    fn mean_us(f: &dyn Fn()) -> f64 {
        let device = gpu();
        f();
        device.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..20 {
            f();
        }
        device.synchronize().unwrap();
        start.elapsed().as_secs_f64() / 20.0 * 1e6
    }

    /// Microseconds per launch of `f` (which launches one kernel on the GPU's stream) as a decoding step runs
    /// it: `n` launches captured as one CUDA graph, replayed.
    fn graph_us(n: usize, f: &dyn Fn()) -> f64 {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let device = gpu();
        let Device::Cuda(dev) = &device else { unreachable!("gpu() is a CUDA device") };
        f();
        device.synchronize().unwrap();
        let stream = dev.cuda_stream();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
        (0..n).for_each(|_| f());
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags).unwrap().expect("the capture recorded the launches");
        graph.launch().unwrap();
        device.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..10 {
            graph.launch().unwrap();
        }
        device.synchronize().unwrap();
        start.elapsed().as_secs_f64() / (10 * n) as f64 * 1e6
    }

    /// The decoding step's kernels one at a time, batch 1, as a captured step replays them: each BitLinear of
    /// bitnet_b1_58-large and 2B4T with the bandwidth its packed weights take (the same weights each launch,
    /// which stay in L2, and weights from memory), and the attention over a short and a long cache. Prints a
    /// table (BENCHMARKS.md's decode profile by shape); asserts nothing.
    #[test]
    #[ignore = "a timing; run with --ignored"]
    fn decode_kernels_timing() {
        use bessie::kernels::decode::{try_bitlinear_step, try_decode_attention};
        use bessie::kernels::shapes::BitLinearStep;
        // The first row does almost nothing: what a launch in a graph costs, waiting for the one before it.
        let shapes: [(&str, usize, usize, Option<Activation>); 9] = [
            ("floor", 8, 16, None),
            ("large qkv", 4608, 1536, None),
            ("large o", 1536, 1536, None),
            ("large gate/up", 8192, 1536, None),
            ("large down", 1536, 4096, Some(Activation::Silu)),
            ("2B4T qkv", 3840, 2560, None),
            ("2B4T o", 2560, 2560, None),
            ("2B4T gate/up", 13824, 2560, None),
            ("2B4T down", 2560, 6912, Some(Activation::Relu2)),
        ];
        for (name, n, k, glu) in shapes {
            let x = randn(&[1, 1, if glu.is_some() { 2 * k } else { k }], DType::BF16);
            let (norm, residual) = (randn(&[k], DType::BF16), randn(&[1, 1, n], DType::BF16));
            let (_, codes) = ternary(n, k);
            let scales = randn(&[n], DType::BF16);
            let step = BitLinearStep {
                x: &x,
                norm: Some(&norm),
                eps: 1e-6,
                glu,
                codes: &codes,
                scales: &scales,
                residual: Some(&residual),
                out: None,
            };
            let us = graph_us(50, &|| drop(try_bitlinear_step(&step).unwrap().expect("takes it")));
            // Into one buffer, as a captured step runs (no allocation node between the launches).
            let buffer = Tensor::zeros((1, 1, n), DType::BF16, &gpu()).unwrap();
            let into = BitLinearStep { out: Some(&buffer), ..step };
            let us_into = graph_us(50, &|| drop(try_bitlinear_step(&into).unwrap().expect("takes it")));
            // A step reads each layer's weights from memory, not from L2 (50 MB on an H100) as the same codes
            // launched again are: copies of them, 128 MB in all, taken in turn.
            let copies: Vec<Tensor> =
                (0..(128usize << 20).div_ceil(n * k / 4).min(1024)).map(|_| codes.copy().unwrap()).collect();
            let turn = std::cell::Cell::new(0);
            let us_cold = graph_us(50, &|| {
                let codes = &copies[turn.replace(turn.get() + 1) % copies.len()];
                drop(try_bitlinear_step(&BitLinearStep { codes, ..into }).unwrap().expect("takes it"))
            });
            let (gbs, gbs_cold) = ((n * k / 4) as f64 / us_into / 1e3, (n * k / 4) as f64 / us_cold / 1e3);
            println!(
                "bitlinear step {name} ({k} -> {n}): {us:.2} us, into a buffer {us_into:.2} us ({gbs:.0} GB/s of \
                 packed weights), weights from memory {us_cold:.2} us ({gbs_cold:.0} GB/s)"
            );
        }
        // Within one split of 32 columns the blocks write their heads' outputs themselves; past it the last
        // block of each head joins the splits.
        for (name, heads, kv_heads, d, col) in [
            ("large", 16, 16, 96, 31),
            ("large", 16, 16, 96, 63),
            ("large", 16, 16, 96, 439),
            ("large", 16, 16, 96, 1700),
            ("2B4T", 20, 5, 128, 439),
            ("2B4T", 20, 5, 128, 1700),
        ] {
            let width = 2048;
            let meta: Vec<u32> = [col as u32, 0, 0, 0, 0, col as u32].to_vec();
            let meta = Tensor::from_vec(meta, 6, &gpu()).unwrap();
            let inputs = AttentionInputs::new(1, heads, kv_heads, d, width);
            let step = inputs.step(&meta);
            let us = graph_us(50, &|| drop(try_decode_attention(&step).unwrap().expect("takes it")));
            let out = Tensor::zeros((1, heads * d), DType::BF16, &gpu()).unwrap();
            let partial = bessie::kernels::decode::partial_len(1, heads, d, width);
            let partial = Tensor::zeros(partial, DType::F32, &gpu()).unwrap();
            let into = bessie::kernels::shapes::DecodeAttention { out: Some(&out), partial: Some(&partial), ..step };
            let us_into = graph_us(50, &|| drop(try_decode_attention(&into).unwrap().expect("takes it")));
            println!(
                "decode attention {name} ({heads}/{kv_heads} heads of {d}) over {} columns: {us:.2} us, into \
                 buffers {us_into:.2} us",
                col + 1
            );
        }
    }

    /// A decoding step's attention (`kernels::decode::try_decode_attention`: RoPE, the cache write, masked
    /// softmax over the cache, split over the columns) against the candle ops of `model::bitnet`'s attention
    /// on the same bf16 tensors: a row from column 0, a row whose own tokens skip a gap (a shared prefix's
    /// padding), a retired row; 2B4T's grouped heads over 601 columns (19 splits of 32, the cache wide enough
    /// for empty ones after them, joined by the last block to finish), -large's over 101, Falcon3's heads of
    /// 256 over 301, a group of 16 query heads (two blocks a kv head) and the tiny shape's heads of 16 within
    /// one split.
    #[test]
    fn decode_attention_matches_reference() {
        use bessie::kernels::decode::try_decode_attention;
        use bessie::kernels::shapes::DecodeAttention;
        use candle_core::D;
        for (heads, kv_heads, d, col) in
            [(20, 5, 128, 600), (16, 16, 96, 100), (8, 2, 256, 300), (32, 2, 64, 70), (4, 4, 16, 20)]
        {
            let (rows, width, first) = (3, if col > 256 { 1000 } else { 200 }, 0);
            // (start, gap, gap_len); u32::MAX: retired.
            let spans = [(0u32, 0u32, 0u32), (5, 40, 30), (u32::MAX, u32::MAX, 0)];
            let hides = |(s, g, l): (u32, u32, u32), c: u32| c < s || (c >= g && c - g < l);
            let position = |sp: (u32, u32, u32), c: u32| match hides(sp, c) {
                true => 0,
                false if c >= sp.1 + sp.2 => c - sp.0 - sp.2,
                false => c - sp.0,
            };
            let meta: Vec<u32> = spans
                .iter()
                .flat_map(|&sp| [position(sp, col as u32), sp.0, sp.1, sp.2])
                .chain([first as u32, col as u32])
                .collect();
            let meta = Tensor::from_vec(meta, 4 * rows + 2, &gpu()).unwrap();
            let inputs = AttentionInputs::new(rows, heads, kv_heads, d, width);
            let AttentionInputs { qkv, k_cache, v_cache, inv_freq, done, .. } = &inputs;
            let (k_before, v_before) = (k_cache.copy().unwrap(), v_cache.copy().unwrap());
            let step = inputs.step(&meta);
            let got = try_decode_attention(&step).unwrap().expect("the kernel takes it");
            // The join counts are back at zero, so the next layer's launch reuses them: it gives the same.
            let counts: Vec<u32> = done.to_vec1().unwrap();
            assert!(counts.iter().all(|&c| c == 0), "join counts left at {counts:?}");
            // Into buffers given (a captured step's), as a fresh launch.
            use bessie::kernels::decode::partial_len;
            let out = Tensor::zeros((rows, heads * d), DType::BF16, &gpu()).unwrap();
            let partial = Tensor::zeros(partial_len(rows, heads, d, width), DType::F32, &gpu()).unwrap();
            let into = DecodeAttention { out: Some(&out), partial: Some(&partial), ..inputs.step(&meta) };
            try_decode_attention(&into).unwrap().expect("the kernel takes it");
            assert_eq!(mismatched(&out, &got), 0.0, "a second launch on the same counts, into buffers given");

            // The reference, as model::bitnet's attention computes it.
            let positions: Vec<f32> = spans.iter().map(|&sp| position(sp, col as u32) as f32).collect();
            let angles = Tensor::new(positions.as_slice(), &gpu())
                .unwrap()
                .reshape((rows, 1))
                .unwrap()
                .matmul(&inv_freq.reshape((1, d / 2)).unwrap())
                .unwrap();
            let table = |t: Tensor| t.to_dtype(DType::BF16).unwrap().reshape((rows, 1, d / 2)).unwrap();
            let (cos, sin) = (table(angles.cos().unwrap()), table(angles.sin().unwrap()));
            let part = |from: usize, n: usize| {
                qkv.narrow(1, from * d, n * d).unwrap().reshape((rows, 1, n, d)).unwrap().transpose(1, 2).unwrap()
            };
            let rope = |x: Tensor| candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &cos, &sin).unwrap();
            let (q, k_new, v_new) =
                (rope(part(0, heads)), rope(part(heads, kv_heads)), part(heads + kv_heads, kv_heads));
            let k_want = k_before.slice_assign(&[0..rows, 0..kv_heads, col..col + 1, 0..d], &k_new).unwrap();
            let v_want = v_before
                .slice_assign(&[0..rows, 0..kv_heads, col..col + 1, 0..d], &v_new.contiguous().unwrap())
                .unwrap();
            // The same roundings (a sum of two bf16 products rounded twice may differ, rarely).
            let (mk, mv) = (mismatched(k_cache, &k_want), mismatched(v_cache, &v_want));
            assert!(mk < 1e-3 && mv == 0.0, "the cache's new keys differ at {mk}, values at {mv}");
            let repeat = |t: &Tensor| {
                let t = t.narrow(2, first, col + 1 - first).unwrap();
                let (b, h, n, dd) = t.dims4().unwrap();
                t.unsqueeze(2)
                    .unwrap()
                    .expand((b, h, heads / kv_heads, n, dd))
                    .unwrap()
                    .reshape((b, heads, n, dd))
                    .unwrap()
            };
            let (k, v) = (repeat(&k_want), repeat(&v_want));
            let scores =
                (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap().to_dtype(DType::F32).unwrap();
            let mask: Vec<f32> = spans
                .iter()
                .flat_map(|&sp| {
                    (first..=col).map(move |c| match hides(sp, c as u32) == hides(sp, col as u32) {
                        true => 0.0,
                        false => f32::NEG_INFINITY,
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (rows, 1, 1, col + 1 - first), &gpu()).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
            let want = probs.to_dtype(DType::BF16).unwrap().matmul(&v).unwrap();
            let want = want.transpose(1, 2).unwrap().reshape((rows, heads * d)).unwrap();
            // The retired row computes what no one reads: compared for the live rows only.
            let live = |t: &Tensor| t.narrow(0, 0, 2).unwrap();
            let e = rel_l2(&live(&got), &live(&want));
            let worst = values(&(live(&got) - live(&want)).unwrap().abs().unwrap().max(D::Minus1).unwrap())
                .into_iter()
                .fold(0f64, f64::max);
            println!(
                "decode attention {heads}/{kv_heads} heads of {d}, {} columns: rel L2 {e:.2e}, worst {worst:.2e}",
                col + 1
            );
            assert!(e < 1e-2, "{heads} heads over {} columns: rel L2 {e}", col + 1);
        }
    }

    #[test]
    fn rmsnorm_quant_forward_and_backward_match_reference() {
        // The forward's warp per row (64 to 1536 channels: 1 to 6 vectors per lane) and block per row (2560 to
        // 8640 channels); the backward's block per row with 1, 2 and 4 vectors per thread. 2560 and 3072: the
        // hidden sizes of BitNet 2B4T and Falcon3-1B.
        for (n, c, lambda) in [
            (37, 64, 1.0),
            (64, 1000, 0.5),
            (300, 1536, 1.0),
            (50, 2560, 1.0),
            (40, 3072, 1.0),
            (16, 4096, 1.0),
            (9, 5000, 1.0),
            (5, 8640, 0.0),
        ] {
            let (x, w, dy) = (randn(&[n, c], DType::BF16), randn(&[c], DType::BF16), randn(&[n, c], DType::BF16));
            let (y_ref, s_ref) = sub_norm_quant_forward_reference(&x, None, Some(&w), 1e-6, lambda).unwrap();
            let (y, s, y8) = rmsnorm_quant_forward(&x, &w, 1e-6, lambda, lambda == 1.0).unwrap();
            if lambda == 1.0 {
                assert_int8_form(&y, y8.as_ref());
            }
            // The plain norm (the final one): the same kernel without the quantization, so also the values the
            // quantization started from.
            let (pre_ref, _) = rmsnorm_forward_reference(&x, &w, 1e-6).unwrap();
            let (pre, _) = rmsnorm_forward(&x, &w, 1e-6).unwrap();
            let e = rel_l2(&y, &y_ref);
            let (m, moved) = mismatched_same_scale(&y, &y_ref, &pre, &pre_ref);
            println!(
                "rmsnorm+quant n={n} c={c} lambda={lambda}: rel L2 {e:.2e}, {:.3}% codes differ, {moved} rows of \
                 another scale",
                m * 100.0
            );
            assert!(e < 5e-3 && m < 5e-3 && moved <= (n / 50).max(1), "forward: rel L2 {e}, mismatched {m}, {moved}");
            let (y, y_ref) = (pre, pre_ref);
            let (e, m) = (rel_l2(&y, &y_ref), mismatched(&y, &y_ref));
            println!("rmsnorm n={n} c={c}: rel L2 {e:.2e}, {:.3}% of values differ", m * 100.0);
            assert!(e < 1e-3 && m < 2e-2, "plain forward: rel L2 {e}, mismatched {m}");
            // With the residual stream's gradient added (as every block's two norms get it) and without.
            let residual = (lambda == 1.0).then(|| randn(&[n, c], DType::BF16));
            let (dx_ref, dw_ref) = norm_backward_reference(&dy, Some(&w), &s_ref, residual.as_ref()).unwrap();
            let dw_ref = dw_ref.unwrap();
            let (dx, dw) = rmsnorm_backward(&dy, &w, &s, residual.as_ref()).unwrap();
            assert!(matches!(dw, WeightGrad::RowSums(_)), "the fused backward ran");
            let (ex, ew) = (rel_l2(&dx, &dx_ref), rel_l2(&dense(&dw, c, false), &dense(&dw_ref, c, true)));
            println!("rmsnorm backward n={n} c={c}: dx rel L2 {ex:.2e}, dw rel L2 {ew:.2e}");
            assert!(ex < 1e-2 && ew < 1e-4, "backward: dx {ex}, dw {ew}");
        }
        // Attention's output heads [b, h, t, d] normed as rows [b t, h d], read in place; dx in the heads.
        let (x, w, dy) =
            (randn(&[2, 3, 5, 64], DType::BF16), randn(&[192], DType::BF16), randn(&[10, 192], DType::BF16));
        let (y_ref, s_ref) = sub_norm_quant_forward_reference(&x, None, Some(&w), 1e-6, 1.0).unwrap();
        let (y, s, y8) = rmsnorm_quant_forward(&x, &w, 1e-6, 1.0, true).unwrap();
        assert_int8_form(&y, y8.as_ref());
        let (dx_ref, dw_ref) = norm_backward_reference(&dy, Some(&w), &s_ref, None).unwrap();
        let dw_ref = dw_ref.unwrap();
        let (dx, dw) = rmsnorm_backward(&dy, &w, &s, None).unwrap();
        assert_eq!(dx.dims(), &[2, 3, 5, 64]);
        let ew = rel_l2(&dense(&dw, 192, false), &dense(&dw_ref, 192, true));
        let (ey, ex) = (rel_l2(&y, &y_ref), rel_l2(&dx, &dx_ref));
        println!("rmsnorm on heads: y rel L2 {ey:.2e}, dx {ex:.2e}, dw {ew:.2e}");
        assert!(ey < 5e-3 && ex < 1e-2 && ew < 1e-4);
    }

    /// The attention sub-norm's backward also gives each head row's delta = rowsum(dx x) for the flash backward, at
    /// the families' head dims (Falcon3's heads of 256 without a sub-norm), against the sums of its own dx and x
    /// in f32; dx is the plain backward's, bit for bit.
    #[test]
    fn attention_sub_norm_backward_gives_the_deltas() {
        for (b, h, t, d, normed) in
            [(2, 16, 70, 96, true), (2, 20, 33, 128, true), (1, 8, 40, 256, false), (3, 4, 9, 64, true)]
        {
            let (x, dy) = (randn(&[b, h, t, d], DType::BF16), randn(&[b * t, h * d], DType::BF16));
            let w = normed.then(|| randn(&[h * d], DType::BF16));
            let (_, s, _) = sub_norm_quant_forward(&x, None, w.as_ref(), 1e-6, 1.0, true).unwrap();
            let (dx, _, delta) = attention_sub_norm_backward(&dy, w.as_ref(), &s).unwrap();
            let delta = delta.expect("the kernel gave the deltas");
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let want = (f32(&dx) * f32(&x)).unwrap().sum(3).unwrap();
            assert_eq!(delta.dims(), &[b, h, t]);
            let (plain, _) = sub_norm_backward(&dy, w.as_ref(), &s).unwrap();
            let e = rel_l2(&delta, &want);
            println!("deltas of {h} heads of {d}, {t} tokens, normed {normed}: rel L2 {e:.2e}");
            assert!(e < 1e-5 && mismatched(&dx, &plain) == 0.0);
        }
    }

    #[test]
    fn residual_add_matches_reference() {
        let (x, branch) = (randn(&[37, 1000], DType::BF16), randn(&[37, 1000], DType::BF16));
        let got = residual_add(&x, &branch).unwrap();
        // One f32 add rounded to bf16 on both sides: equal bit for bit.
        assert_eq!(mismatched(&got, &(&x + &branch).unwrap()), 0.0);
        // A prefill's BitLinear output times each column's weight scale, with and without the residual, as
        // model::bitnet's candle ops compute it.
        use bessie::kernels::residual::try_scale_add;
        let (y, scale) = (randn(&[3, 37, 4608], DType::BF16), randn(&[4608], DType::BF16));
        let residual = randn(&[3, 37, 4608], DType::BF16);
        let want = y.broadcast_mul(&scale).unwrap();
        let got = try_scale_add(&y, Some(&scale), None).unwrap().expect("the kernel takes it");
        assert_eq!(mismatched(&got, &want), 0.0);
        let got = try_scale_add(&y, Some(&scale), Some(&residual)).unwrap().expect("the kernel takes it");
        assert_eq!(mismatched(&got, &(&residual + &want).unwrap()), 0.0);
    }

    /// down_proj's input: the gated activation (SiLU or relu^2) read from the gate/up rows, normed and quantized
    /// in one kernel, and its backward through both into [dgate | dup], against the reference's activation, norm
    /// and activation backward.
    #[test]
    fn glu_rmsnorm_matches_reference() {
        // A warp per row (1000 channels) and a block per row (4096 and up) in the forward; 1, 2 and 4 vectors
        // per thread in the backward. 6912, 8192 and 9216: the intermediate sizes of BitNet 2B4T, Llama 3 8B's
        // and Falcon3-1B's families.
        for (n, m, lambda) in
            [(33, 1000, 1.0), (40, 4096, 1.0), (6, 8640, 0.5), (12, 6912, 1.0), (8, 8192, 1.0), (7, 9216, 1.0)]
        {
            for act in [Activation::Silu, Activation::Relu2] {
                let (gu, w, dy) =
                    (randn(&[n, 2 * m], DType::BF16), randn(&[m], DType::BF16), randn(&[n, m], DType::BF16));
                let (y_ref, s_ref) = sub_norm_quant_forward_reference(&gu, Some(act), Some(&w), 1e-6, lambda).unwrap();
                let (y, s, y8) = sub_norm_quant_forward(&gu, Some(act), Some(&w), 1e-6, lambda, lambda == 1.0).unwrap();
                if lambda == 1.0 {
                    assert_int8_form(&y, y8.as_ref());
                }
                let pre_ref = sub_norm_quant_forward_reference(&gu, Some(act), Some(&w), 1e-6, 0.0).unwrap().0;
                let pre = sub_norm_quant_forward(&gu, Some(act), Some(&w), 1e-6, 0.0, false).unwrap().0;
                let e = rel_l2(&y, &y_ref);
                let (mis, moved) = mismatched_same_scale(&y, &y_ref, &pre, &pre_ref);
                let (dgu_ref, dw_ref) = norm_backward_reference(&dy, Some(&w), &s_ref, None).unwrap();
                let dw_ref = dw_ref.unwrap();
                let (dgu, dw) = rmsnorm_backward(&dy, &w, &s, None).unwrap();
                assert!(matches!(dw, WeightGrad::RowSums(_)), "the fused backward ran");
                let (eg, eu) = (
                    rel_l2(&dgu.narrow(1, 0, m).unwrap(), &dgu_ref.narrow(1, 0, m).unwrap()),
                    rel_l2(&dgu.narrow(1, m, m).unwrap(), &dgu_ref.narrow(1, m, m).unwrap()),
                );
                let ew = rel_l2(&dense(&dw, m, false), &dense(&dw_ref, m, true));
                println!(
                    "{act:?} glu+rmsnorm n={n} m={m} lambda={lambda}: y rel L2 {e:.2e} ({:.3}% codes differ, {moved} \
                     rows of another scale), dgate {eg:.2e}, dup {eu:.2e}, dw {ew:.2e}",
                    mis * 100.0
                );
                assert!(e < 5e-3 && mis < 5e-3 && moved <= (n / 50).max(1) && eg < 1e-2 && eu < 1e-2 && ew < 1e-3);
            }
        }
    }

    /// Where a family has no sub-norm (the Llama layout) the same kernels quantize without norming: the gated
    /// activation of the gate/up rows, and attention's output heads as rows; the backward passes the gradient
    /// straight through (the gate's derivative for the former).
    #[test]
    fn quantization_without_a_sub_norm_matches_reference() {
        for (n, m) in [(33, 1000), (12, 8192)] {
            for act in [Activation::Silu, Activation::Relu2] {
                let (gu, dy) = (randn(&[n, 2 * m], DType::BF16), randn(&[n, m], DType::BF16));
                let (y_ref, s_ref) = sub_norm_quant_forward_reference(&gu, Some(act), None, 1e-6, 1.0).unwrap();
                let (y, s, y8) = sub_norm_quant_forward(&gu, Some(act), None, 1e-6, 1.0, true).unwrap();
                assert_int8_form(&y, y8.as_ref());
                let (dgu_ref, _) = norm_backward_reference(&dy, None, &s_ref, None).unwrap();
                let (dgu, dw) = sub_norm_backward(&dy, None, &s).unwrap();
                assert!(dw.is_none());
                let (e, mis, eg) = (rel_l2(&y, &y_ref), mismatched(&y, &y_ref), rel_l2(&dgu, &dgu_ref));
                println!(
                    "{act:?} glu+quant n={n} m={m}: y rel L2 {e:.2e} ({:.3}% differ), d[gate|up] {eg:.2e}",
                    mis * 100.0
                );
                assert!(e < 5e-3 && mis < 5e-3 && eg < 1e-2);
            }
        }
        let (x, dy) = (randn(&[2, 8, 33, 256], DType::BF16), randn(&[66, 2048], DType::BF16));
        let (y_ref, s_ref) = sub_norm_quant_forward_reference(&x, None, None, 1e-6, 0.5).unwrap();
        let (y, s, _) = sub_norm_quant_forward(&x, None, None, 1e-6, 0.5, false).unwrap();
        let (dx_ref, _) = norm_backward_reference(&dy, None, &s_ref, None).unwrap();
        let (dx, _) = sub_norm_backward(&dy, None, &s).unwrap();
        assert_eq!(dx.dims(), &[2, 8, 33, 256]);
        let (e, ex) = (rel_l2(&y, &y_ref), rel_l2(&dx, &dx_ref));
        println!("quant of heads (head dim 256): y rel L2 {e:.2e}, dx {ex:.2e}");
        assert!(e < 5e-3 && ex == 0.0);
    }

    #[test]
    fn embedding_backward_matches_reference() {
        // Ids with many repeats (a small vocabulary) and some never seen.
        let (n, c, vocab) = (300, 136, 50);
        let ids: Vec<u32> = (0..n).map(|i| ((i * i * 7 + 3) % 37) as u32).collect();
        let dx = randn(&[n, c], DType::BF16);
        let g = embedding_backward(
            &dx,
            &Tensor::new(ids.as_slice(), &gpu()).unwrap(),
            &TokenRows::new(&ids, &gpu()).unwrap(),
        );
        // Added into a table of ones, as into the gradient buffer; candle's index_add may add in another order.
        let e = rel_l2(&dense(&g, vocab * c, false), &dense(&g, vocab * c, true));
        println!("embedding backward: rel L2 {e:.2e}");
        assert!(e < 1e-6, "rel L2 {e}");
    }

    #[test]
    fn qkv_heads_match_reference() {
        // Grouped-query heads and the head sizes of the flash kernel; each token its own angles, as packing
        // gives them.
        for (b, t, hq, hkv, d) in [(2, 70, 4, 2, 64), (3, 33, 6, 6, 96), (2, 40, 20, 5, 128), (1, 50, 8, 4, 256)] {
            let s = HeadShape { batch: b, seq: t, q_heads: hq, kv_heads: hkv, head_dim: d };
            let qkv = randn(&[b * t, (hq + 2 * hkv) * d], DType::BF16);
            let angles = (randn(&[b, t, d / 2], DType::F32) * 3.0).unwrap();
            let (cos, sin) = (
                angles.cos().unwrap().to_dtype(DType::BF16).unwrap(),
                angles.sin().unwrap().to_dtype(DType::BF16).unwrap(),
            );
            let want = qkv_heads_reference(&qkv, s, &cos, &sin).unwrap();
            let got = qkv_heads(&qkv, s, &cos, &sin).unwrap();
            let (eq, ek, ev) = (rel_l2(&got.0, &want.0), rel_l2(&got.1, &want.1), rel_l2(&got.2, &want.2));
            let (dq, dk, dv) = (
                randn(want.0.dims(), DType::BF16),
                randn(want.1.dims(), DType::BF16),
                randn(want.2.dims(), DType::BF16),
            );
            let back_ref = qkv_heads_backward_reference(&dq, &dk, &dv, s, &cos, &sin).unwrap();
            let back = qkv_heads_backward(&dq, &dk, &dv, s, &cos, &sin).unwrap();
            let ed = rel_l2(&back, &back_ref);
            println!("qkv heads {s:?}: q rel L2 {eq:.2e}, k {ek:.2e}, v {ev:.2e}; backward {ed:.2e}");
            // candle's bf16 rope rounds each product; the kernel rounds once. v is a copy.
            assert!(eq < 1e-2 && ek < 1e-2 && ed < 1e-2 && ev == 0.0);
        }
    }

    #[test]
    fn cross_entropy_matches_reference() {
        // 32002: the Llama 2 vocabulary padded by 6 columns; 128256 (Llama 3, BitNet 2B4T) and 131072
        // (Falcon3), multiples of 8 already.
        for (n, v, pad) in [(19, 32002, 6), (7, 128256, 0), (5, 131072, 0)] {
            let logits = (randn(&[n, v], DType::F32) * 3.0).unwrap().to_dtype(DType::BF16).unwrap();
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect();
            let mask: Vec<f32> = (0..n).map(|i| if i % 4 == 3 { 0.0 } else { 1.0 }).collect();
            let (t, m) =
                (Tensor::new(targets.as_slice(), &gpu()).unwrap(), Tensor::new(mask.as_slice(), &gpu()).unwrap());
            let (loss_ref, d_ref) = cross_entropy_forward_backward_reference(&logits, v, &t, &m).unwrap();
            // Padded to a multiple of 8 columns, as the head pads them (the kernel reads rows of a multiple of 8),
            // the padding large, so that it would show in the loss: the same loss, and no gradient on the padding.
            let padded = match pad {
                0 => logits.clone(),
                _ => Tensor::cat(
                    &[&logits, &(randn(&[n, pad], DType::F32) * 50.0).unwrap().to_dtype(DType::BF16).unwrap()],
                    1,
                )
                .unwrap(),
            };
            let (loss, d_pad) = cross_entropy_forward_backward(&padded, v, &t, &m).unwrap();
            assert_eq!(d_pad.dtype(), DType::BF16, "the fused kernel ran");
            let d = d_pad.narrow(1, 0, v).unwrap();
            let (loss, loss_ref) = (loss.to_scalar::<f64>().unwrap(), loss_ref.to_scalar::<f64>().unwrap());
            let (el, ed) = ((loss - loss_ref).abs() / loss_ref.abs(), rel_l2(&d, &d_ref));
            println!("cross-entropy vocab {v}: loss {loss} vs {loss_ref} (rel {el:.2e}), dlogits rel L2 {ed:.2e}");
            if pad > 0 {
                assert!(values(&d_pad.narrow(1, v, pad).unwrap()).iter().all(|&x| x == 0.0));
            }
            assert!(el < 1e-5 && ed < 1e-2);
        }
    }

    #[test]
    fn step_weights_match_reference() {
        // BitLinear matrices and cast slots at offsets off the 16-byte grid, as the flat buffer holds them.
        let sizes =
            [(3, None), (96 * 64, Some(64)), (37, None), (1536 * 4096, Some(4096)), (333 * 77, Some(77)), (5, None)];
        let mut slots = Vec::new();
        let mut at = 0;
        for (len, columns) in sizes {
            slots.push((at..at + len, columns));
            at += len;
        }
        let flat = (randn(&[at], DType::F32) * 0.02).unwrap();
        for lambda in [1.0, 0.3] {
            let want = step_weights_reference(&flat, &slots, lambda, DType::BF16).unwrap();
            let (got, codes) = step_weights(&flat, &slots, lambda, DType::BF16, lambda == 1.0).unwrap();
            assert_eq!(codes.is_some(), lambda == 1.0);
            // The int8 form of every matrix: its codes times its rows' scales are the bf16 weights, bit for bit.
            for (k, (r, columns)) in slots.iter().enumerate() {
                if let (Some(codes), Some(c)) = (&codes, columns) {
                    let op = codes.operand(k, r.clone(), *c).unwrap();
                    assert_int8_form(&got.narrow(0, r.start, r.len()).unwrap(), Some(&op));
                }
            }
            for (r, columns) in &slots {
                let (g, w) = (got.narrow(0, r.start, r.len()).unwrap(), want.narrow(0, r.start, r.len()).unwrap());
                // The blend `x + lambda (q - x)` may round its f32 result once more or less than candle's
                // ops (a fused multiply-add), which moves a bf16 value by one unit in the last place where the
                // f32 value sits on a rounding boundary: about one value in 6,000 of a fresh draw. A wrong
                // ternary value or scale moves it by far more.
                let (e, m, far) = (rel_l2(&g, &w), mismatched(&g, &w), beyond_one_ulp(&g, &w));
                println!(
                    "step weights {r:?} matrix columns {columns:?} lambda={lambda}: rel L2 {e:.2e}, {m:.2e} of values \
                     differ, {far:.2e} by more than one bf16 unit"
                );
                assert!(far == 0.0 && m < 1e-3 && e < 1e-3, "rel L2 {e}, mismatched {m}, beyond one unit {far}");
            }
        }
    }

    /// The BitLinear forward by the int8 GEMM (lambda 1 on Hopper, from the norm's and the step weights' int8
    /// forms) against the bf16 GEMM of the same bf16 operands and against their exact product (f64), at the
    /// forward's four GEMMs of each family's shape, q, k and v stacked with a scale each. 200 rows: a
    /// partial tile of rows too.
    #[test]
    fn bitlinear_int8_forward_matches_bf16() {
        assert!(bessie::kernels::int8_gemm::available(&gpu()), "the GPU suite runs on Hopper");
        let n = 200;
        for name in FAMILY_SHAPES {
            for (what, k, rows) in bitlinear_gemms(name) {
                let (x, w) = (randn(&[n, k], DType::BF16), randn(&[k], DType::BF16));
                let (a, _, a8) = rmsnorm_quant_forward(&x, &w, 1e-6, 1.0, true).unwrap();
                let mut slots = Vec::new();
                for r in &rows {
                    let at = slots.last().map_or(0, |(s, _): &(std::ops::Range<usize>, _)| s.end);
                    slots.push((at..at + r * k, Some(k)));
                }
                let total = slots.last().unwrap().0.end;
                let latents = (randn(&[total], DType::F32) * 0.02).unwrap();
                let (weights, codes) = step_weights(&latents, &slots, 1.0, DType::BF16, true).unwrap();
                let weights = weights.reshape((total / k, k)).unwrap();
                let w8 = codes.unwrap().operand(0, 0..total, k).unwrap();
                let y8 = linear_forward(&a, &weights, Some((a8.as_ref().unwrap(), &w8)), None).unwrap();
                let y16 = linear_forward(&a, &weights, None, None).unwrap();
                let exact = a.to_dtype(DType::F64).unwrap().matmul(&weights.to_dtype(DType::F64).unwrap().t().unwrap());
                let exact = exact.unwrap();
                let (e, e8, e16) = (rel_l2(&y8, &y16), rel_l2(&y8, &exact), rel_l2(&y16, &exact));
                println!(
                    "{name} {what} ({k} -> {rows:?}): int8 against bf16 rel L2 {e:.2e}; against the exact product \
                     int8 {e8:.2e}, bf16 {e16:.2e}"
                );
                assert!(mismatched(&y8, &y16) > 0.0, "{name} {what}: the int8 GEMM did not run");
                assert!(e < 5e-3 && e8 < 5e-3, "{name} {what}: int8 rel L2 {e} to bf16, {e8} to the exact product");
            }
        }
    }

    /// ZeRO-1's step weights: each rank quantizes its shard with the matrices' absmeans summed over the
    /// shards, and the shards put together equal the step weights of the whole buffer.
    #[test]
    fn sharded_step_weights_match_the_whole() {
        use bessie::train::model::StepWeights;
        let dev = gpu();
        let layout = crate::common::mlp_layout(64, 300);
        let flat = (randn(&[layout.total], DType::F32) * 0.02).unwrap().to_device(&dev).unwrap();
        for lambda in [1.0, 0.3] {
            let whole = StepWeights::new(&layout, &flat, lambda, DType::BF16).unwrap();
            for world in [2, 3] {
                let split = crate::common::sharded_step_weights(&layout, &flat, world, lambda, DType::BF16);
                for i in 0..layout.slots.len() {
                    let (a, b) = (split.slot(&layout, i).unwrap(), whole.slot(&layout, i).unwrap());
                    let (e, m) = (rel_l2(&a, &b), mismatched(&a, &b));
                    println!("{world} shards, lambda {lambda}: rel L2 {e:.2e}, mismatched {m:.2e}");
                    assert!(m < 1e-4 && e < 1e-3, "{world} shards, lambda {lambda}: rel L2 {e}, mismatched {m}");
                }
            }
        }
    }

    #[test]
    fn grad_norm_and_adamw_match_reference() {
        let dev = gpu();
        let layout = crate::common::mlp_layout(64, 300);
        let g = randn(&[layout.total], DType::F32).to_device(&Device::Cpu).unwrap();
        let (want, got) = (grad_norm(&g, &layout).unwrap(), grad_norm(&g.to_device(&dev).unwrap(), &layout).unwrap());
        println!("grad norm {got} vs {want}");
        // The reference sums rows in f32 before f64: its own error is ~1e-7.
        assert!((got - want).abs() <= 1e-6 * want);
        // A view that starts and ends off the 16-byte grid: the kernel's scalar head and tail.
        let part = g.narrow(0, 1, layout.total - 4).unwrap();
        let want: f64 = values(&part).iter().map(|x| x * x).sum();
        let got =
            bessie::kernels::flat::sum_squares(&part.to_device(&dev).unwrap()).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() <= 1e-9 * want, "sum of squares {got} vs {want}");
        // A bf16 gradient buffer (train.grad_buffer) viewed off the 16-byte grid as well: its own kernel, the same
        // sum of its values (a head of 7 elements before the 8-element loads).
        let part = g.to_dtype(DType::BF16).unwrap().narrow(0, 1, layout.total - 4).unwrap();
        let want: f64 = values(&part).iter().map(|x| x * x).sum();
        let got =
            bessie::kernels::flat::sum_squares(&part.to_device(&dev).unwrap()).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() <= 1e-9 * want, "bf16 sum of squares {got} vs {want}");

        let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
        let p0 = randn(&[layout.total], DType::F32).to_device(&Device::Cpu).unwrap();
        let gs: Vec<Tensor> = (0..3).map(|k| (randn(&[layout.total], DType::F32) * (k + 1) as f64).unwrap()).collect();
        // The whole buffer, and a ZeRO-1 shard that starts off the 16-byte grid (the kernel's scalar path); f32
        // and bf16 gradients (train.grad_buffer).
        let cases = [DType::F32, DType::BF16].map(|d| [(d, 0..layout.total), (d, 3..layout.total - 5)]).concat();
        for (grad_dtype, shard) in cases {
            let replay = |device: &Device| {
                // A copy: on the CPU `to_device` shares the storage the update writes into.
                let p = p0.to_device(device).unwrap().copy().unwrap();
                let mut adam = AdamW::zeros(shard.clone(), OptimizerState::F32, device).unwrap();
                for g in &gs {
                    let g = g.to_dtype(grad_dtype).unwrap().to_device(device).unwrap();
                    adam.step(&p, &g, &layout, 1e-2, &h, 0.37).unwrap();
                }
                let sums = adam.take_abs_sums();
                let (m, v) = adam.moments.to_f32().unwrap();
                (p, m, v, sums)
            };
            let (pc, mc, vc, _) = replay(&Device::Cpu);
            let (pg, mg, vg, sums) = replay(&dev);
            let update = |p: &Tensor| (p.to_device(&Device::Cpu).unwrap() - &p0).unwrap();
            let (ep, em, ev) = (rel_l2(&update(&pg), &update(&pc)), rel_l2(&mg, &mc), rel_l2(&vg, &vc));
            println!("adamw {grad_dtype:?} gradients, {shard:?}: update rel L2 {ep:.2e}, m {em:.2e}, v {ev:.2e}");
            assert!(ep < 1e-5 && em < 1e-6 && ev < 1e-6);
            // The sums of |W| the kernel took as it wrote the new weights: those of the shard's part of each
            // BitLinear matrix (0 for the other slots), which the next step weights take.
            let want = bessie::train::model::shard_abs_sums(
                &layout,
                &pg.to_device(&Device::Cpu).unwrap(),
                shard.clone(),
                DType::F32,
            )
            .unwrap();
            let got = sums.expect("AdamW on a GPU leaves the sums of |W|").to_device(&Device::Cpu).unwrap();
            for (k, (g, w)) in values(&got).iter().zip(values(&want)).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "slot {k}: sum of |W| {g} vs {w}");
            }
        }
    }

    /// 8-bit moments: the fused kernel on a GPU against the candle-op update on the CPU: three steps land on
    /// the same weights and moments to f32 rounding of the update, and to an 8-bit code one step away where a
    /// value's log rounds differently (exp and log are not correctly rounded on either side).
    #[test]
    fn int8_adamw_matches_the_cpu() {
        let dev = gpu();
        let layout = ParamLayout::from_shapes(vec![
            ("model.layers.0.mlp.up_proj.weight".into(), vec![640, 1536]),
            ("model.layers.0.mlp.ffn_layernorm.weight".into(), vec![640]),
        ]);
        let h = AdamWHyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_norms_and_embeddings: false };
        let p0 = randn(&[layout.total], DType::F32).to_device(&Device::Cpu).unwrap();
        let gs: Vec<Tensor> = (0..3).map(|k| (randn(&[layout.total], DType::F32) * (k + 1) as f64).unwrap()).collect();
        // The whole buffer (a partial last block of moments), and with bf16 gradients a ZeRO-1 shard that starts
        // inside the matrix and ends inside the norm (the decay runs cut by the shard).
        for (grad_dtype, shard) in [(DType::F32, 0..layout.total), (DType::BF16, 1000..layout.total - 77)] {
            let replay = |device: &Device| {
                let p = p0.to_device(device).unwrap().copy().unwrap();
                let mut adam = AdamW::zeros(shard.clone(), OptimizerState::Int8, device).unwrap();
                for g in &gs {
                    let g = g.to_dtype(grad_dtype).unwrap().to_device(device).unwrap();
                    adam.step(&p, &g, &layout, 1e-2, &h, 0.37).unwrap();
                }
                let (m, v) = adam.moments.to_f32().unwrap();
                let cpu = |t: Tensor| t.to_device(&Device::Cpu).unwrap();
                ((cpu(p) - &p0).unwrap(), cpu(m), cpu(v))
            };
            let ((pg, mg, vg), (pc, mc, vc)) = (replay(&dev), replay(&Device::Cpu));
            let (ep, em, ev) = (rel_l2(&pg, &pc), rel_l2(&mg, &mc), rel_l2(&vg, &vc));
            println!("int8 adamw {grad_dtype:?} gradients, {shard:?}: update rel L2 {ep:.2e}, m {em:.2e}, v {ev:.2e} GPU vs CPU");
            assert!(ep < 1e-3 && em < 1e-2 && ev < 1e-2, "update {ep}, m {em}, v {ev}");
            // Outside the shard nothing moves.
            let moved = values(&pg).iter().enumerate().filter(|(i, d)| !shard.contains(i) && **d != 0.0).count();
            assert_eq!(moved, 0, "{moved} parameters outside the shard changed");
        }
    }

    /// Row 0: two packed examples then padding; row 1: one example.
    fn packed_windows(b: usize, t: usize) -> Windows {
        Windows::new(packed_starts(b, t), b, t, &gpu()).unwrap()
    }

    /// The window starts of [`packed_windows`].
    fn packed_starts(b: usize, t: usize) -> Vec<f32> {
        let segments: Vec<u32> = (0..b * t)
            .map(|i| match (i / t, i % t) {
                (0, p) if p < 3 * t / 7 => 1,
                (0, p) if p < 6 * t / 7 => 2,
                (0, _) => 0,
                _ => 1,
            })
            .collect();
        bessie::train::model::window_starts(&segments, t).unwrap()
    }

    #[test]
    fn attention_matches_reference() {
        // Head dims 64, 96, 128 and 256 take the tensor-core flash kernel, 100 (bitnet_b1_58-3B's) the blocked
        // softmax kernel between GEMMs; the reference is the blocked path in candle ops. Grouped-query heads
        // (K and V with fewer heads, read in place by the kernel), 2B4T's 20 on 5 among them. Rows of 70 keys
        // (not a multiple of 8 nor of the flash tiles: the kernels' scalar and edge paths) and of 300 (several
        // tiles); for the blocked path one block of all queries, and blocks whose key counts are multiples of
        // 8 and not.
        let cases = [
            (70, 70, (3, 3), 100),
            (70, 32, (4, 2), 100),
            (300, 128, (3, 3), 100),
            (70, 70, (3, 3), 64),
            (300, 300, (4, 2), 64),
            (300, 300, (3, 3), 96),
            (300, 300, (3, 3), 128),
            (300, 300, (20, 5), 128),
            (300, 300, (4, 1), 256),
            (70, 70, (2, 2), 256),
        ];
        for (t, block, (h, hkv), d) in cases {
            let b = 2;
            let windows = packed_windows(b, t);
            let (q, k, v, dy) = (
                randn(&[b, h, t, d], DType::BF16),
                randn(&[b, hkv, t, d], DType::BF16),
                randn(&[b, hkv, t, d], DType::BF16),
                randn(&[b, h, t, d], DType::BF16),
            );
            let (y_ref, s_ref) = flash_attention_forward_reference(&q, &k, &v, &windows, block).unwrap();
            let (y, s) = flash_attention_forward(&q, &k, &v, &windows, block).unwrap();
            let grads_ref = flash_attention_backward_reference(&dy, &s_ref, &windows, block).unwrap();
            let grads = flash_attention_backward(&dy, &s, &windows, block).unwrap();
            assert_eq!(grads.1.dims(), k.dims(), "dk in K's heads");
            let ey = rel_l2(&y, &y_ref);
            let (eq, ek, ev) =
                (rel_l2(&grads.0, &grads_ref.0), rel_l2(&grads.1, &grads_ref.1), rel_l2(&grads.2, &grads_ref.2));
            println!(
                "attention, {t} tokens, {h} heads on {hkv}, head dim {d}, query block {block}: y rel L2 {ey:.2e}, \
                 dq {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}"
            );
            assert!(ey < 1e-2 && eq < 2e-2 && ek < 2e-2 && ev < 1e-2);
            if d == 100 {
                continue;
            }
            // The flash kernels directly: their forward's output and log-sum-exp, both kernel sets (on Hopper the
            // forward above took the warpgroup kernel; the portable one is what other cards run), then the
            // backward. The log-sum-exps differ only in the order of f32 sums.
            use bessie::kernels::{flash_attention, shapes::FlashInputs, shapes::FlashKernels};
            let start = Tensor::from_vec(packed_starts(b, t), (b, t), &gpu()).unwrap();
            let forward =
                |kernels| flash_attention::try_forward(&q, &k, &v, &start, kernels).unwrap().expect("a kernel");
            let ((o_fast, lse_fast), (o, lse)) = (forward(FlashKernels::Fastest), forward(FlashKernels::Portable));
            let (ef, ep, el) = (rel_l2(&o_fast, &y_ref), rel_l2(&o, &y_ref), rel_l2(&lse_fast, &lse));
            println!("  forward kernels: fastest y {ef:.2e}, portable y {ep:.2e}; their log-sum-exps {el:.2e} apart");
            assert!(ef < 1e-2 && ep < 1e-2 && el < 1e-5);
            let x = FlashInputs { dy: &dy, q: &q, k: &k, v: &v, o: &o, lse: &lse, start: &start, delta: None };
            // Each row's delta as the attention sub-norm's backward gives it, which the kernels that hand dS over
            // read instead of computing them in a kernel of their own.
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let delta = (f32(&dy) * f32(&o)).unwrap().sum(3).unwrap();
            let given = FlashInputs { delta: Some(&delta), ..x };
            // On Hopper the backward above took the warpgroup kernels, with the dQ kernel reading the
            // dK/dV kernel's score gradients: the one recomputing them, and the portable kernels, which other cards
            // run, against the same reference.
            for (kernels, x, what) in [
                (FlashKernels::Fastest, &given, " (deltas given)"),
                (FlashKernels::HopperRecompute, &x, ""),
                (FlashKernels::Portable, &x, ""),
            ] {
                let (dq, dk, dv) = flash_attention::try_backward(x, kernels).unwrap().expect("the kernels");
                let (eq, ek, ev) = (rel_l2(&dq, &grads_ref.0), rel_l2(&dk, &grads_ref.1), rel_l2(&dv, &grads_ref.2));
                println!("  {kernels:?} kernels{what}: dq {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}");
                assert!(eq < 2e-2 && ek < 2e-2 && ev < 1e-2);
            }
            // The kernels writing the q/k/v projection's rows, dQ and dK turned back by RoPE (each token its own
            // angles), both kernel sets, against the reference's gradients through the reference turn.
            let shape = HeadShape { batch: b, seq: t, q_heads: h, kv_heads: hkv, head_dim: d };
            let angles = (randn(&[b, t, d / 2], DType::F32) * 3.0).unwrap();
            let cos = angles.cos().unwrap().to_dtype(DType::BF16).unwrap();
            let sin = angles.sin().unwrap().to_dtype(DType::BF16).unwrap();
            let want =
                qkv_heads_backward_reference(&grads_ref.0, &grads_ref.1, &grads_ref.2, shape, &cos, &sin).unwrap();
            for kernels in [FlashKernels::Fastest, FlashKernels::HopperRecompute, FlashKernels::Portable] {
                let got =
                    flash_attention::try_backward_rows(&x, (&cos, &sin), kernels).unwrap().expect("the flash kernel");
                let part = |x: &Tensor, from: usize, heads: usize| x.narrow(1, from * d, heads * d).unwrap();
                let (eq, ek, ev) = (
                    rel_l2(&part(&got, 0, h), &part(&want, 0, h)),
                    rel_l2(&part(&got, h, hkv), &part(&want, h, hkv)),
                    rel_l2(&part(&got, h + hkv, hkv), &part(&want, h + hkv, hkv)),
                );
                println!("  {kernels:?} kernels into the q/k/v rows: dq {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}");
                assert!(eq < 2e-2 && ek < 2e-2 && ev < 1e-2);
            }
        }
    }

    /// Flash attention's forward and backward at BitNet 2B4T's shape (batch 4, 2048 tokens, 20 query heads on
    /// 5 key/value heads of 128): grouped-query heads read in place, against the path before them (K and V
    /// repeated to 20 heads, dK and dV summed over each group after the kernel), which must give the same
    /// gradients. Prints the time of each (wall clock over 20 iterations after a warm-up, synchronized).
    #[test]
    #[ignore = "a timing; run with --ignored"]
    fn flash_attention_gqa_timing() {
        use bessie::ops::repeat_kv;
        let (b, t, h, hkv, d) = (4, 2048, 20, 5, 128);
        let groups = h / hkv;
        let windows = packed_windows(b, t);
        let (q, k, v, dy) = (
            randn(&[b, h, t, d], DType::BF16),
            randn(&[b, hkv, t, d], DType::BF16),
            randn(&[b, hkv, t, d], DType::BF16),
            randn(&[b, h, t, d], DType::BF16),
        );
        let native = || {
            let (_, s) = flash_attention_forward(&q, &k, &v, &windows, t).unwrap();
            flash_attention_backward(&dy, &s, &windows, t).unwrap()
        };
        let expanded = || {
            let (ke, ve) = (repeat_kv(&k, groups).unwrap(), repeat_kv(&v, groups).unwrap());
            let (_, s) = flash_attention_forward(&q, &ke, &ve, &windows, t).unwrap();
            let (dq, dk, dv) = flash_attention_backward(&dy, &s, &windows, t).unwrap();
            let sum = |g: Tensor| g.reshape((b, hkv, groups, t, d)).unwrap().sum(2).unwrap();
            (dq, sum(dk), sum(dv))
        };
        let (a, e) = (native(), expanded());
        let (eq, ek, ev) = (rel_l2(&a.0, &e.0), rel_l2(&a.1, &e.1), rel_l2(&a.2, &e.2));
        println!("GQA native vs expanded: dq rel L2 {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}");
        // The same dQ bits; dK and dV summed in f32 before one rounding rather than rounded per head.
        assert!(eq == 0.0 && ek < 1e-2 && ev < 1e-2);
        let (tn, te) = (mean_us(&|| drop(native())) / 1e3, mean_us(&|| drop(expanded())) / 1e3);
        println!(
            "flash attention fwd+bwd at 4 x 2048, 20 heads on 5, dim 128: native GQA {tn:.3} ms, expanded {te:.3} ms"
        );
    }

    /// Flash attention's forward and backward at the training shapes of the families (one causal example a
    /// row, as `--bench` trains): milliseconds and TFLOP/s of each (causal FLOPs: 2 t^2 d a head forward, 2.5
    /// times that backward, as FlashAttention counts them), and a hash of the gradients' bits from seeded
    /// inputs, so two builds' kernels can be compared bit for bit.
    #[test]
    #[ignore = "a timing; run with --ignored"]
    fn flash_attention_timing() {
        let shapes = [
            ("bitnet_b1_58-large 768 x 8", 8, 768, 16, 16, 96),
            ("bitnet_b1_58-large 2048 x 4", 4, 2048, 16, 16, 96),
            ("2B4T 2048 x 4", 4, 2048, 20, 5, 128),
            ("Falcon3-1B 2048 x 4", 4, 2048, 8, 4, 256),
        ];
        for (name, b, t, h, hkv, d) in shapes {
            let mut rng = bessie::rng::Rng::new(7);
            let mut seeded = |dims: &[usize]| {
                let n = dims.iter().product::<usize>();
                let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                Tensor::from_vec(x, dims, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(&gpu())
                    .unwrap()
            };
            let (q, k, v, dy) =
                (seeded(&[b, h, t, d]), seeded(&[b, hkv, t, d]), seeded(&[b, hkv, t, d]), seeded(&[b, h, t, d]));
            let windows = Windows::new(vec![0.0; b * t], b, t, &gpu()).unwrap();
            let (_, s) = flash_attention_forward(&q, &k, &v, &windows, t).unwrap();
            let (dq, dk, dv) = flash_attention_backward(&dy, &s, &windows, t).unwrap();
            // bf16 values as f64 have 45 zero low bits: the rotation carries every bit to the whole hash.
            let hash = [&dq, &dk, &dv]
                .iter()
                .flat_map(|g| values(g))
                .fold(0u64, |acc, x| (acc.rotate_left(29) ^ x.to_bits()).wrapping_mul(0x100000001b3));
            let forward_us = mean_us(&|| drop(flash_attention_forward(&q, &k, &v, &windows, t).unwrap()));
            let backward_us = mean_us(&|| drop(flash_attention_backward(&dy, &s, &windows, t).unwrap()));
            let flops = 2.0 * (b * h * t * t * d) as f64;
            println!(
                "\nflash {name}: forward {:.3} ms ({:.0} TFLOP/s), backward {:.3} ms ({:.0} TFLOP/s), gradients' bits \
                 {hash:016x}",
                forward_us / 1e3,
                flops / forward_us / 1e6,
                backward_us / 1e3,
                2.5 * flops / backward_us / 1e6
            );
            // The other kernels (on Hopper training takes the warpgroup kernels, with the score gradients handed
            // over).
            use bessie::kernels::{flash_attention, shapes::FlashInputs, shapes::FlashKernels};
            let start = Tensor::zeros((b, t), DType::F32, &gpu()).unwrap();
            let forward = || flash_attention::try_forward(&q, &k, &v, &start, FlashKernels::Portable);
            let (o, lse) = forward().unwrap().expect("the flash kernel");
            let portable_forward_us = mean_us(&|| drop(forward().unwrap()));
            let x = FlashInputs { dy: &dy, q: &q, k: &k, v: &v, o: &o, lse: &lse, start: &start, delta: None };
            let backward_us = |kernels| mean_us(&|| drop(flash_attention::try_backward(&x, kernels).unwrap()));
            let (recompute_us, portable_us) =
                (backward_us(FlashKernels::HopperRecompute), backward_us(FlashKernels::Portable));
            println!(
                "flash {name}: Hopper's with dQ recomputing the scores: backward {:.3} ms; the portable kernels: \
                 forward {:.3} ms, backward {:.3} ms",
                recompute_us / 1e3,
                portable_forward_us / 1e3,
                portable_us / 1e3
            );
        }
    }

    #[test]
    fn accumulate_matches_reference() {
        let layout =
            ParamLayout::from_shapes(vec![("a.weight".into(), vec![300, 70]), ("b_ln.weight".into(), vec![70])]);
        let flat = randn(&[layout.total], DType::F32);
        let (ga, gb) = (randn(&[300, 70], DType::BF16), randn(&[70], DType::F32));
        let run = |reference: bool| {
            let f = flat.copy().unwrap();
            for (g, slot) in [(&ga, 0..=0), (&gb, 1..=1)] {
                let g = WeightGrad::Tensor(g.clone());
                match reference {
                    true => g.add_to_reference(&f, layout.span(slot), Mode::Add).unwrap(),
                    false => g.add_to(&f, layout.span(slot), Mode::Add).unwrap(),
                }
            }
            f
        };
        let (want, got) = (run(true), run(false));
        assert_eq!(values(&got), values(&want), "f32 additions of the same values must agree exactly");
        assert_ne!(values(&got), values(&flat));
    }

    #[test]
    fn weight_gradient_gemm_matches_reference() {
        // dW = dy^T x added into a slot of the f32 buffer; odd sizes so no dimension is a multiple of 8.
        let (n, out, inp, offset) = (77, 45, 93, 5);
        let flat = randn(&[offset + out * inp + 3], DType::F32);
        let (dy, x) = (randn(&[n, out], DType::BF16), randn(&[n, inp], DType::BF16));
        let run = |reference: bool| {
            let f = flat.copy().unwrap();
            let g = WeightGrad::Product { dy: dy.clone(), x: x.clone() };
            match reference {
                true => g.add_to_reference(&f, offset..offset + out * inp, Mode::Add).unwrap(),
                false => g.add_to(&f, offset..offset + out * inp, Mode::Add).unwrap(),
            }
            f
        };
        let (want, got) = (run(true), run(false));
        let e = rel_l2(&(&got - &flat).unwrap(), &(&want - &flat).unwrap());
        println!("weight gradient GEMM: rel L2 {e:.2e} (the reference rounds dW to bf16, the GEMM adds f32)");
        assert!(e < 1e-2, "rel L2 {e}");
        let (g, w) = (values(&got), values(&want));
        assert_eq!(g[..offset], w[..offset], "wrote before the slot");
        assert_eq!(g[offset + out * inp..], w[offset + out * inp..], "wrote past the slot");
    }

    #[test]
    fn gemm_matches_reference() {
        // c (+)= op(a) op(b) for every pair of transposes, into the first columns of wider rows (as the head's
        // logits), m, n and k each off the multiples of 8 (each is then two products); fresh inputs each case.
        use bessie::kernels::gemm::{try_gemm, Gemm};
        let (m, n, k, width) = (37, 1003, 131, 1010);
        for (a_t, b_t, add) in [(false, false, false), (false, true, true), (true, false, true), (true, true, false)] {
            let a = randn(&if a_t { [k, m] } else { [m, k] }, DType::BF16);
            let b = randn(&if b_t { [n, k] } else { [k, n] }, DType::BF16);
            let wide = randn(&[m, width], DType::F32);
            let got = wide.copy().unwrap();
            let g = Gemm { a: &a, a_t, b: &b, b_t, add };
            try_gemm(&got.narrow(1, 0, n).unwrap(), g).unwrap().expect("the GEMM applies to bf16 on CUDA");
            let operand = |x: &Tensor, t: bool| {
                let x = x.to_dtype(DType::F32).unwrap();
                if t {
                    x.t().unwrap()
                } else {
                    x
                }
            };
            let product = operand(&a, a_t).matmul(&operand(&b, b_t)).unwrap();
            let base = wide.narrow(1, 0, n).unwrap();
            let want = if add { (&base + &product).unwrap() } else { product };
            let e = rel_l2(&got.narrow(1, 0, n).unwrap(), &want);
            println!("gemm a_t {a_t} b_t {b_t} add {add}: rel L2 {e:.2e}");
            assert!(e < 1e-4, "a_t {a_t} b_t {b_t} add {add}: rel L2 {e}");
            let rest = |t: &Tensor| values(&t.narrow(1, n, width - n).unwrap());
            assert_eq!(rest(&got), rest(&wide), "a_t {a_t} b_t {b_t}: wrote past the view's columns");
        }
    }

    #[test]
    fn head_products_match_reference() {
        // The loss's logits in padded rows and the input gradient into its chunk of rows, at a vocabulary off
        // the multiples of 8, against the bf16 matmuls they replace.
        let (n, c, vocab, first) = (45, 96, 32002, 7);
        let (h, w) = (randn(&[n, c], DType::BF16), randn(&[vocab, c], DType::BF16));
        let logits = head_logits(&h, &w).unwrap();
        assert_eq!(logits.dims(), [n, 32008], "rows padded to a multiple of 8");
        let want = h.matmul(&w.t().unwrap()).unwrap();
        let e = rel_l2(&logits.narrow(1, 0, vocab).unwrap(), &want);
        println!("head logits: rel L2 {e:.2e}");
        assert!(e < 1e-2, "logits: rel L2 {e}");
        let dlogits = randn(&[n, 32008], DType::BF16).narrow(1, 0, vocab).unwrap();
        let dx = Tensor::full(f32::NAN, (first + n + 3, c), &gpu()).unwrap().to_dtype(DType::BF16).unwrap();
        head_input_grad(&dlogits, &w, &dx, first).unwrap();
        let want = dlogits.contiguous().unwrap().matmul(&w).unwrap();
        let e = rel_l2(&dx.narrow(0, first, n).unwrap(), &want);
        println!("head input gradient: rel L2 {e:.2e}");
        assert!(e < 1e-2, "input gradient: rel L2 {e}");
        let outside = [values(&dx.narrow(0, 0, first).unwrap()), values(&dx.narrow(0, first + n, 3).unwrap())];
        assert!(outside.iter().flatten().all(|v| v.is_nan()), "wrote outside the chunk's rows");
    }

    #[test]
    fn embedding_rows_match_index_select() {
        let (vocab, c) = (1001, 264);
        let table = randn(&[vocab, c], DType::BF16);
        let ids: Vec<u32> =
            (0..777u32).map(|i| (i * 613 + 5) % vocab as u32).chain([0, vocab as u32 - 1, 3, 3]).collect();
        let ids = Tensor::new(ids.as_slice(), &gpu()).unwrap();
        let got = embedding_forward(&table, &ids).unwrap();
        assert_eq!(values(&got), values(&table.index_select(&ids, 0).unwrap()), "the gathered rows differ");
    }

    #[test]
    fn overwrite_then_add_matches_reference() {
        // Each kind of weight gradient written into a buffer of NaN (the step's buffer is uninitialized), then
        // added: the first write must not read the buffer, and the embedding's rows of absent ids must be 0.
        let (n, c, vocab) = (37, 24, 50);
        let dev = gpu();
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 13).collect();
        let (dy, x, p) = (randn(&[n, c], DType::BF16), randn(&[n, c], DType::BF16), randn(&[n, c], DType::F32));
        let grads = [
            (c * c, WeightGrad::Tensor(x.reshape((c * n,)).unwrap().narrow(0, 0, c * c).unwrap())),
            (c * c, WeightGrad::Product { dy: dy.clone(), x: x.clone() }),
            (c, WeightGrad::RowSums(p)),
            (
                vocab * c,
                WeightGrad::Scatter {
                    dx: dy.clone(),
                    ids: Tensor::new(ids.as_slice(), &dev).unwrap(),
                    rows: TokenRows::new(&ids, &dev).unwrap(),
                },
            ),
        ];
        let run = |len: usize, g: &WeightGrad, reference: bool| {
            let f = Tensor::full(f32::NAN, len, &dev).unwrap();
            for mode in [Mode::Overwrite, Mode::Add] {
                match reference {
                    true => g.add_to_reference(&f, 0..len, mode).unwrap(),
                    false => g.add_to(&f, 0..len, mode).unwrap(),
                }
            }
            f
        };
        for (k, (len, g)) in grads.iter().enumerate() {
            let (got, want) = (run(*len, g, false), run(*len, g, true));
            assert!(values(&got).iter().all(|v| v.is_finite()), "gradient kind {k}: the first write read the buffer");
            let e = rel_l2(&got, &want);
            println!("gradient kind {k}, overwritten then added: rel L2 {e:.2e}");
            assert!(e < 1e-2, "gradient kind {k}: rel L2 {e}");
        }
    }

    #[test]
    fn norm_gradients_together_match_one_by_one() {
        // Six norms' row sums of different widths (more than one launch takes), overwriting and adding, into
        // one f32 and one bf16 buffer of NaN, between gradients of the other kinds: each slot as its reference
        // writes it, nothing outside the slots.
        let dev = gpu();
        let widths = [1536, 24, 4096, 40, 8, 1000];
        let rows = [264, 7, 264, 33, 1, 50];
        let partials: Vec<Tensor> = widths.iter().zip(rows).map(|(&c, r)| randn(&[r, c], DType::F32)).collect();
        let sums: Vec<WeightGrad> = partials.iter().map(|p| WeightGrad::RowSums(p.clone())).collect();
        let other = WeightGrad::Tensor(randn(&[64], DType::F32));
        let (mut at, mut items) = (3, Vec::new());
        for (k, (g, &c)) in sums.iter().zip(&widths).enumerate() {
            let mode = if k % 2 == 0 { Mode::Overwrite } else { Mode::Add };
            items.push((g, at..at + c, mode));
            at += c + 5;
            if k == 2 {
                items.push((&other, at..at + 64, Mode::Overwrite));
                at += 64;
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            // Slots that add start from 1s, as an earlier gradient left them; the rest from NaN.
            let fresh = || {
                let f = Tensor::full(f32::NAN, at + 3, &dev).unwrap().to_dtype(dtype).unwrap();
                for (_, r, mode) in &items {
                    if *mode == Mode::Add {
                        f.slice_set(&Tensor::ones(r.len(), dtype, &dev).unwrap(), 0, r.start).unwrap();
                    }
                }
                f
            };
            let (got, want) = (fresh(), fresh());
            WeightGrad::add_all_to(&got, &items).unwrap();
            for (g, r, mode) in &items {
                g.add_to_reference(&want, r.clone(), *mode).unwrap();
            }
            for (k, (_, r, _)) in items.iter().enumerate() {
                let (g, w) = (got.narrow(0, r.start, r.len()).unwrap(), want.narrow(0, r.start, r.len()).unwrap());
                let e = rel_l2(&g, &w);
                assert!(e < 1e-5 || (dtype == DType::BF16 && e < 1e-2), "{dtype:?} gradient {k}: rel L2 {e}");
            }
            let (gv, wv) = (values(&got), values(&want));
            let inside = |i: usize| items.iter().any(|(_, r, _)| r.contains(&i));
            assert!((0..gv.len()).all(|i| inside(i) || (gv[i].is_nan() && wv[i].is_nan())), "wrote outside a slot");
            assert!((0..gv.len()).all(|i| !inside(i) || gv[i].is_finite()), "{dtype:?}: a slot read NaN");
        }
    }
}

/// A whole training step on the GPU (bf16, every fused kernel, the int8 forward GEMM on Hopper) against the
/// CPU's f32 step: same small model (widths the int8 GEMM takes: multiples of 128), same packed batch. bf16
/// activations move some int8 and ternary codes by one, so the agreement is statistical: the loss within 1%
/// and the flat gradient within a few percent (relative L2).
#[test]
fn training_step_matches_cpu_f32() {
    use bessie::data::{make_batch, DataStats, Dataset, Example, Row};
    use bessie::model::init::random_weights;
    use bessie::train::grads::Gradients;
    use bessie::train::model::{backward, forward, BatchTensors, MemoryPlan, RopeTables, StepWeights};
    use bessie::train::params::ParamLayout;
    use candle_core::DType;

    let mut c = bessie::config::ModelConfig::shape("tiny", 97).unwrap();
    (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) = (128, 256, 2, Some(1));
    let layout = ParamLayout::new(&c);
    let flat = layout.flatten(&random_weights(&c, 3).unwrap().into_iter().map(|(_, t)| t).collect::<Vec<_>>()).unwrap();
    let ex = |len: usize, loss_start: usize, k: u32| {
        Example::from_loss_start((0..len as u32).map(|i| (i * 31 + k) % 97).collect(), loss_start)
    };
    let ds = Dataset { examples: vec![ex(40, 5, 1), ex(23, 3, 2), ex(50, 10, 3)], stats: DataStats::default() };
    let b = make_batch(&ds, &[Row { examples: vec![0, 1] }, Row { examples: vec![2] }], 0);
    use bessie::config::run::{Recompute, StepWeightsPlan};
    let kept = MemoryPlan {
        recompute: Recompute::None,
        attention_block: 1024,
        loss_chunk: 1024,
        step_weights: StepWeightsPlan::Kept,
    };
    // `int8`: the step weights with their ternary codes where the card runs the int8 GEMM (as training
    // builds them), or without (every forward GEMM in bf16).
    let step = |dev: &Device, dtype: DType, plan: MemoryPlan, buffer: DType, int8: bool| -> (f64, Vec<f32>) {
        let flat = flat.to_device(dev).unwrap();
        let w = match plan.step_weights {
            StepWeightsPlan::Kept if int8 => StepWeights::new(&layout, &flat, 1.0, dtype).unwrap(),
            StepWeightsPlan::Kept => {
                let slots: Vec<_> = layout
                    .slots
                    .iter()
                    .map(|s| (s.offset..s.offset + s.len, bessie::model::is_bitlinear(&s.name).then(|| s.shape[1])))
                    .collect();
                let weights = bessie::train::layers::step_weights(&flat, &slots, 1.0, dtype, false).unwrap().0;
                StepWeights::from_flat(weights, None).unwrap()
            }
            StepWeightsPlan::PerBlock => {
                let sums = bessie::train::model::shard_abs_sums(&layout, &flat, 0..layout.total, dtype).unwrap();
                StepWeights::per_block(&layout, &flat, sums, 1.0, dtype).unwrap()
            }
        };
        let rope = RopeTables::new(&c, b.seq, dev).unwrap();
        let bt = BatchTensors::new(&b, &rope, dtype, dev).unwrap();
        // Uninitialized on the GPU, as the step's: every slot's first gradient overwrites it.
        let grads = Gradients::new(&layout, dev, buffer).unwrap();
        let (loss, saved) = forward(&c, &layout, &w, &bt, 1.0, plan, &grads).unwrap();
        backward(&c, &layout, &w, &bt, plan, saved, &grads, &mut |_| Ok(())).unwrap();
        grads.settle(&layout, 0..layout.total).unwrap();
        let g = grads.tensor().to_dtype(DType::F32).unwrap();
        (loss.to_scalar::<f64>().unwrap(), g.to_device(&Device::Cpu).unwrap().to_vec1().unwrap())
    };
    let (loss_ref, g_ref) = step(&Device::Cpu, DType::F32, kept, DType::F32, true);
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let (loss, g) = step(&gpu, DType::BF16, kept, DType::F32, true);
    let rel = |g: &[f32], g_ref: &[f32]| {
        let num: f64 = g.iter().zip(g_ref).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        (num / g_ref.iter().map(|b| (*b as f64).powi(2)).sum::<f64>()).sqrt()
    };
    let (el, eg) = ((loss - loss_ref).abs() / loss_ref, rel(&g, &g_ref));
    println!("training step: loss {loss:.4} vs {loss_ref:.4} (rel {el:.2e}), gradient rel L2 {eg:.2e}");
    assert!(el < 1e-2 && eg < 5e-2, "loss rel {el}, gradient rel L2 {eg}");
    // Per-block weights are the same bf16 weights in smaller buffers: only cuBLAS's choice of kernel for
    // another alignment may round differently.
    let per_block = MemoryPlan { step_weights: StepWeightsPlan::PerBlock, ..kept };
    let (loss_pb, g_pb) = step(&gpu, DType::BF16, per_block, DType::F32, true);
    let (el, eg) = ((loss_pb - loss).abs() / loss, rel(&g_pb, &g));
    println!("per-block step weights: loss {loss_pb:.6} vs {loss:.6} (rel {el:.2e}), gradient rel L2 {eg:.2e}");
    assert!(el < 1e-4 && eg < 1e-3, "per block: loss rel {el}, gradient rel L2 {eg}");
    // A bf16 gradient buffer: every GEMM, norm, embedding and addition kernel writing into it; each element
    // rounded to bf16 once per addition (2^-9 relative), against the f32 buffer on the same card.
    let (loss_b, g_b) = step(&gpu, DType::BF16, kept, DType::BF16, true);
    let eg = rel(&g_b, &g);
    println!("bf16 gradient buffer: gradient rel L2 {eg:.2e} against the f32 buffer");
    assert!(loss_b == loss && eg < 5e-3, "bf16 buffer: loss {loss_b} vs {loss}, gradient rel L2 {eg}");
    // The int8 forward GEMM (Hopper) against every forward GEMM in bf16 on the same card: exact integer sums
    // scaled once against f32 sums of bf16-rounded products, so the steps differ by roundings only.
    assert!(bessie::kernels::int8_gemm::available(&gpu), "the GPU suite runs on Hopper");
    // Both steps differ from the f32 one by activation codes moved by one, about as much as from each other,
    // so the oracle is the f32 step: the int8 forward must be about as close to it as the bf16 one (a factor
    // 1.5 for which codes happen to move; a wrong scale or layout lands near 1).
    let (loss_16, g_16) = step(&gpu, DType::BF16, kept, DType::F32, false);
    let (el, eg) = ((loss - loss_16).abs() / loss_16, rel(&g, &g_16));
    let (eg_int8, eg_16) = (rel(&g, &g_ref), rel(&g_16, &g_ref));
    println!(
        "int8 forward GEMMs: loss {loss:.6} vs {loss_16:.6} in bf16 (rel {el:.2e}), gradient rel L2 {eg:.2e}; \
         against the CPU's f32 gradient int8 {eg_int8:.2e}, bf16 {eg_16:.2e}"
    );
    assert!(g != g_16, "the int8 forward changed nothing: it did not run");
    assert!(
        el < 1e-3 && eg_int8 < 1.5 * eg_16,
        "int8 forward: loss rel {el}, gradient rel L2 {eg_int8} vs bf16's {eg_16}"
    );
    // Recomputing attention redoes q, k and v from the saved input's int8 form: the same gradients.
    let attention = MemoryPlan { recompute: Recompute::Attention, ..kept };
    let (loss_ra, g_ra) = step(&gpu, DType::BF16, attention, DType::F32, true);
    let eg = rel(&g_ra, &g);
    println!("recompute = attention with the int8 forward: loss {loss_ra:.6} vs {loss:.6}, gradient rel L2 {eg:.2e}");
    assert!(loss_ra == loss && eg < 1e-6, "recompute attention: loss {loss_ra} vs {loss}, gradient rel L2 {eg}");
}
