//! transformers' packed `bitnet` checkpoints: Bessie reads them as latent weights that quantize back to the
//! stored values and scales (`model::hf`), `bessie-export -f hf-bitnet` writes them, and transformers itself
//! (tests/reference/hf_logits.py: `from_pretrained`, no remote code) computes the logits and greedy tokens
//! Bessie computes, for the latent checkpoint and for its export. Needs python3 with torch, transformers
//! and accelerate: without them these tests fail (.ci/run installs them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bessie::config::model::{Quantization, WeightScale};
use bessie::config::ModelConfig;
use bessie::export::{export, DenseDtype, Format, Options};
use bessie::model::bitnet_packed::unpack;
use bessie::model::hf::{self, Layout};
use bessie::model::init::{write_random_checkpoint, TokenizerSource};
use bessie::model::{is_bitlinear, BitNet, KvCache};
use bessie::ops::quantize_weight;
use candle_core::{DType, Device, Tensor};

const IDS: [u32; 12] = [1, 5, 99, 250, 7, 7, 7, 300, 12, 611, 42, 900];
const STEPS: usize = 32;

fn random_checkpoint(dir: &Path, shape: &str, seed: u64) -> ModelConfig {
    write_random_checkpoint(dir, shape, TokenizerSource::Shipped, None, seed, DType::F32, Layout::Safetensors).unwrap()
}

fn load(dir: &Path) -> BitNet {
    bessie::model::load(dir, &Device::Cpu).unwrap()
}

fn forward(model: &BitNet, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let h = model.forward(&x, &mut KvCache::new(&model.cfg)).unwrap();
    model.logits(&h.squeeze(0).unwrap()).unwrap().to_vec2().unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

/// Bessie's logits of every position of IDS and STEPS greedy tokens (argmax, no stopping), as the script
/// computes them.
fn bessie(dir: &Path) -> (Vec<Vec<f32>>, Vec<u32>) {
    let model = load(dir);
    let logits = forward(&model, &IDS);
    let mut seq = IDS.to_vec();
    for _ in 0..STEPS {
        let next = argmax(forward(&model, &seq).last().unwrap());
        seq.push(next);
    }
    (logits, seq[IDS.len()..].to_vec())
}

struct Hf {
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    q_proj: String,
    architecture: String,
}

/// transformers' logits and greedy tokens of each of `dirs` (one Python process). Fails, with the script's
/// error, when python3, torch, transformers or accelerate is missing.
fn transformers(dirs: &[&Path]) -> Vec<Hf> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_logits.py");
    let ids = serde_json::to_string(&IDS).unwrap();
    let run = Command::new("python3")
        .arg(script)
        .args([ids, STEPS.to_string()])
        .args(dirs)
        .output()
        .expect("running python3 (needed with torch, transformers and accelerate: .ci/run installs them)");
    assert!(
        run.status.success(),
        "hf_logits.py failed (it needs python3 with torch, transformers and accelerate):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    dirs.iter()
        .map(|d| {
            let m = &out["models"][d.to_str().unwrap()];
            Hf {
                logits: serde_json::from_value(m["logits"].clone()).unwrap(),
                greedy: serde_json::from_value(m["greedy"].clone()).unwrap(),
                q_proj: m["q_proj"].as_str().unwrap().into(),
                architecture: m["architecture"].as_str().unwrap().into(),
            }
        })
        .collect()
}

/// The largest difference of two logit matrices, relative to the largest |logit| of the first.
fn relative_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!((a.len(), a[0].len()), (b.len(), b[0].len()));
    let scale = a.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// For each family transformers has a class for: (a) Bessie's logits of a latent checkpoint equal
/// transformers' (online quantization), (b) after `-f hf-bitnet`, transformers' logits of the packed export
/// equal Bessie's of the same export loaded back and the latent model's, (c) so do 32 greedy tokens.
#[test]
fn transformers_computes_what_bessie_computes() {
    for (shape, architecture, linear) in
        [("tiny-bitnet", "BitNetForCausalLM", "AutoBitLinear"), ("tiny-llama-bitnet", "LlamaForCausalLM", "BitLinear")]
    {
        let dir = tempfile::tempdir().unwrap();
        let latent = dir.path().join("latent");
        random_checkpoint(&latent, shape, 7);
        let (f32_export, bf16_export) = (dir.path().join("f32"), dir.path().join("bf16"));
        export(&latent, &f32_export, &Options { dense: DenseDtype::F32, ..Options::new(Format::HfBitnet) }).unwrap();
        export(&latent, &bf16_export, &Options::new(Format::HfBitnet)).unwrap();
        let hf = transformers(&[&latent, &f32_export, &bf16_export]);
        let ours: Vec<_> = [&latent, &f32_export, &bf16_export].map(|d| bessie(d)).into();

        assert_eq!(hf[0].q_proj, "AutoBitLinear", "{shape}: the latent checkpoint quantizes online");
        for h in &hf {
            assert_eq!(h.architecture, architecture, "{shape}");
        }
        assert_eq!((hf[1].q_proj.as_str(), hf[2].q_proj.as_str()), (linear, linear), "{shape}");
        let diffs: Vec<f32> = (0..3).map(|i| relative_diff(&hf[i].logits, &ours[i].0)).collect();
        let export_vs_latent = [1, 2].map(|i| relative_diff(&ours[0].0, &hf[i].logits));
        println!(
            "{shape}: max |transformers - Bessie| / max |logit|: latent {:.1e}, f32 export {:.1e}, bf16 export {:.1e}; \
             transformers of the export vs the latent model: f32 {:.1e}, bf16 {:.1e}",
            diffs[0], diffs[1], diffs[2], export_vs_latent[0], export_vs_latent[1]
        );
        for (i, what) in ["latent", "f32 export", "bf16 export"].iter().enumerate() {
            assert!(diffs[i] < 1e-4, "{shape} {what}: transformers and Bessie differ by {:e}", diffs[i]);
            assert_eq!(hf[i].greedy, ours[i].1, "{shape} {what}: greedy tokens");
        }
        // The f32 export holds the latent model's ternary values and f32 scales: only float order differs.
        assert!(export_vs_latent[0] < 1e-4, "{shape}: {}", export_vs_latent[0]);
        assert_eq!(hf[1].greedy, ours[0].1, "{shape}: the f32 export's greedy tokens are the latent model's");
        // bf16 rounds the embedding, norms and scales (relative 2^-9).
        assert!(export_vs_latent[1] < 2e-2, "{shape}: {}", export_vs_latent[1]);
    }
}

/// What the export writes: transformers' class and quantization_config, U8 codes `[out/4, in]` of exactly
/// `quantize_weight`'s values, the absmean or its reciprocal as `weight_scale`, the tokenizer and chat
/// template; loading it back gives Bessie's quantizer the same values and scale.
#[test]
fn export_layout_and_load_back() {
    for (shape, linear_class, kind) in [
        ("tiny-bitnet", "autobitlinear", WeightScale::Absmean),
        ("tiny-llama-bitnet", "bitlinear", WeightScale::Reciprocal),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (latent, out) = (dir.path().join("latent"), dir.path().join("out"));
        let cfg = random_checkpoint(&latent, shape, 3);
        std::fs::write(latent.join("chat_template.jinja"), "{{ messages }}").unwrap();
        export(&latent, &out, &Options { dense: DenseDtype::F32, ..Options::new(Format::HfBitnet) }).unwrap();

        let json = config_json(&out);
        assert_eq!(
            json["quantization_config"],
            serde_json::json!({"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"})
        );
        assert_eq!(json["torch_dtype"], "float32");
        let saved = ModelConfig::from_file(&out.join("config.json")).unwrap();
        assert_eq!(saved.quantization().unwrap(), Quantization::Bitnet { scale: kind });
        assert_eq!(saved.family().unwrap(), cfg.family().unwrap());
        for f in ["tokenizer.model", "tokenizer_config.json", "chat_template.jinja"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(latent.join(f)).unwrap(), "{f}");
        }

        let source = read_safetensors(&latent.join("model.safetensors"));
        let stored = read_safetensors(&out.join("model.safetensors"));
        let (_, vb) = hf::open(&out, DType::F32, &Device::Cpu).unwrap();
        let (mut projections, mut exact) = (0, 0);
        for (name, shape) in cfg.parameter_shapes() {
            if !is_bitlinear(&name) {
                assert_eq!(stored[&name].to_vec1::<f32>().ok(), source[&name].to_vec1::<f32>().ok(), "{name}");
                continue;
            }
            projections += 1;
            let (out_dim, in_dim) = (shape[0], shape[1]);
            let (ternary, scale) = quantize_weight(&source[&name]).unwrap();
            let (ternary, scale) =
                (ternary.flatten_all().unwrap().to_vec1::<f32>().unwrap(), scale.to_scalar::<f32>().unwrap());
            let codes = &stored[&name];
            assert_eq!((codes.dtype(), codes.dims()), (DType::U8, &[out_dim / 4, in_dim][..]), "{name}");
            let values = unpack(&codes.flatten_all().unwrap().to_vec1().unwrap(), out_dim, in_dim).unwrap();
            assert!(values.iter().zip(&ternary).all(|(&v, &t)| f32::from(v) == t), "{name}");
            let weight_scale = stored[&format!("{name}_scale")].to_vec1::<f32>().unwrap();
            let expected = match kind {
                WeightScale::Absmean => scale,
                WeightScale::Reciprocal => (1.0 / f64::from(scale)) as f32,
            };
            assert_eq!(weight_scale, [expected], "{name}");
            // Read back as latent weights, which Bessie's quantizer turns into the same values and scale.
            let (again, again_scale) = quantize_weight(&vb.get(shape.as_slice(), &name).unwrap()).unwrap();
            assert_eq!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), ternary, "{name}");
            // ... the stored absmean (or the reciprocal of the stored 1 / absmean), to the bit as a rule.
            let absmean = match kind {
                WeightScale::Absmean => weight_scale[0],
                WeightScale::Reciprocal => (1.0 / f64::from(weight_scale[0])) as f32,
            };
            let again_scale = again_scale.to_scalar::<f32>().unwrap();
            exact += usize::from(again_scale == absmean);
            assert!((again_scale / absmean - 1.0).abs() < 2.5e-7, "{name}: {again_scale} read back, {absmean} stored");
            assert!((absmean / scale - 1.0).abs() < 1e-6, "{name}: {absmean} stored, {scale} exported");
        }
        assert_eq!(projections, 7 * cfg.num_hidden_layers);
        println!("{shape}: {exact} of {projections} scales read back to the bit");
        assert!(exact * 4 >= projections * 3, "{shape}: {exact} of {projections} scales read back to the bit");
    }
}

/// Rewrites one tensor of `dir`'s model.safetensors (None removes it).
fn edit_tensor(dir: &Path, name: &str, t: Option<Tensor>) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    match t {
        Some(t) => tensors.insert(name.into(), t),
        None => tensors.remove(name),
    };
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// A fresh copy of the checkpoint directory `src` at `dst`.
fn copy_dir(src: &Path, dst: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst.to_path_buf()
}

/// Errors of a packed checkpoint name the file and the tensor; an unpacked float ternary tensor (which an
/// autobitlinear offline file may hold) loads as the packed one does.
#[test]
fn packed_weights_errors_and_float_ternary() {
    let dir = tempfile::tempdir().unwrap();
    let (latent, out) = (dir.path().join("latent"), dir.path().join("out"));
    random_checkpoint(&latent, "tiny-bitnet", 5);
    export(&latent, &out, &Options { dense: DenseDtype::F32, ..Options::new(Format::HfBitnet) }).unwrap();
    let reference = bessie(&out).0;
    let victim = "model.layers.1.mlp.down_proj.weight";
    let scale_name = format!("{victim}_scale");
    let original = read_safetensors(&out.join("model.safetensors"));
    let codes = original[victim].clone();
    let error = |edit: Option<Tensor>, name: &str| {
        let broken = copy_dir(&out, &dir.path().join("broken"));
        edit_tensor(&broken, name, edit);
        format!("{:#}", bessie::model::load(&broken, &Device::Cpu).unwrap_err())
    };
    let names_file = |e: &str| e.contains("model.safetensors");

    let e = error(Some(codes.narrow(0, 0, 3).unwrap()), victim);
    assert!(names_file(&e) && e.contains(victim) && e.contains("[ceil(64/4), 176] = [16, 176]"), "{e}");
    let mut bytes: Vec<u8> = codes.flatten_all().unwrap().to_vec1().unwrap();
    bytes[7] |= 0b11 << 4;
    let e = error(Some(Tensor::from_vec(bytes, codes.dims(), &Device::Cpu).unwrap()), victim);
    assert!(names_file(&e) && e.contains(victim) && e.contains("invalid 2-bit code 3"), "{e}");
    let e = error(None, &scale_name);
    assert!(e.contains(victim) && e.contains(&format!("no `{scale_name}`")), "{e}");
    for bad in [0.0f32, -0.5, f32::NAN, f32::INFINITY] {
        let e = error(Some(Tensor::new(&[bad], &Device::Cpu).unwrap()), &scale_name);
        assert!(names_file(&e) && e.contains(&scale_name) && e.contains("finite and positive"), "{bad}: {e}");
    }
    let e = error(Some(Tensor::zeros(codes.dims(), DType::I64, &Device::Cpu).unwrap()), victim);
    assert!(e.contains(victim) && e.contains("I64"), "{e}");

    // Float ternary values: the same model; a non-ternary value is refused naming its position.
    let values = unpack(&codes.flatten_all().unwrap().to_vec1().unwrap(), 64, 176).unwrap();
    let floats: Vec<f32> = values.iter().map(|&v| f32::from(v)).collect();
    let unpacked = copy_dir(&out, &dir.path().join("unpacked"));
    edit_tensor(&unpacked, victim, Some(Tensor::from_vec(floats.clone(), (64, 176), &Device::Cpu).unwrap()));
    assert!(bessie(&unpacked).0 == reference, "float ternary values load as the codes do");
    let mut floats = floats;
    floats[176 + 2] = 0.5;
    let e = error(Some(Tensor::from_vec(floats, (64, 176), &Device::Cpu).unwrap()), victim);
    assert!(names_file(&e) && e.contains(victim) && e.contains("0.5 at [1, 2]"), "{e}");
}

/// 1bitLLM's BitnetForCausalLM has no transformers class: the export says so and what to use instead.
#[test]
fn one_bit_llm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    random_checkpoint(&src, "tiny", 1);
    let e = format!("{:#}", export(&src, &dir.path().join("out"), &Options::new(Format::HfBitnet)).unwrap_err());
    assert!(e.contains("1bitllm") && e.contains("BitnetForCausalLM") && e.contains("-f gguf"), "{e}");
    assert!(!dir.path().join("out").exists());
}

/// What a fine-tuning run saves loads in transformers with no remote code and computes what Bessie computes:
/// a 2B4T-family model, and a full-precision Llama trained into BitNet (through the quantization warm-up),
/// saved as a `bitnet` Llama.
#[test]
fn fine_tuned_checkpoints_load_in_transformers() {
    for (shape, architecture) in [("tiny-bitnet", "BitNetForCausalLM"), ("tiny-llama", "LlamaForCausalLM")] {
        let dir = tempfile::tempdir().unwrap();
        let (base, out) = (dir.path().join("base"), dir.path().join("run"));
        random_checkpoint(&base, shape, 11);
        let run = Command::new(env!("CARGO_BIN_EXE_bessie-train"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--set", &format!("model.path={}", base.display()), "--set", "model.init="])
            .args(["--set", &format!("checkpoint.out_dir={}", out.display()), "--set", "checkpoint.every=0"])
            .args(["--set", "train.max_steps=4", "--set", "train.quant_warmup_steps=2", "--set", "data.dev="])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(run.status.success(), "{shape}: bessie-train failed:\n{}", String::from_utf8_lossy(&run.stderr));
        let saved = out.join("final_checkpoint");
        assert_eq!(config_json(&saved)["quantization_config"]["quantization_mode"], "online", "{shape}");
        let hf = transformers(&[&saved]);
        let ours = bessie(&saved);
        assert_eq!((hf[0].architecture.as_str(), hf[0].q_proj.as_str()), (architecture, "AutoBitLinear"), "{shape}");
        let diff = relative_diff(&hf[0].logits, &ours.0);
        println!("{shape} fine-tuned: max |transformers - Bessie| / max |logit| {diff:.1e}");
        assert!(diff < 1e-4, "{shape}: transformers and Bessie differ by {diff:e}");
        assert_eq!(hf[0].greedy, ours.1, "{shape}: greedy tokens");
    }
}
