//! virtio-net (virtio 1.2 section 5.1) on a host tap device.
//!
//! Checksum and segmentation offloads, mergeable RX buffers, no control
//! queue. Each frame is preceded by the 12-byte `virtio_net_hdr_v1`, and
//! the tap speaks the same layout (`IFF_VNET_HDR`), so the header passes
//! between the two as it is (see [`header`] for the little the device
//! checks and fills in). Offered: `CSUM`, `HOST_TSO4/6`, `HOST_UFO` (the
//! guest may hand over partial checksums and frames up to 64 KiB, which
//! the host kernel finishes or segments), `GUEST_CSUM`, `GUEST_TSO4/6`,
//! `GUEST_UFO` (the tap may hand the guest the same; it is told with
//! `TUNSETOFFLOAD` at activation, from the features the driver acked), and
//! `MRG_RXBUF`.
//!
//! RX: a frame is read from the tap only once a guest buffer is at hand,
//! so nothing is lost inside the VMM; while the guest offers no buffers the
//! tap is not watched (the kernel queues or drops, as a NIC would). With
//! mergeable buffers (what Linux acks) a frame fills as many buffers as it
//! needs, `num_buffers` in its header saying how many; a frame that needs
//! more than the driver has posted waits in the device until it posts
//! more. Without them a frame goes into one chain (with `GUEST_TSO*` a
//! Linux driver then posts chains of 64 KiB and more). Frames that do not
//! fit or carry offloads the driver did not negotiate, and TX chains that
//! are too short, too long or carry such a header, are dropped and
//! counted.
//!
//! Rate limits (optional, per direction; see [`crate::rate_limiter`]): a TX
//! chain is charged before its frame is written to the tap; if refused, the
//! chain goes back to the queue and TX stops until the limiter's timer
//! fires. An RX frame is charged after it is read from the tap (its size is
//! unknown before); if refused, it is kept in the device (`rx_pending`), the
//! tap is no longer watched, and it is delivered first when the timer fires.
//! A blocked direction therefore costs no CPU and loses no frame. A frame
//! is charged its length without the header (a GSO frame: all its bytes,
//! up to 64 KiB) and counts as one packet, however many segments it
//! becomes on the wire.

pub mod header;
pub mod tap;

use std::io::{self, Read, Write};

use virtio_queue::{Reader, Writer};
use vmm_sys_util::epoll::EventSet;

use self::header::{NET_HEADER_SIZE, OFFLOAD_FEATURES, Offloads, VIRTIO_NET_F_MRG_RXBUF};
use self::tap::FrameDevice;
use super::{
    Chain, ChainOutcome, DeviceError, FIRST_BACKEND_TOKEN, QueueContext, QueueCursor,
    VIRTIO_F_VERSION_1, VirtioDevice, process_queue_until_deferred, read_config_bytes,
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
/// Largest Ethernet frame handled, without the header: an IP packet of
/// 64 KiB (a GSO frame, or a frame of a tap with a large MTU) and its
/// Ethernet header.
pub const MAX_FRAME: usize = 65536 + 14;
/// Largest header and frame handled.
const MAX_PACKET: usize = NET_HEADER_SIZE + MAX_FRAME;
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
    /// Frames dropped (too big, malformed chains, offloads not
    /// negotiated, tap errors).
    pub dropped: u64,
    /// Times a direction was held back by its rate limiter.
    pub throttled: u64,
}

/// The network device.
pub struct Net {
    backend: Box<dyn FrameDevice>,
    mac: MacAddress,
    /// A TX header and frame on their way to the backend.
    frame: Vec<u8>,
    /// An RX header and frame from the backend (one byte longer than the
    /// longest accepted, to see a packet that was cut short).
    rx_frame: Vec<u8>,
    /// Length of a header and frame in `rx_frame` read from the tap but
    /// held back by the RX limiter.
    rx_pending: Option<usize>,
    /// Offloads the driver acked, per direction (none before activation).
    tx_offloads: Offloads,
    rx_offloads: Offloads,
    /// The driver acked mergeable RX buffers.
    mergeable: bool,
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
            frame: vec![0; MAX_PACKET],
            rx_frame: vec![0; MAX_PACKET + 1],
            rx_pending: None,
            tx_offloads: Offloads::default(),
            rx_offloads: Offloads::default(),
            mergeable: false,
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
                crate::limited_log!(
                    kind = "virtio-net timer watch failures",
                    log::Level::Warn,
                    "virtio-net: cannot update a rate-limiter timer watch: {e}"
                );
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
            Err(e) => crate::limited_log!(
                kind = "virtio-net tap watch failures",
                log::Level::Warn,
                "virtio-net: cannot update tap watch: {e}"
            ),
        }
    }

    /// Sends the header and frame of one TX chain to the backend; returns
    /// false if they were dropped.
    pub fn serve_tx_chain(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> bool {
        let mut reader: Reader<'_> = match chain.reader(mem) {
            Ok(reader) => reader,
            Err(_) => return false,
        };
        let total = reader.available_bytes();
        if total <= NET_HEADER_SIZE || total > MAX_PACKET {
            return false;
        }
        let packet = &mut self.frame[..total];
        if reader.read_exact(packet).is_err() {
            return false;
        }
        if let Err(e) = header::check_tx(packet, self.tx_offloads) {
            crate::limited_log!(
                kind = "virtio-net dropped TX frames",
                log::Level::Debug,
                "virtio-net: TX frame dropped: {e}"
            );
            return false;
        }
        match self.backend.write_frame(packet) {
            Ok(()) => true,
            Err(e) => {
                crate::limited_log!(
                    kind = "virtio-net tap write errors",
                    log::Level::Debug,
                    "virtio-net: tap write: {e}"
                );
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

    /// The next packet (header and frame) for the guest in `rx_frame`: the
    /// one held back by the limiter, else the next one from the backend
    /// the driver can take (others are dropped and counted). `None` when
    /// the backend has nothing.
    fn next_rx_packet(&mut self) -> Option<usize> {
        if let Some(len) = self.rx_pending.take() {
            return Some(len);
        }
        loop {
            let len = match self.backend.read_frame(&mut self.rx_frame) {
                Ok(len) => len,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::limited_log!(
                            kind = "virtio-net tap read errors",
                            log::Level::Warn,
                            "virtio-net: tap read: {e}"
                        );
                    }
                    return None;
                }
            };
            if len <= MAX_PACKET {
                match header::prepare_rx(&mut self.rx_frame[..len], self.rx_offloads) {
                    Ok(()) => return Some(len),
                    Err(e) => crate::limited_log!(
                        kind = "virtio-net dropped RX frames",
                        log::Level::Debug,
                        "virtio-net: RX frame dropped: {e}"
                    ),
                }
            } else {
                crate::limited_log!(
                    kind = "virtio-net oversized RX frames",
                    log::Level::Debug,
                    "virtio-net: RX frame dropped: longer than {MAX_FRAME} bytes"
                );
            }
            self.counters.dropped += 1;
        }
    }

    /// Moves frames from the backend into guest RX buffers while both exist
    /// and the RX rate limit allows. A frame takes one chain, or with
    /// mergeable buffers as many as it needs. The tap is watched only while
    /// a frame could be delivered: not when the guest has no buffers (its
    /// next notification resumes RX) nor when throttled (the limiter's
    /// timer does).
    fn process_rx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        let mut cursor = QueueCursor::new(ctx, RX_QUEUE)?;
        let stop = loop {
            match self.deliver_rx_frame(&mut cursor)? {
                RxStep::Delivered | RxStep::Dropped => {}
                RxStep::Stop(stop) => break stop,
            }
        };
        cursor.finish()?;
        self.set_watch(ctx.registrar, stop == RxStop::NoFrame);
        Ok(())
    }

    /// Delivers (or drops) the next frame. Chains are taken first (a frame
    /// is only read from the backend once one is at hand), then the frame,
    /// then more chains while it does not fit and mergeable buffers allow
    /// it. A frame that could fit in more buffers than the driver has
    /// posted so far, or that the limiter holds back, stays in
    /// `rx_pending` and its chains are put back. A frame too big for one
    /// chain (no mergeable buffers) or for the whole queue, or met by a
    /// chain the device cannot write, is dropped; the chains it took go
    /// back to the driver empty.
    fn deliver_rx_frame(
        &mut self,
        cursor: &mut QueueCursor<'_, '_>,
    ) -> Result<RxStep, DeviceError> {
        let mem = cursor.mem;
        let max_chains = if self.mergeable {
            usize::from(cursor.size())
        } else {
            1
        };
        let Some(first) = cursor.pop()? else {
            return Ok(RxStep::Stop(RxStop::NoBuffers));
        };
        let mut buffers = vec![RxBuffer::new(mem, first)];
        let Some(len) = self.next_rx_packet() else {
            cursor.put_back(1);
            return Ok(RxStep::Stop(RxStop::NoFrame));
        };
        let mut room = buffers[0].room();
        let mut usable = buffers[0].usable(self.mergeable);
        while usable && room < len && buffers.len() < max_chains {
            let Some(chain) = cursor.pop()? else {
                cursor.put_back(buffers.len() as u16);
                self.rx_pending = Some(len);
                return Ok(RxStep::Stop(RxStop::NoBuffers));
            };
            let buffer = RxBuffer::new(mem, chain);
            usable = buffer.usable(self.mergeable);
            room += buffer.room();
            buffers.push(buffer);
        }
        if !usable || room < len {
            self.counters.dropped += 1;
            for buffer in buffers {
                cursor.add_used(buffer.head, 0)?;
            }
            return Ok(RxStep::Dropped);
        }
        if let Some(limiter) = &mut self.rx_limiter
            && !limiter.consume((len - NET_HEADER_SIZE) as u64)
        {
            cursor.put_back(buffers.len() as u16);
            self.rx_pending = Some(len);
            self.counters.throttled += 1;
            return Ok(RxStep::Stop(RxStop::Throttled));
        }
        let packet = &mut self.rx_frame[..len];
        header::set_num_buffers(packet, buffers.len() as u16);
        let mut rest: &[u8] = packet;
        for buffer in buffers {
            let n = buffer.room().min(rest.len());
            let (part, tail) = rest.split_at(n);
            rest = tail;
            if let Some(mut writer) = buffer.writer
                && let Err(e) = writer.write_all(part)
            {
                // The writer checked the memory: not expected.
                crate::limited_log!(
                    kind = "virtio-net RX buffer errors",
                    log::Level::Warn,
                    "virtio-net: writing an RX buffer: {e}"
                );
            }
            cursor.add_used(buffer.head, n as u32)?;
        }
        self.counters.rx_frames += 1;
        Ok(RxStep::Delivered)
    }
}

/// What became of one RX step.
enum RxStep {
    Delivered,
    Dropped,
    Stop(RxStop),
}

/// Why RX stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStop {
    /// The backend has no frame: wait for the tap.
    NoFrame,
    /// The driver has no (or not enough) buffers: wait for its notification.
    NoBuffers,
    /// The limiter holds the frame back: wait for its timer.
    Throttled,
}

/// One guest RX chain taken for a frame.
struct RxBuffer<'m> {
    head: u16,
    /// `None`: a chain the device cannot write (read-only descriptors,
    /// memory outside the guest's).
    writer: Option<Writer<'m>>,
}

impl<'m> RxBuffer<'m> {
    fn new(mem: &'m GuestMemory, chain: Chain<'m>) -> Self {
        Self {
            head: chain.head_index(),
            writer: chain.writer(mem).ok(),
        }
    }

    fn room(&self) -> usize {
        self.writer.as_ref().map_or(0, Writer::available_bytes)
    }

    /// Whether the chain can carry a frame: writable, and with mergeable
    /// buffers at least a header long (the spec asks that of every one).
    fn usable(&self, mergeable: bool) -> bool {
        self.writer.is_some() && (!mergeable || self.room() >= NET_HEADER_SIZE)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | OFFLOAD_FEATURES | VIRTIO_NET_F_MRG_RXBUF
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.0, offset, data);
    }

    fn activate(&mut self, features: u64, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        self.tx_offloads = Offloads::tx(features);
        self.rx_offloads = Offloads::rx(features);
        self.mergeable = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let tun_flags = self.rx_offloads.tun_flags();
        if let Err(e) = self.backend.set_offloads(tun_flags) {
            // The tap keeps handing us plain frames, which every driver
            // takes: slower, not wrong.
            crate::limited_log!(
                kind = "virtio-net tap offload failures",
                log::Level::Warn,
                "virtio-net: cannot set tap offloads {tun_flags:#x}: {e}"
            );
        }
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
        self.tx_offloads = Offloads::default();
        self.rx_offloads = Offloads::default();
        self.mergeable = false;
    }
}

/// A frame device over a datagram socket pair, for tests and fuzzing: one
/// datagram is one header and frame; the offloads it was given are kept in
/// `offloads`.
#[cfg(any(test, feature = "fuzzing"))]
pub struct SocketFrames {
    /// The device's end of the pair.
    pub socket: std::os::unix::net::UnixDatagram,
    /// The last `set_offloads` argument.
    pub offloads: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl FrameDevice for SocketFrames {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
    fn write_frame(&mut self, packet: &[u8]) -> io::Result<()> {
        self.socket.send(packet).map(|_| ())
    }
    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offloads
            .store(tun_flags, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::header::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4};
    use super::*;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::testing::{ChainBuilder, TestQueue};
    use crate::event_loop::EventLoop;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use virtio_queue::Queue;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const NEEDS_CSUM: u8 = 1;
    const DATA_VALID: u8 = 2;
    const GSO_TCPV4: u8 = 1;
    /// Every offload, no mergeable buffers (big RX buffers).
    const ALL: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | OFFLOAD_FEATURES;
    /// What a Linux driver acks of our offer.
    const MERGEABLE: u64 = ALL | VIRTIO_NET_F_MRG_RXBUF;

    fn device() -> (Net, UnixDatagram, Arc<AtomicU32>) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let offloads = Arc::new(AtomicU32::new(u32::MAX));
        let backend = SocketFrames {
            socket: a,
            offloads: offloads.clone(),
        };
        let mac = "02:00:00:00:00:01".parse().unwrap();
        (Net::new(Box::new(backend), mac), b, offloads)
    }

    /// A limit that lets one frame pass, then one every 50 ms.
    const ONE_FRAME: RateLimit = RateLimit {
        bytes: None,
        ops: Some(crate::rate_limiter::BucketConfig { rate: 20, burst: 1 }),
    };

    /// Waits for the timer of the RX or TX limiter (by its token) and hands
    /// its event to the device.
    fn fire_timer(net: &mut Net, rig: &mut Rig<'_>, token: u32) {
        let limiter = if token == RX_TIMER_TOKEN {
            &net.rx_limiter
        } else {
            &net.tx_limiter
        };
        assert!(limiter.as_ref().unwrap().wait_for_timer(), "no timer");
        net.backend_event(token, EventSet::IN, &mut rig.ctx())
            .unwrap();
    }

    /// A device on a socket pair, activated with `features` over `q`.
    fn active(q: &TestQueue, features: u64) -> (Net, UnixDatagram, Rig<'_>) {
        let (mut net, host, _) = device();
        let mut rig = Rig::new(q);
        rig.activate(&mut net, features);
        (net, host, rig)
    }

    /// A header (flags, gso_type, gso_size 1448, num_buffers as the tap
    /// leaves it: garbage) and `frame`.
    fn packet(flags: u8, gso_type: u8, frame: &[u8]) -> Vec<u8> {
        let mut p = vec![flags, gso_type, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0xee, 0xee];
        p.extend_from_slice(frame);
        p
    }

    /// The device side of a queue pair in test memory (both queues on the
    /// same rings: a test uses one of them), the driver side (`mock`, made
    /// once: making one resets the rings) and what a device needs around
    /// them.
    struct Rig<'a> {
        mem: &'a GuestMemory,
        mock: MockSplitQueue<'a, GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        registrar: Registrar,
        _event_loop: EventLoop,
    }

    impl<'a> Rig<'a> {
        fn new(q: &'a TestQueue) -> Self {
            let queues = vec![q.queue(), q.queue()];
            let mut event_loop = EventLoop::new().unwrap();
            Self {
                mem: &q.mem,
                mock: q.mock(),
                queues,
                interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                registrar: event_loop.registrar(),
                _event_loop: event_loop,
            }
        }

        fn ctx(&mut self) -> QueueContext<'_> {
            QueueContext {
                mem: self.mem,
                queues: &mut self.queues,
                interrupt: &self.interrupt,
                registrar: &self.registrar,
            }
        }

        fn activate(&mut self, net: &mut Net, features: u64) {
            net.activate(features, &mut self.ctx()).unwrap();
        }

        /// Makes `chain` available at descriptor `first`.
        fn offer(&self, chain: &ChainBuilder, first: u16) {
            self.mock
                .add_desc_chains(&chain.descriptors_at(first), first)
                .unwrap();
        }

        /// Offers `count` one-descriptor buffers of `size` bytes, the first
        /// at descriptor (and 64 KiB address slot) `first`.
        fn offer_buffers(&self, first: u16, count: u16, size: u32) {
            for i in first..first + count {
                let addr = 0x10_0000 + u64::from(i) * 0x1_0000;
                self.offer(&ChainBuilder::new().writable(addr, size), i);
            }
        }

        /// `len` bytes of guest memory at `addr`.
        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        /// The used ring entries from `from` on: (head, length).
        fn used(&self, from: u16) -> Vec<(u32, u32)> {
            let used = self.mock.used();
            (from..used.idx().load())
                .map(|i| {
                    let e = used.ring().ref_at(usize::from(i)).unwrap().load();
                    (e.id(), e.len())
                })
                .collect()
        }
    }

    #[test]
    fn config_space_is_the_mac() {
        let (net, _, _) = device();
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
        assert_ne!(net.features() & VIRTIO_NET_F_MAC, 0);
    }

    #[test]
    fn offloads_are_offered_and_the_tap_gets_what_the_guest_acked() {
        let (mut net, _, offloads) = device();
        assert_eq!(net.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.activate(&mut net, ALL);
        assert_eq!(
            offloads.load(Ordering::SeqCst),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        net.reset(&rig.registrar);
        assert_eq!(net.rx_offloads, Offloads::default());
        // A driver that takes no offloads: the tap hands over plain frames.
        rig.activate(&mut net, VIRTIO_F_VERSION_1);
        assert_eq!(offloads.load(Ordering::SeqCst), 0);
        net.reset(&rig.registrar);
        rig.activate(
            &mut net,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4,
        );
        assert_eq!(offloads.load(Ordering::SeqCst), libc::TUN_F_CSUM);
    }

    #[test]
    fn tx_passes_the_header_through_and_rejects_bad_chains() {
        let (mut net, host, _) = device();
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        let mem = &q.mem;
        let gso = packet(NEEDS_CSUM, GSO_TCPV4, b"");
        mem.write_slice(&gso, GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(b"frame-bytes", GuestAddress(0x10_1000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x10_1000, 11);
        // Not negotiated yet: a TSO header is refused.
        assert!(!net.serve_tx_chain(&q.mem, chain.build(&q)));
        rig.activate(&mut net, ALL);
        assert!(net.serve_tx_chain(&q.mem, chain.build(&q)));
        let mut buf = [0u8; 64];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..12], &gso[..], "header passed as it was");
        assert_eq!(&buf[12..n], b"frame-bytes");
        // A 64 KiB GSO frame over several descriptors.
        let big = vec![0x5a; MAX_FRAME];
        q.mem.write_slice(&big, GuestAddress(0x20_0000)).unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x20_0000, 0x8000)
            .readable(0x20_8000, (MAX_FRAME - 0x8000) as u32)
            .build(&q);
        assert!(net.serve_tx_chain(&q.mem, chain));
        let mut buf = vec![0u8; MAX_PACKET + 1];
        assert_eq!(host.recv(&mut buf).unwrap(), MAX_PACKET);
        assert_eq!(&buf[12..MAX_PACKET], &big[..]);
        // Header only, no frame.
        let chain = ChainBuilder::new().readable(0x10_0000, 12).build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
        // Beyond guest memory.
        let chain = ChainBuilder::new().readable(0xffff_0000, 100).build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
        // Oversized.
        let chain = ChainBuilder::new()
            .readable(0x10_0000, (MAX_PACKET + 1) as u32)
            .build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
        // An offload that was never offered (TCPv4 with ECN).
        q.mem
            .write_slice(&[NEEDS_CSUM, GSO_TCPV4 | 0x80], GuestAddress(0x10_0000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x10_1000, 11)
            .build(&q);
        assert!(!net.serve_tx_chain(&q.mem, chain));
    }

    #[test]
    fn a_gso_frame_fills_a_big_multi_descriptor_rx_buffer() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, ALL);
        // What Linux posts with GUEST_TSO and no mergeable buffers: the
        // header in a descriptor of its own, then pages.
        let frame: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let sent = packet(NEEDS_CSUM, GSO_TCPV4, &frame);
        host.send(&sent).unwrap();
        let buffer = ChainBuilder::new()
            .writable(0x10_0000, 12)
            .writable(0x20_0000, 0x2000)
            .writable(0x30_0000, 0x2000)
            .writable(0x38_0000, 0x2000);
        rig.offer(&buffer, 0);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().rx_frames, 1);
        assert_eq!(rig.used(0), [(0, sent.len() as u32)]);
        let header = rig.read(0x10_0000, 12);
        assert_eq!(
            &header[..10],
            &sent[..10],
            "offload fields as the tap gave them"
        );
        assert_eq!(&header[10..], &[1, 0], "num_buffers");
        let mut got = vec![0u8; frame.len()];
        let parts = [
            (0x20_0000u64, 0..0x2000),
            (0x30_0000, 0x2000..0x4000),
            (0x38_0000, 0x4000..frame.len()),
        ];
        for (addr, range) in parts {
            let len = range.len();
            got[range].copy_from_slice(&rig.read(addr, len));
        }
        assert_eq!(got, frame);
    }

    #[test]
    fn rx_frames_the_guest_cannot_take_are_dropped_without_using_a_buffer() {
        let (mut net, host, _) = device();
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        // Checksum offload only: no TSO frames, no partial checksums
        // without it either.
        rig.activate(&mut net, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM);
        host.send(&packet(NEEDS_CSUM, GSO_TCPV4, b"segment me"))
            .unwrap();
        host.send(&vec![0u8; MAX_PACKET + 1]).unwrap();
        host.send(&[0u8; 5]).unwrap();
        host.send(&packet(NEEDS_CSUM, 0, b"fine")).unwrap();
        rig.offer(&ChainBuilder::new().writable(0x10_0000, 2048), 0);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().dropped, 3);
        assert_eq!(net.counters().rx_frames, 1);
        let got = rig.read(0x10_0000, 16);
        assert_eq!(got[0], NEEDS_CSUM);
        assert_eq!(&got[12..], b"fine");
        // Reset and renegotiated without offloads: a frame the tap queued
        // under the old settings does not reach the new driver.
        net.reset(&rig.registrar);
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.activate(&mut net, VIRTIO_F_VERSION_1);
        host.send(&packet(NEEDS_CSUM, 0, b"partial")).unwrap();
        host.send(&packet(DATA_VALID, 0, b"valid")).unwrap();
        rig.offer(&ChainBuilder::new().writable(0x10_0000, 2048), 0);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().dropped, 4);
        let got = rig.read(0x10_0000, 17);
        assert_eq!(
            got[0], 0,
            "DATA_VALID is not for a driver without GUEST_CSUM"
        );
        assert_eq!(&got[12..], b"valid");
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, ALL);
        host.send(&packet(0, 0, &[7; 3000])).unwrap();
        rig.offer(&ChainBuilder::new().writable(0x10_0000, 1526), 0);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().dropped, 1);
        assert_eq!(net.counters().rx_frames, 0);
        assert_eq!(rig.used(0), [(0, 0)]);
        // A chain the device cannot write: the frame is dropped too.
        host.send(&packet(0, 0, b"hello")).unwrap();
        rig.offer(&ChainBuilder::new().readable(0x10_1000, 100), 1);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().dropped, 2);
        assert_eq!(rig.used(1), [(1, 0)]);
    }

    #[test]
    fn with_mergeable_buffers_a_gso_frame_spans_as_many_as_it_needs() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, MERGEABLE);
        let frame: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let sent = packet(NEEDS_CSUM, GSO_TCPV4, &frame);
        host.send(&sent).unwrap();
        host.send(&packet(0, 0, b"small")).unwrap();
        rig.offer_buffers(0, 8, 4096);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().rx_frames, 2);
        // 20012 bytes: four full buffers and 3628 bytes of a fifth; the
        // small frame takes the sixth.
        let used = rig.used(0);
        assert_eq!(
            used,
            [
                (0, 4096),
                (1, 4096),
                (2, 4096),
                (3, 4096),
                (4, 3628),
                (5, 17)
            ]
        );
        let mut got = Vec::new();
        for (head, len) in &used[..5] {
            let addr = 0x10_0000 + u64::from(*head) * 0x1_0000;
            got.extend_from_slice(&rig.read(addr, *len as usize));
        }
        assert_eq!(
            &got[..10],
            &sent[..10],
            "offload fields as the tap gave them"
        );
        assert_eq!(&got[10..12], &[5, 0], "num_buffers");
        assert_eq!(&got[12..], &frame[..]);
        assert_eq!(&rig.read(0x15_0000, 17)[10..], b"\x01\x00small");
    }

    #[test]
    fn with_mergeable_buffers_a_frame_waits_for_enough_of_them() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, MERGEABLE);
        host.send(&packet(0, 0, &[3; 10_000])).unwrap();
        rig.offer_buffers(0, 2, 4096);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        // Two buffers hold 8192 of 10012 bytes: nothing is used, the frame
        // waits in the device and the tap is not watched.
        assert_eq!(rig.used(0), []);
        assert!(net.rx_pending.is_some());
        assert!(!net.watching_tap);
        rig.offer_buffers(2, 1, 4096);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used(0), [(0, 4096), (1, 4096), (2, 1820)]);
        assert_eq!(net.counters().rx_frames, 1);
        assert_eq!(net.counters().dropped, 0);
    }

    #[test]
    fn with_mergeable_buffers_a_bad_chain_drops_the_frame_and_returns_what_it_took() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, MERGEABLE);
        host.send(&packet(0, 0, &[3; 6000])).unwrap();
        host.send(&packet(0, 0, b"next")).unwrap();
        rig.offer_buffers(0, 1, 4096);
        rig.offer(&ChainBuilder::new().readable(0x11_0000, 4096), 1);
        rig.offer_buffers(2, 1, 4096);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used(0), [(0, 0), (1, 0), (2, 16)]);
        assert_eq!(net.counters().dropped, 1);
        assert_eq!(net.counters().rx_frames, 1);
        // A buffer shorter than a header breaks the spec: dropped as well.
        host.send(&packet(0, 0, b"x")).unwrap();
        rig.offer_buffers(3, 1, 8);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used(3), [(3, 0)]);
        assert_eq!(net.counters().dropped, 2);
    }

    #[test]
    fn with_mergeable_buffers_a_throttled_frame_puts_its_buffers_back() {
        let (net, host, _) = device();
        let mut net = net.with_limits(ONE_FRAME, RateLimit::default()).unwrap();
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.activate(&mut net, MERGEABLE);
        host.send(&packet(0, 0, &[1; 5000])).unwrap();
        host.send(&packet(0, 0, &[2; 5000])).unwrap();
        rig.offer_buffers(0, 4, 4096);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(rig.used(0), [(0, 4096), (1, 916)]);
        assert_eq!(net.counters().throttled, 1);
        fire_timer(&mut net, &mut rig, RX_TIMER_TOKEN);
        assert_eq!(rig.used(2), [(2, 4096), (3, 916)]);
        assert_eq!(rig.read(0x13_0000, 4), [2; 4]);
    }

    #[test]
    fn rx_reads_only_when_the_guest_has_buffers() {
        let q = TestQueue::new();
        let (mut net, host, mut rig) = active(&q, VIRTIO_F_VERSION_1);
        host.send(&packet(0, 0, b"one")).unwrap();
        host.send(&packet(0, 0, b"two")).unwrap();
        // One buffer: one frame delivered, the other stays in the socket.
        rig.offer(&ChainBuilder::new().writable(0x10_0000, 2048), 0);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().rx_frames, 1);
        assert!(!net.watching_tap, "no buffers left: tap not watched");
        rig.offer(&ChainBuilder::new().writable(0x10_1000, 2048), 1);
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().rx_frames, 2);
        assert_eq!(&rig.read(0x10_1000, 15)[12..], b"two");
    }

    #[test]
    fn a_tx_rate_limit_holds_frames_back_until_its_timer_fires() {
        let (net, host, _) = device();
        let mut net = net.with_limits(RateLimit::default(), ONE_FRAME).unwrap();
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        q.mem
            .write_slice(&[0; 12], GuestAddress(0x10_0000))
            .unwrap();
        q.mem
            .write_slice(b"first", GuestAddress(0x10_1000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(0x10_0000, 12)
            .readable(0x10_1000, 5);
        rig.offer(&chain, 0);
        rig.offer(&chain, 2);
        rig.activate(&mut net, 0);
        net.queue_notified(TX_QUEUE, &mut rig.ctx()).unwrap();
        // Burst 1: one frame passes, the second waits in the queue.
        assert_eq!(net.counters().tx_frames, 1);
        assert_eq!(net.counters().throttled, 1);
        // A new notification while blocked does not send it either.
        net.queue_notified(TX_QUEUE, &mut rig.ctx()).unwrap();
        assert_eq!(net.counters().tx_frames, 1);
        fire_timer(&mut net, &mut rig, TX_TIMER_TOKEN);
        assert_eq!(net.counters().tx_frames, 2, "{:?}", net.counters());
        let mut buf = [0u8; 32];
        assert_eq!(host.recv(&mut buf).unwrap(), 17);
        assert_eq!(host.recv(&mut buf).unwrap(), 17);
    }

    #[test]
    fn a_gso_frame_is_charged_all_its_bytes_as_one_packet() {
        let (net, host, _) = device();
        let limit = RateLimit {
            bytes: Some(crate::rate_limiter::BucketConfig {
                rate: 1,
                burst: MAX_FRAME as u64,
            }),
            ops: Some(crate::rate_limiter::BucketConfig { rate: 1, burst: 2 }),
        };
        let mut net = net.with_limits(limit, RateLimit::default()).unwrap();
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        rig.activate(&mut net, ALL);
        let frame = vec![1u8; MAX_FRAME - 100];
        host.send(&packet(NEEDS_CSUM, GSO_TCPV4, &frame)).unwrap();
        host.send(&packet(0, 0, &[2; 101])).unwrap();
        for (i, addr) in [0x10_0000u64, 0x20_0000].into_iter().enumerate() {
            let buffer = ChainBuilder::new().writable(addr, MAX_PACKET as u32);
            rig.offer(&buffer, i as u16);
        }
        net.queue_notified(RX_QUEUE, &mut rig.ctx()).unwrap();
        // The GSO frame took all but 100 bytes of the bucket: the next
        // frame (101 bytes) waits although a packet token is left.
        assert_eq!(net.counters().rx_frames, 1);
        assert_eq!(net.counters().throttled, 1);
        assert!(net.rx_pending.is_some());
    }
}
