//! A decoding step as a CUDA graph: the step's hundreds of kernels (nine a layer) captured once and
//! replayed for every next token, so that the host's launches no longer bound the speed. A graph holds the
//! device addresses its kernels were given, so it is captured for one layout of the KV cache (its rows, width
//! and buffers: `KvCache::layout_key`) and made again when that changes (a grown or compacted cache, a batch
//! that admitted prompts or dropped rows). The step's inputs (the new ids, each row's span and the new column:
//! `DecodeAttention::meta`) are copied into the graph's own buffers before each replay, and its logits out
//! of its own buffer after.
//!
//! A graph ends with each row's greedy pick written into its own ids buffer (`kernels::decode::greedy_tail`),
//! so that a greedy step can be replayed right after the one before, before the host has read that one's picks
//! ([`StepIds::Picked`]): the host reads and streams a step's tokens while the device runs the next, instead
//! of the device waiting for the host between steps. The picks come back through pinned host memory.
//!
//! The first step of a layout runs as it is (with candle's cache of small uploads on, so that the capture
//! that follows finds them) and gives that step's logits; the capture follows it. Steps of up to 8 rows are
//! matrix-vector kernels only; larger ones hold cuBLAS's GEMMs, which capture once the eager step has
//! made cuBLAS's workspace. A failed capture is said once, and steps of that many rows run without graphs
//! from then on. `BESSIE_CUDA_GRAPHS=0` turns them off.

use candle_core::{Result, Tensor, D};

/// The next tokens of a decoding step's rows.
pub enum StepIds<'a> {
    /// Given by the host.
    Host(&'a [u32]),
    /// The greedy picks of the step before: they stay on the device where that step's graph runs this one too.
    Picked(&'a Picks),
}

impl StepIds<'_> {
    /// The ids on the host (waiting for picks still being copied).
    pub(super) fn values(&self) -> Result<Vec<u32>> {
        match self {
            StepIds::Host(ids) => Ok(ids.to_vec()),
            StepIds::Picked(p) => p.values(),
        }
    }
}

/// A greedy decoding step's picks (one id per row): read already, or being copied to the host behind the
/// step, which [`Picks::values`] waits for.
pub struct Picks(PicksState);

enum PicksState {
    Ready(Vec<u32>),
    #[cfg(feature = "cuda")]
    Pending(cuda::Pending),
}

impl Picks {
    pub(super) fn ready(ids: Vec<u32>) -> Self {
        Picks(PicksState::Ready(ids))
    }

    /// The rows picked for.
    pub fn rows(&self) -> usize {
        match &self.0 {
            PicksState::Ready(ids) => ids.len(),
            #[cfg(feature = "cuda")]
            PicksState::Pending(p) => p.rows,
        }
    }

    /// Each row's pick.
    pub fn values(&self) -> Result<Vec<u32>> {
        match &self.0 {
            PicksState::Ready(ids) => Ok(ids.clone()),
            #[cfg(feature = "cuda")]
            PicksState::Pending(p) => p.values(),
        }
    }
}

/// What a step gives: its logits `[rows, vocab]` (f32), or its greedy picks.
pub(super) enum StepOut {
    Logits(Tensor),
    Picks(Picks),
}

impl StepOut {
    /// The step's output as `greedy` asks for it, from its `logits`.
    pub(super) fn of(logits: Tensor, greedy: bool) -> Result<Self> {
        match greedy {
            true => Ok(StepOut::Picks(Picks::ready(logits.argmax(D::Minus1)?.to_vec1::<u32>()?))),
            false => Ok(StepOut::Logits(logits)),
        }
    }
}

/// The captured step of the last cache layout it ran on, if any.
#[derive(Default, Clone)]
pub(super) struct StepGraphs {
    #[cfg(feature = "cuda")]
    captured: std::sync::Arc<std::sync::Mutex<Option<cuda::Captured>>>,
    /// Pinned host buffers for the picks, reused.
    #[cfg(feature = "cuda")]
    pinned: cuda::Pool,
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

    /// The logits, or with `greedy` the picks, that `compute(ids, meta)` gives, from the graph captured for
    /// `key` where there is one, else computed (and on a GPU captured for the next step). An empty key is
    /// never captured.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn run(
        &self,
        key: Vec<u64>,
        ids: StepIds,
        meta: &Tensor,
        greedy: bool,
        mut compute: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<StepOut> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = meta.device() {
            if !key.is_empty() && cuda::enabled(key[0]) {
                let (out, replayed) = cuda::run(&self.captured, &self.pinned, dev, key, ids, meta, greedy, compute)?;
                self.replays.fetch_add(usize::from(replayed), std::sync::atomic::Ordering::Relaxed);
                return Ok(out);
            }
        }
        let rows = meta.elem_count().saturating_sub(2) / 4;
        let ids = Tensor::from_vec(ids.values()?, (rows, 1), meta.device())?;
        StepOut::of(compute(&ids, meta)?, greedy)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use candle_core::{CudaDevice, DType, Result, Tensor};
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{CudaGraph, PinnedHostSlice};

    use super::{Picks, PicksState, StepIds, StepOut};

    /// The row counts whose capture failed: their steps run without graphs from then on.
    static FAILED: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    /// Names each captured graph, so that picks tell which graph's ids buffer holds them.
    static GRAPHS: AtomicU64 = AtomicU64::new(0);

    /// Whether steps of `rows` rows are captured.
    pub(super) fn enabled(rows: u64) -> bool {
        let failed = FAILED.lock().map_or(true, |f| f.contains(&rows));
        !failed && std::env::var("BESSIE_CUDA_GRAPHS").map_or(true, |v| v != "0")
    }

    /// Pinned host buffers the picks are copied into (two in use at most: a step's and the one after).
    pub(super) type Pool = Arc<Mutex<Vec<PinnedHostSlice<u32>>>>;

    /// A captured step: its key, its input and output buffers and the graph, with its name and how many
    /// times it was launched.
    pub(super) struct Captured {
        key: Vec<u64>,
        ids: Tensor,
        meta: Tensor,
        logits: Tensor,
        picks: Tensor,
        graph: CudaGraph,
        name: u64,
        launches: u64,
    }

    // SAFETY: the graph is used under the StepGraphs mutex only, one thread at a time, as cudarc asks.
    unsafe impl Send for Captured {}

    /// Picks being copied into pinned host memory behind the launch `launch` of graph `graph`.
    pub(super) struct Pending {
        host: Option<PinnedHostSlice<u32>>,
        pub(super) rows: usize,
        graph: u64,
        launch: u64,
        pool: Pool,
    }

    impl Pending {
        pub(super) fn values(&self) -> Result<Vec<u32>> {
            let host = self.host.as_ref().expect("held until dropped");
            let ids = host.as_slice().map_err(|e| candle_core::Error::msg(format!("reading the picks: {e:?}")))?;
            Ok(ids.to_vec())
        }
    }

    impl Drop for Pending {
        fn drop(&mut self) {
            if let (Some(host), Ok(mut pool)) = (self.host.take(), self.pool.lock()) {
                pool.push(host);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        captured: &Mutex<Option<Captured>>,
        pool: &Pool,
        dev: &CudaDevice,
        key: Vec<u64>,
        ids: StepIds,
        meta: &Tensor,
        greedy: bool,
        mut compute: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(StepOut, bool)> {
        let rows = key[0] as usize;
        let mut slot = captured.lock().map_err(|_| candle_core::Error::msg("a decoding graph's lock was poisoned"))?;
        if let Some(c) = slot.as_mut().filter(|c| c.key == key) {
            match ids {
                // The picks of this graph's last launch are in its ids buffer already.
                StepIds::Picked(Picks(PicksState::Pending(p))) if p.graph == c.name && p.launch == c.launches => {}
                ids => c.ids.slice_set(&Tensor::from_vec(ids.values()?, (rows, 1), meta.device())?, 0, 0)?,
            }
            c.meta.slice_set(meta, 0, 0)?;
            c.graph.launch().map_err(|e| candle_core::Error::msg(format!("replaying the decoding graph: {e:?}")))?;
            c.launches += 1;
            let out = match greedy {
                true => StepOut::Picks(Picks(PicksState::Pending(copy_picks(c, pool, dev)?))),
                false => StepOut::Logits(c.logits.copy()?),
            };
            return Ok((out, true));
        }
        // The ids first: where they are picks still being copied, reading them waits for the step that made
        // them, whose graph may be the one dropped next.
        let ids = ids.values()?;
        *slot = None;
        // This step as it is, with candle's small uploads cached for the capture.
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let ids = Tensor::from_vec(ids, (rows, 1), meta.device())?;
        let logits = compute(&ids, meta)?;
        match capture(dev, key, &ids, meta, &logits, &mut compute) {
            Ok(c) => *slot = Some(c),
            Err(e) => {
                if let Ok(mut failed) = FAILED.lock() {
                    failed.push(rows as u64);
                }
                eprintln!(
                    "note: capturing a decoding step of {rows} rows as a CUDA graph failed ({e}); such steps run \
                     without graphs"
                );
            }
        }
        Ok((StepOut::of(logits, greedy)?, false))
    }

    /// Copies the picks of `c`'s launch into a pinned host buffer behind it, without waiting.
    fn copy_picks(c: &Captured, pool: &Pool, dev: &CudaDevice) -> Result<Pending> {
        let rows = c.picks.elem_count();
        let to_err = |e: cudarc::driver::DriverError| candle_core::Error::msg(format!("copying the picks: {e:?}"));
        let stream = dev.cuda_stream();
        // The copy moves the host buffer's whole length: exactly the rows.
        let reused =
            pool.lock().ok().and_then(|mut p| p.iter().position(|h| h.len() == rows).map(|i| p.swap_remove(i)));
        let mut host = match reused {
            Some(h) => h,
            // SAFETY: written by the copy below before anything reads it.
            None => unsafe { stream.context().alloc_pinned::<u32>(rows) }.map_err(to_err)?,
        };
        let (storage, _) = c.picks.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else { candle_core::bail!("the picks are not on the GPU") };
        stream.memcpy_dtoh(s.as_cuda_slice::<u32>()?, &mut host).map_err(to_err)?;
        Ok(Pending { host: Some(host), rows, graph: c.name, launch: c.launches, pool: pool.clone() })
    }

    /// Captures `compute` on the step's own copies of its inputs, its logits copied into a buffer of its own and
    /// its greedy picks written into its ids and picks buffers.
    fn capture(
        dev: &CudaDevice,
        key: Vec<u64>,
        ids: &Tensor,
        meta: &Tensor,
        like: &Tensor,
        compute: &mut impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Captured> {
        let (ids, meta, logits) = (ids.copy()?, meta.copy()?, like.zeros_like()?);
        let picks = Tensor::zeros(ids.elem_count(), DType::U32, ids.device())?;
        let stream = dev.cuda_stream();
        let to_err = |what: &str, e: cudarc::driver::DriverError| candle_core::Error::msg(format!("{what}: {e:?}"));
        stream.synchronize().map_err(|e| to_err("synchronizing before the capture", e))?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| to_err("beginning the capture", e))?;
        // Whatever happens, the capture ends: a stream left capturing would fail every later op.
        let body = compute(&ids, &meta).and_then(|out| {
            logits.slice_set(&out, 0, 0)?;
            crate::kernels::decode::greedy_tail(&out, &ids, &picks)
        });
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags).map_err(|e| to_err("ending the capture", e))?;
        body?;
        let graph = graph.ok_or_else(|| candle_core::Error::msg("the capture recorded nothing"))?;
        graph.upload().map_err(|e| to_err("uploading the graph", e))?;
        let name = GRAPHS.fetch_add(1, Ordering::Relaxed);
        Ok(Captured { key, ids, meta, logits, picks, graph, name, launches: 0 })
    }
}
