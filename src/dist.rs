//! The communicator of data-parallel training: the training loop sums across ranks through it without
//! knowing how many ranks there are or how they talk.
//!
//! - `Single`: one process, every collective a no-op.
//! - `Mpi` (feature `mpi`): ranks started by `mpirun` (or `srun`), collectives through MPI on the host. This is
//!   how CPU runs and CI test the distributed path (`mpirun -n 2` on CPU).
//! - On GPUs (features `cuda` and `mpi`), [`Communicator::use_device`] adds NCCL: rank 0 creates the NCCL
//!   unique id, MPI broadcasts it, and from then on tensors on the GPU are summed by NCCL on the device's
//!   stream; MPI keeps the scalars, barriers and aborts.

use anyhow::{Context, Result};
use candle_core::Tensor;
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

    /// The elementwise sum of `t` over all ranks, in `t`'s dtype (f32, bf16 or f64), on every rank.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::Single => Ok(t.clone()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.all_reduce_sum(t),
        }
    }

    /// Sums scalars (loss sums, token counts) over all ranks in place.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum_f64(&self, xs: &mut [f64]) -> Result<()> {
        match self {
            Self::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => {
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
            let line = format!("rank {}: error: {e:#}\n", m.rank);
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            m.comm.abort(1);
        }
        r
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
    use anyhow::{bail, Context, Result};
    use candle_core::{DType, Tensor};
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

        fn summed<T: Equivalence + candle_core::WithDType>(&self, t: &Tensor) -> Result<Tensor> {
            let send = t.flatten_all()?.to_vec1::<T>()?;
            let mut recv = send.clone();
            self.sum_into(&send, &mut recv);
            Ok(Tensor::from_vec(recv, t.shape(), t.device())?)
        }

        /// Creates the NCCL communicator on `device`'s stream, with the unique id rank 0 made and MPI sent.
        #[cfg(feature = "cuda")]
        pub(super) fn start_nccl(&self, device: &candle_core::CudaDevice) -> Result<()> {
            use cudarc::nccl::safe::{Comm, Id};
            use mpi::traits::Root as _;
            let mut id = match self.rank {
                0 => *Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL unique id: {e:?}"))?.internal(),
                _ => [0; 128],
            };
            self.comm.process_at_rank(0).broadcast_into(&mut id[..]);
            let comm = Comm::from_rank(device.cuda_stream(), self.rank, self.world, Id::uninit(id))
                .map_err(|e| anyhow::anyhow!("rank {}: starting NCCL: {e:?}", self.rank))?;
            self.nccl.set(comm).map_err(|_| anyhow::anyhow!("NCCL was started twice"))
        }

        pub(super) fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            #[cfg(feature = "cuda")]
            if let (Some(comm), true) = (self.nccl.get(), t.device().is_cuda()) {
                return Ok(t.contiguous()?.apply_op1_no_bwd(&nccl::Sum(comm))?);
            }
            match t.dtype() {
                DType::F32 => self.summed::<f32>(t),
                DType::F64 => self.summed::<f64>(t),
                // MPI has no bf16: the values travel as f32 (exactly) and the sum is rounded back to bf16, the
                // result of a bf16 all-reduce that accumulates in f32 (the traffic saving is NCCL's to have).
                DType::BF16 => self.summed::<f32>(&t.to_dtype(DType::F32)?)?.to_dtype(DType::BF16).map_err(Into::into),
                d => bail!("all-reduce of {d:?} tensors is not supported"),
            }
        }
    }

    /// NCCL's all-reduce as a candle op: the sum lands in a new buffer on the same stream, so it is ordered
    /// after the backward that produced the gradients and before the optimizer that reads them.
    #[cfg(feature = "cuda")]
    mod nccl {
        use candle_core::backend::BackendStorage;
        use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape};
        use cudarc::nccl::safe::{Comm, ReduceOp};

        pub struct Sum<'a>(pub &'a Comm);

        impl candle_core::CustomOp1 for Sum<'_> {
            fn name(&self) -> &'static str {
                "nccl-all-reduce-sum"
            }

            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
                candle_core::bail!("NCCL sums GPU tensors only")
            }

            fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
                let (start, end) =
                    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
                let dev = s.device().clone();
                macro_rules! reduce {
                    ($t:ty) => {{
                        let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                        // SAFETY: NCCL writes every element before anything reads the buffer.
                        let mut dst = unsafe { dev.alloc::<$t>(end - start)? };
                        self.0
                            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                        CudaStorage::wrap_cuda_slice(dst, dev)
                    }};
                }
                let out = match s.dtype() {
                    DType::F32 => reduce!(f32),
                    DType::BF16 => reduce!(half::bf16),
                    d => candle_core::bail!("NCCL all-reduce of {d:?} is not supported"),
                };
                Ok((out, l.shape().clone()))
            }
        }
    }
}
