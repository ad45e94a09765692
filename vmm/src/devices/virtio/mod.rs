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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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
            crate::limited_log!(
                kind = "virtio interrupt failures",
                log::Level::Warn,
                "virtio: cannot raise interrupt: {e}"
            );
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
        crate::limited_log!(
            kind = "virtio ignored config writes",
            log::Level::Debug,
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
pub fn process_queue_until_deferred<F>(
    ctx: &mut QueueContext<'_>,
    index: usize,
    mut handle: F,
) -> Result<QueuePass, DeviceError>
where
    F: FnMut(&GuestMemory, Chain<'_>) -> ChainOutcome,
{
    let mut cursor = QueueCursor::new(ctx, index)?;
    let mut deferred = false;
    while let Some(chain) = cursor.pop()? {
        let head = chain.head_index();
        match handle(cursor.mem, chain) {
            ChainOutcome::Used(written) => cursor.add_used(head, written)?,
            ChainOutcome::Deferred => {
                cursor.put_back(1);
                deferred = true;
                break;
            }
        }
    }
    let served = cursor.finish()?;
    Ok(QueuePass { served, deferred })
}

/// One queue of a [`QueueContext`], driven chain by chain, for devices
/// that may take several chains for one piece of work (virtio-net
/// mergeable RX buffers). A bad available index or head index is a driver
/// error for the whole queue ([`DeviceError::Queue`]); [`Self::finish`]
/// raises the interrupt if chains were used and the driver wants one.
pub struct QueueCursor<'c, 'm> {
    index: usize,
    /// Guest memory.
    pub mem: &'m GuestMemory,
    queue: &'c mut Queue,
    interrupt: &'c Interrupt,
    used: usize,
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
        })
    }

    /// The queue's size as the driver set it.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The next available chain, if any.
    pub fn pop(&mut self) -> Result<Option<Chain<'m>>, DeviceError> {
        let mem = self.mem;
        Ok(self
            .queue
            .iter(mem)
            .map_err(|e| queue_error(self.index, e))?
            .next())
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

    /// Raises the interrupt if chains were used; returns how many.
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
        use crate::devices::virtio::testing::{ChainBuilder, TestQueue};
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
