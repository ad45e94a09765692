//! `vsock_echo`: a test tool for the vsock device, run on both sides of a
//! nested end-to-end test. Build it static for the guest with
//! `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --example vsock_echo`.
//!
//! Guest side (AF_VSOCK):
//!   vsock_echo guest-serve PORT             echo every connection back
//!   vsock_echo guest-wait PORT              accept one connection, read it to
//!                                           its end, exit (a "go on" signal)
//!   vsock_echo guest-send PORT BYTES CONNS  connect to the host (CID 2) CONNS
//!                                           times at once, send BYTES each,
//!                                           check the echo
//! Host side (the VMM's Unix sockets):
//!   vsock_echo host-serve UDS_PATH PORT     echo on UDS_PATH_PORT
//!   vsock_echo host-send UDS_PATH PORT BYTES CONNS
//!                                           CONNECT to the guest's PORT
//!
//! Each sender streams a deterministic pattern while a second thread reads
//! the echo and compares a checksum; it prints one `PASS`/`FAIL` line per
//! connection and exits non-zero on any failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::Instant;

const HOST_CID: u32 = 2;

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A connected vsock stream, used through `UnixStream`'s Read/Write (both
/// are plain stream sockets to the kernel).
fn vsock_connect(port: u32) -> std::io::Result<UnixStream> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    // SAFETY: valid fd and address of the stated length.
    check(unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(UnixStream::from(fd))
}

fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: valid fd and address of the stated length.
    check(unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: valid listening-capable socket.
    check(unsafe { libc::listen(raw, 64) })?;
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> std::io::Result<UnixStream> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(listener);
    // SAFETY: accept(2) on our listening socket; null address is allowed.
    let conn = unsafe { libc::accept(raw, std::ptr::null_mut(), std::ptr::null_mut()) };
    if conn < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `conn` is a fresh descriptor owned by nothing else.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(conn) }))
}

fn vsock_serve(port: u32) -> std::io::Result<()> {
    let listener = vsock_listen(port)?;
    loop {
        let stream = vsock_accept(&listener)?;
        std::thread::spawn(move || echo(stream));
    }
}

fn vsock_wait(port: u32) -> std::io::Result<()> {
    let listener = vsock_listen(port)?;
    let mut stream = vsock_accept(&listener)?;
    std::io::copy(&mut stream, &mut std::io::sink())?;
    Ok(())
}

fn echo(mut stream: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn pattern(seed: u64, index: u64) -> u8 {
    (index.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8
}

/// Streams `bytes` of pattern `seed` and checks the echo; returns a report.
fn exchange(stream: UnixStream, bytes: u64, seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let checker = std::thread::spawn(move || -> Result<u64, String> {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0u64;
        while got < bytes {
            let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("echo ended after {got} of {bytes} bytes"));
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern(seed, got + i as u64) {
                    return Err(format!("byte {} differs", got + i as u64));
                }
            }
            got += n as u64;
        }
        Ok(got)
    });
    let mut writer = stream;
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 32 << 10];
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(seed, sent + i as u64);
        }
        writer.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        sent += n as u64;
    }
    let got = checker
        .join()
        .map_err(|_| "checker panicked".to_string())??;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "{got} bytes echoed intact in {secs:.2} s ({:.1} MiB/s)",
        got as f64 / secs / (1 << 20) as f64
    ))
}

fn host_connect(uds: &str, port: u32) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(uds).map_err(|e| format!("connect {uds}: {e}"))?;
    (&stream)
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("OK ") {
        return Err(format!("handshake answer {line:?}"));
    }
    Ok(stream)
}

fn run_senders<F>(conns: u64, bytes: u64, connect: F) -> ExitCode
where
    F: Fn() -> Result<UnixStream, String> + Send + Sync + Clone + 'static,
{
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let connect = connect.clone();
            std::thread::spawn(move || connect().and_then(|s| exchange(s, bytes, i + 1)))
        })
        .collect();
    let mut failed = false;
    for (i, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(report)) => println!("PASS connection {i}: {report}"),
            Ok(Err(e)) => {
                failed = true;
                println!("FAIL connection {i}: {e}");
            }
            Err(_) => {
                failed = true;
                println!("FAIL connection {i}: thread panicked");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = (|| -> Result<ExitCode, String> {
        match args.get(1).map(String::as_str) {
            Some("guest-serve") => {
                vsock_serve(parse(&args, 2, "PORT")?).map_err(|e| e.to_string())?;
                Ok(ExitCode::SUCCESS)
            }
            Some("guest-wait") => {
                vsock_wait(parse(&args, 2, "PORT")?).map_err(|e| e.to_string())?;
                Ok(ExitCode::SUCCESS)
            }
            Some("guest-send") => {
                let port: u32 = parse(&args, 2, "PORT")?;
                let bytes = parse(&args, 3, "BYTES")?;
                let conns = parse(&args, 4, "CONNS")?;
                Ok(run_senders(conns, bytes, move || {
                    vsock_connect(port).map_err(|e| format!("vsock connect: {e}"))
                }))
            }
            Some("host-serve") => {
                let uds: String = parse(&args, 2, "UDS_PATH")?;
                let port: u32 = parse(&args, 3, "PORT")?;
                let path = format!("{uds}_{port}");
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path).map_err(|e| e.to_string())?;
                for stream in listener.incoming() {
                    let stream = stream.map_err(|e| e.to_string())?;
                    std::thread::spawn(move || echo(stream));
                }
                Ok(ExitCode::SUCCESS)
            }
            Some("host-send") => {
                let uds: String = parse(&args, 2, "UDS_PATH")?;
                let port: u32 = parse(&args, 3, "PORT")?;
                let bytes = parse(&args, 4, "BYTES")?;
                let conns = parse(&args, 5, "CONNS")?;
                Ok(run_senders(conns, bytes, move || host_connect(&uds, port)))
            }
            _ => Err("usage: vsock_echo guest-serve|guest-send|host-serve|host-send ...".into()),
        }
    })();
    result.unwrap_or_else(|e| {
        eprintln!("vsock_echo: {e}");
        ExitCode::from(2)
    })
}
