//! `kindling-jailer`: turns "root host agent, VMM command line" into "VMM
//! running alone, unprivileged, in its own namespaces, cgroup and root".
//!
//! It is its own crate and binary, apart from the host agent, because it
//! runs as root: it links no async runtime, HTTP or netlink code, only
//! `nix`, `clap` and `thiserror`.
//!
//! Design (after Firecracker's jailer, see its docs/jailer.md). The host
//! agent execs `kindling-jailer` (as root) with the VM's id, uid/gid,
//! cgroup limits, the files the VM needs and the VMM command line. In
//! order:
//!
//! 1. the cgroup v2 group `<cgroup>` is created with `cpu.max`,
//!    `memory.max` (+ `memory.swap.max` 0), `pids.max` and, where the VM
//!    directory sits on a block device, `io.max` ([`cgroup`]);
//! 2. the VM's tap, if it has one, is attached in the host's network
//!    namespace ([`tap`]); then `unshare(NEWNS | NEWPID | NEWIPC | NEWNET)`:
//!    the VMM's network namespace is new and empty (no interfaces, and
//!    none of the host's abstract Unix sockets, which are scoped per
//!    network namespace; path-based sockets such as the vsock ones in the
//!    VM directory work as before); then `fork`: the child is PID 1 of
//!    the new PID namespace (it can see no other process); the parent stays
//!    outside, forwards SIGTERM/SIGINT/SIGHUP to it, waits, removes the
//!    cgroup and ends the same way the VMM ended (same exit code, or the
//!    same signal re-raised, so that the agent sees e.g. a seccomp SIGSYS);
//! 3. the child joins the cgroup, makes every mount private, mounts a small
//!    tmpfs as the new root and bind-mounts into it, *at their host paths*,
//!    only: the VMM binary and its shared libraries ([`elf`], read-only),
//!    the kernel and image (read-only), the VM's own directory (read-write,
//!    noexec: sockets, serial capture), plus a `/dev/kvm` device node owned
//!    by the VM's uid ([`root`]). Same paths inside and
//!    outside mean the VMM's command line and its Unix sockets need no
//!    translation;
//! 4. `pivot_root` into it, detach the old root, remount the new root
//!    read-only;
//! 5. rlimits (`RLIMIT_NOFILE`, `RLIMIT_CORE` = 0, `RLIMIT_NPROC`), then
//!    `setgroups([])`, `setresgid`, `setresuid` to the VM's own ids (all
//!    capabilities are gone with uid 0), `PR_SET_NO_NEW_PRIVS`;
//! 6. close every fd above stderr but the tap (moved to fd 3), and exec the
//!    VMM with an empty environment. The VMM then installs its seccomp
//!    filters.

mod args;
mod cgroup;
mod elf;
mod error;
mod root;
mod tap;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::stat::SFlag;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

pub use args::{JailDevice, JailerArgs};
pub use cgroup::remove_cgroup;
pub use error::JailerError;
use error::{io, sys};
pub use tap::TAP_FD;

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
    let libs = elf::shared_libraries(&args.exec)?;
    // In the host's network namespace, before leaving it.
    let tap = args.tap.as_deref().map(tap::open_tap).transpose()?;
    if let Err(e) = cgroup::setup_cgroup(args) {
        remove_cgroup(&args.cgroup);
        return Err(e);
    }
    let namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if let Err(e) = unshare(namespaces) {
        remove_cgroup(&args.cgroup);
        return Err(sys("unshare(NEWNS|NEWPID|NEWIPC|NEWNET)")(e));
    }
    // SAFETY: the jailer is single-threaded; the child only makes syscalls
    // and execs (or exits).
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            let err = enter_jail_and_exec(args, &libs, tap.as_ref());
            eprintln!("{err}");
            // SAFETY: leaving the child without running the parent's atexit.
            unsafe { nix::libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            // Only the VMM holds the tap.
            drop(tap);
            Ok(supervise(args, child))
        }
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

/// Child side: steps 3 to 6. Returns only on failure.
fn enter_jail_and_exec(args: &JailerArgs, libs: &[PathBuf], tap: Option<&File>) -> JailerError {
    match jail_steps(args, libs, tap) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn jail_steps(
    args: &JailerArgs,
    libs: &[PathBuf],
    tap: Option<&File>,
) -> Result<std::convert::Infallible, JailerError> {
    // Join the cgroup ("0" = the writing process) before anything else.
    cgroup::write_file(&args.cgroup.join("cgroup.procs"), "0")?;
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
            root::device_node(root, path, SFlag::S_IFBLK, meta.rdev(), 0o400, uid, gid)?;
        } else {
            root::bind(root, path, false)?;
        }
    }
    for path in &args.rw_binds {
        root::bind(root, path, true)?;
    }
    for device in &args.devices {
        let host = Path::new(device.path());
        let rdev = std::fs::metadata(host)
            .map_err(io(format!("stat {}", host.display())))?
            .rdev();
        root::device_node(root, host, SFlag::S_IFCHR, rdev, 0o600, uid, gid)?;
    }
    root::enter_root(root)?;
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

    // Only stdin/stdout/stderr (the agent's log file) and the tap survive.
    let first_closed = match tap {
        Some(tap) => {
            tap::pass_to_vmm(tap)?;
            TAP_FD + 1
        }
        None => 3,
    };
    // SAFETY: close_range(2) on fds this process owns; nothing else runs.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first_closed as u32,
            u32::MAX,
            0u32,
        )
    };
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

fn cstring(s: &OsStr) -> Result<CString, JailerError> {
    CString::new(s.as_bytes())
        .map_err(|_| JailerError::Invalid(format!("{s:?} contains a NUL byte")))
}
