//! A decoding step as a CUDA graph: the step's hundreds of kernels (nine a layer) captured once and
//! replayed for every next token, so that the host's launches no longer bound the speed. A graph holds the
//! device addresses its kernels were given, so it is captured for one layout of the KV cache (its rows, width
//! and buffers: `KvCache::layout_key`) and made again when that changes (a grown or compacted cache, a batch
//! that admitted prompts or dropped rows). The step's inputs (the new ids, each row's span and the new column:
//! `DecodeAttention::meta`) are copied into the graph's own buffers before each replay, and its logits out
//! of its own buffer after. A greedy step ([`StepOutput::Picks`]) takes each row's argmax inside the graph
//! and writes it into the graph's own ids buffer: fed back as the next step's ids, the picks are read in
//! place, and nothing runs between two steps but the spans' upload and copy and the picks' copy to the host.
//!
//! The first step of a layout runs as it is (with candle's cache of small uploads on, so that the capture
//! that follows finds them) and gives that step's logits; the capture follows it. Steps of up to 8 rows are
//! matrix-vector kernels only; larger ones hold cuBLAS's GEMMs, which capture once the eager step has
//! made cuBLAS's workspace. A failed capture is said once, and steps of that many rows run without graphs
//! from then on. `BESSIE_CUDA_GRAPHS=0` turns them off.

use candle_core::{Result, Tensor};

/// What a decoding step gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutput {
    /// Every row's logits `[rows, vocab]`.
    Logits,
    /// Every row's greedy pick `[rows, 1]` (u32, the argmax of its logits): with a graph, the graph's own
    /// ids buffer, which the next step overwrites.
    Picks,
}

impl StepOutput {
    /// The step's output from its logits.
    pub(super) fn of(self, logits: Tensor) -> Result<Tensor> {
        match self {
            StepOutput::Logits => Ok(logits),
            StepOutput::Picks => logits.argmax_keepdim(candle_core::D::Minus1),
        }
    }
}

/// The captured step of the last cache layout it ran on, if any.
#[derive(Default, Clone)]
pub(super) struct StepGraphs {
    #[cfg(feature = "cuda")]
    captured: std::sync::Arc<std::sync::Mutex<Option<cuda::Captured>>>,
    /// Steps replayed from a graph so far.
    replays: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraphs")
    }
}

impl StepGraphs {
    pub fn replays(&self) -> usize {
        self.replays.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `output` of the logits `compute(ids, meta)` gives, from the graph captured for `key` where there
    /// is one, else computed (and on a GPU captured for the next step). An empty key is never captured.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn run(
        &self,
        key: Vec<u64>,
        ids: &Tensor,
        meta: &Tensor,
        output: StepOutput,
        mut compute: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = ids.device() {
            if !key.is_empty() && cuda::enabled(key[0]) {
                let (out, replayed) = cuda::run(&self.captured, dev, key, ids, meta, output, compute)?;
                self.replays.fetch_add(usize::from(replayed), std::sync::atomic::Ordering::Relaxed);
                return Ok(out);
            }
        }
        output.of(compute(ids, meta)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Mutex;

    use candle_core::{CudaDevice, Result, Tensor};
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::CudaGraph;

    use super::StepOutput;
    use crate::kernels::decode::address;

    /// The row counts whose capture failed: their steps run without graphs from then on.
    static FAILED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

    /// Whether steps of `rows` rows are captured.
    pub(super) fn enabled(rows: u64) -> bool {
        let failed = FAILED.lock().map_or(true, |f| f.contains(&rows));
        !failed && std::env::var("BESSIE_CUDA_GRAPHS").map_or(true, |v| v != "0")
    }

    /// A captured step: its key, its input buffers, its logits' buffer (none for picks, which go into `ids`)
    /// and the graph.
    pub(super) struct Captured {
        key: Vec<u64>,
        ids: Tensor,
        meta: Tensor,
        logits: Option<Tensor>,
        graph: CudaGraph,
    }

    // SAFETY: the graph is used under the StepGraphs mutex only, one thread at a time, as cudarc asks.
    unsafe impl Send for Captured {}

    pub(super) fn run(
        captured: &Mutex<Option<Captured>>,
        dev: &CudaDevice,
        key: Vec<u64>,
        ids: &Tensor,
        meta: &Tensor,
        output: StepOutput,
        mut compute: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, bool)> {
        let mut slot = captured.lock().map_err(|_| candle_core::Error::msg("a decoding graph's lock was poisoned"))?;
        let gives = |c: &Captured| c.logits.is_some() == (output == StepOutput::Logits);
        if let Some(c) = slot.as_ref().filter(|c| c.key == key && gives(c) && c.ids.dims() == ids.dims()) {
            // The last step's picks fed back are this buffer already.
            if address(ids)? != address(&c.ids)? {
                c.ids.slice_set(ids, 0, 0)?;
            }
            c.meta.slice_set(meta, 0, 0)?;
            c.graph.launch().map_err(|e| candle_core::Error::msg(format!("replaying the decoding graph: {e:?}")))?;
            let out = match &c.logits {
                Some(logits) => logits.copy()?,
                None => c.ids.clone(),
            };
            return Ok((out, true));
        }
        *slot = None;
        // This step as it is, with candle's small uploads cached for the capture.
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let logits = compute(ids, meta)?;
        let rows = key[0];
        // The picks are taken before the capture, so that their kernel's small uploads are cached for it.
        let out = output.of(logits.clone())?;
        match capture(dev, key, ids, meta, &logits, output, &mut compute) {
            Ok(c) => *slot = Some(c),
            Err(e) => {
                if let Ok(mut failed) = FAILED.lock() {
                    failed.push(rows);
                }
                eprintln!(
                    "note: capturing a decoding step of {rows} rows as a CUDA graph failed ({e}); such steps run \
                     without graphs"
                );
            }
        }
        Ok((out, false))
    }

    /// Captures `compute` on the step's own copies of its inputs, its logits copied into a buffer of its own,
    /// or its picks into its ids.
    fn capture(
        dev: &CudaDevice,
        key: Vec<u64>,
        ids: &Tensor,
        meta: &Tensor,
        like: &Tensor,
        output: StepOutput,
        compute: &mut impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Captured> {
        let (ids, meta) = (ids.copy()?, meta.copy()?);
        let logits = match output {
            StepOutput::Logits => Some(like.zeros_like()?),
            StepOutput::Picks => None,
        };
        let stream = dev.cuda_stream();
        let to_err = |what: &str, e: cudarc::driver::DriverError| candle_core::Error::msg(format!("{what}: {e:?}"));
        stream.synchronize().map_err(|e| to_err("synchronizing before the capture", e))?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| to_err("beginning the capture", e))?;
        // Whatever happens, the capture ends: a stream left capturing would fail every later op.
        let body = compute(&ids, &meta).and_then(|out| match &logits {
            Some(logits) => logits.slice_set(&out, 0, 0),
            None => ids.slice_set(&output.of(out)?, 0, 0),
        });
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags).map_err(|e| to_err("ending the capture", e))?;
        body?;
        let graph = graph.ok_or_else(|| candle_core::Error::msg("the capture recorded nothing"))?;
        graph.upload().map_err(|e| to_err("uploading the graph", e))?;
        Ok(Captured { key, ids, meta, logits, graph })
    }
}
