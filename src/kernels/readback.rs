//! Small u32 tensors (a decoding step's greedy picks) copied to the host behind the stream's work: the copy
//! is queued into page-locked memory with an event after it, and only reading waits, for that event. The host
//! can so queue the next step before it knows this one's picks, and the GPU never waits for the host between
//! steps. (A copy into pageable memory, candle's `to_vec1`, holds the host until the stream has drained.)

use candle_core::{bail, Result, Storage, Tensor};
use cudarc::driver::{CudaEvent, DevicePtr, PinnedHostSlice};

/// Copies in flight or landed, in turn among a few page-locked buffers.
#[derive(Default)]
pub struct Readback {
    slots: Vec<Slot>,
    next: usize,
    started: u64,
}

/// A page-locked buffer, the event recorded after the copy into it, and which copy that was.
struct Slot {
    host: PinnedHostSlice<u32>,
    landed: CudaEvent,
    len: usize,
    copy: u64,
}

impl Drop for Slot {
    /// The buffer is freed only once nothing is being copied into it.
    fn drop(&mut self) {
        let _ = self.landed.synchronize();
    }
}

/// A copy [`Readback::try_start`] queued: read it with [`Readback::read`].
#[derive(Debug)]
pub struct Ticket {
    slot: usize,
    copy: u64,
}

/// Buffers used in turn: a decoding step's copy and the one after it may be in flight at once.
const SLOTS: usize = 2;

impl Readback {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues the copy of `ids` (u32, contiguous) to the host after everything queued on its stream so far;
    /// `None` where `ids` is not on a GPU (read it as usual). A buffer is reused two copies later: a ticket not
    /// read by then reads an error.
    pub fn try_start(&mut self, ids: &Tensor) -> Result<Option<Ticket>> {
        let (storage, layout) = ids.storage_and_layout();
        let Storage::Cuda(s) = &*storage else { return Ok(None) };
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("reading back a strided tensor") };
        let stream = s.device.cuda_stream();
        let err = |what: &str, e: cudarc::driver::DriverError| candle_core::Error::Msg(format!("{what}: {e:?}"));
        let src = s.as_cuda_slice::<u32>()?.slice(start..end);
        let len = end - start;
        let at = self.next;
        self.next = (self.next + 1) % SLOTS;
        if self.slots.get(at).is_none_or(|slot| slot.host.len() < len) {
            let ctx = stream.context();
            // SAFETY: plain page-locked memory (not write-combined: the host reads it), written by the copy
            // before anything reads it.
            let host =
                unsafe { ctx.alloc_pinned_with_flags::<u32>(len.max(32), 0) }.map_err(|e| err("pinned memory", e))?;
            let landed = ctx.new_event(None).map_err(|e| err("an event", e))?;
            let slot = Slot { host, landed, len: 0, copy: 0 };
            match at < self.slots.len() {
                true => self.slots[at] = slot,
                false => self.slots.push(slot),
            }
        }
        let slot = &mut self.slots[at];
        // A copy still landing in this buffer (one never read) is waited for before the buffer is written.
        slot.landed.synchronize().map_err(|e| err("waiting for an earlier copy", e))?;
        // The first `len` elements of the buffer (cudarc's `memcpy_dtoh` copies the whole destination).
        let host = slot.host.as_mut_slice().map_err(|e| err("pinned memory", e))?;
        let (from, _in_use) = src.device_ptr(&stream);
        // SAFETY: `from` holds `len` u32 of a live tensor, kept alive (and ordered) by `_in_use` as cudarc keeps
        // its own copies' sources; the buffer outlives the copy (its slot waits for `landed` before it is
        // written again or freed).
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..len], from, stream.cu_stream()) }
            .map_err(|e| err("copying picks to the host", e))?;
        slot.landed.record(&stream).map_err(|e| err("recording the copy's event", e))?;
        self.started += 1;
        (slot.len, slot.copy) = (len, self.started);
        Ok(Some(Ticket { slot: at, copy: self.started }))
    }

    /// The ids of `ticket`'s copy, once they have landed (the wait is for that copy only).
    pub fn read(&mut self, ticket: Ticket) -> Result<Vec<u32>> {
        let Some(slot) = self.slots.get(ticket.slot).filter(|s| s.copy == ticket.copy) else {
            bail!("a copy to the host was read after its buffer was reused");
        };
        let wait = slot.landed.synchronize();
        wait.map_err(|e| candle_core::Error::Msg(format!("waiting for picks copied to the host: {e:?}")))?;
        let host = slot.host.as_slice().map_err(|e| candle_core::Error::Msg(format!("reading picks: {e:?}")))?;
        Ok(host[..slot.len].to_vec())
    }
}
