//! Helpers for device unit tests: guest memory with a driver-side view of a
//! split queue (virtio-queue's `MockSplitQueue`), and a builder for
//! descriptor chains, including malformed ones.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestAddress;

use super::Chain;
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
