//! A VM's connection-tracking entries, deleted when the VM goes.
//!
//! The kernel keeps a conntrack entry for every connection a VM started
//! (its NAT mapping included) until the connection times out, and an
//! established TCP connection times out after five days by default. A
//! destroyed VM's peers may never close theirs, so without a flush every
//! job could leave up to its pool's `conntrack_limit` entries in the host's
//! table, and enough jobs would fill it for every VM. The agent deletes
//! the entries whose original source is the VM's address when it removes
//! the VM's tap, with the `conntrack` tool (Debian package `conntrack`),
//! which dumps the matching entries over ctnetlink and deletes each. It
//! also resets the tap's per-VM connection count (`vm_conns`, see
//! [`super::policy`]) by the same token: the count drops as the entries it
//! tracks go.

use std::net::Ipv4Addr;
use std::process::Command;

/// Errors flushing a VM's entries.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The tool could not be run.
    #[error(
        "cannot run `{binary}` ({source}): install the `conntrack` package (conntrack-tools) \
         or set network.conntrack to its path"
    )]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{binary} {args}` failed ({status}): {stderr}")]
    Failed {
        /// The binary.
        binary: String,
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed, bounded).
        stderr: String,
    },
}

/// The most of the tool's stderr an error keeps.
const MAX_STDERR: usize = 512;

/// Checks that `binary` runs (at start-up, so a missing tool is reported
/// before any VM starts, not at the first teardown).
pub fn check(binary: &str) -> Result<(), ConntrackError> {
    run(binary, &["--version"]).map(|_| ())
}

/// Deletes every IPv4 conntrack entry whose original source is `source`;
/// returns how many there were.
pub fn flush_source(binary: &str, source: Ipv4Addr) -> Result<u64, ConntrackError> {
    let source = source.to_string();
    let args = ["-D", "-f", "ipv4", "-s", source.as_str()];
    run(binary, &args)
}

/// Runs the tool; the count it reports ("N flow entries have been
/// deleted.") or 0. It exits 1 when it deleted nothing, which is success
/// here.
fn run(binary: &str, args: &[&str]) -> Result<u64, ConntrackError> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .map_err(|source| ConntrackError::Spawn {
            binary: binary.to_string(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let count = deleted_count(&stderr);
    if out.status.success() || count == Some(0) {
        return Ok(count.unwrap_or(0));
    }
    let mut stderr = stderr.trim().to_string();
    if stderr.len() > MAX_STDERR {
        stderr.truncate(crate::reason::floor_char_boundary(&stderr, MAX_STDERR));
    }
    Err(ConntrackError::Failed {
        binary: binary.to_string(),
        args: args.join(" "),
        status: out.status,
        stderr,
    })
}

/// The `N` of the tool's "N flow entries have been deleted." line.
fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let (head, _) = line.split_once(" flow entries have been deleted")?;
        head.rsplit(' ').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deleted_count_is_read_from_the_tools_summary() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 16 flow entries have been deleted.\n"
            ),
            Some(16)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
            Some(0)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7: Operation not permitted"),
            None
        );
        assert_eq!(deleted_count(""), None);
    }

    #[test]
    fn a_missing_tool_says_what_to_install() {
        let e = check("/nonexistent/conntrack").unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ConntrackError::Spawn { .. }), "{text}");
        assert!(text.contains("conntrack` package"), "{text}");
    }

    #[test]
    fn nothing_to_delete_is_success_and_a_failure_keeps_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        // Stand-ins for the tool: one that deleted nothing (exit 1, as the
        // real one), one that failed.
        let nothing = dir.path().join("nothing");
        std::fs::write(
            &nothing,
            "#!/bin/sh\necho 'conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.' >&2\nexit 1\n",
        )
        .unwrap();
        let broken = dir.path().join("broken");
        std::fs::write(
            &broken,
            "#!/bin/sh\necho 'Operation not permitted' >&2\nexit 1\n",
        )
        .unwrap();
        for f in [&nothing, &broken] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let ip = Ipv4Addr::new(198, 18, 0, 2);
        // A file just written may be busy for a moment (ETXTBSY) while a
        // process another test forked still holds it open.
        let flush = |tool: &std::path::Path| loop {
            match flush_source(tool.to_str().unwrap(), ip) {
                Err(ConntrackError::Spawn { source, .. }) if source.raw_os_error() == Some(26) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => break other,
            }
        };
        assert_eq!(flush(&nothing).unwrap(), 0);
        let e = flush(&broken).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("Operation not permitted"), "{text}");
        assert!(text.contains("-D -f ipv4 -s 198.18.0.2"), "{text}");
    }
}
