//! Seccomp: the syscall allow-lists of the VMM's threads, in one place.
//!
//! Design. Every thread of the VMM gets its own filter, installed by the
//! thread itself (`seccomp(SECCOMP_SET_MODE_FILTER)` applies to the calling
//! thread only) at a point where it has finished all set-up and before it
//! touches anything the guest controls:
//!
//! * a vCPU thread installs [`ThreadKind::Vcpu`] before its first `KVM_RUN`;
//! * the device thread installs [`ThreadKind::Devices`] before its first
//!   `epoll_wait`;
//! * the main thread installs [`ThreadKind::Main`] once every other thread is
//!   running (it only waits for the end, stops the others and exits).
//!
//! The BPF programs are compiled once, at start-up, before any thread is
//! spawned ([`Filters::compile`]); a thread only installs an already built
//! program. Any syscall not listed kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): the host agent sees the VMM die by `SIGSYS`
//! and reports "vmm killed by seccomp" on the job.
//!
//! How the lists were made: by reading the code paths of each thread and by
//! running the VMM under `strace -f` with a real guest (boot, block, vsock,
//! rng, serial, reboot, SIGTERM). Each group below says who needs it.
//! Installing a filter also sets `PR_SET_NO_NEW_PRIVS`.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule or filter was rejected by seccompiler (a bug in the lists).
    #[error("building the {thread} seccomp filter: {source}")]
    Build {
        /// The thread kind.
        thread: &'static str,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The filter could not be compiled to BPF.
    #[error("compiling the {thread} seccomp filter to BPF: {source}")]
    Compile {
        /// The thread kind.
        thread: &'static str,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp support?).
    #[error("installing the {thread} seccomp filter: {source}")]
    Install {
        /// The thread kind.
        thread: &'static str,
        /// seccompiler's reason.
        source: seccompiler::Error,
    },
}

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread after start-up: waits, stops the others, exits.
    Main,
    /// A vCPU thread: `KVM_RUN` and the port/MMIO devices it calls into.
    Vcpu,
    /// The device thread: the epoll loop of the virtio devices.
    Devices,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Devices => "devices",
        }
    }
}

/// The compiled filters of all thread kinds (shared by the threads).
#[derive(Debug, Clone)]
pub struct Filters {
    main: Arc<BpfProgram>,
    vcpu: Arc<BpfProgram>,
    devices: Arc<BpfProgram>,
}

impl Filters {
    /// Builds and compiles the filters of every thread kind.
    pub fn compile() -> Result<Self, SeccompError> {
        Ok(Self {
            main: Arc::new(compile(ThreadKind::Main)?),
            vcpu: Arc::new(compile(ThreadKind::Vcpu)?),
            devices: Arc::new(compile(ThreadKind::Devices)?),
        })
    }

    /// Installs the filter of `kind` on the calling thread.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = match kind {
            ThreadKind::Main => &self.main,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Devices => &self.devices,
        };
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            thread: kind.name(),
            source,
        })?;
        log::debug!("seccomp filter installed on the {} thread", kind.name());
        Ok(())
    }
}

/// One allow-list entry: a syscall, unconditionally or under conditions.
type Rules = Vec<(i64, Vec<SeccompRule>)>;

fn allow(syscalls: &[i64]) -> Rules {
    syscalls.iter().map(|&s| (s, Vec::new())).collect()
}

/// `syscall` allowed only when argument `arg` (32-bit compare) is one of
/// `values`.
fn allow_arg_in(syscall: i64, arg: u8, values: &[u64]) -> Result<Rules, seccompiler::BackendError> {
    let rules = values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![(syscall, rules)])
}

/// `syscall` allowed only when argument `arg` (32-bit), masked with
/// `mask`, equals `value`.
fn allow_arg_masked(
    syscall: i64,
    arg: u8,
    mask: u64,
    value: u64,
) -> Result<Rules, seccompiler::BackendError> {
    let rule = SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])?;
    Ok(vec![(syscall, vec![rule])])
}

/// Every thread: memory, locks, signals, logging, closing fds, exiting.
fn common() -> Result<Rules, seccompiler::BackendError> {
    let mut rules = allow(&[
        // Allocator: heap growth, large allocations, thread stacks freed at
        // exit (mmap and mprotect: below, never executable).
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Mutexes, condition variables, Once, thread join.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        // The vCPU kick signal returns through rt_sigreturn; thread exit
        // blocks signals and tears down the alternate signal stack.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        // Log lines (stderr, one write each), serial capture, eventfd kicks.
        libc::SYS_write,
        // Timestamps (normally the vDSO) and short sleeps.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Dropping fds (also the F_GETFD check of debug builds, below).
        libc::SYS_close,
        // Thread and process exit.
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Panic/abort path and pthread bookkeeping.
        libc::SYS_gettid,
        libc::SYS_getpid,
    ]);
    // Memory is mapped or re-protected readable and writable only, never
    // executable: nothing after start-up needs new code (the binary is
    // dynamically linked, but every library is loaded before `main`; no
    // dlopen, no JIT; glibc's thread stacks and malloc heaps are
    // PROT_READ|PROT_WRITE or PROT_NONE). A compromised thread cannot make
    // shellcode executable.
    rules.extend(allow_arg_masked(
        libc::SYS_mmap,
        2,
        libc::PROT_EXEC as u64,
        0,
    )?);
    rules.extend(allow_arg_masked(
        libc::SYS_mprotect,
        2,
        libc::PROT_EXEC as u64,
        0,
    )?);
    // Opens: exactly `O_RDONLY | O_CLOEXEC`, the flags of every open after
    // start-up: the main thread reads /proc/self/smaps (Rust's File::open),
    // and glibc's free() opens /proc/sys/vm/overcommit_memory the first
    // time it shrinks a thread's heap (check_may_shrink_heap; found with
    // `strace -f -k` in the nested test, where the device thread died of it
    // during virtio-net traffic). Any other flag is fatal: write access,
    // O_CREAT, O_TRUNC (which truncates even a read-only open), O_APPEND,
    // O_PATH, O_DIRECTORY, ... Inside the jail only the VM's own files, the
    // kernel, the image and the VMM's libraries exist.
    rules.extend(allow_arg_in(
        libc::SYS_openat,
        2,
        &[(libc::O_RDONLY | libc::O_CLOEXEC) as u64],
    )?);
    rules.extend(allow_arg_in(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
    )?);
    Ok(rules)
}

/// A vCPU thread: runs the guest; port and MMIO exits call the legacy
/// devices (serial writes its capture file, i8042/boot timer/virtio
/// registers) and may register queue fds with the device thread's epoll
/// and set a tap's offloads when the guest activates a virtio device.
fn vcpu() -> Result<Rules, seccompiler::BackendError> {
    let mut rules = common()?;
    rules.extend(allow_arg_in(
        libc::SYS_ioctl,
        1,
        &[
            // The run loop.
            KVM_RUN,
            // Register dump for a KVM internal-error report.
            KVM_GET_REGS,
            // virtio-net activation: the driver's DRIVER_OK status write
            // (an MMIO exit, so on this thread) tells the tap which
            // offloads the guest acked. TUNSETIFF and TUNSETVNETHDRSZ are
            // issued at start-up, before any filter is installed.
            libc::TUNSETOFFLOAD,
        ],
    )?);
    rules.extend(allow(&[
        // Eventfd reads (interrupt/exit channels).
        libc::SYS_read,
        // Device activation adds queue and backend fds to the device loop.
        libc::SYS_epoll_ctl,
        // Kicking another vCPU is not done here, but a guest reset wakes the
        // main thread through its eventfd (write, above).
    ]));
    Ok(rules)
}

/// The device thread: epoll, queue eventfds, block file I/O, tap I/O,
/// vsock Unix sockets, the entropy source, and the rate-limiter timerfd.
fn devices() -> Result<Rules, seccompiler::BackendError> {
    let mut rules = common()?;
    rules.extend(allow(&[
        // The event loop itself.
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        // Eventfds, tap frames, vsock streams.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        // virtio-blk: positioned reads/writes and FLUSH.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        // virtio-rng.
        libc::SYS_getrandom,
        // vsock: host clients (accept), guest-initiated connections to
        // `<uds>_<port>` (socket + non-blocking connect), half-close.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        // Token-bucket rate limiter (virtio-net): its refill timer.
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]));
    // Only Unix sockets may be created (vsock host side).
    rules.extend(allow_arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?);
    // set_nonblocking on accepted/connected streams.
    rules.extend(allow_arg_in(libc::SYS_ioctl, 1, &[libc::FIONBIO])?);
    Ok(rules)
}

/// The main thread once the VM runs: waits on the exit eventfd, measures
/// its memory overhead (reads /proc/self/smaps), kicks and joins the vCPU
/// threads, stops the device thread, removes the vsock socket file, exits.
fn main_thread() -> Result<Rules, seccompiler::BackendError> {
    let mut rules = common()?;
    rules.extend(allow(&[
        // Waiting for the exit reason.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        // Kicking vCPU threads out of KVM_RUN (pthread_kill).
        libc::SYS_tgkill,
        // Removing the vsock socket file at teardown.
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Reading /proc/self/smaps (size, then content; openat in common).
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_lseek,
    ]));
    Ok(rules)
}

// KVM ioctl numbers (linux/kvm.h): _IO(KVMIO, 0x80), _IOR(KVMIO, 0x81,
// struct kvm_regs).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;

fn rules_of(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let list = match kind {
        ThreadKind::Main => main_thread()?,
        ThreadKind::Vcpu => vcpu()?,
        ThreadKind::Devices => devices()?,
    };
    // An empty rule list allows a syscall unconditionally: it wins over
    // conditional entries of the same syscall.
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = std::collections::BTreeSet::new();
    for (syscall, rules) in list {
        if rules.is_empty() {
            unconditional.insert(syscall);
        }
        map.entry(syscall).or_default().extend(rules);
    }
    for syscall in unconditional {
        map.insert(syscall, Vec::new());
    }
    Ok(map)
}

/// Builds the BPF program of `kind`.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let thread = kind.name();
    let rules = rules_of(kind).map_err(|source| SeccompError::Build { thread, source })?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { thread, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { thread, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_filters_compile() {
        let filters = Filters::compile().unwrap();
        assert!(!filters.main.is_empty());
        assert!(!filters.vcpu.is_empty());
        assert!(!filters.devices.is_empty());
    }

    /// Runs `body` in a forked child with the `kind` filter installed and
    /// returns how the child ended.
    fn in_filtered_child(kind: ThreadKind, body: impl FnOnce()) -> libc::c_int {
        let program = compile(kind).unwrap();
        // SAFETY: the child only installs the filter, runs `body` (plain
        // syscalls, no locks shared with other test threads) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: _exit is always safe in the child.
                unsafe { libc::_exit(100) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_forbidden_syscall_kills_with_sigsys() {
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: socket(2) with constant arguments.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn only_vcpu_threads_may_set_tap_offloads() {
        fn set_offloads() {
            // SAFETY: an ioctl on fd -1 fails with EBADF; it takes its
            // argument by value.
            unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        }
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, set_offloads), 0);
        for kind in [ThreadKind::Devices, ThreadKind::Main] {
            let status = in_filtered_child(kind, set_offloads);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: {status:#x}"
            );
        }
    }

    #[test]
    fn listed_syscalls_pass_and_argument_filters_hold() {
        let status = in_filtered_child(ThreadKind::Devices, || {
            // SAFETY: socket(2) with constant arguments; fd closed at once.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: closing the fd just created.
            unsafe { libc::close(fd) };
        });
        assert_eq!(
            status, 0,
            "AF_UNIX socket must be allowed on the device thread"
        );
        let status = in_filtered_child(ThreadKind::Devices, || {
            // SAFETY: socket(2) with constant arguments.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        let status = in_filtered_child(ThreadKind::Main, || {
            let path = c"/tmp/kindling-seccomp-must-not-exist";
            // SAFETY: a valid C string; O_CREAT is what the filter forbids.
            unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
    }

    fn killed_by_seccomp(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    const ALL_KINDS: [ThreadKind; 3] = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices];

    #[test]
    fn only_plain_read_only_opens_pass() {
        // What the VMM opens after start-up: Rust's File::open and glibc's
        // internal opens (O_RDONLY | O_CLOEXEC).
        for kind in ALL_KINDS {
            let status = in_filtered_child(kind, || {
                // SAFETY: a valid C string; the fd is closed at once.
                let fd =
                    unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: closing the fd just opened.
                unsafe { libc::close(fd) };
            });
            assert_eq!(status, 0, "{kind:?}: {status:#x}");
        }
        let status = in_filtered_child(ThreadKind::Main, || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            assert!(smaps.contains("Rss:"));
        });
        assert_eq!(status, 0, "main thread reading smaps: {status:#x}");
        // Each of these flags (with O_CLOEXEC) is fatal on every thread.
        // O_TRUNC truncates a file even when opened read-only.
        for flags in [
            libc::O_TRUNC,
            libc::O_APPEND,
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_CREAT,
            libc::O_PATH,
        ] {
            for kind in ALL_KINDS {
                let status = in_filtered_child(kind, || {
                    let path = c"/tmp/kindling-seccomp-must-not-exist";
                    // SAFETY: a valid C string; the filter kills the process
                    // before the kernel sees the call.
                    unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
                });
                assert!(
                    killed_by_seccomp(status),
                    "{kind:?}, flags {flags:#x}: {status:#x}"
                );
            }
        }
    }

    #[test]
    fn memory_is_never_mapped_or_made_executable() {
        fn map(prot: libc::c_int) -> *mut libc::c_void {
            // SAFETY: an anonymous private mapping, no address hint.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        }
        for kind in ALL_KINDS {
            let status = in_filtered_child(kind, || {
                let page = map(libc::PROT_READ | libc::PROT_WRITE);
                assert_ne!(page, libc::MAP_FAILED);
                // SAFETY: `page` is the 4 KiB mapping just made.
                assert_eq!(unsafe { libc::mprotect(page, 4096, libc::PROT_READ) }, 0);
                // SAFETY: as above.
                assert_eq!(unsafe { libc::mprotect(page, 4096, libc::PROT_NONE) }, 0);
            });
            assert_eq!(
                status, 0,
                "{kind:?}: read/write mappings must pass: {status:#x}"
            );
            let status = in_filtered_child(kind, || {
                map(libc::PROT_READ | libc::PROT_EXEC);
            });
            assert!(
                killed_by_seccomp(status),
                "{kind:?}: mmap PROT_EXEC: {status:#x}"
            );
            let status = in_filtered_child(kind, || {
                let page = map(libc::PROT_READ | libc::PROT_WRITE);
                // SAFETY: `page` is the 4 KiB mapping just made.
                unsafe { libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            });
            assert!(
                killed_by_seccomp(status),
                "{kind:?}: mprotect PROT_EXEC: {status:#x}"
            );
        }
    }
}
