//! The host side of virtio-vsock, compatible with Firecracker's:
//!
//! * guest-initiated: a guest REQUEST to (CID 2, port P) connects to the
//!   Unix socket `<uds_path>_P`; RESPONSE on success, RST if nobody listens;
//! * host-initiated: a client connects to `<uds_path>` and writes
//!   `CONNECT P\n`; the muxer sends the guest a REQUEST to port P from a
//!   fresh host port L and, on RESPONSE, writes `OK L\n` to the client.
//!   Then bytes flow both ways.
//!
//! The muxer owns every host fd and watches them through the device
//! thread's epoll (sub-tokens: the listener, then one per stream). Packets
//! for the guest are produced on demand when the guest has RX buffers:
//! connections with something to say wait in `rx_queue`.
//!
//! Every guest header is checked: source CID must be the guest's,
//! destination the host, type STREAM; unknown connections get RST; data
//! beyond the advertised credit resets the connection. Nothing the guest
//! sends can make the muxer block, panic or grow without bound
//! ([`MAX_CONNECTIONS`], [`MAX_PENDING_RESETS`], per-connection buffers):
//! `rx_queue` holds each connection at most once and at most
//! [`MAX_PENDING_RESETS`] resets; a reset beyond that is dropped and
//! counted (a guest that posts no RX buffers cannot take it anyway).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::connection::{CONN_BUF_ALLOC, Connection, State};
use super::packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::unix::connect_nonblocking;
use crate::devices::virtio::FIRST_BACKEND_TOKEN;
use crate::event_loop::Registrar;

/// Sub-token of the listening socket.
pub const LISTENER_TOKEN: u32 = FIRST_BACKEND_TOKEN;
/// Connections (including not-yet-CONNECTed clients) at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// Resets for unknown connections waiting for the guest's RX buffers at
/// most; further ones are dropped (and counted).
pub const MAX_PENDING_RESETS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors of muxer creation.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The host socket path is in use by something that is not a socket.
    #[error("{0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// Binding the listener failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Connection identity: (host port, guest port).
type Key = (u32, u32);

/// A host client that has not yet sent its CONNECT line.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Something waiting to be sent to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxItem {
    /// A connection with packets to send.
    Connection(Key),
    /// A reset for a connection the muxer does not know.
    Reset(Header),
}

/// What a stream sub-token refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Client,
    Connection(Key),
}

/// The host side of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listening: bool,
    connections: HashMap<Key, Connection>,
    clients: HashMap<u32, PendingClient>,
    targets: HashMap<u32, Target>,
    rx_queue: VecDeque<RxItem>,
    /// `RxItem::Reset` entries in `rx_queue`.
    pending_resets: usize,
    /// Resets not queued because [`MAX_PENDING_RESETS`] were waiting.
    dropped_resets: u64,
    next_token: u32,
    next_local_port: u32,
    dropped_packets: u64,
    /// Whether the guest has connected to a host port yet (the first time
    /// is logged: with the VMM log's timestamps it times the guest's boot
    /// to its agent's first connection).
    guest_connected: bool,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file must not outlive the VM.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn reset_for(header: &Header) -> Header {
    Header {
        src_cid: header.dst_cid,
        dst_cid: header.src_cid,
        src_port: header.dst_port,
        dst_port: header.src_port,
        kind: TYPE_STREAM,
        op: op::RST,
        ..Default::default()
    }
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket file) for a guest
    /// with CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(MuxerError::PathInUse(uds_path.to_path_buf()));
            }
            let _ = std::fs::remove_file(uds_path);
        }
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listening: false,
            connections: HashMap::new(),
            clients: HashMap::new(),
            targets: HashMap::new(),
            rx_queue: VecDeque::new(),
            pending_resets: 0,
            dropped_resets: 0,
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            dropped_packets: 0,
            guest_connected: false,
        })
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Guest packets dropped as invalid.
    pub fn dropped_packets(&self) -> u64 {
        self.dropped_packets
    }

    /// Resets for unknown connections waiting for guest RX buffers.
    pub fn pending_resets(&self) -> usize {
        self.pending_resets
    }

    /// Resets dropped because [`MAX_PENDING_RESETS`] were already waiting.
    pub fn dropped_resets(&self) -> u64 {
        self.dropped_resets
    }

    /// Starts accepting host clients.
    pub fn activate(&mut self, registrar: &Registrar) {
        if !self.listening {
            match registrar.add(self.listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN) {
                Ok(()) => self.listening = true,
                Err(e) => crate::limited_log!(
                    kind = "vsock listener watch failures",
                    log::Level::Error,
                    "vsock: cannot watch the listener: {e}"
                ),
            }
        }
    }

    /// Drops every connection and client (device reset).
    pub fn reset(&mut self, registrar: &Registrar) {
        for (_, conn) in self.connections.drain() {
            if !conn.interest.is_empty() {
                let _ = registrar.remove(conn.stream.as_raw_fd());
            }
        }
        for (_, client) in self.clients.drain() {
            let _ = registrar.remove(client.stream.as_raw_fd());
        }
        if self.listening {
            let _ = registrar.remove(self.listener.as_raw_fd());
            self.listening = false;
        }
        self.targets.clear();
        self.rx_queue.clear();
        self.pending_resets = 0;
    }

    fn allocate_token(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(LISTENER_TOKEN + 1);
            if !self.targets.contains_key(&token) {
                return token;
            }
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn live_count(&self) -> usize {
        self.connections.len() + self.clients.len()
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(conn) = self.connections.get_mut(&key)
            && !conn.queued
            && conn.has_rx_work()
        {
            conn.queued = true;
            self.rx_queue.push_back(RxItem::Connection(key));
        }
    }

    fn update_interest(&mut self, key: Key, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let wanted = conn.desired_interest();
        if wanted == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let result = match (conn.interest.is_empty(), wanted.is_empty()) {
            (true, false) => registrar.add(fd, conn.token, wanted),
            (false, true) => registrar.remove(fd),
            _ => registrar.modify(fd, conn.token, wanted),
        };
        match result {
            Ok(()) => conn.interest = wanted,
            Err(e) => crate::limited_log!(
                kind = "vsock epoll update failures",
                log::Level::Warn,
                "vsock: epoll update failed: {e}"
            ),
        }
    }

    fn remove(&mut self, key: Key, registrar: &Registrar) {
        if let Some(conn) = self.connections.remove(&key) {
            if !conn.interest.is_empty() {
                let _ = registrar.remove(conn.stream.as_raw_fd());
            }
            self.targets.remove(&conn.token);
        }
    }

    /// Resets `key` towards the guest (after which it is forgotten).
    fn abort(&mut self, key: Key, registrar: &Registrar) {
        if let Some(conn) = self.connections.get_mut(&key) {
            conn.pending.rst = true;
            if !conn.interest.is_empty() {
                let _ = registrar.remove(conn.stream.as_raw_fd());
                conn.interest = EventSet::empty();
            }
        }
        self.enqueue(key);
    }

    /// Queues a reset answering `header` (a packet for no connection),
    /// unless [`MAX_PENDING_RESETS`] already wait: then it is dropped.
    fn queue_reset(&mut self, header: &Header) {
        if self.pending_resets >= MAX_PENDING_RESETS {
            self.dropped_resets += 1;
            crate::limited_log!(
                kind = "vsock dropped resets",
                log::Level::Warn,
                "vsock: {MAX_PENDING_RESETS} resets already wait for guest RX buffers; \
                 dropped the reset for {header:?}"
            );
            return;
        }
        self.pending_resets += 1;
        self.rx_queue.push_back(RxItem::Reset(reset_for(header)));
    }

    fn drop_packet(&mut self, why: &str, header: &Header) {
        self.dropped_packets += 1;
        crate::limited_log!(
            kind = "vsock dropped guest packets",
            log::Level::Warn,
            "vsock: dropped guest packet ({why}): {header:?}"
        );
    }

    /// Handles one packet from the guest (TX queue).
    pub fn handle_guest_packet(&mut self, header: &Header, data: &[u8], registrar: &Registrar) {
        if header.src_cid != self.guest_cid {
            return self.drop_packet("source CID is not the guest's", header);
        }
        if header.dst_cid != HOST_CID {
            return self.drop_packet("destination is not the host", header);
        }
        if header.kind != TYPE_STREAM {
            if header.op != op::RST {
                self.queue_reset(header);
            }
            return;
        }
        let key = (header.dst_port, header.src_port);
        if !self.connections.contains_key(&key) {
            match header.op {
                op::REQUEST => self.guest_connect(header, registrar),
                op::RST => {}
                _ => self.queue_reset(header),
            }
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        let outcome = match (header.op, conn.state) {
            (op::RESPONSE, State::AwaitingResponse) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", conn.local_port);
                // The client just connected and is waiting for this line:
                // a fresh socket buffer always takes 20 bytes.
                (&conn.stream)
                    .write_all(line.as_bytes())
                    .map_err(|e| e.to_string())
            }
            (op::RW, State::Established) => conn.push_guest_data(data).map_err(|e| e.to_string()),
            (op::CREDIT_UPDATE, _) => Ok(()),
            (op::CREDIT_REQUEST, _) => {
                conn.pending.credit_update = true;
                Ok(())
            }
            (op::SHUTDOWN, _) => conn
                .peer_shutdown(header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND))
                .map_err(|e| e.to_string()),
            (op::RST, _) => {
                self.remove(key, registrar);
                return;
            }
            (other, state) => Err(format!("op {other} in state {state:?}")),
        };
        if let Err(reason) = outcome {
            crate::limited_log!(
                kind = "vsock connection resets",
                log::Level::Debug,
                "vsock: resetting {key:?}: {reason}"
            );
            self.abort(key, registrar);
            return;
        }
        self.enqueue(key);
        self.update_interest(key, registrar);
    }

    fn guest_connect(&mut self, header: &Header, registrar: &Registrar) {
        let key = (header.dst_port, header.src_port);
        if self.live_count() >= MAX_CONNECTIONS {
            crate::limited_log!(
                kind = "vsock refused guest connections",
                log::Level::Warn,
                "vsock: connection limit reached, refusing {key:?}"
            );
            self.queue_reset(header);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), header.dst_port));
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                crate::limited_log!(
                    kind = "vsock failed guest connects",
                    log::Level::Debug,
                    "vsock: guest connect to {} refused: {e}",
                    path.display()
                );
                self.queue_reset(header);
                return;
            }
        };
        if !self.guest_connected {
            self.guest_connected = true;
            log::info!(
                "vsock: first guest connection, port {} to {}",
                header.src_port,
                path.display()
            );
        }
        let token = self.allocate_token();
        let mut conn = Connection::new(stream, token, key.0, key.1, State::Established);
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        conn.pending.response = true;
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, conn);
        self.enqueue(key);
        self.update_interest(key, registrar);
    }

    /// Whether a packet is waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.rx_queue.is_empty()
    }

    /// The next packet for the guest; its payload (at most `max_data`
    /// bytes) is appended to `data`.
    pub fn next_rx_packet(
        &mut self,
        max_data: usize,
        data: &mut Vec<u8>,
        registrar: &Registrar,
    ) -> Option<Header> {
        while let Some(item) = self.rx_queue.pop_front() {
            let key = match item {
                RxItem::Reset(header) => {
                    self.pending_resets -= 1;
                    return Some(header);
                }
                RxItem::Connection(key) => key,
            };
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let Some((op, flags, fwd_cnt)) = conn.next_packet(max_data, data) else {
                continue;
            };
            let header = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: conn.local_port,
                dst_port: conn.peer_port,
                len: data.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags,
                buf_alloc: CONN_BUF_ALLOC,
                fwd_cnt,
            };
            if op == op::RST {
                self.remove(key, registrar);
            } else {
                self.enqueue(key);
                self.update_interest(key, registrar);
            }
            return Some(header);
        }
        None
    }

    /// Handles readiness of a host fd.
    pub fn handle_event(&mut self, token: u32, events: EventSet, registrar: &Registrar) {
        if token == LISTENER_TOKEN {
            self.accept_clients(registrar);
            return;
        }
        match self.targets.get(&token).copied() {
            Some(Target::Client) => self.read_connect_line(token, registrar),
            Some(Target::Connection(key)) => self.stream_ready(key, events, registrar),
            None => {}
        }
    }

    fn accept_clients(&mut self, registrar: &Registrar) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::limited_log!(
                        kind = "vsock accept failures",
                        log::Level::Warn,
                        "vsock: accept failed: {e}"
                    );
                    return;
                }
            };
            if self.live_count() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                crate::limited_log!(
                    kind = "vsock refused host clients",
                    log::Level::Warn,
                    "vsock: refusing a host client (limit reached)"
                );
                continue;
            }
            let token = self.allocate_token();
            if registrar
                .add(stream.as_raw_fd(), token, EventSet::IN)
                .is_err()
            {
                continue;
            }
            self.targets.insert(token, Target::Client);
            self.clients.insert(
                token,
                PendingClient {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    fn drop_client(&mut self, token: u32, registrar: &Registrar) {
        if let Some(client) = self.clients.remove(&token) {
            let _ = registrar.remove(client.stream.as_raw_fd());
        }
        self.targets.remove(&token);
    }

    fn read_connect_line(&mut self, token: u32, registrar: &Registrar) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        // Read byte by byte so nothing after the newline is consumed.
        let mut byte = [0u8; 1];
        let port = loop {
            match client.stream.read(&mut byte) {
                Ok(0) => return self.drop_client(token, registrar),
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&client.line),
                Ok(_) if client.line.len() < MAX_CONNECT_LINE => client.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(peer_port) = port else {
            crate::limited_log!(
                kind = "vsock malformed CONNECT lines",
                log::Level::Debug,
                "vsock: host client sent a malformed CONNECT line"
            );
            return self.drop_client(token, registrar);
        };
        let Some(client) = self.clients.remove(&token) else {
            return;
        };
        // Keep the token; watch nothing until the guest answers.
        let _ = registrar.remove(client.stream.as_raw_fd());
        let local_port = self.allocate_local_port();
        let key = (local_port, peer_port);
        let mut conn = Connection::new(
            client.stream,
            token,
            local_port,
            peer_port,
            State::AwaitingResponse,
        );
        conn.pending.request = true;
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, conn);
        self.enqueue(key);
    }

    fn stream_ready(&mut self, key: Key, events: EventSet, registrar: &Registrar) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let mut result = Ok(());
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            result = conn.flush_to_host();
        }
        if result.is_ok()
            && events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
        {
            result = conn.read_from_host();
        }
        if result.is_err() || (events.contains(EventSet::ERROR) && conn.buffered_to_host() > 0) {
            self.abort(key, registrar);
            return;
        }
        self.enqueue(key);
        self.update_interest(key, registrar);
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests;
