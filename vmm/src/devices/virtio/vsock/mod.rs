//! virtio-vsock (virtio 1.2 section 5.10) with the host side in userspace:
//! the device moves packets between the guest's queues and the
//! [`muxer::Muxer`], which maps them onto Unix stream sockets.
//!
//! Queues: 0 = RX (host to guest), 1 = TX (guest to host), 2 = event
//! (unused: it only matters for live migration). TX chains are parsed with
//! the `virtio-vsock` crate, which checks descriptor directions and sizes;
//! a chain it rejects is returned unused and counted. RX buffers are only
//! taken from the queue when the muxer has a packet for them.

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod unix;

use std::path::Path;

use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;

use self::muxer::{Muxer, MuxerError};
use self::packet::{HEADER_SIZE, Header, MAX_PACKET_DATA};
use super::{
    ChainOutcome, DeviceError, QueueContext, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, read_config_bytes,
};
use crate::event_loop::Registrar;
use crate::memory::GuestMemory;

/// Virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    rx_data: Vec<u8>,
    tx_data: Vec<u8>,
    malformed: u64,
}

impl Vsock {
    /// A device for guest CID `guest_cid` whose host side listens on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            rx_data: Vec::with_capacity(MAX_PACKET_DATA as usize),
            tx_data: Vec::with_capacity(MAX_PACKET_DATA as usize),
            malformed: 0,
        })
    }

    /// The host side (for inspection).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// TX chains rejected as malformed.
    pub fn malformed_chains(&self) -> u64 {
        self.malformed
    }

    /// Parses one TX chain and hands the packet to the muxer.
    pub fn serve_tx_chain(
        &mut self,
        mem: &GuestMemory,
        mut chain: super::Chain<'_>,
        registrar: &Registrar,
    ) {
        let packet = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
            Ok(packet) => packet,
            Err(e) => {
                self.malformed += 1;
                if self.malformed <= 16 {
                    log::warn!("vsock: dropped a malformed TX chain: {e}");
                }
                return;
            }
        };
        let header = Header {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            kind: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        };
        self.tx_data.clear();
        if let Some(slice) = packet.data_slice() {
            let len = (header.len as usize).min(slice.len());
            self.tx_data.resize(len, 0);
            let copied = slice.copy_to(&mut self.tx_data[..]);
            self.tx_data.truncate(copied);
        }
        self.muxer
            .handle_guest_packet(&header, &self.tx_data, registrar);
    }

    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        let registrar = ctx.registrar;
        super::process_queue(ctx, TX_QUEUE, |mem, chain| {
            self.serve_tx_chain(mem, chain, registrar);
            0
        })
        .map(|_| ())
    }

    /// Fills guest RX buffers with the muxer's pending packets.
    fn deliver_rx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        let registrar = ctx.registrar;
        super::process_queue_until_deferred(ctx, RX_QUEUE, |mem, mut chain| {
            if !self.muxer.has_rx() {
                return ChainOutcome::Deferred;
            }
            match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
                Ok(mut packet) => {
                    let room = packet.data_slice().map_or(0, |s| s.len());
                    self.rx_data.clear();
                    let Some(header) =
                        self.muxer
                            .next_rx_packet(room, &mut self.rx_data, registrar)
                    else {
                        return ChainOutcome::Deferred;
                    };
                    if packet.set_header_from_raw(&header.to_bytes()).is_err() {
                        return ChainOutcome::Used(0);
                    }
                    if let Some(slice) = packet.data_slice() {
                        slice.copy_from(&self.rx_data[..]);
                    }
                    ChainOutcome::Used((HEADER_SIZE + self.rx_data.len()) as u32)
                }
                Err(e) => {
                    self.malformed += 1;
                    if self.malformed <= 16 {
                        log::warn!("vsock: unusable RX buffer: {e}");
                    }
                    ChainOutcome::Used(0)
                }
            }
        })
        .map(|_| ())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueContext<'_>) -> Result<(), DeviceError> {
        self.muxer.activate(ctx.registrar);
        Ok(())
    }

    fn queue_notified(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        match queue {
            TX_QUEUE => {
                self.process_tx(ctx)?;
                self.deliver_rx(ctx)
            }
            RX_QUEUE => self.deliver_rx(ctx),
            _ => Ok(()),
        }
    }

    fn backend_event(
        &mut self,
        sub: u32,
        events: EventSet,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        self.muxer.handle_event(sub, events, ctx.registrar);
        self.deliver_rx(ctx)
    }

    fn reset(&mut self, registrar: &Registrar) {
        self.muxer.reset(registrar);
    }
}

#[cfg(test)]
mod tests {
    use super::packet::{TYPE_STREAM, op};
    use super::*;
    use crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX;
    use crate::devices::virtio::testing::{Rig, TestQueue, buffer_addr};

    const GUEST_CID: u64 = 3;

    /// A device listening on a socket of its own, and its path.
    fn device(name: &str) -> (Vsock, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("vmm-vsock-{}-{name}", std::process::id()));
        (Vsock::new(GUEST_CID, &path).unwrap(), path)
    }

    /// Has the guest send a data packet for a connection the host does not
    /// know: the host side answers with a reset, a packet for RX.
    fn queue_a_reset(vsock: &mut Vsock, rig: &Rig<'_>) {
        let header = Header {
            src_cid: GUEST_CID,
            dst_cid: packet::HOST_CID,
            src_port: 1234,
            dst_port: 5678,
            kind: TYPE_STREAM,
            op: op::RW,
            ..Default::default()
        };
        vsock
            .muxer
            .handle_guest_packet(&header, &[], &rig.registrar);
        assert!(vsock.muxer.has_rx());
    }

    #[test]
    fn event_idx_is_offered() {
        let (vsock, path) = device("offer");
        assert_ne!(vsock.features() & VIRTIO_RING_F_EVENT_IDX, 0);
        drop(vsock);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn with_event_idx_rx_asks_for_kicks_only_when_it_needs_buffers() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        let (mut vsock, path) = device("rx-kicks");
        rig.activate(&mut vsock, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        // A packet for the guest and no RX buffer: the driver's first
        // buffer must kick.
        queue_a_reset(&mut vsock, &rig);
        rig.notify(&mut vsock, RX_QUEUE).unwrap();
        assert_eq!(rig.avail_event(), 0);
        rig.offer_buffers(0, 1, 4096);
        assert!(rig.driver_kicks(0, true));
        rig.notify(&mut vsock, RX_QUEUE).unwrap();
        assert_eq!(rig.used(0), [(0, HEADER_SIZE as u32)]);
        assert_eq!(rig.interrupts(), 1);
        let mut op_bytes = [0u8; 2];
        op_bytes.copy_from_slice(&rig.read(buffer_addr(0) + 30, 2));
        assert_eq!(u16::from_le_bytes(op_bytes), op::RST);
        // Nothing more for the guest: buffers it posts wait for the host
        // side, which drives RX itself; they need not kick.
        assert_eq!(rig.avail_event(), 1);
        rig.offer_buffers(1, 1, 4096);
        assert!(rig.driver_kicks(1, true));
        rig.notify(&mut vsock, RX_QUEUE).unwrap();
        assert_eq!(rig.avail_event(), 1);
        rig.offer_buffers(2, 1, 4096);
        assert!(!rig.driver_kicks(2, true));
        // The host side has a packet again: it takes the first buffer.
        queue_a_reset(&mut vsock, &rig);
        vsock.deliver_rx(&mut rig.ctx()).unwrap();
        assert_eq!(rig.used(1), [(1, HEADER_SIZE as u32)]);
        drop(vsock);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn without_event_idx_rx_leaves_the_rings_alone() {
        let q = TestQueue::new();
        let mut rig = Rig::new(&q);
        let (mut vsock, path) = device("rx-plain");
        rig.activate(&mut vsock, VIRTIO_F_VERSION_1);
        queue_a_reset(&mut vsock, &rig);
        rig.notify(&mut vsock, RX_QUEUE).unwrap();
        rig.offer_buffers(0, 2, 4096);
        rig.notify(&mut vsock, RX_QUEUE).unwrap();
        assert_eq!(rig.used(0), [(0, HEADER_SIZE as u32)]);
        assert_eq!(rig.interrupts(), 1);
        assert_eq!(rig.avail_event(), 0);
        assert_eq!(rig.used_flags(), 0);
        drop(vsock);
        let _ = std::fs::remove_file(path);
    }
}
