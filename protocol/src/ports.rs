//! Fixed vsock addresses of the host <-> guest channel.
//!
//! The guest dials the host (guest-initiated, so there is no race with the
//! host connecting before the guest listens). With the Firecracker-compatible
//! vsock backend of our VMM, a guest connection to `HOST_CID:port` arrives on
//! the host as a connection to the Unix socket `<uds_path>_<port>`; see
//! [`host_listener_path`].

use std::path::{Path, PathBuf};

/// CID of the hypervisor (reserved, never a guest).
pub const HYPERVISOR_CID: u32 = 0;

/// CID of the local loopback (reserved, never a guest).
pub const LOCAL_CID: u32 = 1;

/// CID of the host, as seen from a guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// Smallest CID a guest may be given.
pub const FIRST_GUEST_CID: u32 = 3;

/// `VMADDR_CID_ANY`: a wildcard, never a guest's address.
pub const ANY_CID: u32 = u32::MAX;

/// Host port the runner agent dials to reach the host agent.
pub const RUNNER_AGENT_PORT: u32 = 10_000;

/// Whether `cid` may be assigned to a guest (not a reserved or wildcard CID).
pub fn is_valid_guest_cid(cid: u32) -> bool {
    (FIRST_GUEST_CID..ANY_CID).contains(&cid)
}

/// Path of the Unix socket on which the host receives guest-initiated
/// connections to `port`, given the VM's vsock `uds_path`: `<uds_path>_<port>`.
pub fn host_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_cids_are_not_guest_cids() {
        for cid in [HYPERVISOR_CID, LOCAL_CID, HOST_CID, ANY_CID] {
            assert!(!is_valid_guest_cid(cid), "{cid}");
        }
        assert!(is_valid_guest_cid(FIRST_GUEST_CID));
        assert!(is_valid_guest_cid(ANY_CID - 1));
    }

    #[test]
    fn listener_path_appends_port() {
        let path = host_listener_path(
            Path::new("/run/kindling/vm-1/vsock.sock"),
            RUNNER_AGENT_PORT,
        );
        assert_eq!(path, Path::new("/run/kindling/vm-1/vsock.sock_10000"));
    }
}
