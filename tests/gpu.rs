//! CUDA checks (feature `cuda`, run on a GPU machine): the bf16 forward against the CPU f32 forward.
#![cfg(feature = "cuda")]

mod common;

use bessie::model::KvCache;
use candle_core::{Device, Tensor};

fn logits(dir: &std::path::Path, device: &Device, ids: &[u32]) -> Vec<f32> {
    let model = bessie::model::load(dir, device).unwrap();
    let x = Tensor::new(ids, device).unwrap().unsqueeze(0).unwrap();
    let h = model.forward(&x, &mut KvCache::new(&model.cfg)).unwrap();
    model.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
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
