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
    ChainOutcome, DeviceError, QueueContext, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
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
                crate::limited_log!(
                    kind = "vsock malformed TX chains",
                    log::Level::Warn,
                    "vsock: dropped a malformed TX chain: {e}"
                );
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
                    crate::limited_log!(
                        kind = "vsock unusable RX buffers",
                        log::Level::Warn,
                        "vsock: unusable RX buffer: {e}"
                    );
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
        VIRTIO_F_VERSION_1
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
