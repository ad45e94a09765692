//! PID-1 duties: everything a guest needs before it can run a job.
//!
//! In order:
//!
//! 1. mount proc, sysfs and devtmpfs on the base root (the kernel usually
//!    mounted devtmpfs already);
//! 2. read the `kindling.*` kernel parameters ([`crate::cmdline`]);
//! 3. build the overlay root and switch into it ([`rootfs`]);
//! 4. mount what the new root needs fresh: /run, /tmp, /dev/pts, /dev/shm,
//!    cgroup2 on /sys/fs/cgroup; create the /dev/fd and /dev/std* links;
//! 5. raise the open-files limit the job inherits;
//! 6. hostname, lo and eth0 up, DNS ([`network`]).
//!
//! A failure in 1-4 is fatal for the job (no writable root, no /dev) but
//! not for the agent: it still dials the host, so the host learns *why*
//! (the job is answered with `JobFinished { Error }`) instead of seeing a
//! VM that never calls. Failures in 5-6 are warnings.
//!
//! Reaping zombies is the reaper's job ([`crate::reaper`]); ending the VM
//! is [`power::power_off`].

pub mod mounts;
pub mod network;
pub mod power;
pub mod rootfs;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::MsFlags;
use nix::sys::resource::{Resource, setrlimit};
use protocol::limits::MAX_REASON_LEN;

use self::mounts::Mount;
use self::rootfs::WritableLayer;
use crate::channel::truncate;
use crate::cmdline::KernelParams;

/// Open-files limit given to the job (Docker and build tools want many).
const NOFILE_LIMIT: u64 = 1 << 20;

/// What went wrong while preparing the guest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetupReport {
    /// Problems that make running a job pointless.
    pub fatal: Vec<String>,
    /// Problems a job can live with.
    pub warnings: Vec<String>,
}

impl SetupReport {
    /// The reason to fail the job with, if the setup failed.
    pub fn failure_reason(&self) -> Option<String> {
        if self.fatal.is_empty() {
            return None;
        }
        let reason = format!("guest setup failed: {}", self.fatal.join("; "));
        Some(truncate(reason, MAX_REASON_LEN))
    }

    fn fatal(&mut self, problem: impl ToString) {
        let problem = problem.to_string();
        tracing::error!(%problem, "guest setup");
        self.fatal.push(problem);
    }

    fn warn(&mut self, problem: impl ToString) {
        let problem = problem.to_string();
        tracing::warn!(%problem, "guest setup");
        self.warnings.push(problem);
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Step 1: the pseudo filesystems of the base root. Done first, separately,
/// because reading the kernel command line needs /proc.
pub fn mount_early(report: &mut SetupReport) {
    let early = [
        Mount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        Mount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        Mount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
    ];
    for mount in early {
        if let Err(err) = mount.ensure() {
            report.fatal(err);
        }
    }
}

/// Steps 3-6 (see the module docs).
pub fn prepare(params: &KernelParams, report: &mut SetupReport) {
    if !report.fatal.is_empty() {
        return;
    }
    let layer = match &params.scratch_device {
        Some(device) => WritableLayer::Disk(device.clone()),
        None => WritableLayer::Tmpfs,
    };
    tracing::info!(?layer, "building the overlay root");
    match rootfs::switch_to_overlay_root(&layer) {
        Ok(warnings) => warnings.into_iter().for_each(|w| report.warn(w)),
        Err(err) => {
            report.fatal(err);
            return;
        }
    }
    mount_runtime(report);
    dev_links(report);
    if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, NOFILE_LIMIT, NOFILE_LIMIT) {
        report.warn(format!("cannot raise the open-files limit: {err}"));
    }
    match network::configure_hostname(params.hostname.as_deref()) {
        Ok(name) => tracing::info!(hostname = %name, "hostname set"),
        Err(err) => report.warn(err),
    }
    for interface in ["lo", "eth0"] {
        match network::bring_up(interface) {
            Ok(true) => tracing::info!(interface, "link up"),
            Ok(false) => tracing::info!(interface, "no such interface"),
            Err(err) => report.warn(err),
        }
    }
    match network::configure_dns() {
        Ok(true) => tracing::info!("DNS servers from ip= written to /etc/resolv.conf"),
        Ok(false) => {}
        Err(err) => report.warn(err),
    }
}

/// Step 4: fresh mounts inside the new root.
fn mount_runtime(report: &mut SetupReport) {
    let runtime = [
        Mount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: Some("mode=0755"),
        },
        Mount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: Some("mode=1777"),
        },
        Mount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("gid=5,mode=0620,ptmxmode=0666"),
        },
        Mount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: Some("mode=1777"),
        },
        Mount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
    ];
    for mount in runtime {
        if let Err(err) = mount.ensure() {
            // Only /run and /tmp are essential; the rest serve some jobs.
            if matches!(mount.target, "/run" | "/tmp") {
                report.fatal(err);
            } else {
                report.warn(err);
            }
        }
    }
}

/// The /dev symlinks devtmpfs does not provide (bash process substitution
/// and many scripts use /dev/fd and /dev/std*).
fn dev_links(report: &mut SetupReport) {
    let links = [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ];
    for (target, link) in links {
        if Path::new(link).symlink_metadata().is_ok() {
            continue;
        }
        if let Err(err) = symlink(target, link) {
            report.warn(format!("cannot create {link}: {err}"));
        }
    }
    // /dev/ptmx must reach the devpts instance mounted above.
    let ptmx = Path::new("/dev/ptmx");
    if !ptmx.exists()
        && fs::metadata("/dev/pts/ptmx").is_ok()
        && let Err(err) = symlink("pts/ptmx", ptmx)
    {
        report.warn(format!("cannot create /dev/ptmx: {err}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reason_lists_fatal_problems_only() {
        let mut report = SetupReport::default();
        assert_eq!(report.failure_reason(), None);
        report.warn("no eth0");
        assert_eq!(report.failure_reason(), None);
        report.fatal("cannot mount overlay");
        report.fatal("x".repeat(MAX_REASON_LEN));
        let reason = report.failure_reason().unwrap();
        assert!(reason.starts_with("guest setup failed: cannot mount overlay; x"));
        assert_eq!(reason.len(), MAX_REASON_LEN);
    }
}
