//! virtio-net (virtio 1.2 section 5.1) on a host tap device.
//!
//! Deliberately plain: no offloads, no mergeable buffers, no control
//! queue. Each queue element carries the 12-byte `virtio_net_hdr_v1`
//! followed by one Ethernet frame. The header of guest frames is skipped
//! (no offload was offered, so it carries nothing); frames to the guest get
//! a zeroed header with `num_buffers = 1`.
//!
//! RX: a frame is read from the tap only once a guest buffer is at hand,
//! so nothing is lost inside the VMM; while the guest offers no buffers the
//! tap is not watched (the kernel queues or drops, as a NIC would). Frames
//! that do not fit the buffer, and TX chains that are too short or too
//! long, are dropped and counted.
//!
//! Rate limits (optional, per direction; see [`crate::rate_limiter`]): a TX
//! chain is charged before its frame is written to the tap; if refused, the
//! chain goes back to the queue and TX stops until the limiter's timer
//! fires. An RX frame is charged after it is read from the tap (its size is
//! unknown before); if refused, it is kept in the device (`rx_pending`), the
//! tap is no longer watched, and it is delivered first when the timer fires.
//! A blocked direction therefore costs no CPU and loses no frame.

pub mod header;
pub mod tap;

use std::io::{self, Read, Write};

use virtio_queue::{Reader, Writer};
use vmm_sys_util::epoll::EventSet;

use self::tap::FrameDevice;
use super::{
    Chain, ChainOutcome, DeviceError, FIRST_BACKEND_TOKEN, QueueContext, VIRTIO_F_VERSION_1,
    VirtioDevice, process_queue_until_deferred, read_config_bytes,
};
use crate::config::MacAddress;
use crate::event_loop::Registrar;
use crate::memory::GuestMemory;
use crate::rate_limiter::{RateLimit, RateLimiter, RateLimiterError};

/// Virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1`.
pub const NET_HEADER_SIZE: usize = 12;
/// Largest Ethernet frame handled (64 KiB, as a tap may deliver with a large MTU).
pub const MAX_FRAME: usize = 65536;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Sub-token of the tap fd.
const TAP_TOKEN: u32 = FIRST_BACKEND_TOKEN;
/// Sub-token of the RX limiter's timer.
const RX_TIMER_TOKEN: u32 = FIRST_BACKEND_TOKEN + 1;
/// Sub-token of the TX limiter's timer.
const TX_TIMER_TOKEN: u32 = FIRST_BACKEND_TOKEN + 2;

/// Frame counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames passed to the guest.
    pub rx_frames: u64,
    /// Frames passed to the host.
    pub tx_frames: u64,
    /// Frames dropped (too big, malformed chains, tap errors).
    pub dropped: u64,
    /// Times a direction was held back by its rate limiter.
    pub throttled: u64,
}

/// The network device.
pub struct Net {
    backend: Box<dyn FrameDevice>,
    mac: MacAddress,
    frame: Vec<u8>,
    rx_frame: Vec<u8>,
    /// Length of a frame in `rx_frame` read from the tap but held back by
    /// the RX limiter.
    rx_pending: Option<usize>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    watching_tap: bool,
    counters: NetCounters,
}

impl Net {
    /// A device with MAC `mac` on `backend`, without rate limits.
    pub fn new(backend: Box<dyn FrameDevice>, mac: MacAddress) -> Self {
        Self {
            backend,
            mac,
            frame: vec![0; MAX_FRAME],
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            rx_limiter: None,
            tx_limiter: None,
            watching_tap: false,
            counters: NetCounters::default(),
        }
    }

    /// Adds rate limits to the frames to (`rx`) and from (`tx`) the guest.
    pub fn with_limits(mut self, rx: RateLimit, tx: RateLimit) -> Result<Self, RateLimiterError> {
        let limiter = |l: RateLimit| -> Result<Option<RateLimiter>, RateLimiterError> {
            if l.is_unlimited() {
                Ok(None)
            } else {
                RateLimiter::new(l).map(Some)
            }
        };
        self.rx_limiter = limiter(rx)?;
        self.tx_limiter = limiter(tx)?;
        Ok(self)
    }

    fn watch_timers(&self, registrar: &Registrar, watch: bool) {
        let timers = [
            (&self.rx_limiter, RX_TIMER_TOKEN),
            (&self.tx_limiter, TX_TIMER_TOKEN),
        ];
        for (limiter, token) in timers {
            let Some(limiter) = limiter else { continue };
            let result = if watch {
                registrar.add(limiter.timer_fd(), token, EventSet::IN)
            } else {
                registrar.remove(limiter.timer_fd())
            };
            if let Err(e) = result {
                log::warn!("virtio-net: cannot update a rate-limiter timer watch: {e}");
            }
        }
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn set_watch(&mut self, registrar: &Registrar, watch: bool) {
        if watch == self.watching_tap {
            return;
        }
        let fd = self.backend.raw_fd();
        let result = if watch {
            registrar.add(fd, TAP_TOKEN, EventSet::IN)
        } else {
            registrar.remove(fd)
        };
        match result {
            Ok(()) => self.watching_tap = watch,
            Err(e) => log::warn!("virtio-net: cannot update tap watch: {e}"),
        }
    }

    /// Sends the frame of one TX chain to the backend; returns false if it
    /// was dropped.
    pub fn serve_tx_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> bool {
        let mut reader: Reader<'_> = match chain.reader(mem) {
            Ok(reader) => reader,
            Err(_) => return false,
        };
        let total = reader.available_bytes();
        if total <= NET_HEADER_SIZE || total > NET_HEADER_SIZE + MAX_FRAME {
            return false;
        }
        let mut header = [0u8; NET_HEADER_SIZE];
        if reader.read_exact(&mut header).is_err() {
            return false;
        }
        let len = total - NET_HEADER_SIZE;
        if reader.read_exact(&mut self.frame[..len]).is_err() {
            return false;
        }
        match self.backend.write_frame(&self.frame[..len]) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("virtio-net: tap write: {e}");
                false
            }
        }
    }

    /// Sends the guest's frames to the backend while the TX rate limit
    /// allows; a throttled chain waits for the limiter's timer.
    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        let pass = process_queue_until_deferred(ctx, TX_QUEUE, |mem, chain| {
            if let Some(limiter) = &mut self.tx_limiter {
                let len = chain
                    .clone()
                    .reader(mem)
                    .map(|r| r.available_bytes().saturating_sub(NET_HEADER_SIZE))
                    .unwrap_or(0);
                if !limiter.consume(len as u64) {
                    return ChainOutcome::Deferred;
                }
            }
            if self.serve_tx_chain(mem, chain) {
                self.counters.tx_frames += 1;
            } else {
                self.counters.dropped += 1;
            }
            ChainOutcome::Used(0)
        })?;
        if pass.deferred {
            self.counters.throttled += 1;
        }
        Ok(())
    }

    /// Moves frames from the backend into guest RX buffers while both exist
    /// and the RX rate limit allows. The tap is watched only while a frame
    /// could be delivered: not when the guest has no buffers (its next
    /// notification resumes RX) nor when throttled (the limiter's timer
    /// does).
    fn process_rx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        let mut throttled = false;
        let pass = process_queue_until_deferred(ctx, RX_QUEUE, |mem, chain| {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::warn!("virtio-net: tap read: {e}");
                        }
                        return ChainOutcome::Deferred;
                    }
                },
            };
            if let Some(limiter) = &mut self.rx_limiter
                && !limiter.consume(len as u64)
            {
                self.rx_pending = Some(len);
                self.counters.throttled += 1;
                throttled = true;
                return ChainOutcome::Deferred;
            }
            match write_rx_frame(mem, chain, &self.rx_frame[..len]) {
                Some(used) => {
                    self.counters.rx_frames += 1;
                    ChainOutcome::Used(used)
                }
                None => {
                    self.counters.dropped += 1;
                    ChainOutcome::Used(0)
                }
            }
        })?;
        let out_of_buffers = !pass.deferred;
        self.set_watch(ctx.registrar, !out_of_buffers && !throttled);
        Ok(())
    }
}

/// Writes the RX header and `frame` into a guest buffer; `None` if the
/// buffer is unusable or too small.
pub fn write_rx_frame(mem: &GuestMemory, chain: Chain<'_>, frame: &[u8]) -> Option<u32> {
    let mut writer: Writer<'_> = chain.writer(mem).ok()?;
    if writer.available_bytes() < NET_HEADER_SIZE + frame.len() {
        return None;
    }
    let mut header = [0u8; NET_HEADER_SIZE];
    // num_buffers (le16 at offset 10) is 1 without mergeable buffers.
    header[10] = 1;
    writer.write_all(&header).ok()?;
    writer.write_all(frame).ok()?;
    Some((NET_HEADER_SIZE + frame.len()) as u32)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.0, offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        self.set_watch(ctx.registrar, true);
        self.watch_timers(ctx.registrar, true);
        Ok(())
    }

    fn queue_notified(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        match queue {
            TX_QUEUE => self.process_tx(ctx),
            RX_QUEUE => self.process_rx(ctx),
            _ => Ok(()),
        }
    }

    fn backend_event(
        &mut self,
        sub: u32,
        _events: EventSet,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        match sub {
            RX_TIMER_TOKEN => {
                if let Some(limiter) = &mut self.rx_limiter {
                    limiter.on_timer();
                }
                self.process_rx(ctx)
            }
            TX_TIMER_TOKEN => {
                if let Some(limiter) = &mut self.tx_limiter {
                    limiter.on_timer();
                }
                self.process_tx(ctx)
            }
            _ => self.process_rx(ctx),
        }
    }

    fn reset(&mut self, registrar: &Registrar) {
        self.set_watch(registrar, false);
        self.watch_timers(registrar, false);
        self.rx_pending = None;
    }
}

/// A frame device over a datagram socket pair, for tests.
#[cfg(test)]
pub struct SocketFrames(pub std::os::unix::net::UnixDatagram);

#[cfg(test)]
impl FrameDevice for SocketFrames {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(|_| ())
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::testing::{ChainBuilder, TestQueue};
    use crate::event_loop::EventLoop;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    fn device() -> (Net, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mac = "02:00:00:00:00:01".parse().unwrap();
        (Net::new(Box::new(SocketFrames(a)), mac), b)
    }

    #[test]
    fn config_space_is_the_mac() {
        let (net, _) = device();
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
        assert_ne!(net.features() & VIRTIO_NET_F_MAC, 0);
    }

    #[test]
    fn tx_strips_the_header_and_rejects_bad_chains() {
        let (mut net, host) = device();
        let q = TestQueue::new();
        q.mem
            .write_slice(&[0xee; 12], GuestAddress(0x10_0000))
            .unwrap();
        q.mem
            .write_slice(b"frame-bytes", GuestAddress(0x10_1000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x10_1000, 11)
            .build(&q);
        assert!(net.serve_tx_chain(&q.mem, chain));
        let mut buf = [0u8; 64];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"frame-bytes");
        // Header only, no frame.
        let chain = ChainBuilder::new().readable(0x10_0000, 12).build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
        // Beyond guest memory.
        let chain = ChainBuilder::new().readable(0xffff_0000, 100).build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
        // Oversized.
        let chain = ChainBuilder::new()
            .readable(0x10_0000, (NET_HEADER_SIZE + MAX_FRAME + 1) as u32)
            .build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
    }

    #[test]
    fn rx_frame_gets_header_and_small_buffers_drop() {
        let q = TestQueue::new();
        let chain = ChainBuilder::new().writable(0x10_0000, 100).build(&q);
        assert_eq!(write_rx_frame(&q.mem, chain, b"hello"), Some(17));
        let mut got = [0u8; 17];
        q.mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[12..], b"hello");
        let chain = ChainBuilder::new().writable(0x10_0000, 14).build(&q);
        assert_eq!(write_rx_frame(&q.mem, chain, b"hello"), None);
        let chain = ChainBuilder::new().readable(0x10_0000, 100).build(&q);
        assert_eq!(write_rx_frame(&q.mem, chain, b"hello"), None);
    }

    #[test]
    fn rx_reads_only_when_the_guest_has_buffers() {
        let (mut net, host) = device();
        let q = TestQueue::new();
        let mock = q.mock();
        let mut queues = vec![q.queue(), q.queue()];
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        host.send(b"one").unwrap();
        host.send(b"two").unwrap();
        // One buffer: one frame delivered, the other stays in the socket.
        let chain = ChainBuilder::new().writable(0x10_0000, 2048);
        mock.add_desc_chains(&chain.descriptors(), 0).unwrap();
        let mut ctx = QueueContext {
            mem: &q.mem,
            queues: &mut queues,
            interrupt: &interrupt,
            registrar: &registrar,
        };
        net.queue_notified(RX_QUEUE, &mut ctx).unwrap();
        assert_eq!(net.counters().rx_frames, 1);
        assert!(!net.watching_tap, "no buffers left: tap not watched");
        let chain = ChainBuilder::new().writable(0x10_1000, 2048);
        mock.add_desc_chains(&chain.descriptors_at(1), 1).unwrap();
        net.queue_notified(RX_QUEUE, &mut ctx).unwrap();
        assert_eq!(net.counters().rx_frames, 2);
        let mut got = [0u8; 15];
        q.mem.read_slice(&mut got, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(&got[12..], b"two");
    }

    #[test]
    fn a_tx_rate_limit_holds_frames_back_until_its_timer_fires() {
        let (net, host) = device();
        let limit = RateLimit {
            bytes: None,
            ops: Some(crate::rate_limiter::BucketConfig { rate: 20, burst: 1 }),
        };
        let mut net = net.with_limits(RateLimit::default(), limit).unwrap();
        let q = TestQueue::new();
        let mock = q.mock();
        let mut queues = vec![q.queue(), q.queue()];
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        q.mem
            .write_slice(&[0; 12], GuestAddress(0x10_0000))
            .unwrap();
        q.mem
            .write_slice(b"first", GuestAddress(0x10_1000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x10_1000, 5);
        mock.add_desc_chains(&chain.descriptors(), 0).unwrap();
        mock.add_desc_chains(&chain.descriptors_at(2), 2).unwrap();
        let mut ctx = QueueContext {
            mem: &q.mem,
            queues: &mut queues,
            interrupt: &interrupt,
            registrar: &registrar,
        };
        net.activate(0, &mut ctx).unwrap();
        net.queue_notified(TX_QUEUE, &mut ctx).unwrap();
        // Burst 1: one frame passes, the second waits in the queue.
        assert_eq!(net.counters().tx_frames, 1);
        assert_eq!(net.counters().throttled, 1);
        // A new notification while blocked does not send it either.
        net.queue_notified(TX_QUEUE, &mut ctx).unwrap();
        assert_eq!(net.counters().tx_frames, 1);
        let mut fds = [libc::pollfd {
            fd: net.tx_limiter.as_ref().unwrap().timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 2000) };
        assert_eq!(ready, 1, "no timer");
        net.backend_event(TX_TIMER_TOKEN, EventSet::IN, &mut ctx)
            .unwrap();
        assert_eq!(net.counters().tx_frames, 2, "{:?}", net.counters());
        let mut buf = [0u8; 16];
        assert_eq!(host.recv(&mut buf).unwrap(), 5);
        assert_eq!(host.recv(&mut buf).unwrap(), 5);
    }
}
