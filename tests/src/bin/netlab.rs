//! `netlab`: the small network fixtures of the nested networking tests.
//!
//! - `netlab dns ADDR:PORT NAME=IPV4...`: an authoritative-only UDP DNS
//!   responder: A queries for a listed name get its address, anything else
//!   NXDOMAIN. Stands for "the internet's" resolver.
//! - `netlab listen LOG ADDR:PORT...`: TCP listeners that append one line
//!   per accepted connection (`ADDR:PORT <- PEER`) to LOG, then close it.
//!   Used on forbidden destinations: an empty LOG proves nothing got there.
//! - `netlab unix-listen NAME`: listens on the abstract Unix socket NAME
//!   (scoped to its network namespace) and closes every connection.
//! - `netlab unix-connect NAME`: connects to it once; exit status 0 and
//!   `connected` when it could, 1 and the error when it could not. Run in
//!   a jailed VMM's network namespace, it shows whether the VMM could
//!   reach the host's abstract sockets.
//!
//! The listeners run until killed.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("dns") if args.len() >= 2 => dns(&args[1], &args[2..]),
        Some("listen") if args.len() >= 3 => listen(&args[1], &args[2..]),
        Some("unix-listen") if args.len() == 2 => unix_listen(&args[1]),
        Some("unix-connect") if args.len() == 2 => unix_connect(&args[1]),
        _ => Err(
            "usage: netlab dns ADDR:PORT NAME=IPV4... | netlab listen LOG ADDR:PORT... \
                  | netlab unix-listen NAME | netlab unix-connect NAME"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netlab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dns(addr: &str, records: &[String]) -> Result<(), String> {
    let mut table = Vec::new();
    for record in records {
        let (name, ip) = record
            .split_once('=')
            .ok_or_else(|| format!("{record:?} is not NAME=IPV4"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{record:?}: {e}"))?;
        table.push((name.trim_end_matches('.').to_ascii_lowercase(), ip));
    }
    let socket = UdpSocket::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
    let mut buf = [0u8; 512];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..len], &table) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// The reply to one query, or `None` for a packet that is not one.
fn answer(query: &[u8], table: &[(String, Ipv4Addr)]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = query.get(pos..pos + 2)?;
    let question_end = pos + 4;
    query.get(pos..question_end)?;
    let name = labels.join(".");
    let found = table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ip)| *ip)
        .filter(|_| qtype == [0, 1]);
    let known = table.iter().any(|(n, _)| *n == name);
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]);
    // QR, opcode 0, AA, RD copied; RA; rcode 0 or 3 (NXDOMAIN).
    reply.push(0x84 | (query[2] & 0x01));
    reply.push(if known { 0x80 } else { 0x83 });
    reply.extend_from_slice(&[0, 1, 0, u8::from(found.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let Some(ip) = found {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

fn listen(log: &str, addrs: &[String]) -> Result<(), String> {
    let mut threads = Vec::new();
    for addr in addrs {
        let parsed: SocketAddr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
        let listener = TcpListener::bind(parsed).map_err(|e| format!("binding {addr}: {e}"))?;
        let log = log.to_string();
        let addr = addr.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let peer = stream
                    .peer_addr()
                    .map_or("?".to_string(), |p| p.to_string());
                if let Ok(mut file) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                {
                    let _ = writeln!(file, "{addr} <- {peer}");
                }
            }
        }));
    }
    println!("listening on {}", addrs.join(" "));
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The abstract Unix socket address NAME.
fn abstract_addr(name: &str) -> Result<UnixAddr, String> {
    UnixAddr::from_abstract_name(name.as_bytes()).map_err(|e| format!("@{name}: {e}"))
}

fn unix_listen(name: &str) -> Result<(), String> {
    let listener = UnixListener::bind_addr(&abstract_addr(name)?)
        .map_err(|e| format!("binding @{name}: {e}"))?;
    println!("listening on @{name}");
    for stream in listener.incoming() {
        drop(stream);
    }
    Ok(())
}

fn unix_connect(name: &str) -> Result<(), String> {
    UnixStream::connect_addr(&abstract_addr(name)?)
        .map_err(|e| format!("connecting to @{name}: {e}"))?;
    println!("connected");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abstract_socket_is_reached_by_name() {
        let name = format!("netlab-test-{}", std::process::id());
        assert!(unix_connect(&name).is_err(), "nobody listens yet");
        let listener = UnixListener::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        unix_connect(&name).unwrap();
        drop(listener);
    }

    fn query(name: &str, qtype: u8) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, qtype, 0, 1]);
        q
    }

    #[test]
    fn answers_known_names_and_refuses_the_rest() {
        let table = vec![(
            "files.example.test".to_string(),
            Ipv4Addr::new(203, 0, 113, 10),
        )];
        let reply = answer(&query("Files.Example.Test", 1), &table).unwrap();
        assert_eq!(&reply[0..2], &[0x12, 0x34]);
        assert_eq!(reply[3] & 0x0f, 0, "rcode");
        assert_eq!(&reply[reply.len() - 4..], &[203, 0, 113, 10]);
        let reply = answer(&query("other.test", 1), &table).unwrap();
        assert_eq!(reply[3] & 0x0f, 3, "NXDOMAIN");
        // AAAA for a known name: no answer, no error.
        let reply = answer(&query("files.example.test", 28), &table).unwrap();
        assert_eq!((reply[3] & 0x0f, reply[7]), (0, 0));
        assert!(answer(&[1, 2, 3], &table).is_none());
        assert!(answer(&query("x", 1)[..14], &table).is_none());
    }
}
