//! Muxer tests with real Unix sockets and no guest: packets are fed in as
//! the TX queue would deliver them and read out as RX would take them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::event_loop::EventLoop;

const GUEST_CID: u64 = 3;

struct Fixture {
    muxer: Muxer,
    registrar: Registrar,
    dir: PathBuf,
    _event_loop: EventLoop,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("vmm-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut event_loop = EventLoop::new().unwrap();
    let registrar = event_loop.registrar();
    let mut muxer = Muxer::new(GUEST_CID, &dir.join("v.sock")).unwrap();
    muxer.activate(&registrar);
    Fixture {
        muxer,
        registrar,
        dir,
        _event_loop: event_loop,
    }
}

fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Default::default()
    }
}

impl Fixture {
    fn send(&mut self, header: Header, data: &[u8]) {
        let mut h = header;
        h.len = data.len() as u32;
        self.muxer.handle_guest_packet(&h, data, &self.registrar);
    }

    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut data = Vec::new();
        self.muxer
            .next_rx_packet(4096, &mut data, &self.registrar)
            .map(|h| (h, data))
    }

    /// Polls host fds the way the event loop would, until `cond` holds.
    fn pump_until(&mut self, mut cond: impl FnMut(&mut Self) -> bool) {
        for _ in 0..200 {
            let tokens: Vec<u32> = self.muxer.targets.keys().copied().collect();
            self.muxer
                .handle_event(LISTENER_TOKEN, EventSet::IN, &self.registrar);
            for token in tokens {
                self.muxer
                    .handle_event(token, EventSet::IN | EventSet::OUT, &self.registrar);
            }
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("condition not reached");
    }
}

#[test]
fn guest_connect_to_listening_port_gets_response_and_data_flows() {
    let mut f = fixture("guest-ok");
    let listener = UnixListener::bind(f.dir.join("v.sock_52")).unwrap();
    f.send(guest(op::REQUEST, 1000, 52), &[]);
    let (h, _) = f.recv().unwrap();
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (op::RESPONSE, 52, 1000, GUEST_CID)
    );
    let (mut host, _) = listener.accept().unwrap();

    f.send(guest(op::RW, 1000, 52), b"from guest");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");

    host.write_all(b"from host").unwrap();
    let mut got = None;
    f.pump_until(|f| {
        got = f.recv();
        got.is_some()
    });
    let (h, data) = got.unwrap();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"from host"[..]));
    assert_eq!(h.fwd_cnt, 10, "host reports what it forwarded");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut f = fixture("guest-refused");
    f.send(guest(op::REQUEST, 1000, 53), &[]);
    let (h, _) = f.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 53, 1000));
    assert_eq!(f.muxer.connection_count(), 0);
}

#[test]
fn host_initiated_connect_handshake() {
    let mut f = fixture("host-ok");
    let mut client = UnixStream::connect(f.dir.join("v.sock")).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let mut request = None;
    f.pump_until(|f| {
        request = f.recv();
        request.is_some()
    });
    let (h, _) = request.unwrap();
    assert_eq!((h.op, h.dst_port, h.src_cid), (op::REQUEST, 1234, HOST_CID));
    let local = h.src_port;
    f.send(guest(op::RESPONSE, 1234, local), &[]);
    let mut line = String::new();
    BufReader::new(&client).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));
    f.send(guest(op::RW, 1234, local), b"hi");
    let mut buf = [0u8; 2];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
    // The client goes away: the guest is told, and its RST ends it.
    drop(client);
    let mut shutdown = None;
    f.pump_until(|f| {
        shutdown = f.recv();
        shutdown.is_some()
    });
    assert_eq!(shutdown.unwrap().0.op, op::SHUTDOWN);
    f.send(guest(op::RST, 1234, local), &[]);
    assert_eq!(f.muxer.connection_count(), 0);
}

#[test]
fn malformed_connect_lines_are_dropped() {
    assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"connect 5",
        b"CONNECT 99999999999",
        b"\xff",
    ] {
        assert_eq!(parse_connect_line(bad), None, "{bad:?}");
    }
    let mut f = fixture("host-bad");
    let mut client = UnixStream::connect(f.dir.join("v.sock")).unwrap();
    client.write_all(&[b'A'; 64]).unwrap();
    f.pump_until(|f| f.muxer.clients.is_empty() && f.muxer.targets.is_empty());
    let mut buf = [0u8; 1];
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the muxer to close the client, got {other:?}"),
    }
    assert!(f.recv().is_none());
}

#[test]
fn spoofed_and_unknown_packets() {
    let mut f = fixture("spoof");
    let mut spoofed = guest(op::REQUEST, 1, 52);
    spoofed.src_cid = 7;
    f.send(spoofed, &[]);
    let mut to_other = guest(op::REQUEST, 1, 52);
    to_other.dst_cid = 9;
    f.send(to_other, &[]);
    assert!(f.recv().is_none());
    assert_eq!(f.muxer.dropped_packets(), 2);
    // Data for a connection that does not exist: RST.
    f.send(guest(op::RW, 1, 52), b"x");
    assert_eq!(f.recv().unwrap().0.op, op::RST);
    // A stray RST gets no answer.
    f.send(guest(op::RST, 1, 52), &[]);
    assert!(f.recv().is_none());
    // Non-stream type: RST.
    let mut dgram = guest(op::REQUEST, 1, 52);
    dgram.kind = 2;
    f.send(dgram, &[]);
    assert_eq!(f.recv().unwrap().0.op, op::RST);
}

#[test]
fn credit_overrun_resets_the_connection() {
    let mut f = fixture("overrun");
    let listener = UnixListener::bind(f.dir.join("v.sock_60")).unwrap();
    f.send(guest(op::REQUEST, 7, 60), &[]);
    assert_eq!(f.recv().unwrap().0.op, op::RESPONSE);
    let (_host, _) = listener.accept().unwrap();
    // The host never reads: the guest ignores credit and keeps sending.
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..16 {
        f.send(guest(op::RW, 7, 60), &chunk);
    }
    let mut saw_rst = false;
    while let Some((h, _)) = f.recv() {
        saw_rst |= h.op == op::RST;
    }
    assert!(saw_rst);
    assert_eq!(f.muxer.connection_count(), 0);
}

#[test]
fn connection_limit_is_enforced() {
    let mut f = fixture("limit");
    let _listener = UnixListener::bind(f.dir.join("v.sock_70")).unwrap();
    let mut refused = 0;
    for port in 0..(MAX_CONNECTIONS as u32 + 5) {
        f.send(guest(op::REQUEST, 10_000 + port, 70), &[]);
        while let Some((h, _)) = f.recv() {
            if h.op == op::RST {
                refused += 1;
            }
        }
    }
    // The listener's backlog refuses some too; never more than the limit live.
    assert!(f.muxer.connection_count() <= MAX_CONNECTIONS);
    assert!(refused >= 5);
}

#[test]
fn socket_file_is_removed_with_the_muxer() {
    let dir = std::env::temp_dir().join(format!("vmm-vsock-{}-cleanup", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let muxer = Muxer::new(GUEST_CID, &path).unwrap();
    assert!(path.exists());
    drop(muxer);
    assert!(!path.exists());
    // A regular file in the way is not clobbered.
    std::fs::write(&path, b"x").unwrap();
    assert!(matches!(
        Muxer::new(GUEST_CID, &path),
        Err(MuxerError::PathInUse(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_flood_of_bogus_packets_without_rx_buffers_keeps_the_reset_queue_at_its_cap() {
    let mut f = fixture("rst-flood");
    // Data for connections that do not exist, non-stream packets and
    // connects to ports nobody listens on: each asks for a reset, and the
    // guest posts no RX buffer to take them.
    for i in 0..20_000u32 {
        let mut header = guest(op::RW, i, 52);
        match i % 3 {
            0 => {}
            1 => header.kind = 2,
            _ => header.op = op::REQUEST,
        }
        f.send(header, b"x");
    }
    assert_eq!(f.muxer.pending_resets(), MAX_PENDING_RESETS);
    assert_eq!(f.muxer.rx_queue.len(), MAX_PENDING_RESETS);
    assert_eq!(f.muxer.dropped_resets(), 20_000 - MAX_PENDING_RESETS as u64);
    // The queued ones drain in order; then new resets are queued again.
    let mut drained = 0;
    while let Some((h, _)) = f.recv() {
        assert_eq!(h.op, op::RST);
        drained += 1;
    }
    assert_eq!(drained, MAX_PENDING_RESETS);
    assert_eq!(f.muxer.pending_resets(), 0);
    f.send(guest(op::RW, 1, 52), b"x");
    assert_eq!(f.recv().unwrap().0.op, op::RST);
}
