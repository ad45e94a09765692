//! Virtio devices over the virtio-mmio transport (virtio 1.2, section 4.2).
//!
//! A device implements [`VirtioDevice`]: its id, queues, features and
//! config space, and what to do when the driver notifies a queue or a host
//! backend fd becomes ready. The [`mmio::MmioTransport`] owns the queues
//! and the register state machine, hands the device a [`QueueContext`] for
//! each piece of work, and turns a [`DeviceError`] into the virtio
//! `DEVICE_NEEDS_RESET` state: a misbehaving driver stops its own device,
//! never the VMM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::Registrar;
use crate::memory::GuestMemory;

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vsock;

/// `VIRTIO_F_VERSION_1`: the device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: the driver says in `used_event` after which
/// used buffer it wants an interrupt, the device in `avail_event` after
/// which available buffer it wants a notification (virtio 1.2, 2.7.7 and
/// 2.7.8). Offered by every device; applied to the queues by
/// [`apply_ring_features`].
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_VRING: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// A failure that stops one device until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver broke the queue protocol (e.g. a bad available index).
    #[error("queue {queue}: {reason}")]
    Queue {
        /// The queue index.
        queue: usize,
        /// What was wrong.
        reason: String,
    },
    /// The host side of the device failed.
    #[error("backend: {0}")]
    Backend(String),
}

/// The device-to-driver interrupt line and the "needs reset" flag.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt raised by writing `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_VRING);
    }

    /// Tells the driver the config space or device status changed.
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG);
    }

    /// Puts the device into `DEVICE_NEEDS_RESET` and tells the driver.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    /// Whether the device is in `DEVICE_NEEDS_RESET`.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What a device may touch while it works.
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The device's queues, in index order.
    pub queues: &'a mut [Queue],
    /// The interrupt line.
    pub interrupt: &'a Interrupt,
    /// Adds or removes backend fds on the device thread's epoll (sub-tokens
    /// at or above [`FIRST_BACKEND_TOKEN`]).
    pub registrar: &'a Registrar,
}

/// The first sub-token devices may use for their own fds; lower ones are
/// the queue notification eventfds.
pub const FIRST_BACKEND_TOKEN: u32 = 0x100;

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 4 = entropy, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space (read-only for most devices).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio device {}: ignored config write of {} bytes at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }
    /// Starts the device after the driver set DRIVER_OK.
    fn activate(
        &mut self,
        _acked_features: u64,
        _ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Processes queue `queue` after the driver notified it.
    fn queue_notified(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError>;
    /// Handles an event on a backend fd registered with sub-token `sub`.
    fn backend_event(
        &mut self,
        _sub: u32,
        _events: EventSet,
        _ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Returns to the pre-activation state (driver reset); backend fds
    /// registered at activation must be removed.
    fn reset(&mut self, _registrar: &Registrar) {}
}

/// Copies the bytes of `config` at `offset` into `data`, zero-filling
/// anything past its end (guest-controlled offsets never panic).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let len = data.len().min(config.len() - start);
    data[..len].copy_from_slice(&config[start..start + len]);
}

/// Applies the ring features the driver acked to a device's queues when it
/// activates: with [`VIRTIO_RING_F_EVENT_IDX`] the queues honour
/// `used_event` when deciding on interrupts and the device publishes
/// `avail_event` (see [`QueueCursor::enable_kicks`]). Without it nothing
/// changes: every used batch interrupts, every available chain kicks.
pub fn apply_ring_features(queues: &mut [Queue], acked_features: u64) {
    let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
    for queue in queues {
        queue.set_event_idx(event_idx);
    }
}

/// A descriptor chain borrowed from guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// What a queue handler did with one descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Served: the chain goes on the used ring with this many bytes
    /// written into it.
    Used(u32),
    /// Not served now (no data for it yet, or a rate limit says wait):
    /// the chain stays available and the pass over the queue ends.
    Deferred,
}

/// How one pass over a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePass {
    /// Chains put on the used ring.
    pub served: usize,
    /// The pass ended on a [`ChainOutcome::Deferred`] chain rather than on
    /// an empty available ring.
    pub deferred: bool,
}

/// Pops every available chain of queue `index`, lets `handle` serve it
/// (returning the number of bytes it wrote to the chain), puts it on the
/// used ring and raises the interrupt if the driver wants one.
///
/// A bad available index or head index is a driver error for the whole
/// queue ([`DeviceError::Queue`]); problems inside one chain are for
/// `handle` to judge (it typically reports 0 bytes and carries on).
pub fn process_queue<F>(
    ctx: &mut QueueContext<'_>,
    index: usize,
    mut handle: F,
) -> Result<usize, DeviceError>
where
    F: FnMut(&GuestMemory, Chain<'_>) -> u32,
{
    process_queue_until_deferred(ctx, index, |mem, chain| {
        ChainOutcome::Used(handle(mem, chain))
    })
    .map(|pass| pass.served)
}

/// [`process_queue`] for devices that cannot always serve a chain: the
/// first chain `handle` defers is put back (it will be the first one of
/// the next pass) and the pass ends there. Used where the device waits
/// for its backend (RX) or a rate limiter.
///
/// A pass that empties the available ring asks the driver to notify the
/// next chain it posts, and goes on if chains arrived meanwhile (see
/// [`QueueCursor::drain`]). A deferred pass leaves notifications as they
/// are: whatever it waits for (a backend fd, a limiter's timer) drives the
/// queue again, and a kick for every chain posted meanwhile would only be
/// an exit for nothing.
pub fn process_queue_until_deferred<F>(
    ctx: &mut QueueContext<'_>,
    index: usize,
    mut handle: F,
) -> Result<QueuePass, DeviceError>
where
    F: FnMut(&GuestMemory, Chain<'_>) -> ChainOutcome,
{
    let mut cursor = QueueCursor::new(ctx, index)?;
    let deferred = cursor.drain(
        |cursor| serve_until_deferred(cursor, &mut handle),
        |deferred| !deferred,
    )?;
    let served = cursor.finish()?;
    Ok(QueuePass { served, deferred })
}

/// One pass of [`process_queue_until_deferred`]: serves chains until the
/// ring is empty (false) or `handle` defers one (true).
fn serve_until_deferred<F>(
    cursor: &mut QueueCursor<'_, '_>,
    handle: &mut F,
) -> Result<bool, DeviceError>
where
    F: FnMut(&GuestMemory, Chain<'_>) -> ChainOutcome,
{
    while let Some(chain) = cursor.pop()? {
        let head = chain.head_index();
        match handle(cursor.mem, chain) {
            ChainOutcome::Used(written) => cursor.add_used(head, written)?,
            ChainOutcome::Deferred => {
                cursor.put_back(1);
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// One queue of a [`QueueContext`], driven chain by chain, for devices
/// that may take several chains for one piece of work (virtio-net
/// mergeable RX buffers). A bad available index or head index is a driver
/// error for the whole queue ([`DeviceError::Queue`]); [`Self::finish`]
/// raises the interrupt if chains were used and the driver wants one.
///
/// Notification suppression with [`VIRTIO_RING_F_EVENT_IDX`]: the driver
/// notifies (kicks) only when it makes available the chain whose index the
/// device put in `avail_event`. Once it has kicked, further chains kick no
/// more until the device moves `avail_event` forward, so a device draining
/// a queue is not interrupted by kicks it would find nothing new in (this
/// is the "disabled" state: virtio-queue's `disable_notification` writes
/// nothing with EVENT_IDX either). When the device runs out of chains it
/// must move `avail_event` to the first chain not yet posted
/// ([`Self::enable_kicks`]) and look once more, or a chain posted in
/// between is never kicked for: [`Self::drain`] does both.
pub struct QueueCursor<'c, 'm> {
    index: usize,
    /// Guest memory.
    pub mem: &'m GuestMemory,
    queue: &'c mut Queue,
    interrupt: &'c Interrupt,
    used: usize,
    /// The driver's available index when [`Self::pop`] last found no
    /// chain: the next chain it posts is the one to be kicked for, even if
    /// chains before it were put back.
    ring_end: Option<u16>,
}

impl<'c, 'm> QueueCursor<'c, 'm> {
    /// Queue `index` of `ctx`.
    pub fn new(ctx: &'c mut QueueContext<'m>, index: usize) -> Result<Self, DeviceError> {
        let queue = ctx
            .queues
            .get_mut(index)
            .ok_or_else(|| queue_error(index, "no such queue"))?;
        Ok(Self {
            index,
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            used: 0,
            ring_end: None,
        })
    }

    /// The queue's size as the driver set it.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The next available chain, if any.
    pub fn pop(&mut self) -> Result<Option<Chain<'m>>, DeviceError> {
        let mem = self.mem;
        let chain = self
            .queue
            .iter(mem)
            .map_err(|e| queue_error(self.index, e))?
            .next();
        if chain.is_none() {
            self.ring_end = Some(self.queue.next_avail());
        }
        Ok(chain)
    }

    /// Makes the last `count` chains popped (and not used) available again.
    pub fn put_back(&mut self, count: u16) {
        let next = self.queue.next_avail().wrapping_sub(count);
        self.queue.set_next_avail(next);
    }

    /// Puts chain `head` on the used ring with `written` bytes written into it.
    pub fn add_used(&mut self, head: u16, written: u32) -> Result<(), DeviceError> {
        self.queue
            .add_used(self.mem, head, written)
            .map_err(|e| queue_error(self.index, format!("head {head}: {e}")))?;
        self.used += 1;
        Ok(())
    }

    /// Runs `pass` over the queue; if `out_of_chains` says it stopped
    /// because the driver had posted no (or not enough) chains, asks for a
    /// kick at the driver's next chain and runs `pass` again if chains
    /// arrived in between. Returns what the last pass returned.
    ///
    /// Without [`VIRTIO_RING_F_EVENT_IDX`] this is one pass: the driver
    /// kicks for every chain, so nothing posted meanwhile goes unnoticed.
    pub fn drain<T>(
        &mut self,
        mut pass: impl FnMut(&mut Self) -> Result<T, DeviceError>,
        out_of_chains: impl Fn(&T) -> bool,
    ) -> Result<T, DeviceError> {
        loop {
            let outcome = pass(self)?;
            if !out_of_chains(&outcome) || !self.enable_kicks()? {
                return Ok(outcome);
            }
        }
    }

    /// With [`VIRTIO_RING_F_EVENT_IDX`]: asks the driver to kick when it
    /// posts a chain after those [`Self::pop`] last saw (`avail_event` =
    /// the available index then), and returns whether it has already
    /// posted one, in which case it may not kick for it and the caller
    /// must look again. Without EVENT_IDX: does nothing, returns false.
    ///
    /// Not virtio-queue's `enable_notification`: that one asks for a kick
    /// at the next chain *to be served*, which for a device that put chains
    /// back (mergeable RX waiting for more buffers) is a chain the driver
    /// already posted: it would never kick, and the re-check would report
    /// new chains forever.
    pub fn enable_kicks(&mut self) -> Result<bool, DeviceError> {
        if !self.queue.event_idx_enabled() {
            return Ok(false);
        }
        let end = self.ring_end.unwrap_or_else(|| self.queue.next_avail());
        self.set_avail_event(end)?;
        // The driver publishes its available index, then (after a full
        // barrier) reads avail_event to decide whether to kick; we publish
        // avail_event, then read its index. The full fence between our two
        // accesses means at least one side sees the other's store: either
        // the driver sees the new avail_event and kicks, or we see its new
        // index here.
        fence(Ordering::SeqCst);
        let idx = self
            .queue
            .avail_idx(self.mem, Ordering::Acquire)
            .map_err(|e| queue_error(self.index, e))?;
        Ok(idx.0 != end)
    }

    /// Writes `avail_event`: the u16 after the used ring's entries.
    fn set_avail_event(&self, value: u16) -> Result<(), DeviceError> {
        let offset = 4 + 8 * u64::from(self.queue.size());
        let addr = GuestAddress(self.queue.used_ring())
            .checked_add(offset)
            .ok_or_else(|| queue_error(self.index, "avail_event address overflows"))?;
        self.mem
            .store(value.to_le(), addr, Ordering::Relaxed)
            .map_err(|e| queue_error(self.index, format!("avail_event: {e}")))
    }

    /// Raises the interrupt if chains were used and the driver wants one;
    /// returns how many were used. With [`VIRTIO_RING_F_EVENT_IDX`] the
    /// driver wants one only if this batch took the used index past its
    /// `used_event` (virtio-queue's `needs_notification`, with wrapping
    /// u16 arithmetic and a full fence after the used index was written);
    /// without it, always (the `VRING_AVAIL_F_NO_INTERRUPT` hint is not
    /// honoured, as before).
    pub fn finish(self) -> Result<usize, DeviceError> {
        if self.used > 0
            && self
                .queue
                .needs_notification(self.mem)
                .map_err(|e| queue_error(self.index, e))?
        {
            self.interrupt.signal_used_queue();
        }
        Ok(self.used)
    }
}

fn queue_error(queue: usize, reason: impl ToString) -> DeviceError {
    DeviceError::Queue {
        queue,
        reason: reason.to_string(),
    }
}

/// Shared handle to a device's interrupt.
pub type SharedInterrupt = Arc<Interrupt>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{ChainBuilder, Rig, TestQueue};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn a_deferred_chain_stays_available_for_the_next_pass() {
        let q = TestQueue::new();
        let mock = q.mock();
        let mut queues = vec![q.queue()];
        let chain = ChainBuilder::new().writable(0x10_0000, 16);
        mock.add_desc_chains(&chain.descriptors(), 0).unwrap();
        mock.add_desc_chains(&chain.descriptors_at(1), 1).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        let mut event_loop = crate::event_loop::EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let mut ctx = QueueContext {
            mem: &q.mem,
            queues: &mut queues,
            interrupt: &interrupt,
            registrar: &registrar,
        };
        // First pass: serve one chain, defer the next.
        let mut budget = 1;
        let mut heads = Vec::new();
        let pass = process_queue_until_deferred(&mut ctx, 0, |_, chain| {
            if budget == 0 {
                return ChainOutcome::Deferred;
            }
            budget -= 1;
            heads.push(chain.head_index());
            ChainOutcome::Used(4)
        })
        .unwrap();
        assert_eq!(
            pass,
            QueuePass {
                served: 1,
                deferred: true
            }
        );
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        // Second pass: the deferred chain comes first, then the ring is empty.
        let pass = process_queue_until_deferred(&mut ctx, 0, |_, chain| {
            heads.push(chain.head_index());
            ChainOutcome::Used(4)
        })
        .unwrap();
        assert_eq!(
            pass,
            QueuePass {
                served: 1,
                deferred: false
            }
        );
        assert_eq!(heads, [0, 1]);
        assert_eq!(mock.used().idx().load(), 2);
        // Nothing left: an empty pass neither serves nor interrupts.
        assert_eq!(process_queue(&mut ctx, 0, |_, _| 0).unwrap(), 0);
        assert!(irq.read().is_ok(), "the second pass interrupted");
        assert!(irq.read().is_err(), "an empty pass interrupted");
    }

    /// Serves every available chain of queue 0 (0 bytes each).
    fn serve_all(rig: &mut Rig<'_>) -> usize {
        process_queue(&mut rig.ctx(), 0, |_, _| 0).unwrap()
    }

    #[test]
    fn with_event_idx_interrupts_follow_used_event() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        // used_event 0: the first batch (used 0 -> 2) passes it.
        rig.offer_readable(0, 2, 16);
        assert_eq!(serve_all(&mut rig), 2);
        assert_eq!(rig.interrupts(), 1);
        // The driver wants one once used entry 5 is written: 2 -> 3 and
        // 3 -> 5 do not get there, 5 -> 7 does.
        rig.set_used_event(5);
        rig.offer_readable(2, 1, 16);
        assert_eq!(serve_all(&mut rig), 1);
        assert_eq!(rig.interrupts(), 0, "used 3 has not passed used_event 5");
        rig.offer_readable(3, 2, 16);
        assert_eq!(serve_all(&mut rig), 2);
        assert_eq!(rig.interrupts(), 0, "used 5 has not passed used_event 5");
        rig.offer_readable(5, 2, 16);
        assert_eq!(serve_all(&mut rig), 2);
        assert_eq!(rig.interrupts(), 1, "used 7 passed used_event 5");
        // An empty pass never interrupts.
        assert_eq!(serve_all(&mut rig), 0);
        assert_eq!(rig.interrupts(), 0);
    }

    #[test]
    fn with_event_idx_used_event_is_compared_in_wrapping_u16() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_RING_F_EVENT_IDX);
        // The used index about to wrap: 0xfffe -> 0x0000 passes 0xffff.
        rig.queues[0].set_next_used(0xfffe);
        rig.set_used_event(0xffff);
        rig.offer_readable(0, 2, 16);
        assert_eq!(serve_all(&mut rig), 2);
        assert_eq!(rig.interrupts(), 1);
        // 0x0000 -> 0x0001 does not pass 0xffff again.
        rig.offer_readable(2, 1, 16);
        assert_eq!(serve_all(&mut rig), 1);
        assert_eq!(rig.interrupts(), 0);
    }

    #[test]
    fn without_event_idx_every_used_batch_interrupts_and_rings_are_untouched() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_F_VERSION_1);
        rig.set_used_event(100);
        for first in [0, 2, 4] {
            rig.offer_readable(first, 2, 16);
            assert_eq!(serve_all(&mut rig), 2);
            assert_eq!(rig.interrupts(), 1, "used_event is not ours to read");
        }
        // Neither avail_event nor the used flags were written: the driver
        // kicks for every chain, as before.
        assert_eq!(rig.avail_event(), 0);
        assert_eq!(rig.used_flags(), 0);
        let old = rig.avail_idx();
        rig.offer_readable(6, 1, 16);
        assert!(rig.driver_kicks(old, false));
    }

    #[test]
    fn with_event_idx_a_drained_queue_asks_for_a_kick_at_the_next_chain() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_RING_F_EVENT_IDX);
        rig.offer_readable(0, 3, 16);
        assert_eq!(serve_all(&mut rig), 3);
        assert_eq!(rig.avail_event(), 3);
        // The driver's next chain kicks; the one after it (posted before
        // the device looked again) does not: the device will see both.
        rig.offer_readable(3, 1, 16);
        assert!(rig.driver_kicks(3, true));
        rig.offer_readable(4, 1, 16);
        assert!(!rig.driver_kicks(4, true));
        assert_eq!(serve_all(&mut rig), 2);
        assert_eq!(rig.avail_event(), 5);
    }

    /// Drains queue 0 with a pass that serves every chain and, the first
    /// time it finds the ring empty, has the driver post one more chain
    /// (as a driver on another vCPU would, between the device's last look
    /// and its re-enabling of kicks). Returns the passes run and the
    /// chains served.
    fn drain_racing_the_driver(rig: &mut Rig<'_>) -> (usize, usize) {
        let mock = &rig.mock;
        let mut passes = 0;
        let mut ctx = QueueContext {
            mem: rig.mem,
            queues: &mut rig.queues,
            interrupt: &rig.interrupt,
            registrar: &rig.registrar,
        };
        let mut cursor = QueueCursor::new(&mut ctx, 0).unwrap();
        cursor
            .drain(
                |cursor| {
                    while let Some(chain) = cursor.pop()? {
                        cursor.add_used(chain.head_index(), 0)?;
                    }
                    passes += 1;
                    if passes == 1 {
                        let chain = ChainBuilder::new().readable(0x10_0000, 16);
                        mock.add_desc_chains(&chain.descriptors_at(1), 1).unwrap();
                    }
                    Ok(())
                },
                |_| true,
            )
            .unwrap();
        (passes, cursor.finish().unwrap())
    }

    #[test]
    fn with_event_idx_chains_posted_before_kicks_are_enabled_get_another_pass() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_RING_F_EVENT_IDX);
        rig.offer_readable(0, 1, 16);
        // The chain posted after the device's last look would not kick
        // (avail_event was still 0), so the device must find it itself.
        assert_eq!(drain_racing_the_driver(&mut rig), (2, 2));
        assert_eq!(rig.avail_event(), 2);
        assert_eq!(rig.interrupts(), 1);
    }

    #[test]
    fn without_event_idx_one_pass_and_the_late_chain_is_left_to_its_kick() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.offer_readable(0, 1, 16);
        assert_eq!(drain_racing_the_driver(&mut rig), (1, 1));
        assert_eq!(rig.avail_event(), 0);
        assert!(rig.driver_kicks(1, false));
        assert_eq!(serve_all(&mut rig), 1);
    }

    #[test]
    fn with_event_idx_a_deferred_pass_leaves_kicks_alone_until_drained() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_RING_F_EVENT_IDX);
        rig.offer_readable(0, 3, 16);
        let mut budget = 1;
        let pass = process_queue_until_deferred(&mut rig.ctx(), 0, |_, _| {
            if budget == 0 {
                return ChainOutcome::Deferred;
            }
            budget -= 1;
            ChainOutcome::Used(0)
        })
        .unwrap();
        assert_eq!(
            pass,
            QueuePass {
                served: 1,
                deferred: true
            }
        );
        // What the device waits for (its backend, a timer) drives the
        // queue again: chains the driver posts meanwhile need not kick.
        assert_eq!(rig.avail_event(), 0);
        rig.offer_readable(3, 1, 16);
        assert!(!rig.driver_kicks(3, true));
        // Once drained, the next chain kicks again.
        assert_eq!(serve_all(&mut rig), 3);
        assert_eq!(rig.avail_event(), 4);
        rig.offer_readable(4, 1, 16);
        assert!(rig.driver_kicks(4, true));
    }

    #[test]
    fn with_event_idx_chains_put_back_for_want_of_more_ask_for_a_kick_at_the_next() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.ack(VIRTIO_RING_F_EVENT_IDX);
        rig.offer_readable(0, 2, 16);
        // A device that needs three chains at once takes two, finds no
        // third, and puts both back (mergeable RX buffers).
        let mut ctx = rig.ctx();
        let mut cursor = QueueCursor::new(&mut ctx, 0).unwrap();
        let mut wants_more = true;
        let more = cursor
            .drain(
                |cursor| {
                    let mut taken = 0;
                    while taken < 3 && cursor.pop()?.is_some() {
                        taken += 1;
                    }
                    cursor.put_back(taken);
                    wants_more = taken < 3;
                    Ok(wants_more)
                },
                |wants_more| *wants_more,
            )
            .unwrap();
        assert!(more);
        assert_eq!(cursor.finish().unwrap(), 0);
        // avail_event is the driver's index (2), not the first chain put
        // back (0, already posted: it would never kick).
        assert_eq!(rig.avail_event(), 2);
        rig.offer_readable(2, 1, 16);
        assert!(rig.driver_kicks(2, true));
    }

    #[test]
    fn ring_features_reach_every_queue() {
        let q = TestQueue::new();
        let mut queues = vec![q.queue(), q.queue()];
        apply_ring_features(&mut queues, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert!(queues.iter().all(|q| q.event_idx_enabled()));
        apply_ring_features(&mut queues, VIRTIO_F_VERSION_1);
        assert!(queues.iter().all(|q| !q.event_idx_enabled()));
    }

    #[test]
    fn interrupt_bits_and_reset() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        interrupt.signal_used_queue();
        interrupt.set_needs_reset();
        assert_eq!(interrupt.status(), INTERRUPT_VRING | INTERRUPT_CONFIG);
        assert!(interrupt.needs_reset());
        assert_eq!(irq.read().unwrap(), 2);
        interrupt.acknowledge(INTERRUPT_VRING);
        assert_eq!(interrupt.status(), INTERRUPT_CONFIG);
        interrupt.reset();
        assert_eq!(interrupt.status(), 0);
        assert!(!interrupt.needs_reset());
    }
}
