//! Peak device memory of a training step, estimated from the configs before anything is allocated, so a
//! run that cannot fit says so at once (with a config that would fit) instead of running out of memory
//! mid-run.
//!
//! The estimate counts the bytes of every tensor alive at the two candidate peaks of a step:
//!
//! - **forward/backward**: latent f32 weights (4P), the flat gradient buffer (4P in f32, 2P in bf16), the AdamW moments
//!   (8P in f32, 2.03P in 8-bit, divided by N under ZeRO-1 over N ranks), this step's weights in the compute
//!   dtype (eP; per block, those outside the blocks and one block's), the activations the forward keeps
//!   ([`saved_per_token`] for the recompute level), and the largest transient: either the loss of one
//!   chunk at the end of the forward (its logits and their gradient, plus the head gradient) or one block's
//!   backward (its weight gradients, the FFN backward's temporaries, one attention query block's
//!   score-sized temporaries (none with the flash kernel), the f32 dK/dV accumulators, and under
//!   recomputation the recomputed block's saved tensors). On CUDA the fused kernels (`crate::kernels`) leave one bf16 output where the candle
//!   ops left several f32 temporaries, and the estimate counts what each path allocates (with
//!   `BESSIE_UNFUSED=1` it undercounts);
//! - **optimizer**: latent weights, moments and the gradient buffer, which is summed across ranks,
//!   normalised and clipped in place; where the update runs as candle ops (the CPU), its temporaries for
//!   one chunk of the shard.
//!
//! On CUDA two more parts: the stream-ordered allocator keeps freed blocks for reuse, which costs about
//! one more largest transient, and the CUDA context with its libraries and the pool's rounding, a constant
//! fitted to nvidia-smi peaks on an H200:
//! - the fused step (what CUDA runs): 0.5 GiB, fitted to the 13 rows of BENCHMARKS.md's long-context table
//!   (large shape, 768 to 8192 tokens, every recompute level, and 768 x 8); with it every row is within
//!   5% of the measured peak (before the fit, with 2.5 GiB, the estimate was 9-17% high);
//! - the candle-op step (`BESSIE_UNFUSED=1`, and the code before the fused kernels): 2.5 GiB, fitted to
//!   18.6, 20.8, 37.5, 57.1 and 37.0 GiB measured at seq x batch 768x1, 768x2, 2048x2, 2048x4 and 768x8,
//!   which it put at 18.4, 21.1, 38.1, 60.8 and 36.8 GiB.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use super::layers::flash_kernel_takes;
use super::model::MemoryPlan;
use super::moments::{moments_bytes, CHUNK};
use crate::config::run::{GradDtype, OptimizerState, Recompute, StepWeightsPlan, TrainSection};
use crate::config::ModelConfig;

/// The CUDA context, cuBLAS, the kernels and the pool's rounding, for the fused and the candle-op step
/// (see the module doc for the fit).
const CUDA_CONTEXT_BYTES: [f64; 2] = [0.5 * GIB, 2.5 * GIB];
const GIB: f64 = (1u64 << 30) as f64;

/// What the estimate depends on.
#[derive(Debug, Clone)]
pub struct StepShape<'a> {
    pub model: &'a ModelConfig,
    pub micro_batch: usize,
    pub seq: usize,
    pub plan: MemoryPlan,
    /// bf16 on CUDA, f32 on CPU.
    pub dtype: DType,
    pub cuda: bool,
    /// How many ranks share the AdamW moments: the world size under ZeRO-1, else 1.
    pub optimizer_shards: usize,
    /// f32 or 8-bit moments (`train.optimizer_state`).
    pub optimizer_state: OptimizerState,
    /// The gradient buffer's dtype (`train.grad_buffer`).
    pub grad_buffer: GradDtype,
}

impl<'a> StepShape<'a> {
    /// The step a run with `train` makes on `device`, `micro_batch` sequences of `seq` tokens at a time, on
    /// each of `world` ranks.
    pub fn of_run(
        model: &'a ModelConfig,
        train: &TrainSection,
        micro_batch: usize,
        seq: usize,
        device: &Device,
        world: usize,
    ) -> Self {
        Self {
            model,
            micro_batch,
            seq,
            plan: MemoryPlan::new(train),
            dtype: crate::device::compute_dtype(device),
            cuda: device.is_cuda(),
            optimizer_shards: if train.zero1 { world } else { 1 },
            optimizer_state: train.optimizer_state,
            grad_buffer: train.grad_buffer_dtype(device.is_cuda(), world),
        }
    }
}

/// A peak estimate as named parts, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub parts: Vec<(&'static str, f64)>,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    pub fn gib(&self) -> f64 {
        self.total() / GIB
    }

    pub fn part(&self, name: &str) -> f64 {
        self.parts.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, b)| *b)
    }
}

/// Bytes the forward keeps per token and block for a recompute level (`e` = compute dtype bytes). With
/// nothing recomputed: the block input, the residual after attention, the normed quantized inputs of
/// q/k/v, o_proj and gate/up (4 x hidden, 1 x q width), q, k, v and attention's output rows (4 x q width),
/// gate, up and down_proj's input (3 x intermediate), four f32 RMS statistics and one f32 log-sum-exp per head.
/// `int8`: the forward runs the int8 GEMM, whose input codes (a byte a channel, an f32 scale a token) the
/// recomputation of attention reads too.
pub fn saved_per_token(cfg: &ModelConfig, recompute: Recompute, e: f64, int8: bool) -> f64 {
    let (h, i, heads) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_attention_heads as f64);
    // The width of q, of attention's output and o_proj's input; k and v as attention keeps them: their own
    // heads, which grouped-query attention reads in place.
    let (q, kv) = attention_widths(cfg);
    match recompute {
        Recompute::None => e * (4.0 * h + 3.0 * q + 2.0 * kv + 3.0 * i) + 4.0 * (4.0 + heads),
        // Less q, k, v, the log-sum-exp, down_proj's input and its statistics.
        Recompute::Attention => e * (4.0 * h + 2.0 * q + 2.0 * i) + 12.0 + if int8 { h + 4.0 } else { 0.0 },
        Recompute::Blocks => e * h,
    }
}

/// The widths of q (and of attention's output) and of k or v: heads times head dim.
fn attention_widths(cfg: &ModelConfig) -> (f64, f64) {
    let d = cfg.head_dim();
    ((cfg.num_attention_heads * d) as f64, (cfg.num_kv_heads() * d) as f64)
}

/// The estimated peak of one training step.
pub fn estimate(s: &StepShape) -> Estimate {
    let cfg = s.model;
    let e = s.dtype.size_in_bytes() as f64;
    let p = cfg.num_parameters() as f64;
    let (h, i, v) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.vocab_size as f64);
    let (layers, heads) = (cfg.num_hidden_layers as f64, cfg.num_attention_heads as f64);
    let n = (s.micro_batch * s.seq) as f64;
    let family = cfg.family().expect("a validated config names a known family");
    let block_params =
        cfg.block_tensors(family, 0).iter().map(|t| t.shape.iter().product::<usize>()).sum::<usize>() as f64;

    // The final norm's input and the gradient at its output stay to the backward.
    let saved = n * (layers * saved_per_token(cfg, s.plan.recompute, e, s.cuda) + 2.0 * e * h + 4.0);
    let chunk = s.plan.loss_chunk.min(s.micro_batch * s.seq) as f64;
    // On CUDA the fused kernels (crate::kernels) replace chains of f32 temporaries with one bf16 output.
    let fused = s.cuda;
    // The loss chunk: logits, exp and two gradient copies in f32 (fused: bf16 logits and their gradient, in
    // rows padded to a multiple of 8); the gradient at the hidden rows, which the chunks write. On CUDA the
    // head's and the embedding's gradients go straight into the buffer; elsewhere each is a dense f32 table
    // first, then its sum with the buffer.
    let (logits, row) = if fused { (2.0 * e, cfg.vocab_size.next_multiple_of(8) as f64) } else { (16.0, v) };
    let dense_grads = if fused { 0.0 } else { 8.0 * v * h };
    let loss = logits * chunk * row + dense_grads + e * n * h;
    let query_block = s.plan.attention_block.min(s.seq) as f64;
    let scores = s.micro_batch as f64 * heads * query_block * s.seq as f64;
    // Score-sized temporaries of one query block: probabilities (f32 and e), dP, dP P, dP - rowsum, dS (f32
    // and e); fused: the scores, P, dP and dS in e. Then dK, dV in f32 and the sum written back; dY and dQ;
    // with grouped-query heads, K and V expanded to a head per query head.
    // The flash kernel keeps no scores and reads K and V in place: dY, dQ, dK, dV in e and one f32 per row, and
    // the score gradients its dK/dV kernel hands to its dQ kernel.
    let (q, kv) = attention_widths(cfg);
    let attention = match fused && flash_kernel_takes(cfg.head_dim()) {
        true => {
            let ds = crate::kernels::flash_ds_bytes(s.micro_batch * cfg.num_attention_heads, s.seq);
            n * (e * (2.0 * q + 2.0 * kv) + 4.0 * heads) + ds as f64
        }
        false => {
            let expanded = if kv < q { 2.0 * e * n * q } else { 0.0 };
            scores * if fused { 4.0 * e } else { 20.0 + 2.0 * e } + n * h * (12.0 + 2.0 * e) + expanded
        }
    };
    // down_proj's input where the backward recomputes it (a recomputed block keeps it, as recompute = "none"
    // does), and the temporaries of the norm and SwiGLU backward (f32; fused: its input's gradient and
    // [dgate | dup]).
    let kept = s.plan.recompute != Recompute::Attention;
    let ffn = if fused { (3.0 + f64::from(!kept)) * e * n * i } else { (32.0 + 2.0 * e) * n * i };
    let recomputed = match s.plan.recompute {
        Recompute::None => 0.0,
        Recompute::Attention => n * (3.0 * e * h + 4.0 * heads),
        Recompute::Blocks => n * saved_per_token(cfg, Recompute::None, e, s.cuda),
    };
    // The block's weight gradients (in e: the flat buffer widens them as it adds them), the residual
    // gradients, and off CUDA the embedding's dense gradient.
    let backward = e * block_params + recomputed + attention.max(ffn) + dense_grads + 2.0 * e * n * h;
    let transient = loss.max(backward);

    let moments = moments_bytes(p / s.optimizer_shards.max(1) as f64, s.optimizer_state);
    let moments_part = match s.optimizer_state {
        OptimizerState::F32 => "AdamW moments (f32)",
        OptimizerState::Int8 => "AdamW moments (8-bit)",
    };
    // Per block, the slots outside the blocks and one block's at a time. On CUDA the BitLinear matrices'
    // ternary codes beside them, a byte a weight, for the int8 forward GEMM (only Hopper builds them; the
    // estimate does not ask which card, so it counts them on every one).
    let codes = if s.cuda { 1.0 } else { 0.0 };
    let step_weights = match s.plan.step_weights {
        StepWeightsPlan::Kept => e * p + codes * layers * block_params,
        StepWeightsPlan::PerBlock => e * (p - layers * block_params + block_params) + codes * block_params,
    };
    let (grads_part, grads) = match s.grad_buffer {
        GradDtype::F32 => ("gradient buffer (f32)", 4.0 * p),
        GradDtype::Bf16 => ("gradient buffer (bf16)", 2.0 * p),
    };
    let step = [
        ("latent weights (f32)", 4.0 * p),
        (grads_part, grads),
        (moments_part, moments),
        ("this step's weights", step_weights),
        ("saved activations", saved),
        ("largest transient", transient),
    ];
    // The gradients are summed across ranks, normalised and clipped in place (inside AdamW's update). The
    // fused kernels (CUDA) have no temporaries; the candle-op update takes a chunk of the shard at a time: the
    // chunk's moments in f32, and about ten f32 temporaries of the update and the coding.
    let temporaries = match fused {
        true => 0.0,
        false => 48.0 * (CHUNK as f64).min(p),
    };
    let optimizer = 4.0 * p + grads + moments + temporaries;
    let mut parts: Vec<(&'static str, f64)> = match step.iter().map(|(_, b)| b).sum::<f64>() >= optimizer {
        true => step.to_vec(),
        false => vec![
            ("latent weights (f32)", 4.0 * p),
            (moments_part, moments),
            (grads_part, grads),
            ("AdamW temporaries", temporaries),
        ],
    };
    if s.cuda {
        // The memory pool keeps freed blocks for reuse (device::rank_device), and blocks of one size cannot
        // always serve another: at 768 x 8 on an H100, 20.64-20.70 GiB in use at the peak against 20.40
        // counted with one transient of slack (0.23 GiB); two count 20.63.
        parts.push(("allocator slack (two largest transients)", 2.0 * transient));
        parts.push(("CUDA context and libraries", CUDA_CONTEXT_BYTES[if fused { 0 } else { 1 }]));
    }
    Estimate { parts }
}

/// The device's total memory in bytes; `None` on the CPU.
pub fn device_memory(device: &Device) -> Result<Option<f64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (_, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| anyhow::anyhow!("querying the GPU's memory: {e:?}"))?;
            Ok(Some(total as f64))
        }
        _ => Ok(None),
    }
}

/// The largest device memory in use (total less free, every process on the card, as nvidia-smi counts
/// it) while it runs, sampled every 5 ms on its own thread; for `--bench`. Does nothing on the CPU.
pub struct PeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl PeakSampler {
    pub fn start(device: &Device) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let (ctx, stop) = (d.cuda_stream().context().clone(), stop.clone());
                Some(std::thread::spawn(move || {
                    let mut peak = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok((free, total)) = ctx.mem_get_info() {
                            peak = peak.max(total - free);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    peak
                }))
            }
            _ => None,
        };
        Self { stop, thread }
    }

    /// The peak in GiB; `None` on the CPU.
    pub fn stop(mut self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap_or(0) as f64 / GIB)
    }
}

/// [`check_fits`] against `device`'s memory, unless `enabled` is false (`train.check_memory`); nothing
/// to check on the CPU.
pub fn check_device(s: &StepShape, device: &Device, enabled: bool) -> Result<()> {
    match device_memory(device)?.filter(|_| enabled) {
        Some(card) => check_fits(s, card),
        None => Ok(()),
    }
}

/// Fails, before anything is allocated, when the estimate exceeds `card` bytes, with the estimate's parts
/// and the cheapest change that fits: a recompute level (least recomputation first), then with recompute =
/// "blocks" the memory savings (8-bit moments, then per-block step weights, then a bf16 gradient buffer,
/// each added to the last), then a smaller micro-batch with all of them, then a shorter sequence.
pub fn check_fits(s: &StepShape, card: f64) -> Result<()> {
    let est = estimate(s);
    if est.total() <= card {
        return Ok(());
    }
    let parts: Vec<String> = est.parts.iter().map(|(n, b)| format!("{n} {:.2}", b / GIB)).collect();
    let fits = |recompute: Recompute, micro_batch: usize, seq: usize| {
        let plan = MemoryPlan { recompute, ..s.plan };
        let e = estimate(&StepShape { plan, micro_batch, seq, ..s.clone() });
        (e.total() <= card).then_some(e.gib())
    };
    // The savings under recompute = "blocks", each added to those before it.
    let blocks = MemoryPlan { recompute: Recompute::Blocks, ..s.plan };
    let int8 = StepShape { plan: blocks, optimizer_state: OptimizerState::Int8, ..s.clone() };
    let per_block =
        StepShape { plan: MemoryPlan { step_weights: StepWeightsPlan::PerBlock, ..blocks }, ..int8.clone() };
    let all = StepShape { grad_buffer: GradDtype::Bf16, ..per_block.clone() };
    let savings = [
        ("train.optimizer_state = \"int8\"", &int8),
        ("train.step_weights = \"per_block\"", &per_block),
        ("train.grad_buffer = \"bf16\"", &all),
    ];
    let named = |k: usize| {
        let names: Vec<&str> = savings[..=k].iter().map(|(n, _)| *n).collect();
        format!("train.recompute = \"blocks\", {}", names.join(", "))
    };
    let with_savings = (0..savings.len()).find_map(|k| {
        let e = estimate(savings[k].1);
        (e.total() <= card).then(|| format!("{} ({:.1} GiB)", named(k), e.gib()))
    });
    let fits_all = |micro_batch: usize, seq: usize| {
        let e = estimate(&StepShape { micro_batch, seq, ..all.clone() });
        (e.total() <= card).then_some(e.gib())
    };
    let all_savings = named(savings.len() - 1);
    let levels = [Recompute::None, Recompute::Attention, Recompute::Blocks];
    let from = levels.iter().position(|&l| l == s.plan.recompute).unwrap_or(0);
    let name = |l: Recompute| format!("{l:?}").to_lowercase();
    let suggestion = levels[from..]
        .iter()
        .find_map(|&l| fits(l, s.micro_batch, s.seq).map(|g| format!("train.recompute = \"{}\" ({g:.1} GiB)", name(l))))
        .or(with_savings)
        .or_else(|| {
            (1..s.micro_batch).rev().find_map(|b| {
                fits_all(b, s.seq).map(|g| {
                    format!(
                        "{all_savings} with train.micro_batch = {b} and a grad_accum {} times larger ({g:.1} GiB)",
                        s.micro_batch as f64 / b as f64
                    )
                })
            })
        })
        .or_else(|| {
            (1..=s.seq / 256).rev().map(|k| k * 256).find_map(|seq| {
                fits_all(1, seq).map(|g| {
                    format!("data.max_seq_len = {seq} with {all_savings} and train.micro_batch = 1 ({g:.1} GiB)")
                })
            })
        })
        .unwrap_or_else(|| "nothing: the weights and optimizer state alone do not fit".into());
    bail!(
        "this run needs about {:.1} GiB of GPU memory ({}; micro-batch {} x sequence {}, train.recompute = \
         \"{}\") but the card has {:.1} GiB; what would fit: {suggestion} (train.check_memory = false starts \
         anyway)",
        est.gib(),
        parts.join(", "),
        s.micro_batch,
        s.seq,
        name(s.plan.recompute),
        card / GIB
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cfg: &ModelConfig, micro_batch: usize, seq: usize, recompute: Recompute) -> StepShape<'_> {
        let plan =
            MemoryPlan { recompute, attention_block: 256, loss_chunk: 1024, step_weights: StepWeightsPlan::Kept };
        StepShape {
            model: cfg,
            micro_batch,
            seq,
            plan,
            dtype: DType::BF16,
            cuda: true,
            optimizer_shards: 1,
            optimizer_state: OptimizerState::F32,
            grad_buffer: GradDtype::F32,
        }
    }

    #[test]
    fn zero1_divides_the_moments_by_the_ranks() {
        let cfg = ModelConfig::shape("tiny", 97).unwrap();
        let p = cfg.num_parameters() as f64;
        let one = estimate(&shape(&cfg, 2, 64, Recompute::None));
        let four = estimate(&StepShape { optimizer_shards: 4, ..shape(&cfg, 2, 64, Recompute::None) });
        assert_eq!(four.part("AdamW moments (f32)"), 2.0 * p);
        assert_eq!(one.total() - four.total(), 6.0 * p);
    }

    #[test]
    fn parts_by_hand_on_the_tiny_shape() {
        let cfg = ModelConfig::shape("tiny", 97).unwrap();
        let p = cfg.num_parameters() as f64;
        let est = estimate(&shape(&cfg, 2, 64, Recompute::None));
        assert_eq!(est.part("latent weights (f32)"), 4.0 * p);
        // With the blocks' ternary codes, a byte a weight (no copy of the head: its products take it as it is).
        let block_params: usize =
            cfg.block_tensors(cfg.family().unwrap(), 0).iter().map(|t| t.shape.iter().product::<usize>()).sum();
        assert_eq!(est.part("this step's weights"), 2.0 * p + 2.0 * block_params as f64);
        // hidden 64, intermediate 176, 4 heads, 2 layers: (9 x 64 + 3 x 176) x 2 + 4 x 8 = 2240 bytes a
        // token and block; 128 tokens; the final norm's 2 x 2 x 64 + 4.
        assert_eq!(saved_per_token(&cfg, Recompute::None, 2.0, true), 2240.0);
        assert_eq!(est.part("saved activations"), 128.0 * (2.0 * 2240.0 + 260.0));
        assert_eq!(est.part("allocator slack (two largest transients)"), 2.0 * est.part("largest transient"));
        let sum: f64 = est.parts.iter().map(|(_, b)| b).sum();
        assert_eq!(est.total(), sum);
    }

    #[test]
    fn more_tokens_cost_more_and_recomputing_less() {
        let cfg = ModelConfig::shape("large", 32002).unwrap();
        let gib = |b, t, r| estimate(&shape(&cfg, b, t, r)).gib();
        for r in [Recompute::None, Recompute::Attention, Recompute::Blocks] {
            assert!(gib(1, 2048, r) < gib(1, 4096, r) && gib(1, 4096, r) < gib(2, 4096, r), "{r:?}");
        }
        assert!(gib(1, 4096, Recompute::Blocks) < gib(1, 4096, Recompute::Attention));
        assert!(gib(1, 4096, Recompute::Attention) < gib(1, 4096, Recompute::None));
        // The target: bitnet_b1_58-large at 4096 tokens in 22 GiB with whole-block recomputation.
        assert!(gib(1, 4096, Recompute::Blocks) <= 22.0, "{}", gib(1, 4096, Recompute::Blocks));
    }

    /// The memory savings, each on top of the last, at the 2B4T shape (2048 tokens, micro-batch 1, whole-block
    /// recomputation): each lowers the estimate by what it saves, and all of them together fit a 24 GB card
    /// (22 GiB usable) where f32 moments alone needed 42.8 GiB.
    #[test]
    fn every_saving_together_fits_2b4t_in_22_gib() {
        let cfg = ModelConfig::shape("2b4t", 128256).unwrap();
        let p = cfg.num_parameters() as f64;
        let base = shape(&cfg, 1, 2048, Recompute::Blocks);
        let int8 = StepShape { optimizer_state: OptimizerState::Int8, ..base.clone() };
        let per_block =
            StepShape { plan: MemoryPlan { step_weights: StepWeightsPlan::PerBlock, ..base.plan }, ..int8.clone() };
        let all = StepShape { grad_buffer: GradDtype::Bf16, ..per_block.clone() };
        let gib: Vec<f64> = [&base, &int8, &per_block, &all].iter().map(|s| estimate(s).gib()).collect();
        eprintln!(
            "2B4T 2048 x 1, recompute blocks: f32 {:.2}, int8 {:.2}, per block {:.2}, bf16 grads {:.2} GiB",
            gib[0], gib[1], gib[2], gib[3]
        );
        assert!(gib.windows(2).all(|w| w[1] < w[0]), "{gib:?}");
        assert!(gib[3] <= 22.0 && gib[2] > 22.0, "{gib:?}");
        // The buffer's half, and the step weights (bf16 and their codes) of every block but one.
        assert_eq!(estimate(&all).part("gradient buffer (bf16)"), 2.0 * p);
        let kept = estimate(&int8).part("this step's weights");
        let block_params: usize =
            cfg.block_tensors(cfg.family().unwrap(), 0).iter().map(|t| t.shape.iter().product::<usize>()).sum();
        let saved = 3.0 * (cfg.num_hidden_layers - 1) as f64 * block_params as f64;
        assert_eq!(kept - estimate(&per_block).part("this step's weights"), saved);
        // What the check says of the plain config on a 24 GB card.
        let err = check_fits(&base, 22.0 * GIB).unwrap_err().to_string();
        assert!(
            err.contains(
                "train.optimizer_state = \"int8\", train.step_weights = \"per_block\", train.grad_buffer = \"bf16\" ("
            ),
            "{err}"
        );
    }

    #[test]
    fn too_big_suggests_what_fits() {
        let cfg = ModelConfig::shape("large", 32002).unwrap();
        let s = shape(&cfg, 1, 4096, Recompute::None);
        assert!(check_fits(&s, 80.0 * GIB).is_ok());
        let card = estimate(&shape(&cfg, 1, 4096, Recompute::Blocks)).total() + 1.0;
        let err = check_fits(&s, card).unwrap_err().to_string();
        assert!(err.contains("train.recompute = \"blocks\""), "{err}");
        assert!(err.contains("saved activations") && err.contains("train.check_memory = false"), "{err}");
        // Micro-batch 4 at blocks does not fit that card either; with 8-bit moments it does.
        let four = shape(&cfg, 4, 4096, Recompute::Blocks);
        let err = check_fits(&four, card).unwrap_err().to_string();
        assert!(
            err.contains("what would fit: train.recompute = \"blocks\", train.optimizer_state = \"int8\" ("),
            "{err}"
        );
        // On a card that takes micro-batch 1 with every saving and no more, micro-batch 1 with them.
        let all = StepShape {
            plan: MemoryPlan { step_weights: StepWeightsPlan::PerBlock, ..four.plan },
            optimizer_state: OptimizerState::Int8,
            grad_buffer: GradDtype::Bf16,
            ..shape(&cfg, 1, 4096, Recompute::Blocks)
        };
        let err = check_fits(&four, estimate(&all).total() + 1.0).unwrap_err().to_string();
        assert!(
            err.contains("train.grad_buffer = \"bf16\" with train.micro_batch = 1 and a grad_accum 4 times larger"),
            "{err}"
        );
        let err = check_fits(&shape(&cfg, 1, 4096, Recompute::None), 3.0 * GIB).unwrap_err().to_string();
        assert!(err.contains("nothing: the weights"), "{err}");
    }
}
