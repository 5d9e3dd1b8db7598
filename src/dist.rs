//! The communicator of data-parallel training: the training loop sums across ranks through it without
//! knowing how many ranks there are or how they talk.
//!
//! - `Single`: one process, every collective a no-op.
//! - `Mpi` (feature `mpi`): ranks started by `mpirun` (or `srun`), collectives through MPI on the host. This is
//!   how CPU runs and CI test the distributed path (`mpirun -n 2` on CPU).
//! - On GPUs (features `cuda` and `mpi`), [`Communicator::use_device`] adds NCCL: rank 0 creates the NCCL
//!   unique id, MPI broadcasts it, and from then on tensors on the GPU are summed by NCCL on a stream of its
//!   own; MPI keeps the scalars, barriers and aborts.
//!
//! Gradients are summed by a [`GradReducer`] range by range as the backward finishes each layer, so on GPUs
//! the traffic of one layer overlaps the backward of the layers below it; under ZeRO-1 each part of a range
//! is summed onto the rank that owns it only (half the traffic of an all-reduce).

use std::ops::Range;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
#[cfg(feature = "mpi")]
use mpi::traits::{Communicator as _, CommunicatorCollectives as _};

pub enum Communicator {
    Single,
    #[cfg(feature = "mpi")]
    Mpi(Mpi),
}

/// The world size the launcher announces (Open MPI's `mpirun`, or PMI: MPICH's `mpiexec` and Slurm), 1 when
/// there is none. Read before MPI starts, so that a single process never initializes MPI.
fn launched_world() -> Result<usize> {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        if let Ok(v) = std::env::var(var) {
            return v.parse().with_context(|| format!("{var}={v} is not a number"));
        }
    }
    Ok(1)
}

impl Communicator {
    /// `Single` unless launched under MPI with more than one rank.
    pub fn from_env() -> Result<Self> {
        let world = launched_world()?;
        if world <= 1 {
            return Ok(Self::Single);
        }
        #[cfg(feature = "mpi")]
        return Ok(Self::Mpi(Mpi::init()?));
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "launched with {world} ranks but built without the `mpi` feature: cargo build --release --features mpi"
        );
    }

    pub fn rank(&self) -> usize {
        match self {
            Self::Single => 0,
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.rank,
        }
    }

    pub fn world(&self) -> usize {
        match self {
            Self::Single => 1,
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.world,
        }
    }

    /// The rank among the ranks of this node: which GPU of the node this rank takes.
    pub fn local_rank(&self) -> usize {
        match self {
            Self::Single => 0,
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.local_rank,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Tells the communicator which device this rank computes on: with several ranks on CUDA devices,
    /// GPU tensors are summed through NCCL from now on. A no-op otherwise.
    #[cfg_attr(not(all(feature = "mpi", feature = "cuda")), allow(unused_variables))]
    pub fn use_device(&self, device: &candle_core::Device) -> Result<()> {
        match (self, device) {
            #[cfg(all(feature = "mpi", feature = "cuda"))]
            (Self::Mpi(m), candle_core::Device::Cuda(d)) => m.start_nccl(d),
            _ => Ok(()),
        }
    }

    /// Replaces the contiguous tensor `t` (f32, bf16 or f64; a view of a larger buffer is fine) by its
    /// elementwise sum over all ranks, on every rank. On GPUs the sum runs on NCCL's stream after the work
    /// queued so far; call [`Communicator::wait_for_collectives`] before reading `t` or freeing it.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn sum_in_place(&self, t: &Tensor) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.sum_in_place(t),
        }
    }

    /// Replaces the contiguous tensor `t` (a view of a larger buffer is fine) on every rank by its value on
    /// rank `root`. On GPUs it runs on NCCL's stream like [`Communicator::sum_in_place`].
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn broadcast_in_place(&self, t: &Tensor, root: usize) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => Ok(t.inplace_op1(&with_mpi::Collective { mpi: m, op: with_mpi::Op::Broadcast(root) })?),
        }
    }

    /// Replaces the contiguous tensor `t` on rank `root` by its elementwise sum over all ranks; elsewhere `t`
    /// is left as it was. Half the traffic of [`Communicator::sum_in_place`], for a sum only `root` needs. On
    /// GPUs it runs on NCCL's stream like [`Communicator::sum_in_place`].
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn reduce_in_place(&self, t: &Tensor, root: usize) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => Ok(t.inplace_op1(&with_mpi::Collective { mpi: m, op: with_mpi::Op::Reduce(root) })?),
        }
    }

    /// Gives every rank the shards of the others: `t[shards[r]]` of rank `r` replaces it on every rank (`t`
    /// contiguous, `shards` one disjoint range per rank). An all-gather whose shards may differ in length:
    /// one broadcast per rank, on GPUs in one NCCL group so that they run at once, each link busy in both
    /// directions; on NCCL's stream like [`Communicator::sum_in_place`].
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_gather_in_place(&self, t: &Tensor, shards: &[Range<usize>]) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.group(|| {
                for (r, s) in shards.iter().enumerate() {
                    self.broadcast_in_place(&t.narrow(0, s.start, s.len())?, r)?;
                }
                Ok(())
            }),
        }
    }

    /// Makes `device`'s stream wait for the collectives queued so far (a no-op off the GPU, where they are
    /// done).
    #[cfg_attr(not(all(feature = "mpi", feature = "cuda")), allow(unused_variables))]
    pub fn wait_for_collectives(&self, device: &candle_core::Device) -> Result<()> {
        match (self, device) {
            #[cfg(all(feature = "mpi", feature = "cuda"))]
            (Self::Mpi(m), candle_core::Device::Cuda(d)) => m.wait_for_collectives(d),
            _ => Ok(()),
        }
    }

    /// A reducer for the flat gradient buffer `grads` (f32 or bf16), sending `wire` (f32 or bf16) over the
    /// network.
    /// With `owners` (ZeRO-1: each rank's shard of the buffer, in rank order), each part of a range is summed
    /// onto the rank that owns it only, and the rest of `grads` is left partial; without, onto every rank.
    pub fn grad_reducer<'a>(
        &'a self,
        grads: &'a Tensor,
        wire: DType,
        owners: Option<Vec<Range<usize>>>,
    ) -> GradReducer<'a> {
        GradReducer { comm: self, grads, wire, owners, staged: Vec::new() }
    }

    /// Sums scalars (loss sums, token counts) over all ranks in place.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum_f64(&self, xs: &mut [f64]) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => {
                // MPI's send and receive buffers must not alias: the copy is the send buffer.
                #[allow(clippy::unnecessary_to_owned)]
                m.sum_into(&xs.to_vec(), xs);
                Ok(())
            }
        }
    }

    /// Every rank's `bytes`, in rank order, on rank 0 (None elsewhere): how evaluation results reach the
    /// rank that writes them.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        match self {
            Self::Single => Ok(Some(vec![bytes.to_vec()])),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => Ok(m.gather_bytes(bytes)),
        }
    }

    pub fn barrier(&self) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => {
                m.comm.barrier();
                Ok(())
            }
        }
    }

    /// Passes `r` through, except that with several ranks an error ends the whole job: it is printed with
    /// this rank's number and MPI aborts every rank, so that none waits forever in a collective for this one.
    pub fn or_abort<T>(&self, r: Result<T>) -> Result<T> {
        #[cfg(feature = "mpi")]
        if let (Self::Mpi(m), Err(e)) = (self, &r) {
            // One write, so that lines of ranks failing together do not interleave.
            let line = format!("rank {}: error: {}\n", m.rank, crate::cli::message(e));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            m.comm.abort(1);
        }
        r
    }
}

/// Sums the flat gradient buffer over the ranks one range at a time, each as soon as the backward has
/// finished writing it (llm.c's `gpt2_backward_and_reduce`). Every rank must reduce the same ranges in the
/// same order, which the shared model code guarantees.
pub struct GradReducer<'a> {
    comm: &'a Communicator,
    grads: &'a Tensor,
    wire: DType,
    /// ZeRO-1: each rank's shard of `grads`, where its parts of every range are summed.
    owners: Option<Vec<Range<usize>>>,
    /// Copies of ranges in the wire's dtype where it is not the buffer's, summed in place and kept alive until
    /// the sums are done; those whose sum this rank holds (the flag) are written back into `grads` by
    /// [`GradReducer::finish`].
    staged: Vec<(usize, Tensor, bool)>,
}

impl GradReducer<'_> {
    /// Starts summing `grads[range]` over the ranks, onto every rank or, split at the shard boundaries,
    /// each part onto its owner. With one rank, nothing to do.
    pub fn reduce(&mut self, range: Range<usize>) -> Result<()> {
        if self.comm.world() == 1 || range.is_empty() {
            return Ok(());
        }
        let parts: Vec<(Range<usize>, Option<usize>)> = match &self.owners {
            None => vec![(range, None)],
            Some(owners) => owners
                .iter()
                .enumerate()
                .map(|(rank, s)| (range.start.max(s.start)..range.end.min(s.end), Some(rank)))
                .filter(|(part, _)| !part.is_empty())
                .collect(),
        };
        for (part, root) in parts {
            self.sum(part, root)?;
        }
        Ok(())
    }

    /// Starts summing `grads[range]` onto rank `root`, or onto every rank.
    fn sum(&mut self, range: Range<usize>, root: Option<usize>) -> Result<()> {
        let part = self.grads.narrow(0, range.start, range.len())?;
        let staged = self.wire != self.grads.dtype();
        let wire = match staged {
            false => part,
            true => part.to_dtype(self.wire)?,
        };
        match root {
            None => self.comm.sum_in_place(&wire)?,
            Some(r) => self.comm.reduce_in_place(&wire, r)?,
        }
        if staged {
            self.staged.push((range.start, wire, root.is_none_or(|r| r == self.comm.rank())));
        }
        Ok(())
    }

    /// Waits for the sums, then writes the staged ones this rank holds back in the buffer's dtype (the others
    /// are in place already).
    pub fn finish(self) -> Result<()> {
        self.comm.wait_for_collectives(self.grads.device())?;
        for (offset, staged, _) in self.staged.into_iter().filter(|s| s.2) {
            self.grads.slice_set(&staged.to_dtype(self.grads.dtype())?, 0, offset)?;
        }
        Ok(())
    }
}

/// Ends this process when no progress is reported for `timeout`: a rank that hangs (a stuck GPU, a stalled
/// collective, a stopped process) leaves the others waiting in a collective, where nothing else would
/// notice. Exiting makes the launcher end every rank, as for a rank that died; the last checkpoint stays.
pub struct Watchdog {
    beat: std::sync::Arc<std::sync::atomic::AtomicU64>,
    start: std::time::Instant,
}

impl Watchdog {
    pub fn start(rank: usize, timeout: std::time::Duration) -> Self {
        use std::sync::atomic::Ordering;
        let beat = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = std::time::Instant::now();
        let seen = beat.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let idle = start.elapsed().as_secs().saturating_sub(seen.load(Ordering::Relaxed));
            if idle >= timeout.as_secs() {
                eprintln!(
                    "rank {rank}: error: no progress for {idle} s (train.step_timeout); a rank has hung or a \
                     collective stalled: ending the job, the last checkpoint is intact"
                );
                std::process::exit(3);
            }
        });
        Self { beat, start }
    }

    /// Reports progress.
    pub fn beat(&self) {
        self.beat.store(self.start.elapsed().as_secs(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(feature = "mpi")]
pub use with_mpi::Mpi;

#[cfg(feature = "mpi")]
mod with_mpi {
    use anyhow::{Context, Result};
    use candle_core::Tensor;
    use mpi::collective::SystemOperation;
    use mpi::datatype::Equivalence;
    use mpi::environment::{Threading, Universe};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _};

    pub struct Mpi {
        pub(super) comm: SimpleCommunicator,
        pub(super) rank: usize,
        pub(super) world: usize,
        pub(super) local_rank: usize,
        /// Set once this rank's GPU is known.
        #[cfg(feature = "cuda")]
        nccl: std::cell::OnceCell<cudarc::nccl::safe::Comm>,
        // Dropping it finalizes MPI; it stays alive as long as the communicator does.
        _universe: Universe,
    }

    impl Mpi {
        pub(super) fn init() -> Result<Self> {
            // Funneled: candle's worker threads exist, but only the main thread calls MPI.
            let (universe, _) =
                mpi::initialize_with_threading(Threading::Funneled).context("MPI was initialized twice")?;
            let comm = universe.world();
            let local_rank = comm.split_shared(comm.rank()).rank() as usize;
            // A panic would otherwise unwind into MPI_Finalize while the other ranks wait in a collective.
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                SimpleCommunicator::world().abort(101);
            }));
            Ok(Self {
                rank: comm.rank() as usize,
                world: comm.size() as usize,
                local_rank,
                comm,
                #[cfg(feature = "cuda")]
                nccl: Default::default(),
                _universe: universe,
            })
        }

        pub(super) fn gather_bytes(&self, bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
            use mpi::datatype::PartitionMut;
            use mpi::traits::Root as _;
            let root = self.comm.process_at_rank(0);
            let len = bytes.len() as i32;
            if self.rank != 0 {
                root.gather_into(&len);
                root.gather_varcount_into(bytes);
                return None;
            }
            let mut lens = vec![0i32; self.world];
            root.gather_into_root(&len, &mut lens[..]);
            let displs: Vec<i32> = lens.iter().scan(0, |at, &l| Some(std::mem::replace(at, *at + l))).collect();
            let mut all = vec![0u8; lens.iter().sum::<i32>() as usize];
            root.gather_varcount_into_root(bytes, &mut PartitionMut::new(&mut all[..], &lens[..], &displs[..]));
            Some(displs.iter().zip(&lens).map(|(&d, &l)| all[d as usize..(d + l) as usize].to_vec()).collect())
        }

        pub(super) fn sum_into<T: Equivalence>(&self, send: &[T], recv: &mut [T]) {
            self.comm.all_reduce_into(send, recv, SystemOperation::sum());
        }

        /// Creates the NCCL communicator, with the unique id rank 0 made and MPI sent, on a high-priority
        /// stream of its own, so that gradient sums overlap the backward and get SMs when they are ready.
        #[cfg(feature = "cuda")]
        pub(super) fn start_nccl(&self, device: &candle_core::CudaDevice) -> Result<()> {
            use cudarc::nccl::safe::{Comm, Id};
            use mpi::traits::Root as _;
            // `device::rank_device` turned cudarc's per-buffer events off, which a second stream would
            // otherwise record and wait on for every buffer of every launch (microseconds of CPU each,
            // thousands of launches per step). The two streams meet only in the collectives and
            // `wait_for_collectives`, which order them explicitly, and every buffer NCCL touches stays alive
            // until `wait_for_collectives`.
            let ctx = device.cuda_stream().context().clone();
            let (_, highest) = cudarc::driver::result::stream::get_priority_range().context("stream priorities")?;
            let stream = ctx.new_stream_with_priority(highest).context("creating NCCL's stream")?;
            let mut id = match self.rank {
                0 => *Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL unique id: {e:?}"))?.internal(),
                _ => [0; 128],
            };
            self.comm.process_at_rank(0).broadcast_into(&mut id[..]);
            let comm = Comm::from_rank(stream, self.rank, self.world, Id::uninit(id))
                .map_err(|e| anyhow::anyhow!("rank {}: starting NCCL: {e:?}", self.rank))?;
            self.nccl.set(comm).map_err(|_| anyhow::anyhow!("NCCL was started twice"))
        }

        pub(super) fn sum_in_place(&self, t: &Tensor) -> Result<()> {
            Ok(t.inplace_op1(&Collective { mpi: self, op: Op::Sum })?)
        }

        /// Runs `f`, whose NCCL collectives start together as one group when it returns.
        pub(super) fn group(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
            #[cfg(feature = "cuda")]
            if self.nccl.get().is_some() {
                use cudarc::nccl::result::{group_end, group_start};
                group_start().map_err(|e| anyhow::anyhow!("starting an NCCL group: {e:?}"))?;
                let r = f();
                group_end().map_err(|e| anyhow::anyhow!("running an NCCL group: {e:?}"))?;
                return r;
            }
            f()
        }

        #[cfg(feature = "cuda")]
        pub(super) fn wait_for_collectives(&self, device: &candle_core::CudaDevice) -> Result<()> {
            if let Some(comm) = self.nccl.get() {
                device.cuda_stream().join(&comm.stream()).context("waiting for NCCL's stream")?;
            }
            Ok(())
        }
    }

    pub(super) enum Op {
        Sum,
        /// Onto this rank.
        Reduce(usize),
        /// From this rank.
        Broadcast(usize),
    }

    /// A collective as an in-place candle op on a contiguous tensor (or view): NCCL on GPU tensors, MPI
    /// through host memory on CPU tensors.
    pub(super) struct Collective<'a> {
        pub mpi: &'a Mpi,
        pub op: Op,
    }

    impl candle_core::InplaceOp1 for Collective<'_> {
        fn name(&self) -> &'static str {
            match self.op {
                Op::Sum => "all-reduce-sum",
                Op::Reduce(_) => "reduce-sum",
                Op::Broadcast(_) => "broadcast",
            }
        }

        fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
            use candle_core::backend::BackendStorage as _;
            use candle_core::CpuStorage;
            let (start, end) =
                l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
            match s {
                CpuStorage::F32(v) => self.on_host(&mut v[start..end]),
                CpuStorage::F64(v) => self.on_host(&mut v[start..end]),
                // MPI has no bf16: the values travel as f32 (exactly) and a sum is rounded back to bf16, the
                // result of a bf16 all-reduce that accumulates in f32 (the traffic saving is NCCL's to have).
                CpuStorage::BF16(v) => {
                    let mut wide: Vec<f32> = v[start..end].iter().map(|x| x.to_f32()).collect();
                    self.on_host(&mut wide);
                    v[start..end].iter_mut().zip(wide).for_each(|(x, w)| *x = half::bf16::from_f32(w));
                }
                other => candle_core::bail!("MPI {} of {:?} tensors is not supported", self.name(), other.dtype()),
            }
            Ok(())
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
            use candle_core::backend::BackendStorage as _;
            use candle_core::DType;
            use cudarc::nccl::safe::ReduceOp;
            let comm = self.mpi.nccl.get().ok_or_else(|| candle_core::Error::Msg("NCCL was not started".into()))?;
            let (start, end) =
                l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
            // After the ops that wrote `t` on the compute stream.
            comm.stream()
                .join(&s.device.cuda_stream())
                .map_err(|e| candle_core::Error::Msg(format!("ordering NCCL after the backward: {e:?}")))?;
            macro_rules! reduce {
                ($t:ty) => {{
                    let mut view = s.as_cuda_slice_mut::<$t>()?.slice_mut(start..end);
                    match self.op {
                        Op::Sum => comm.all_reduce_in_place(&mut view, &ReduceOp::Sum),
                        Op::Reduce(root) => comm.reduce_in_place(&mut view, &ReduceOp::Sum, root as i32),
                        Op::Broadcast(root) => comm.broadcast_in_place(&mut view, root as i32),
                    }
                }};
            }
            match s.dtype() {
                DType::F32 => reduce!(f32),
                DType::BF16 => reduce!(half::bf16),
                DType::F64 => reduce!(f64),
                d => candle_core::bail!("NCCL {} of {d:?} is not supported", self.name()),
            }
            .map_err(|e| candle_core::Error::Msg(format!("NCCL {}: {e:?}", self.name())))?;
            Ok(())
        }
    }

    impl Collective<'_> {
        fn on_host<T: Equivalence + Copy>(&self, v: &mut [T]) {
            match self.op {
                Op::Sum => {
                    let send = v.to_vec();
                    self.mpi.sum_into(&send, v);
                }
                Op::Reduce(root) => {
                    use mpi::traits::Root as _;
                    let at = self.mpi.comm.process_at_rank(root as i32);
                    match self.mpi.rank == root {
                        true => at.reduce_into_root(&v.to_vec()[..], v, SystemOperation::sum()),
                        false => at.reduce_into(&*v, SystemOperation::sum()),
                    }
                }
                Op::Broadcast(root) => {
                    use mpi::traits::Root as _;
                    self.mpi.comm.process_at_rank(root as i32).broadcast_into(v);
                }
            }
        }
    }
}
