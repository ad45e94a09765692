//! virtio-rng (entropy device, virtio 1.2 section 5.4): fills every
//! device-writable buffer the driver offers with bytes from the host's
//! `getrandom(2)`. At most 64 KiB are served per request.

use std::io::Write;

use virtio_queue::Writer;

use crate::memory::GuestMemory;

use super::{Chain, DeviceError, QueueContext, VIRTIO_F_VERSION_1, VirtioDevice, process_queue};

/// Virtio device id of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Largest number of bytes served per request.
pub const MAX_REQUEST: usize = 64 << 10;

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    buffer: Vec<u8>,
    served_bytes: u64,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self {
            buffer: vec![0; MAX_REQUEST],
            served_bytes: 0,
        }
    }

    /// Bytes handed to the guest so far.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes
    }

    /// Fills one chain; returns the bytes written (0 for a chain with no
    /// usable writable buffer, or if the host's entropy source failed).
    pub fn serve_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> u32 {
        let mut writer: Writer<'_> = match chain.writer(mem) {
            Ok(writer) => writer,
            Err(e) => {
                crate::limited_log!(
                    kind = "virtio-rng malformed requests",
                    log::Level::Warn,
                    "virtio-rng: dropped a malformed request: {e}"
                );
                return 0;
            }
        };
        let len = writer.available_bytes().min(MAX_REQUEST);
        let chunk = &mut self.buffer[..len];
        if let Err(e) = getrandom::fill(chunk) {
            crate::limited_log!(
                kind = "virtio-rng getrandom failures",
                log::Level::Warn,
                "virtio-rng: getrandom failed: {e}"
            );
            return 0;
        }
        if writer.write_all(chunk).is_err() {
            return 0;
        }
        self.served_bytes += len as u64;
        len as u32
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn queue_notified(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        process_queue(ctx, queue, |mem, chain| self.serve_chain(mem, chain)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::testing::{ChainBuilder, TestQueue};
    use crate::event_loop::EventLoop;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    #[test]
    fn fills_writable_buffers_only() {
        let q = TestQueue::new();
        let mut rng = Rng::new();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 64)
            .writable(0x10_1000, 32)
            .writable(0x10_2000, 32)
            .build(&q);
        assert_eq!(rng.serve_chain(&q.mem, chain), 64);
        let mut out = [0u8; 32];
        q.mem.read_slice(&mut out, GuestAddress(0x10_2000)).unwrap();
        assert_ne!(out, [0u8; 32], "32 random bytes are not all zero");
        let mut untouched = [0u8; 64];
        q.mem
            .read_slice(&mut untouched, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(untouched, [0u8; 64]);
    }

    #[test]
    fn oversized_and_invalid_requests_are_bounded() {
        let q = TestQueue::new();
        let mut rng = Rng::new();
        let chain = ChainBuilder::new().writable(0x10_0000, 1 << 20).build(&q);
        assert_eq!(rng.serve_chain(&q.mem, chain) as usize, MAX_REQUEST);
        let chain = ChainBuilder::new().writable(0xffff_0000, 16).build(&q);
        assert_eq!(rng.serve_chain(&q.mem, chain), 0);
        let chain = ChainBuilder::new().readable(0x10_0000, 16).build(&q);
        assert_eq!(rng.serve_chain(&q.mem, chain), 0);
    }

    #[test]
    fn queue_processing_updates_used_ring_and_interrupts() {
        let q = TestQueue::new();
        let mock = q.mock();
        let mut queues = vec![q.queue()];
        let chain = ChainBuilder::new().writable(0x10_0000, 16);
        mock.add_desc_chains(&chain.descriptors(), 0).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let mut ctx = QueueContext {
            mem: &q.mem,
            queues: &mut queues,
            interrupt: &interrupt,
            registrar: &registrar,
        };
        let mut rng = Rng::new();
        rng.queue_notified(0, &mut ctx).unwrap();
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rng.served_bytes(), 16);
    }

    #[test]
    fn bad_avail_index_is_a_queue_error() {
        let q = TestQueue::new();
        let mock = q.mock();
        let mut queues = vec![q.queue()];
        // The driver claims 100 new entries in a 16-entry queue.
        mock.avail().idx().store(100);
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let mut ctx = QueueContext {
            mem: &q.mem,
            queues: &mut queues,
            interrupt: &interrupt,
            registrar: &registrar,
        };
        assert!(matches!(
            Rng::new().queue_notified(0, &mut ctx),
            Err(DeviceError::Queue { queue: 0, .. })
        ));
    }
}
