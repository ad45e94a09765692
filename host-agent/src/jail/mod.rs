//! The jail every VMM runs in, as the host agent sees it: settings, per-VM
//! ids ([`uids`]) and limits, and the jailer's command line.
//!
//! The agent (root) never execs the VMM directly when the jail is on: it
//! prepares the VM directory for the VM's own uid, then execs
//! `kindling-jailer ... --exec <vmm> -- <vmm args>`. The jailer is its own
//! small crate and binary (`jailer/`, no async runtime or network code);
//! its crate documentation says what it does, in order.

pub mod uids;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use uids::{UidAllocator, UidLease, UidsExhausted};

/// The fd on which a jailed VMM finds its tap: the jailer attaches the tap
/// named by `--tap` in the host's network namespace and hands it over as
/// this fd (the VMM's own network namespace is empty).
pub const TAP_FD: i32 = 3;

/// `[jail]` in the host agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Start VMMs through the jailer (default on; off only for debugging).
    pub enabled: bool,
    /// The jailer binary; default `kindling-jailer` next to the host agent.
    pub jailer: Option<PathBuf>,
    /// First uid (and gid) of the range VMMs run as; each live VM holds
    /// one id of the range, taken at start, returned at teardown.
    pub uid_base: u32,
    /// How many ids the range has (at least the VMs alive at once).
    pub uid_count: u32,
    /// cgroup v2 directory under which each VM gets its own group.
    pub cgroup_parent: PathBuf,
    /// memory.max = guest RAM + this (VMM overhead, page tables, buffers).
    pub memory_overhead_mib: u64,
    /// pids.max (and RLIMIT_NPROC) of a VMM: its threads count.
    pub pids_max: u32,
    /// RLIMIT_NOFILE of a VMM.
    pub nofile: u64,
    /// `io.max` limits on the VM directory's block device (if it is one).
    pub io_max: Option<String>,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            jailer: None,
            uid_base: 900_000,
            uid_count: 10_000,
            cgroup_parent: PathBuf::from("/sys/fs/cgroup/kindling"),
            memory_overhead_mib: 64,
            pids_max: 64,
            nofile: 1024,
            io_max: Some("rbps=209715200 wbps=104857600 riops=20000 wiops=10000".into()),
        }
    }
}

/// Errors validating jail settings or preparing a VM for its jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A setting is unusable.
    #[error("jail.{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Handing the VM directory to the VM's uid failed.
    #[error("preparing {path} for uid {uid}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The uid.
        uid: u32,
        /// Why.
        source: std::io::Error,
    },
}

impl JailConfig {
    /// Checks the settings (called by the config loader).
    pub fn validate(&self) -> Result<(), JailError> {
        let invalid = |field, reason: &str| JailError::Invalid {
            field,
            reason: reason.into(),
        };
        if self.uid_base == 0 {
            return Err(invalid("uid_base", "must not be 0 (root)"));
        }
        if self.uid_count == 0 || self.uid_base.checked_add(self.uid_count).is_none() {
            return Err(invalid(
                "uid_count",
                "must be at least 1 and keep ids below 2^32",
            ));
        }
        if !self.cgroup_parent.is_absolute() {
            return Err(invalid("cgroup_parent", "must be an absolute path"));
        }
        if self.pids_max < 8 {
            return Err(invalid("pids_max", "a VMM needs at least 8 (its threads)"));
        }
        if self.nofile < 64 {
            return Err(invalid("nofile", "a VMM needs at least 64 open files"));
        }
        Ok(())
    }

    /// The jailer binary to exec.
    pub fn jailer_path(&self) -> PathBuf {
        self.jailer.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("kindling-jailer")))
                .unwrap_or_else(|| PathBuf::from("kindling-jailer"))
        })
    }

    /// The allocator of this range's uids (one per agent, shared by every
    /// slot).
    pub fn uid_allocator(&self) -> std::sync::Arc<UidAllocator> {
        UidAllocator::new(self.uid_base, self.uid_count)
    }

    /// The per-VM jail for a VM holding `uid` (its uid and gid, until the
    /// spec and every clone of it are dropped).
    pub fn for_vm(&self, name: &str, uid: UidLease, vcpus: u8, memory_mib: u32) -> JailSpec {
        let id = uid.uid();
        JailSpec {
            jailer: self.jailer_path(),
            uid: id,
            gid: id,
            _uid_lease: std::sync::Arc::new(uid),
            cgroup: self.cgroup_parent.join(name),
            cpu_max: format!("{} 100000", u64::from(vcpus.max(1)) * 100_000),
            memory_max: (u64::from(memory_mib) + self.memory_overhead_mib) << 20,
            pids_max: self.pids_max,
            nofile: self.nofile,
            io_max: self.io_max.clone(),
        }
    }
}

/// What one jailed VMM is given.
#[derive(Debug, Clone)]
pub struct JailedVmm<'a> {
    /// The VM's id (its cgroup name).
    pub id: &'a str,
    /// The empty directory the jail's root tmpfs is mounted on.
    pub mount_point: &'a Path,
    /// The VMM binary.
    pub vmm: &'a Path,
    /// The VMM's arguments (host paths; the jail keeps them valid).
    pub args: &'a [OsString],
    /// Files bound read-only (kernel, image).
    pub read_only: &'a [&'a Path],
    /// The VM directory, bound read-write.
    pub dir: &'a Path,
    /// Device nodes ("kvm").
    pub devices: &'a [&'a str],
    /// The VM's tap, if it has one: the jailer attaches it and hands it to
    /// the VMM as fd [`TAP_FD`].
    pub tap: Option<&'a str>,
}

/// One VM's jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// Holds `uid` for this VM until the last clone of the spec is dropped
    /// (after teardown).
    _uid_lease: std::sync::Arc<UidLease>,
    /// The VM's cgroup directory.
    pub cgroup: PathBuf,
    /// cpu.max.
    pub cpu_max: String,
    /// memory.max in bytes.
    pub memory_max: u64,
    /// pids.max.
    pub pids_max: u32,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// io.max limits.
    pub io_max: Option<String>,
}

impl JailSpec {
    /// Hands the VM directory and the sockets the agent bound in it to the
    /// VM's uid (mode 0700: no other VM's uid can enter it).
    pub fn prepare_dir(&self, dir: &Path, sockets: &[PathBuf]) -> Result<(), JailError> {
        let chown = |path: &Path| {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(|source| {
                JailError::Prepare {
                    path: path.to_path_buf(),
                    uid: self.uid,
                    source,
                }
            })
        };
        chown(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| JailError::Prepare {
                path: dir.to_path_buf(),
                uid: self.uid,
                source,
            },
        )?;
        for socket in sockets {
            chown(socket)?;
        }
        Ok(())
    }

    /// The jailer command line (program, arguments) that runs `vm` jailed.
    pub fn command(&self, vm: &JailedVmm<'_>) -> (PathBuf, Vec<OsString>) {
        let JailedVmm {
            id,
            mount_point,
            vmm,
            args,
            read_only,
            dir,
            devices,
            tap,
        } = vm;
        let mut out: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            out.push(format!("--{name}").into());
            out.push(value);
        };
        flag("id", id.into());
        flag("uid", self.uid.to_string().into());
        flag("gid", self.gid.to_string().into());
        flag("mount-point", mount_point.into());
        flag("cgroup", self.cgroup.clone().into());
        flag("cpu-max", self.cpu_max.clone().into());
        flag("memory-max", self.memory_max.to_string().into());
        flag("pids-max", self.pids_max.to_string().into());
        flag("nofile", self.nofile.to_string().into());
        if let Some(io) = &self.io_max {
            flag("io-max", io.into());
        }
        for path in read_only.iter() {
            flag("ro-bind", (*path).into());
        }
        flag("rw-bind", dir.into());
        for device in devices.iter() {
            flag("dev", (*device).into());
        }
        if let Some(tap) = tap {
            flag("tap", tap.into());
        }
        flag("exec", vmm.into());
        out.push("--".into());
        out.extend(args.iter().cloned());
        (self.jailer.clone(), out)
    }

    /// Removes the VM's cgroup (after its processes are gone).
    pub fn remove_cgroup(&self) {
        remove_cgroup(&self.cgroup);
    }
}

/// Removes a VM's cgroup, retrying for up to 3 s while its last processes
/// finish exiting (the jailer removes it itself when it outlives the VMM;
/// after a SIGKILL of the whole group, or a crash, the agent does).
pub fn remove_cgroup(cgroup: &Path) {
    let mut last = None;
    for _ in 0..150 {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(e) = last {
        tracing::warn!("cannot remove cgroup {}: {e}", cgroup.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        JailConfig::default().validate().unwrap();
        let bad = JailConfig {
            uid_base: 0,
            ..JailConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("jail.uid_base")
        );
        let bad = JailConfig {
            cgroup_parent: "rel".into(),
            ..JailConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("cgroup_parent")
        );
    }

    #[test]
    fn a_vm_holds_its_uid_until_its_spec_and_every_clone_are_dropped() {
        let config = JailConfig {
            uid_count: 2,
            ..JailConfig::default()
        };
        let uids = config.uid_allocator();
        let a = config.for_vm("a", uids.allocate().unwrap(), 1, 128);
        let b = config.for_vm("b", uids.allocate().unwrap(), 1, 128);
        assert_ne!(a.uid, b.uid);
        assert!(uids.allocate().is_err(), "a third live VM got a uid");
        let (freed, clone) = (a.uid, a.clone());
        drop(a);
        assert!(uids.allocate().is_err(), "freed while a clone lives");
        drop(clone);
        let c = config.for_vm("c", uids.allocate().unwrap(), 1, 128);
        assert_eq!(c.uid, freed);
        assert_ne!(c.uid, b.uid);
    }

    #[test]
    fn the_jailer_parses_the_command_line_the_agent_builds() {
        use clap::Parser as _;
        let config = JailConfig::default();
        let spec = config.for_vm("vm-1", config.uid_allocator().allocate().unwrap(), 2, 256);
        let (program, argv) = spec.command(&JailedVmm {
            id: "vm-1",
            mount_point: Path::new("/s/jail-root"),
            vmm: Path::new("/bin/vmm"),
            args: &["--kernel".into(), "/k".into(), "--rng".into()],
            read_only: &[Path::new("/k"), Path::new("/i")],
            dir: Path::new("/s/vms/vm-1"),
            devices: &["kvm"],
            tap: Some("kdl7"),
        });
        assert!(program.ends_with("kindling-jailer"), "{program:?}");
        let parsed = kindling_jailer::JailerArgs::try_parse_from(
            std::iter::once(OsString::from("kindling-jailer")).chain(argv),
        )
        .unwrap();
        assert_eq!(
            (parsed.id.as_str(), parsed.uid, parsed.gid),
            ("vm-1", spec.uid, spec.gid)
        );
        assert_eq!(parsed.cgroup, spec.cgroup);
        assert_eq!(parsed.memory_max, Some(spec.memory_max));
        assert_eq!(parsed.pids_max, Some(spec.pids_max));
        assert_eq!(parsed.nofile, spec.nofile);
        assert_eq!(parsed.io_max, spec.io_max);
        assert_eq!(parsed.ro_binds, [PathBuf::from("/k"), PathBuf::from("/i")]);
        assert_eq!(parsed.rw_binds, [PathBuf::from("/s/vms/vm-1")]);
        assert_eq!(parsed.devices, [kindling_jailer::JailDevice::Kvm]);
        assert_eq!(parsed.tap.as_deref(), Some("kdl7"));
        assert_eq!(TAP_FD, kindling_jailer::TAP_FD);
        assert_eq!(parsed.exec, PathBuf::from("/bin/vmm"));
        assert_eq!(parsed.args, ["--kernel", "/k", "--rng"]);
    }

    #[test]
    fn per_vm_ids_and_limits() {
        let config = JailConfig::default();
        let uids = config.uid_allocator();
        let a = config.for_vm("a", uids.allocate().unwrap(), 2, 256);
        let b = config.for_vm("b", uids.allocate().unwrap(), 1, 128);
        assert_ne!(a.uid, b.uid);
        assert_eq!((a.uid, a.gid), (900_000, 900_000));
        assert_eq!(a.cpu_max, "200000 100000");
        assert_eq!(a.memory_max, (256 + 64) << 20);
        assert_eq!(a.cgroup, PathBuf::from("/sys/fs/cgroup/kindling/a"));
        let (_, argv) = a.command(&JailedVmm {
            id: "a",
            mount_point: Path::new("/s/jail"),
            vmm: Path::new("/bin/vmm"),
            args: &["--kernel".into(), "/k".into()],
            read_only: &[Path::new("/k")],
            dir: Path::new("/s/vms/a"),
            devices: &["kvm"],
            tap: None,
        });
        let text: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into()).collect();
        let joined = text.join(" ");
        assert!(joined.contains("--uid 900000 --gid 900000"), "{joined}");
        assert!(
            joined.ends_with("--exec /bin/vmm -- --kernel /k"),
            "{joined}"
        );
    }
}
