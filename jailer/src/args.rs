//! The jailer's command line (built by the host agent's `jail` module).

use std::ffi::OsString;
use std::path::PathBuf;

/// A device node the jail may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JailDevice {
    /// `/dev/kvm`.
    Kvm,
}

impl JailDevice {
    /// The device's path on the host (and in the jail).
    pub fn path(self) -> &'static str {
        match self {
            Self::Kvm => "/dev/kvm",
        }
    }
}

/// Everything the jailer is told (its command line).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kindling-jailer",
    about = "Starts a VMM jailed: own uid/gid, mount/PID/IPC/network namespaces, pivot_root, cgroup, rlimits"
)]
pub struct JailerArgs {
    /// The VM's id (names its cgroup).
    #[arg(long)]
    pub id: String,
    /// The VM's uid (not 0).
    #[arg(long)]
    pub uid: u32,
    /// The VM's gid (not 0).
    #[arg(long)]
    pub gid: u32,
    /// An empty directory the new root (a tmpfs) is mounted on, inside the
    /// jail's own mount namespace (so one directory serves every VM).
    #[arg(long)]
    pub mount_point: PathBuf,
    /// The cgroup v2 directory to create for this VM.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// `cpu.max` value, e.g. "200000 100000".
    #[arg(long)]
    pub cpu_max: Option<String>,
    /// `memory.max` in bytes.
    #[arg(long)]
    pub memory_max: Option<u64>,
    /// `pids.max`.
    #[arg(long)]
    pub pids_max: Option<u32>,
    /// `io.max` limits for the VM directory's device, e.g. "wbps=104857600".
    #[arg(long)]
    pub io_max: Option<String>,
    /// RLIMIT_NOFILE.
    #[arg(long, default_value_t = 1024)]
    pub nofile: u64,
    /// Files or directories bind-mounted read-only at the same path.
    #[arg(long = "ro-bind")]
    pub ro_binds: Vec<PathBuf>,
    /// Directories bind-mounted read-write (noexec) at the same path.
    #[arg(long = "rw-bind")]
    pub rw_binds: Vec<PathBuf>,
    /// Device nodes to create, owned by the VM's uid.
    #[arg(long = "dev", value_enum)]
    pub devices: Vec<JailDevice>,
    /// The VM's tap: attached in the host's network namespace before the
    /// VMM gets its own, empty one, and inherited by the VMM as fd 3
    /// ([`crate::TAP_FD`]; give the VMM `--net tap-fd=3,...`).
    #[arg(long)]
    pub tap: Option<String>,
    /// The VMM binary (its shared libraries are bound too).
    #[arg(long)]
    pub exec: PathBuf,
    /// The VMM's arguments.
    #[arg(last = true)]
    pub args: Vec<OsString>,
}
