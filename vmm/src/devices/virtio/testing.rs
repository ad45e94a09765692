//! Helpers for device unit tests: guest memory with a driver-side view of a
//! split queue (virtio-queue's `MockSplitQueue`), a builder for
//! descriptor chains, including malformed ones, and a [`Rig`] that holds
//! what a device needs around its queues and plays the driver's side of
//! notification suppression.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Chain, DeviceError, Interrupt, QueueContext, VirtioDevice, apply_ring_features};
use crate::event_loop::{EventLoop, Registrar};
use crate::memory::GuestMemory;

/// Queue size used by the helpers.
pub const TEST_QUEUE_SIZE: u16 = 16;

/// Guest memory (4 MiB) whose first page holds a test queue.
pub struct TestQueue {
    /// The memory.
    pub mem: GuestMemory,
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl TestQueue {
    /// Fresh memory with an empty queue at address 0.
    pub fn new() -> Self {
        Self {
            mem: crate::memory::allocate(&[(GuestAddress(0), 4 << 20)]).unwrap(),
        }
    }

    /// The driver's view of the queue.
    pub fn mock(&self) -> MockSplitQueue<'_, GuestMemory> {
        MockSplitQueue::create(&self.mem, GuestAddress(0), TEST_QUEUE_SIZE)
    }

    /// A device-side `Queue` for the mock queue.
    pub fn queue(&self) -> Queue {
        self.mock().create_queue().unwrap()
    }
}

/// Builds one descriptor chain.
#[derive(Debug, Default, Clone)]
pub struct ChainBuilder {
    descriptors: Vec<(u64, u32, bool)>,
}

impl ChainBuilder {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a driver-readable buffer.
    pub fn readable(mut self, addr: u64, len: u32) -> Self {
        self.descriptors.push((addr, len, false));
        self
    }

    /// Appends a device-writable buffer.
    pub fn writable(mut self, addr: u64, len: u32) -> Self {
        self.descriptors.push((addr, len, true));
        self
    }

    /// The raw descriptors, linked with NEXT flags from index `first` on.
    pub fn descriptors_at(&self, first: u16) -> Vec<RawDescriptor> {
        let count = self.descriptors.len();
        self.descriptors
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                let next = if i + 1 < count {
                    flags |= VRING_DESC_F_NEXT as u16;
                    first + i as u16 + 1
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    /// The raw descriptors, linked from index 0.
    pub fn descriptors(&self) -> Vec<RawDescriptor> {
        self.descriptors_at(0)
    }

    /// Writes the chain at descriptor 0 as the only available entry of
    /// `queue` and returns it as the device sees it.
    pub fn build<'a>(&self, queue: &'a TestQueue) -> Chain<'a> {
        let mock = queue.mock();
        for (i, desc) in self.descriptors().into_iter().enumerate() {
            mock.desc_table().store(i as u16, desc).unwrap();
        }
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);
        let mut device_queue: Queue = mock.create_queue().unwrap();
        device_queue.iter(&queue.mem).unwrap().next().unwrap()
    }
}

/// Where a [`Rig`] puts the used ring.
///
/// Not where `MockSplitQueue` puts it: virtio-queue 0.18's mock places the
/// used ring after the avail ring's first `size` *bytes* rather than its
/// `4 + 2 * size + 2`, so used entries 1 and up overwrite `used_event` and
/// the avail ring's second half. The tests of notification suppression need
/// both intact.
pub const RIG_USED_RING: u64 = 0x1000;

/// The device side of a device's queues in test memory (all of them on the
/// same rings: a test uses one of them), the driver side (`mock`, made
/// once: making one resets the rings; its descriptor table and avail ring
/// are the device's, its used ring is not: see [`RIG_USED_RING`]), and the
/// interrupt, registrar and event loop a device needs around them.
pub struct Rig<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The driver's view of the rings.
    pub mock: MockSplitQueue<'a, GuestMemory>,
    /// The device's queues.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Interrupt,
    irq: EventFd,
    /// Registrar of the event loop below.
    pub registrar: Registrar,
    _event_loop: EventLoop,
}

impl<'a> Rig<'a> {
    /// Three queues (enough for every device) on the rings of `q`.
    pub fn new(q: &'a TestQueue) -> Self {
        let queues = (0..3)
            .map(|_| {
                let mut queue = q.queue();
                queue
                    .try_set_used_ring_address(GuestAddress(RIG_USED_RING))
                    .unwrap();
                queue
            })
            .collect();
        let mut event_loop = EventLoop::new().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        Self {
            mem: &q.mem,
            mock: q.mock(),
            queues,
            interrupt: Interrupt::new(irq.try_clone().unwrap()),
            irq,
            registrar: event_loop.registrar(),
            _event_loop: event_loop,
        }
    }

    /// What the transport hands the device.
    pub fn ctx(&mut self) -> QueueContext<'_> {
        QueueContext {
            mem: self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
            registrar: &self.registrar,
        }
    }

    /// Activates `device` with `features` acked, as the transport does.
    pub fn activate(&mut self, device: &mut dyn VirtioDevice, features: u64) {
        apply_ring_features(&mut self.queues, features);
        device.activate(features, &mut self.ctx()).unwrap();
    }

    /// Applies the ring features in `features` without a device.
    pub fn ack(&mut self, features: u64) {
        apply_ring_features(&mut self.queues, features);
    }

    /// Makes `chain` available at descriptor `first`.
    pub fn offer(&self, chain: &ChainBuilder, first: u16) {
        self.mock
            .add_desc_chains(&chain.descriptors_at(first), first)
            .unwrap();
    }

    /// Offers `count` one-descriptor writable buffers of `size` bytes, the
    /// first at descriptor (and 64 KiB address slot) `first`.
    pub fn offer_buffers(&self, first: u16, count: u16, size: u32) {
        for i in first..first + count {
            self.offer(&ChainBuilder::new().writable(buffer_addr(i), size), i);
        }
    }

    /// Offers `count` one-descriptor readable buffers of `size` bytes, the
    /// first at descriptor (and 64 KiB address slot) `first`.
    pub fn offer_readable(&self, first: u16, count: u16, size: u32) {
        for i in first..first + count {
            self.offer(&ChainBuilder::new().readable(buffer_addr(i), size), i);
        }
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The used ring entries from `from` on: (head, length).
    pub fn used(&self, from: u16) -> Vec<(u32, u32)> {
        (from..self.used_idx())
            .map(|i| {
                let at = RIG_USED_RING + 4 + 8 * u64::from(i % TEST_QUEUE_SIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (u32::from_le(id), u32::from_le(len))
            })
            .collect()
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(RIG_USED_RING + 2)).unwrap())
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> u16 {
        self.mock.avail().idx().load()
    }

    /// Interrupts raised since the last call.
    pub fn interrupts(&self) -> u64 {
        // EAGAIN: none.
        self.irq.read().unwrap_or(0)
    }

    /// The driver writes `used_event`: it wants an interrupt once the used
    /// index passes `value`.
    pub fn set_used_event(&self, value: u16) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(TEST_QUEUE_SIZE);
        self.mem
            .write_obj(value.to_le(), GuestAddress(addr))
            .unwrap();
    }

    /// The device's `avail_event`.
    pub fn avail_event(&self) -> u16 {
        let addr = RIG_USED_RING + 4 + 8 * u64::from(TEST_QUEUE_SIZE);
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(RIG_USED_RING)).unwrap())
    }

    /// Whether a driver that moved its available index from `old` to the
    /// current one would kick, by the rule of virtio 1.2 2.7.10 (Linux's
    /// `vring_need_event`) with EVENT_IDX, or the used ring's flags
    /// without it.
    pub fn driver_kicks(&self, old: u16, event_idx: bool) -> bool {
        let new = self.avail_idx();
        if event_idx {
            new.wrapping_sub(self.avail_event()).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_flags() & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 == 0
        }
    }

    /// Processes queue `queue` of `device` as after a kick.
    pub fn notify(
        &mut self,
        device: &mut dyn VirtioDevice,
        queue: usize,
    ) -> Result<(), DeviceError> {
        device.queue_notified(queue, &mut self.ctx())
    }
}

/// The guest address of test buffer slot `i` (64 KiB each, from 1 MiB).
pub fn buffer_addr(i: u16) -> u64 {
    0x10_0000 + u64::from(i) * 0x1_0000
}
