//! One vsock stream connection between a guest port and a host Unix
//! stream, with the virtio-vsock credit accounting.
//!
//! Credit (virtio 1.2 section 5.10.6.3): each side advertises its receive
//! buffer (`buf_alloc`) and how much it has consumed (`fwd_cnt`). The host
//! may send the guest at most `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`
//! bytes; the guest may have at most [`CONN_BUF_ALLOC`] bytes in flight to
//! the host, which are held in `tx_buf` until the Unix stream takes them.
//! A guest exceeding that is broken or hostile, and its connection is reset.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND, op};

/// Receive buffer the host advertises per connection.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Bytes read from the host stream ahead of delivery, at most.
const STAGING_LIMIT: usize = 64 << 10;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to be sent), waiting for RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

/// Control packets a connection owes the guest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Reset the connection (then forget it).
    pub rst: bool,
    /// Ask the guest to accept a host-initiated connection.
    pub request: bool,
    /// Accept a guest-initiated connection.
    pub response: bool,
    /// Tell the guest about freed buffer space.
    pub credit_update: bool,
    /// Tell the guest the host side closed.
    pub shutdown: bool,
}

/// Why a connection must be reset.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The guest sent more than the advertised buffer.
    #[error("guest overran the host receive buffer")]
    CreditOverrun,
    /// The host stream failed.
    #[error("host stream: {0}")]
    Stream(String),
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The event-loop sub-token of `stream`.
    pub token: u32,
    /// The host-side vsock port.
    pub local_port: u32,
    /// The guest-side vsock port.
    pub peer_port: u32,
    /// The life-cycle state.
    pub state: State,
    /// Control packets owed to the guest.
    pub pending: Pending,
    /// Whether the connection is in the muxer's delivery queue.
    pub queued: bool,
    /// Events currently watched on `stream` (empty: not watched).
    pub interest: EventSet,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    staging: Vec<u8>,
    peer_shutdown: u32,
    host_eof: bool,
}

impl Connection {
    /// A connection over `stream` (non-blocking) in `state`.
    pub fn new(
        stream: UnixStream,
        token: u32,
        local_port: u32,
        peer_port: u32,
        state: State,
    ) -> Self {
        Self {
            stream,
            token,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            queued: false,
            interest: EventSet::empty(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            staging: Vec::new(),
            peer_shutdown: 0,
            host_eof: false,
        }
    }

    /// Records the guest's buffer state carried by every packet.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self) -> bool {
        let p = self.pending;
        p.rst
            || p.request
            || p.response
            || p.credit_update
            || (self.state == State::Established
                && !self.staging.is_empty()
                && self.peer_credit() > 0)
            || (p.shutdown && self.staging.is_empty())
    }

    /// Produces the next packet for the guest: its op and flags, with any
    /// payload appended to `data` (at most `max_data` bytes). Also returns
    /// the `fwd_cnt` to advertise.
    pub fn next_packet(&mut self, max_data: usize, data: &mut Vec<u8>) -> Option<(u16, u32, u32)> {
        let (op, flags) = if self.pending.rst {
            self.pending = Pending::default();
            (op::RST, 0)
        } else if self.pending.request {
            self.pending.request = false;
            (op::REQUEST, 0)
        } else if self.pending.response {
            self.pending.response = false;
            (op::RESPONSE, 0)
        } else if self.state == State::Established
            && !self.staging.is_empty()
            && self.peer_credit() > 0
        {
            let n = self
                .staging
                .len()
                .min(max_data)
                .min(self.peer_credit() as usize);
            if n == 0 {
                return None;
            }
            data.extend_from_slice(&self.staging[..n]);
            self.staging.drain(..n);
            self.rx_cnt += Wrapping(n as u32);
            (op::RW, 0)
        } else if self.pending.credit_update {
            (op::CREDIT_UPDATE, 0)
        } else if self.pending.shutdown && self.staging.is_empty() {
            self.pending.shutdown = false;
            (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        } else {
            return None;
        };
        // Every packet carries fwd_cnt, so a separate update is now moot.
        self.pending.credit_update = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some((op, flags, self.fwd_cnt.0))
    }

    /// Takes guest data bound for the host stream.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ConnectionError> {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnectionError::CreditOverrun);
        }
        self.tx_buf.extend(data);
        self.flush_to_host()
    }

    /// Writes buffered guest data to the host stream as far as it goes.
    pub fn flush_to_host(&mut self) -> Result<(), ConnectionError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnectionError::Stream("wrote 0 bytes".into())),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnectionError::Stream(e.to_string())),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2 {
            self.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // The guest sends no more: pass the end of stream on.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                self.pending.rst = true;
            }
        }
        Ok(())
    }

    /// Reads from the host stream into the staging buffer, within credit.
    pub fn read_from_host(&mut self) -> Result<(), ConnectionError> {
        let room = STAGING_LIMIT
            .saturating_sub(self.staging.len())
            .min(self.peer_credit() as usize);
        if room == 0 || self.host_eof {
            return Ok(());
        }
        let start = self.staging.len();
        self.staging.resize(start + room, 0);
        let result = loop {
            match self.stream.read(&mut self.staging[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(0) => {
                self.staging.truncate(start);
                self.host_eof = true;
                self.pending.shutdown = true;
                Ok(())
            }
            Ok(n) => {
                self.staging.truncate(start + n);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.staging.truncate(start);
                Ok(())
            }
            Err(e) => {
                self.staging.truncate(start);
                Err(ConnectionError::Stream(e.to_string()))
            }
        }
    }

    /// Records a guest SHUTDOWN.
    pub fn peer_shutdown(&mut self, flags: u32) -> Result<(), ConnectionError> {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.flush_to_host()
    }

    /// The events worth watching on the host stream now.
    pub fn desired_interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == State::Established
            && !self.host_eof
            && self.staging.len() < STAGING_LIMIT
            && self.peer_credit() > 0
        {
            events |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Whether the host closed its end.
    pub fn host_eof(&self) -> bool {
        self.host_eof
    }

    /// Bytes waiting to be written to the host stream.
    pub fn buffered_to_host(&self) -> usize {
        self.tx_buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 0x101, 1024, 5000, State::Established), b)
    }

    #[test]
    fn host_data_respects_peer_credit() {
        let (mut conn, mut host) = pair();
        host.write_all(&[7u8; 100]).unwrap();
        conn.read_from_host().unwrap();
        assert!(!conn.has_rx_work(), "no credit yet");
        assert!(!conn.desired_interest().contains(EventSet::IN));
        conn.update_peer_credit(30, 0);
        conn.read_from_host().unwrap();
        let mut data = Vec::new();
        let (op, _, _) = conn.next_packet(4096, &mut data).unwrap();
        assert_eq!((op, data.len()), (op::RW, 30));
        assert_eq!(conn.peer_credit(), 0);
        assert!(conn.next_packet(4096, &mut data).is_none());
        conn.update_peer_credit(30, 30);
        conn.read_from_host().unwrap();
        data.clear();
        conn.next_packet(4096, &mut data).unwrap();
        assert_eq!(data.len(), 30);
    }

    #[test]
    fn guest_data_reaches_host_and_overrun_is_refused() {
        let (mut conn, mut host) = pair();
        conn.push_guest_data(b"hello").unwrap();
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let big = vec![0u8; CONN_BUF_ALLOC as usize + 1];
        assert_eq!(
            conn.push_guest_data(&big),
            Err(ConnectionError::CreditOverrun)
        );
    }

    #[test]
    fn full_buffer_waits_for_writable_and_sends_credit_updates() {
        let (mut conn, mut host) = pair();
        // Fill the socket so writes block, then buffer up to the limit.
        let chunk = vec![1u8; 64 << 10];
        let mut pushed = 0usize;
        while pushed + chunk.len() <= CONN_BUF_ALLOC as usize {
            conn.push_guest_data(&chunk).unwrap();
            pushed += chunk.len();
        }
        assert!(conn.buffered_to_host() > 0);
        assert!(conn.desired_interest().contains(EventSet::OUT));
        let mut sink = vec![0u8; pushed];
        host.set_nonblocking(false).unwrap();
        let mut read = 0;
        while read < pushed {
            read += host.read(&mut sink[read..]).unwrap();
            conn.flush_to_host().unwrap();
        }
        assert_eq!(conn.buffered_to_host(), 0);
        assert!(conn.pending.credit_update);
        let (op, _, fwd) = conn.next_packet(0, &mut Vec::new()).unwrap();
        assert_eq!(op, op::CREDIT_UPDATE);
        assert_eq!(fwd as usize, pushed);
    }

    #[test]
    fn host_eof_becomes_shutdown_after_data() {
        let (mut conn, host) = pair();
        conn.update_peer_credit(1 << 20, 0);
        (&host).write_all(b"tail").unwrap();
        drop(host);
        conn.read_from_host().unwrap();
        conn.read_from_host().unwrap();
        assert!(conn.host_eof());
        let mut data = Vec::new();
        assert_eq!(conn.next_packet(4096, &mut data).unwrap().0, op::RW);
        let (op, flags, _) = conn.next_packet(4096, &mut data).unwrap();
        assert_eq!((op, flags), (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    }

    #[test]
    fn full_peer_shutdown_requests_reset_once_flushed() {
        let (mut conn, _host) = pair();
        conn.peer_shutdown(SHUTDOWN_SEND | SHUTDOWN_RCV).unwrap();
        assert!(conn.pending.rst);
        assert_eq!(conn.next_packet(0, &mut Vec::new()).unwrap().0, op::RST);
    }
}
