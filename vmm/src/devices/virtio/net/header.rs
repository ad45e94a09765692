//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 section
//! 5.1.6) and the offload features it depends on.
//!
//! ```text
//! 0 flags  1 gso_type  2 hdr_len  4 gso_size  6 csum_start  8 csum_offset
//! 10 num_buffers                              (all little-endian, 12 bytes)
//! ```
//!
//! The tap is opened with `IFF_VNET_HDR` and a header size of 12, so the
//! kernel reads and writes this very layout in front of every frame, and
//! the header passes between the guest's buffers and the tap unchanged,
//! except for what the spec requires of the device and the tap does not
//! do:
//!
//! * to the guest ([`prepare_rx`], [`set_num_buffers`]): `num_buffers` is
//!   set to the number of buffers the frame fills (the tap skips those two
//!   bytes), and without `GUEST_CSUM` the flags are cleared (the tap may
//!   say DATA_VALID);
//! * both ways ([`check_tx`], [`prepare_rx`]): a header that asks for an
//!   offload the driver did not negotiate is refused, and its frame dropped
//!   and counted. The tap is told what the guest accepts
//!   ([`Offloads::tun_flags`]), so on RX this only catches frames queued
//!   before a renegotiation; on TX it keeps a driver to what it agreed to
//!   (the host kernel validates the rest: `hdr_len`, `csum_start`, ...).

use virtio_bindings::virtio_net as bindings;

/// Size of `virtio_net_hdr_v1`.
pub const NET_HEADER_SIZE: usize = 12;

/// `VIRTIO_NET_F_CSUM`: the device takes frames with a partial checksum.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << bindings::VIRTIO_NET_F_CSUM;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << bindings::VIRTIO_NET_F_GUEST_CSUM;
/// `VIRTIO_NET_F_GUEST_TSO4`: the driver takes TCPv4 segmentation offload frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << bindings::VIRTIO_NET_F_GUEST_TSO4;
/// `VIRTIO_NET_F_GUEST_TSO6`: the driver takes TCPv6 segmentation offload frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << bindings::VIRTIO_NET_F_GUEST_TSO6;
/// `VIRTIO_NET_F_GUEST_UFO`: the driver takes UDP fragmentation offload frames.
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << bindings::VIRTIO_NET_F_GUEST_UFO;
/// `VIRTIO_NET_F_HOST_TSO4`: the device takes TCPv4 segmentation offload frames.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << bindings::VIRTIO_NET_F_HOST_TSO4;
/// `VIRTIO_NET_F_HOST_TSO6`: the device takes TCPv6 segmentation offload frames.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << bindings::VIRTIO_NET_F_HOST_TSO6;
/// `VIRTIO_NET_F_HOST_UFO`: the device takes UDP fragmentation offload frames.
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << bindings::VIRTIO_NET_F_HOST_UFO;

/// `VIRTIO_NET_F_MRG_RXBUF`: a frame to the driver may span several buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << bindings::VIRTIO_NET_F_MRG_RXBUF;

/// Every offload feature the device offers.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_UFO
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_UFO;

const FLAGS: usize = 0;
const GSO_TYPE: usize = 1;
const NUM_BUFFERS: usize = 10;
const F_NEEDS_CSUM: u8 = bindings::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const GSO_NONE: u8 = bindings::VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = bindings::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = bindings::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
const GSO_UDP: u8 = bindings::VIRTIO_NET_HDR_GSO_UDP as u8;

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("shorter than a virtio-net header")]
    Short,
    /// A partial checksum without checksum offload.
    #[error("partial checksum, but checksum offload was not negotiated")]
    Checksum,
    /// A segmentation type that was not negotiated (or does not exist).
    #[error("segmentation type {0:#x} was not negotiated")]
    Gso(u8),
}

/// The offloads one direction's headers may use, from the acked features.
/// A segmentation offload counts only with checksum offload in the same
/// direction (the spec makes it a dependency; a driver that acks one
/// without the other gets neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`NEEDS_CSUM`).
    pub csum: bool,
    /// `GSO_TCPV4`.
    pub tso4: bool,
    /// `GSO_TCPV6`.
    pub tso6: bool,
    /// `GSO_UDP`.
    pub ufo: bool,
}

impl Offloads {
    fn from_bits(acked: u64, csum: u64, tso4: u64, tso6: u64, ufo: u64) -> Self {
        let has = |bit: u64| acked & bit != 0;
        let csum = has(csum);
        Self {
            csum,
            tso4: csum && has(tso4),
            tso6: csum && has(tso6),
            ufo: csum && has(ufo),
        }
    }

    /// What frames from the driver may use (`CSUM`, `HOST_*`).
    pub fn tx(acked: u64) -> Self {
        Self::from_bits(
            acked,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        )
    }

    /// What frames to the driver may use (`GUEST_CSUM`, `GUEST_*`).
    pub fn rx(acked: u64) -> Self {
        Self::from_bits(
            acked,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        )
    }

    /// Whether any segmentation offload is on (frames up to 64 KiB).
    pub fn any_gso(self) -> bool {
        self.tso4 || self.tso6 || self.ufo
    }

    /// The `TUNSETOFFLOAD` argument that lets the tap hand us frames with
    /// these offloads (the tap refuses TSO/UFO without `TUN_F_CSUM`).
    pub fn tun_flags(self) -> u32 {
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        for (on, flag) in [
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ufo, libc::TUN_F_UFO),
        ] {
            if on {
                flags |= flag;
            }
        }
        flags
    }

    fn check(self, header: &[u8]) -> Result<(), HeaderError> {
        let header = header.get(..NET_HEADER_SIZE).ok_or(HeaderError::Short)?;
        if header[FLAGS] & F_NEEDS_CSUM != 0 && !self.csum {
            return Err(HeaderError::Checksum);
        }
        // GSO_ECN (0x80) needs *_ECN, which is not offered: it fails here
        // like an unknown type.
        let gso = header[GSO_TYPE];
        let allowed = match gso {
            GSO_NONE => true,
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            GSO_UDP => self.ufo,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(HeaderError::Gso(gso))
        }
    }
}

/// Checks the header at the start of a frame from the driver against what
/// it negotiated; the header then goes to the tap as it is.
pub fn check_tx(packet: &[u8], offloads: Offloads) -> Result<(), HeaderError> {
    offloads.check(packet)
}

/// Makes the header at the start of a frame read from the tap what the
/// driver may see (no flags without checksum offload); refuses offloads the
/// driver did not negotiate. `num_buffers` is set at delivery
/// ([`set_num_buffers`]).
pub fn prepare_rx(packet: &mut [u8], offloads: Offloads) -> Result<(), HeaderError> {
    offloads.check(packet)?;
    if !offloads.csum {
        // Only DATA_VALID (or RSC_INFO) can be left: not for this driver.
        packet[FLAGS] = 0;
    }
    Ok(())
}

/// Sets `num_buffers` in the header at the start of a frame to the number
/// of buffers it fills (1 without mergeable buffers; the tap leaves those
/// two bytes as they were).
pub fn set_num_buffers(packet: &mut [u8], count: u16) {
    if let Some(field) = packet.get_mut(NUM_BUFFERS..NET_HEADER_SIZE) {
        field.copy_from_slice(&count.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = OFFLOAD_FEATURES;
    const DATA_VALID: u8 = bindings::VIRTIO_NET_HDR_F_DATA_VALID as u8;

    fn header(flags: u8, gso_type: u8) -> [u8; NET_HEADER_SIZE] {
        let mut h = [0u8; NET_HEADER_SIZE];
        h[FLAGS] = flags;
        h[GSO_TYPE] = gso_type;
        // hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16.
        h[2..4].copy_from_slice(&54u16.to_le_bytes());
        h[4..6].copy_from_slice(&1448u16.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        h
    }

    #[test]
    fn directions_take_their_own_feature_bits() {
        let tx = Offloads::tx(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            tx,
            Offloads {
                csum: true,
                tso4: true,
                ..Offloads::default()
            }
        );
        assert_eq!(
            Offloads::rx(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4),
            Offloads::default()
        );
        let rx = Offloads::rx(ALL);
        assert!(rx.csum && rx.tso4 && rx.tso6 && rx.ufo && rx.any_gso());
        assert!(!Offloads::rx(VIRTIO_NET_F_GUEST_CSUM).any_gso());
    }

    #[test]
    fn segmentation_without_checksum_offload_is_not_negotiated() {
        let rx = Offloads::rx(VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(rx, Offloads::default());
        assert_eq!(rx.tun_flags(), 0);
        let tx = Offloads::tx(VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            check_tx(&header(0, GSO_TCPV4), tx),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
    }

    #[test]
    fn tun_flags_follow_what_the_guest_accepts() {
        assert_eq!(Offloads::rx(0).tun_flags(), 0);
        assert_eq!(
            Offloads::rx(VIRTIO_NET_F_GUEST_CSUM).tun_flags(),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            Offloads::rx(ALL).tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert_eq!(
            Offloads::rx(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6).tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn tx_headers_are_held_to_the_negotiated_offloads() {
        let all = Offloads::tx(ALL);
        let none = Offloads::tx(0);
        assert_eq!(check_tx(&[0; NET_HEADER_SIZE], none), Ok(()));
        assert_eq!(check_tx(&[0; 11], all), Err(HeaderError::Short));
        for gso in [GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP] {
            assert_eq!(check_tx(&header(F_NEEDS_CSUM, gso), all), Ok(()));
        }
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_NONE), none),
            Err(HeaderError::Checksum)
        );
        assert_eq!(
            check_tx(&header(0, GSO_TCPV6), none),
            Err(HeaderError::Gso(GSO_TCPV6))
        );
        let tso4_only = Offloads::tx(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_TCPV4), tso4_only),
            Ok(())
        );
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_UDP), tso4_only),
            Err(HeaderError::Gso(GSO_UDP))
        );
        // ECN was not offered; UDP_L4 (USO) neither; 2 is no type at all.
        for gso in [GSO_TCPV4 | 0x80, 5, 2, 0xff] {
            assert_eq!(
                check_tx(&header(F_NEEDS_CSUM, gso), all),
                Err(HeaderError::Gso(gso))
            );
        }
    }

    #[test]
    fn rx_headers_keep_the_offload_fields_and_get_num_buffers() {
        let mut packet = header(F_NEEDS_CSUM, GSO_TCPV4).to_vec();
        packet[NUM_BUFFERS] = 0xaa; // what the tap left there
        packet.extend_from_slice(b"frame");
        let before = packet.clone();
        prepare_rx(&mut packet, Offloads::rx(ALL)).unwrap();
        assert_eq!(packet, before);
        set_num_buffers(&mut packet, 0x0102);
        assert_eq!(&packet[NUM_BUFFERS..NET_HEADER_SIZE], &[2, 1]);
        assert_eq!(&packet[..NUM_BUFFERS], &before[..NUM_BUFFERS]);
        assert_eq!(&packet[NET_HEADER_SIZE..], b"frame");
        // Too short for the field: nothing to set, nothing to panic about.
        set_num_buffers(&mut packet[..11], 1);
    }

    #[test]
    fn rx_headers_without_checksum_offload_carry_no_flags() {
        let mut packet = header(DATA_VALID, GSO_NONE);
        prepare_rx(&mut packet, Offloads::rx(0)).unwrap();
        assert_eq!(packet[FLAGS], 0);
        let mut packet = header(DATA_VALID, GSO_NONE);
        prepare_rx(&mut packet, Offloads::rx(VIRTIO_NET_F_GUEST_CSUM)).unwrap();
        assert_eq!(packet[FLAGS], DATA_VALID);
    }

    #[test]
    fn rx_frames_the_guest_cannot_take_are_refused() {
        let rx_csum = Offloads::rx(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(
            prepare_rx(&mut header(F_NEEDS_CSUM, GSO_NONE), Offloads::rx(0)),
            Err(HeaderError::Checksum)
        );
        assert_eq!(
            prepare_rx(&mut header(F_NEEDS_CSUM, GSO_TCPV4), rx_csum),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
        assert_eq!(prepare_rx(&mut [0u8; 4], rx_csum), Err(HeaderError::Short));
    }
}
