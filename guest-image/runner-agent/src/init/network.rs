//! Guest networking: links up, DNS from the kernel's `ip=` configuration,
//! hostname.
//!
//! The kernel's IP autoconfiguration (`ip=` on the command line) has
//! already given eth0 its address, route and (optionally) DNS servers
//! before init runs. The agent only makes sure `lo` and `eth0` are up
//! (without `ip=`, nothing brought them up), copies the DNS servers the
//! kernel recorded in `/proc/net/pnp` to `/etc/resolv.conf`, and sets the
//! hostname.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// The two interface-flag ioctls (nix has no safe wrapper for them).
mod ioctl {
    nix::ioctl_read_bad!(get_interface_flags, libc::SIOCGIFFLAGS, libc::ifreq);
    nix::ioctl_write_ptr_bad!(set_interface_flags, libc::SIOCSIFFLAGS, libc::ifreq);
}

use self::ioctl::{get_interface_flags, set_interface_flags};

/// Hostname used when neither `kindling.hostname=` nor `ip=` gave one.
pub const DEFAULT_HOSTNAME: &str = "kindling";

/// Why a network step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The interface name does not fit `IFNAMSIZ`.
    #[error("interface name {0:?} is too long")]
    NameTooLong(String),
    /// A socket or ioctl call failed.
    #[error("cannot bring {interface} up ({call}): {errno}")]
    Link {
        /// The interface.
        interface: String,
        /// Which call.
        call: &'static str,
        /// The error.
        errno: Errno,
    },
    /// Setting the hostname failed.
    #[error("cannot set the hostname to {name}: {errno}")]
    Hostname {
        /// The wanted name.
        name: String,
        /// The error.
        errno: Errno,
    },
    /// Writing a file under /etc failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Sets the `IFF_UP` flag of `interface`. Returns `Ok(false)` if there is
/// no such interface.
pub fn bring_up(interface: &str) -> Result<bool, NetworkError> {
    let fail = |call, errno| NetworkError::Link {
        interface: interface.to_owned(),
        call,
        errno,
    };
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| fail("socket", errno))?;
    let mut request = interface_request(interface)?;
    // SAFETY: `request` is a valid, initialised ifreq naming the interface;
    // SIOCGIFFLAGS only writes `ifr_flags` inside it.
    match unsafe { get_interface_flags(socket.as_raw_fd(), &mut request) } {
        Ok(_) => {}
        Err(Errno::ENODEV) => return Ok(false),
        Err(errno) => return Err(fail("SIOCGIFFLAGS", errno)),
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up == 0 {
        request.ifr_ifru.ifru_flags = flags | up;
        // SAFETY: `request` names the interface and carries the new flags;
        // SIOCSIFFLAGS only reads it.
        unsafe { set_interface_flags(socket.as_raw_fd(), &request) }
            .map_err(|errno| fail("SIOCSIFFLAGS", errno))?;
    }
    Ok(true)
}

/// An `ifreq` naming `interface`, everything else zero.
fn interface_request(interface: &str) -> Result<libc::ifreq, NetworkError> {
    if interface.len() >= libc::IFNAMSIZ || interface.contains('\0') {
        return Err(NetworkError::NameTooLong(interface.to_owned()));
    }
    // SAFETY: ifreq is plain old data (integers, arrays and a union of
    // them); all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

/// The `nameserver`/`domain`/`search` lines of `/proc/net/pnp` (written by
/// the kernel's IP autoconfiguration), if it names any DNS server.
pub fn resolv_conf_from_pnp(pnp: &str) -> Option<String> {
    let lines: Vec<&str> = pnp
        .lines()
        .map(str::trim)
        .filter(|line| {
            ["nameserver ", "domain ", "search "]
                .iter()
                .any(|prefix| line.starts_with(prefix))
        })
        // The kernel writes `nameserver 0.0.0.0` for unset servers.
        .filter(|line| *line != "nameserver 0.0.0.0")
        .collect();
    lines
        .iter()
        .any(|line| line.starts_with("nameserver "))
        .then(|| lines.join("\n") + "\n")
}

/// Writes `/etc/resolv.conf` from `/proc/net/pnp` when the kernel got DNS
/// servers from `ip=`. Returns whether it wrote one.
pub fn configure_dns() -> Result<bool, NetworkError> {
    let Ok(pnp) = fs::read_to_string("/proc/net/pnp") else {
        return Ok(false);
    };
    let Some(contents) = resolv_conf_from_pnp(&pnp) else {
        return Ok(false);
    };
    replace_file("/etc/resolv.conf", &contents)?;
    Ok(true)
}

/// Sets the hostname: `wanted`, else the one `ip=` set, else
/// [`DEFAULT_HOSTNAME`]; and makes it resolve locally through /etc/hosts.
pub fn configure_hostname(wanted: Option<&str>) -> Result<String, NetworkError> {
    let current = nix::unistd::gethostname()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match wanted {
        Some(name) => name.to_owned(),
        None if current.is_empty() || current == "(none)" => DEFAULT_HOSTNAME.to_owned(),
        None => current.clone(),
    };
    if name != current {
        nix::unistd::sethostname(&name).map_err(|errno| NetworkError::Hostname {
            name: name.clone(),
            errno,
        })?;
    }
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    if let Some(updated) = hosts_with(&hosts, &name) {
        replace_file("/etc/hosts", &updated)?;
    }
    Ok(name)
}

/// `hosts` with localhost entries if missing, and `127.0.1.1` naming
/// `name` (the image's own `127.0.1.1` line is replaced); `None` if
/// nothing changes.
fn hosts_with(hosts: &str, name: &str) -> Option<String> {
    let names_in = |line: &str| -> Vec<String> {
        line.split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    let own_line = format!("127.0.1.1\t{name}");
    let mut has_localhost = false;
    let mut has_own = false;
    let mut lines = Vec::new();
    for line in hosts.lines() {
        let names = names_in(line);
        has_localhost |= names.iter().any(|n| n == "localhost");
        if line.split_whitespace().next() == Some("127.0.1.1") {
            if names.iter().any(|n| n == name) {
                has_own = true;
                lines.push(line.to_owned());
            } else if !has_own {
                has_own = true;
                lines.push(own_line.clone());
            }
            continue;
        }
        lines.push(line.to_owned());
    }
    if !has_localhost {
        lines.insert(0, "127.0.0.1\tlocalhost".to_owned());
        lines.insert(1, "::1\tlocalhost ip6-localhost ip6-loopback".to_owned());
    }
    if !has_own {
        lines.push(own_line);
    }
    let updated = lines.join("\n") + "\n";
    (updated != hosts).then_some(updated)
}

/// Replaces `path` (a dangling symlink included) with `contents`.
fn replace_file(path: &'static str, contents: &str) -> Result<(), NetworkError> {
    if Path::new(path).is_symlink() {
        let _ = fs::remove_file(path);
    }
    fs::write(path, contents).map_err(|source| NetworkError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_only_real_servers() {
        let pnp = "#PROTO: MANUAL\ndomain example.org\nnameserver 10.0.2.3\nnameserver 0.0.0.0\nbootserver 10.0.2.2\n";
        assert_eq!(
            resolv_conf_from_pnp(pnp).unwrap(),
            "domain example.org\nnameserver 10.0.2.3\n"
        );
        assert_eq!(
            resolv_conf_from_pnp("#PROTO: MANUAL\nnameserver 0.0.0.0\n"),
            None
        );
        assert_eq!(resolv_conf_from_pnp(""), None);
    }

    #[test]
    fn hosts_name_the_guest_once() {
        let full = "127.0.0.1 localhost\n127.0.1.1 vm\n";
        assert_eq!(hosts_with(full, "vm"), None);
        assert_eq!(
            hosts_with("127.0.0.1 localhost\n127.0.1.1\tkindling\n", "vm").unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\tvm\n"
        );
        assert_eq!(
            hosts_with("127.0.0.1 localhost", "vm").unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\tvm\n"
        );
        assert_eq!(
            hosts_with("", "vm").unwrap(),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm\n"
        );
    }

    #[test]
    fn interface_names_are_bounded() {
        assert!(interface_request("eth0").is_ok());
        assert!(matches!(
            interface_request("a-very-long-interface-name"),
            Err(NetworkError::NameTooLong(_))
        ));
    }

    #[test]
    fn a_missing_interface_is_not_an_error() {
        assert!(!bring_up("nosuchif0").unwrap());
    }
}
