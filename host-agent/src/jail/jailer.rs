//! The jailer process: turns "root host agent, VMM command line" into "VMM
//! running alone, unprivileged, in its own namespaces, cgroup and root".
//!
//! Design (after Firecracker's jailer, see its docs/jailer.md). The host
//! agent execs `kindling-jailer` (as root) with the VM's id, uid/gid,
//! cgroup limits, the files the VM needs and the VMM command line. In
//! order:
//!
//! 1. the cgroup v2 group `<cgroup>` is created with `cpu.max`,
//!    `memory.max` (+ `memory.swap.max` 0), `pids.max` and, where the VM
//!    directory sits on a block device, `io.max`;
//! 2. `unshare(NEWNS | NEWPID | NEWIPC)`, then `fork`: the child is PID 1 of
//!    the new PID namespace (it can see no other process); the parent stays
//!    outside, forwards SIGTERM/SIGINT/SIGHUP to it, waits, removes the
//!    cgroup and ends the same way the VMM ended (same exit code, or the
//!    same signal re-raised, so that the agent sees e.g. a seccomp SIGSYS);
//! 3. the child joins the cgroup, makes every mount private, mounts a small
//!    tmpfs as the new root and bind-mounts into it, *at their host paths*,
//!    only: the VMM binary and its shared libraries (read-only), the
//!    kernel and image (read-only), the VM's own directory (read-write,
//!    noexec: sockets, serial capture), plus `/dev/kvm` and `/dev/net/tun`
//!    device nodes owned by the VM's uid. Same paths inside and outside
//!    mean the VMM's command line and its Unix sockets need no translation;
//! 4. `pivot_root` into it, detach the old root, remount the new root
//!    read-only;
//! 5. rlimits (`RLIMIT_NOFILE`, `RLIMIT_CORE` = 0, `RLIMIT_NPROC`), then
//!    `setgroups([])`, `setresgid`, `setresuid` to the VM's own ids (all
//!    capabilities are gone with uid 0), `PR_SET_NO_NEW_PRIVS`;
//! 6. close every fd above stderr, and exec the VMM with an empty
//!    environment. The VMM then installs its seccomp filters.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, chown, fork, pivot_root};

/// Errors of the jailer (each names the step that failed).
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// A system call of a jail step failed.
    #[error("jailer: {step}: {source}")]
    Sys {
        /// The step.
        step: String,
        /// The errno.
        source: nix::Error,
    },
    /// A file operation of a jail step failed.
    #[error("jailer: {step}: {source}")]
    Io {
        /// The step.
        step: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An argument is unusable.
    #[error("jailer: {0}")]
    Invalid(String),
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailerError {
    let step = step.into();
    move |source| JailerError::Sys { step, source }
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailerError {
    let step = step.into();
    move |source| JailerError::Io { step, source }
}

/// A device node the jail may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JailDevice {
    /// `/dev/kvm`.
    Kvm,
    /// `/dev/net/tun` (to open the VM's persistent tap by name).
    Tun,
}

impl JailDevice {
    fn path(self) -> &'static str {
        match self {
            Self::Kvm => "/dev/kvm",
            Self::Tun => "/dev/net/tun",
        }
    }
}

/// Everything the jailer is told (its command line).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kindling-jailer",
    about = "Starts a VMM jailed: own uid/gid, mount/PID/IPC namespaces, pivot_root, cgroup, rlimits"
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
    /// The VMM binary (its shared libraries are bound too).
    #[arg(long)]
    pub exec: PathBuf,
    /// The VMM's arguments.
    #[arg(last = true)]
    pub args: Vec<OsString>,
}

/// The VMM's pid as the parent sees it (for signal forwarding).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: nix::libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { nix::libc::kill(child, signal) };
    }
}

/// Runs the jailer; returns only on failure before the VMM runs, or with
/// the exit code to end with.
pub fn run(args: &JailerArgs) -> Result<i32, JailerError> {
    if args.uid == 0 || args.gid == 0 {
        return Err(JailerError::Invalid("refusing uid/gid 0 for a VMM".into()));
    }
    // No core files, from the VMM nor from this process re-raising its
    // fatal signal.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("RLIMIT_CORE"))?;
    let libs = shared_libraries(&args.exec)?;
    if let Err(e) = setup_cgroup(args) {
        remove_cgroup(&args.cgroup);
        return Err(e);
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC)
        .map_err(sys("unshare(NEWNS|NEWPID|NEWIPC)"))?;
    // SAFETY: the jailer is single-threaded; the child only makes syscalls
    // and execs (or exits).
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            let err = enter_jail_and_exec(args, &libs);
            eprintln!("{err}");
            // SAFETY: leaving the child without running the parent's atexit.
            unsafe { nix::libc::_exit(1) }
        }
        ForkResult::Parent { child } => Ok(supervise(args, child)),
    }
}

/// Parent side: forwards stop signals, waits, removes the cgroup, and
/// returns the exit code to mirror (re-raising a fatal signal itself).
fn supervise(args: &JailerArgs, child: Pid) -> i32 {
    CHILD.store(child.as_raw(), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: `forward` only calls kill(2).
        let _ = unsafe { sigaction(signal, &action) };
    }
    let status = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => break Err(signal),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("jailer: waiting for the VMM: {e}");
                break Ok(1);
            }
        }
    };
    remove_cgroup(&args.cgroup);
    match status {
        Ok(code) => code,
        Err(signal) => {
            // Die the same way, so the host agent sees e.g. SIGSYS.
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: restoring the default action.
            let _ = unsafe { sigaction(signal, &default) };
            let _ = nix::sys::signal::raise(signal);
            128 + signal as i32
        }
    }
}

/// Removes a VM's cgroup, retrying while its last processes finish exiting.
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
        eprintln!("jailer: cannot remove cgroup {}: {e}", cgroup.display());
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), JailerError> {
    std::fs::write(path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

/// Creates the VM's cgroup with its limits (controllers enabled on the way
/// down from the cgroup root).
fn setup_cgroup(args: &JailerArgs) -> Result<(), JailerError> {
    let parent = args.cgroup.parent().ok_or_else(|| {
        JailerError::Invalid(format!("cgroup {} has no parent", args.cgroup.display()))
    })?;
    std::fs::create_dir_all(parent).map_err(io(format!("creating cgroup {}", parent.display())))?;
    // Enable the controllers from the root down to the parent.
    let mut dirs: Vec<&Path> = parent.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        let control = dir.join("cgroup.subtree_control");
        if !control.exists() {
            continue;
        }
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for controller in ["cpu", "memory", "pids", "io"] {
            if available.split_whitespace().any(|c| c == controller) {
                // Already enabled, or not allowed here: the limit writes
                // below report what really matters.
                let _ = std::fs::write(&control, format!("+{controller}"));
            }
        }
    }
    match std::fs::create_dir(&args.cgroup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("creating cgroup {}", args.cgroup.display()))(e)),
    }
    if let Some(cpu) = &args.cpu_max {
        write_file(&args.cgroup.join("cpu.max"), cpu)?;
    }
    if let Some(bytes) = args.memory_max {
        write_file(&args.cgroup.join("memory.max"), &bytes.to_string())?;
        let swap = args.cgroup.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
    }
    if let Some(pids) = args.pids_max {
        write_file(&args.cgroup.join("pids.max"), &pids.to_string())?;
    }
    if let Some(limits) = &args.io_max
        && let Some(dir) = args.rw_binds.first()
    {
        let dev = std::fs::metadata(dir)
            .map_err(io(format!("stat {}", dir.display())))?
            .dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        // Only real block devices can be throttled (not tmpfs/overlay).
        let block = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        if major != 0 && block.exists() && args.cgroup.join("io.max").exists() {
            write_file(
                &args.cgroup.join("io.max"),
                &format!("{major}:{minor} {limits}"),
            )?;
        }
    }
    Ok(())
}

/// The ELF interpreter of `exe` (None for a static binary).
fn interpreter(exe: &Path) -> Result<Option<PathBuf>, JailerError> {
    let data = std::fs::read(exe).map_err(io(format!("reading {}", exe.display())))?;
    let bad = || JailerError::Invalid(format!("{} is not a 64-bit ELF file", exe.display()));
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(bad());
    }
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let kind = data.get(ph..ph + 4).ok_or_else(bad)?;
        if kind == 3u32.to_le_bytes() {
            // PT_INTERP: p_offset at +8, p_filesz at +32.
            let off = u64_at(ph + 8).ok_or_else(bad)? as usize;
            let len = u64_at(ph + 32).ok_or_else(bad)? as usize;
            let raw = data.get(off..off.saturating_add(len)).ok_or_else(bad)?;
            let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(OsStr::from_bytes(raw))));
        }
    }
    Ok(None)
}

/// The VMM binary's shared libraries and loader (`ld.so --list`), so the
/// jail can hold exactly those files.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, JailerError> {
    let Some(interp) = interpreter(exe)? else {
        return Ok(Vec::new());
    };
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .env_clear()
        .output()
        .map_err(io(format!("running {} --list", interp.display())))?;
    if !out.status.success() {
        return Err(JailerError::Invalid(format!(
            "{} --list {} failed: {}",
            interp.display(),
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut libs = vec![interp];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path.
        let path = line.split("=>").last().unwrap_or("").trim();
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !libs.iter().any(|l| l == Path::new(path)) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `path` under `root` (host absolute path re-rooted).
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind-mounts `source` at the same path under `root`, read-only or
/// read-write (then noexec).
fn bind(root: &Path, source: &Path, writable: bool) -> Result<(), JailerError> {
    let meta = std::fs::metadata(source).map_err(io(format!("stat {}", source.display())))?;
    let target = under(root, source);
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(io(format!("mkdir {}", target.display())))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        std::fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
    }
    let step = format!("bind-mounting {}", source.display());
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(&*step))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if writable {
        flags |= MsFlags::MS_NOEXEC;
    } else {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(sys(format!(
        "remounting {} with its flags",
        source.display()
    )))
}

/// Creates a device node at `host`'s path under `root` for the device
/// `rdev`, of `kind` (char or block), with `mode`, owned by the VM's ids.
fn device_node(
    root: &Path,
    host: &Path,
    kind: SFlag,
    rdev: u64,
    mode: u32,
    uid: Uid,
    gid: Gid,
) -> Result<(), JailerError> {
    let node = under(root, host);
    if let Some(parent) = node.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
    }
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    mknod(
        &node,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(sys(format!("mknod {}", node.display())))?;
    chown(&node, Some(uid), Some(gid)).map_err(sys(format!("chown {}", node.display())))
}

/// Child side: steps 3 to 6. Returns only on failure.
fn enter_jail_and_exec(args: &JailerArgs, libs: &[PathBuf]) -> JailerError {
    match jail_steps(args, libs) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn jail_steps(
    args: &JailerArgs,
    libs: &[PathBuf],
) -> Result<std::convert::Infallible, JailerError> {
    // Join the cgroup ("0" = the writing process) before anything else.
    write_file(&args.cgroup.join("cgroup.procs"), "0")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    let root = &args.mount_point;
    std::fs::create_dir_all(root).map_err(io(format!("mkdir {}", root.display())))?;
    mount(
        Some("kindling-jail"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("size=1m,mode=0755"),
    )
    .map_err(sys("mounting the jail's tmpfs root"))?;
    let uid = Uid::from_raw(args.uid);
    let gid = Gid::from_raw(args.gid);
    for path in libs
        .iter()
        .chain(std::iter::once(&args.exec))
        .chain(&args.ro_binds)
    {
        let meta = std::fs::metadata(path).map_err(io(format!("stat {}", path.display())))?;
        if meta.file_type().is_block_device() {
            // A guest image on a block device: read-only binds are nodev,
            // and the host's node is root's; the VMM gets a node of its own
            // that only it may read.
            device_node(root, path, SFlag::S_IFBLK, meta.rdev(), 0o400, uid, gid)?;
        } else {
            bind(root, path, false)?;
        }
    }
    for path in &args.rw_binds {
        bind(root, path, true)?;
    }
    for device in &args.devices {
        let host = Path::new(device.path());
        let rdev = std::fs::metadata(host)
            .map_err(io(format!("stat {}", host.display())))?
            .rdev();
        device_node(root, host, SFlag::S_IFCHR, rdev, 0o600, uid, gid)?;
    }
    enter_root(root)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(sys("remounting the jail root read-only"))?;

    setrlimit(Resource::RLIMIT_NOFILE, args.nofile, args.nofile).map_err(sys("RLIMIT_NOFILE"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("RLIMIT_CORE"))?;
    if let Some(pids) = args.pids_max {
        let n = u64::from(pids);
        setrlimit(Resource::RLIMIT_NPROC, n, n).map_err(sys("RLIMIT_NPROC"))?;
    }
    nix::unistd::setgroups(&[]).map_err(sys("setgroups([])"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(sys("setresgid"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(sys("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;

    // Only stdin/stdout/stderr (the agent's log file) survive.
    // SAFETY: close_range(2) on fds this process owns; nothing else runs.
    unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let exe = cstring(args.exec.as_os_str())?;
    let mut argv = vec![exe.clone()];
    for arg in &args.args {
        argv.push(cstring(arg)?);
    }
    let env: [CString; 0] = [];
    Err(sys(format!("exec {}", args.exec.display()))(
        nix::unistd::execve(&exe, &argv, &env).unwrap_err(),
    ))
}

/// Makes `root` the process's `/`: `pivot_root` and detach the old root.
/// When the old root is the initial ramfs (a host booted into its
/// initramfs, like the test L1), `pivot_root` is refused (EINVAL); then the
/// new root is moved over `/` and entered with `chroot`, as `switch_root`
/// does; the old root stays unreachable because the VMM has no
/// capabilities (no CAP_SYS_CHROOT to escape a chroot).
fn enter_root(root: &Path) -> Result<(), JailerError> {
    let old = root.join("old-root");
    std::fs::create_dir(&old).map_err(io("mkdir old-root"))?;
    match pivot_root(root, &old) {
        Ok(()) => {
            std::env::set_current_dir("/").map_err(io("chdir /"))?;
            umount2("/old-root", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
            std::fs::remove_dir("/old-root").map_err(io("rmdir /old-root"))
        }
        Err(nix::Error::EINVAL) => {
            std::fs::remove_dir(&old).map_err(io("rmdir old-root"))?;
            std::env::set_current_dir(root).map_err(io("chdir to the new root"))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("moving the new root over / (initramfs host)"))?;
            nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
            std::env::set_current_dir("/").map_err(io("chdir /"))
        }
        Err(e) => Err(sys("pivot_root")(e)),
    }
}

fn cstring(s: &OsStr) -> Result<CString, JailerError> {
    CString::new(s.as_bytes())
        .map_err(|_| JailerError::Invalid(format!("{s:?} contains a NUL byte")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_and_libraries_of_a_dynamic_binary() {
        let exe = std::env::current_exe().unwrap();
        let interp = interpreter(&exe)
            .unwrap()
            .expect("test binaries are dynamic");
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        let libs = shared_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter().all(|l| l.is_absolute() && l.exists()),
            "{libs:?}"
        );
    }

    #[test]
    fn a_non_elf_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-elf");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let err = interpreter(&path).unwrap_err().to_string();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
    }

    #[test]
    fn host_paths_are_rerooted() {
        assert_eq!(
            under(Path::new("/jail"), Path::new("/a/b")),
            PathBuf::from("/jail/a/b")
        );
    }
}
