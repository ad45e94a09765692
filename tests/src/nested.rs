//! Runs a scenario inside an L1 Linux under QEMU TCG with emulated AMD SVM.
//!
//! The L1 boots Debian's cloud kernel straight into an initramfs that we
//! assemble per run: static busybox, an `/init` written below, the L1's KVM
//! and virtio modules, the scenario's binaries with their shared libraries,
//! and assets up to `INITRAMFS_ASSET_LIMIT`. Larger assets (guest images)
//! are attached unchanged as read-only virtio-blk disks and appear as
//! `$ASSETS/<name>` symlinks to `/dev/vdX`, so nothing large is copied.
//!
//! Two serial ports separate the channels: ttyS0 is the L1 console (kernel
//! log, kept in `console.log` for failure reports), ttyS1 carries the
//! scenario's output and the harness's marker lines to QEMU's stdout, which
//! `pump` reads live, and ttyS2 carries the L1's heartbeat to
//! `heartbeat.log` (see `heartbeat`: a silent beat ends a frozen L1 early).
//! The L1 has no network device.
//!
//! The L1 kernel also reports every triple fault of an L2 guest on its
//! console (see [`L2_SHUTDOWN_WATCH`]), whatever the scenario prints; the
//! harness counts them (`run`). QEMU dies with the harness process, by any
//! signal (see [`qemu_command`]'s `PR_SET_PDEATHSIG`), and its pid is in
//! the work directory's [`QEMU_PID_FILE`].

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::heartbeat;
use crate::initramfs::Initramfs;
use crate::l1::L1Kernel;
use crate::ldd::shared_libraries;
use crate::pump::{Markers, Pump};
use crate::run::HarnessError;
use crate::scenario::{Scenario, Status, Timings};

/// Assets up to this size go into the initramfs; larger ones become disks.
pub const INITRAMFS_ASSET_LIMIT: u64 = 64 << 20;

/// Why an L1 that ended cleanly but without an exit code died.
pub const SPONTANEOUS_END: &str = "the L1 powered off before the scenario finished";

/// Modules every L1 loads: KVM on emulated SVM, and virtio disks for assets.
const BASE_MODULES: &[&str] = &["kvm_amd", "virtio_pci", "virtio_blk"];

/// The file in the work directory that holds the running QEMU's pid (kept
/// after it ends, for whoever looks into a run from outside).
pub const QEMU_PID_FILE: &str = "qemu.pid";

/// The result of one L1 run, before it is wrapped into an `Outcome`.
pub struct NestedRun {
    /// How it ended.
    pub status: Status,
    /// Scenario output.
    pub output: String,
    /// Phase timings (total filled by the caller).
    pub timings: Timings,
    /// How many times an L2 guest triple-faulted in this L1, as its kernel
    /// reported on the console ([`crate::run::l2_triple_faults`]).
    pub l2_triple_faults: u32,
    /// How many lines of the scenario's whole output (`output.log`) report
    /// an L2 guest hang ([`crate::run::l2_hangs`]).
    pub l2_hangs: u32,
}

/// Boots the L1, runs the scenario, and collects the result.
pub fn run(sc: &Scenario, workdir: &Path, nonce: &str) -> Result<NestedRun, HarnessError> {
    let started = Instant::now();
    let kernel = L1Kernel::find()?;
    let markers = Markers::new(nonce);
    let (initramfs, disks) = assemble(sc, &kernel, &markers)?;
    let initrd_path = workdir.join("initramfs.cpio");
    initramfs.write_to(&initrd_path)?;
    let prepare = started.elapsed();

    warn_if_old_qemu();
    let console = workdir.join("console.log");
    let beat_log = workdir.join("heartbeat.log");
    let monitor = workdir.join("qemu-monitor.sock");
    let mut cmd = qemu_command(sc, &kernel, &initrd_path, workdir, &monitor, &disks);
    let boot_start = Instant::now();
    let child = cmd.spawn().map_err(|e| HarnessError::Spawn {
        what: "qemu-system-x86_64 (install it with `scripts/setup.sh --packages`)".into(),
        source: e,
    })?;
    let mut qemu = KillOnDrop(child);
    let child = &mut qemu.0;
    let pid_file = workdir.join(QEMU_PID_FILE);
    std::fs::write(&pid_file, format!("{}\n", child.id()))
        .map_err(|e| HarnessError::Io(format!("writing {}", pid_file.display()), e))?;
    let stdout = child.stdout.take().ok_or(HarnessError::NoPipe)?;
    let mut stderr = child.stderr.take().ok_or(HarnessError::NoPipe)?;
    let stderr_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let pump = Pump::start(stdout, &workdir.join("output.log"), markers, sc.echo)
        .map_err(|e| HarnessError::Io("starting the output reader".into(), e))?;

    let deadline = boot_start + sc.timeout.saturating_sub(prepare);
    let mut timed_out = false;
    let mut frozen = None;
    let mut beat = heartbeat::Watch::new(&beat_log);
    let mut next_beat_check = boot_start;
    let qemu_status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => return Err(HarnessError::Io("waiting for QEMU".into(), e)),
        }
        let now = Instant::now();
        if now >= next_beat_check {
            next_beat_check = now + Duration::from_secs(1);
            frozen = beat.silent_for(now, sc.freeze_limit);
        }
        if frozen.is_some() || now >= deadline {
            if frozen.is_some() {
                let dump = workdir.join("l1-frozen-vcpus.log");
                let _ = std::fs::write(&dump, heartbeat::vcpu_registers(&monitor));
            } else {
                timed_out = true;
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let qemu_end = Instant::now();
    let seen = pump.finish();
    let qemu_stderr = stderr_thread.join().unwrap_or_default();
    let _ = std::fs::remove_file(&initrd_path);

    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let status = if let Some((_, code)) = seen.exit {
        Status::Exited(code)
    } else if let Some(silent) = frozen {
        Status::L1Frozen(silent.as_secs())
    } else if timed_out {
        Status::TimedOut
    } else if let Some(err) = seen.setup_error.clone() {
        Status::SetupFailed(err)
    } else if console_text.contains("Kernel panic") {
        Status::L1Panic
    } else {
        let why = match qemu_status {
            Some(s) if !s.success() => format!("QEMU exited with {s}: {}", qemu_stderr.trim()),
            _ => SPONTANEOUS_END.into(),
        };
        Status::Died(why)
    };
    let l2_triple_faults = crate::run::l2_triple_faults(&console_text);
    let l2_hangs = match std::fs::read_to_string(workdir.join("output.log")) {
        Ok(all) => crate::run::l2_hangs(&all),
        Err(_) => crate::run::l2_hangs(&seen.output),
    };
    let mut output = seen.output;
    if seen.truncated {
        output.push_str("[harness: output truncated; see output.log]\n");
    }
    Ok(NestedRun {
        status,
        output,
        timings: Timings {
            prepare,
            l1_boot: seen.ready_at.map(|t| t - boot_start),
            scenario: match (seen.ready_at, seen.exit) {
                (Some(r), Some((e, _))) => Some(e - r),
                _ => None,
            },
            shutdown: seen
                .exit
                .map(|(e, _)| qemu_end.saturating_duration_since(e)),
            total: Duration::ZERO,
        },
        l2_triple_faults,
        l2_hangs,
    })
}

/// QEMU's command line for one L1 run: TCG with emulated SVM, our kernel
/// and initramfs, the three serial ports (console and heartbeat to files,
/// the scenario's channel to our pipe), a monitor socket, the disk assets.
///
/// QEMU gets `SIGKILL` when the harness dies (`PR_SET_PDEATHSIG`, set
/// between fork and exec): a CI timeout's `SIGTERM`, a `SIGINT` or a
/// `SIGKILL` of the harness (the `harness run` CLI or a test binary) would
/// otherwise leave the L1 running, orphaned, on both cores. The kernel
/// sends that signal when the *thread* that forked QEMU ends, not the
/// process; we spawn QEMU from the thread that then waits for it in
/// [`run`] and does not return before QEMU has ended (a [`KillOnDrop`]
/// guard kills it on every early return or panic on the way), so that
/// thread outlives QEMU in every case but the death of the whole harness,
/// which is the one the signal is for. A process group the harness kills
/// on its way out would miss `SIGKILL`, which no handler sees.
fn qemu_command(
    sc: &Scenario,
    kernel: &L1Kernel,
    initrd_path: &Path,
    workdir: &Path,
    monitor: &Path,
    disks: &[PathBuf],
) -> Command {
    let console = workdir.join("console.log");
    let beat_log = workdir.join("heartbeat.log");
    let _ = std::fs::remove_file(&beat_log);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "EPYC", "-M", "q35"])
        .args([
            "-smp",
            &sc.l1_cpus.to_string(),
            "-m",
            &sc.l1_memory_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd_path)
        .arg("-append")
        .arg(l1_kernel_cmdline(sc))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args([
            "-chardev",
            "stdio,id=scenario,signal=off",
            "-serial",
            "chardev:scenario",
        ])
        .arg("-serial")
        .arg(format!("file:{}", beat_log.display()));
    // QEMU's monitor, asked where the vCPUs are when the L1 freezes; a
    // socket path too long for sun_path just goes without it.
    let _ = std::fs::remove_file(monitor);
    if monitor.as_os_str().len() < 100 {
        cmd.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    }
    for disk in disks {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            disk.display()
        ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let harness_pid = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two system calls (prctl, getppid), both async-signal-safe; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The harness may have died between fork and prctl: then no
            // signal will come, and QEMU must not start.
            if nix::unistd::getppid() != harness_pid {
                return Err(std::io::Error::other(
                    "the harness died before QEMU started",
                ));
            }
            Ok(())
        });
    }
    cmd
}

/// A QEMU child that is killed and reaped when dropped, so that no early
/// return (an error while waiting) or panic of the harness leaves it
/// running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Builds the initramfs and the list of disk assets.
fn assemble(
    sc: &Scenario,
    kernel: &L1Kernel,
    markers: &Markers,
) -> Result<(Initramfs, Vec<PathBuf>), HarnessError> {
    let mut fs = Initramfs::new();
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/assets",
        "/usr/local/bin",
    ] {
        fs.dir(d)?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err(HarnessError::Missing(
            "/bin/busybox (install it with `apt-get install busybox-static`)".into(),
        ));
    }
    add_binary(&mut fs, busybox, "/bin/busybox")?;

    let mut names: Vec<String> = BASE_MODULES.iter().map(|m| m.to_string()).collect();
    names.extend(sc.modules.iter().cloned());
    let modules = kernel.resolve_modules(&names)?;
    let mut module_paths = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let file = m
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("module.ko");
        let dest = format!("/lib/modules/l1/{i:02}-{file}");
        fs.host_file(&dest, m)?;
        module_paths.push(dest);
    }

    for bin in &sc.bins {
        let name = bin
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| HarnessError::Missing(format!("binary path {}", bin.display())))?;
        add_binary(&mut fs, bin, &format!("/usr/local/bin/{name}"))?;
    }

    let mut disks = Vec::new();
    let mut disk_links = Vec::new();
    for asset in &sc.assets {
        let meta = std::fs::metadata(&asset.host_path)
            .map_err(|e| HarnessError::Io(format!("asset {}", asset.host_path.display()), e))?;
        if meta.len() <= INITRAMFS_ASSET_LIMIT {
            fs.host_file(&format!("/assets/{}", asset.name), &asset.host_path)?;
        } else {
            if meta.len() % 512 != 0 {
                return Err(HarnessError::Missing(format!(
                    "asset {} is {} bytes: assets over {} MiB become disks and must be a multiple of 512 bytes",
                    asset.host_path.display(),
                    meta.len(),
                    INITRAMFS_ASSET_LIMIT >> 20
                )));
            }
            let dev = format!("/dev/vd{}", (b'a' + disks.len() as u8) as char);
            disks.push(asset.host_path.clone());
            disk_links.push((dev, asset.name.clone()));
        }
    }
    if disks.len() > 20 {
        return Err(HarnessError::Missing("more than 20 disk assets".into()));
    }

    fs.bytes("/scenario.sh", sc.script.clone().into_bytes(), 0o755)?;
    fs.bytes(
        "/init",
        init_script(&module_paths, &disk_links, markers).into_bytes(),
        0o755,
    )?;
    Ok((fs, disks))
}

/// Adds a binary and every shared library it loads, at their host paths.
fn add_binary(fs: &mut Initramfs, host: &Path, dest: &str) -> Result<(), HarnessError> {
    fs.host_file(dest, host)?;
    for lib in shared_libraries(host)? {
        let path = lib.to_string_lossy().to_string();
        if !fs.contains(&path) {
            fs.host_file(&path, &lib)?;
        }
    }
    Ok(())
}

/// The L1's PID 1: mount, load modules, check KVM, run the scenario, power off.
fn init_script(modules: &[String], disk_links: &[(String, String)], m: &Markers) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
exec 3>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 2>/dev/null
fail() { echo "@ERROR@ $*" >&3; sync; poweroff -f; sleep 10; }
"#,
    );
    s.push_str(&heartbeat::beat_command("/dev/ttyS2"));
    for module in modules {
        s.push_str(&format!(
            "insmod {module} || fail \"insmod {module} failed\"\n"
        ));
    }
    s.push_str("[ -c /dev/kvm ] || fail \"/dev/kvm is missing after loading kvm_amd (does QEMU's CPU model offer svm?)\"\n");
    s.push_str(L2_SHUTDOWN_WATCH);
    for (dev, name) in disk_links {
        s.push_str(&format!(
            "i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n\
[ -b {dev} ] || fail \"disk {dev} for asset {name} did not appear\"\n\
ln -s {dev} /assets/{name}\n"
        ));
    }
    s.push_str(
        r#"ip link set lo up 2>/dev/null
echo "@READY@ $(cut -d' ' -f1 /proc/uptime)" >&3
cd /tmp
ASSETS=/assets HOME=/tmp sh /scenario.sh </dev/null >&3 2>&3
echo "@EXIT@ $?" >&3
sync
poweroff -f
"#,
    );
    s.replace("@ERROR@", &m.error)
        .replace("@READY@", &m.ready)
        .replace("@EXIT@", &m.exit)
}

/// The L1's `/init` lines that make the L1 kernel print every L2 triple
/// fault on its console: KVM's `kvm_userspace_exit` tracepoint (each
/// return of `KVM_RUN` to a VMM) filtered to `KVM_EXIT_SHUTDOWN` (8, how
/// KVM tells a VMM its guest triple-faulted, whether the emulated SVM
/// reported a SHUTDOWN exit or KVM itself saw an exception while
/// delivering a double fault), with `tp_printk` on the L1's command line
/// (see [`l1_kernel_cmdline`]) sending matching events to printk. The
/// harness counts those lines ([`crate::run::l2_triple_faults`]) and
/// reruns the scenario on them.
///
/// Why this channel: the L2 emulator triple fault must be seen in every
/// nested scenario, however it ends and whatever it prints. The VMM's own
/// line ("triple fault (KVM_EXIT_SHUTDOWN)") lands in its `vmm.log`, which
/// the host agent deletes at teardown and only sometimes quotes in a job's
/// reason; where that reason goes (an agent log, a client's stderr, the
/// scenario's output) differs per scenario, and the Firecracker peer or
/// `vmm/tests/nested` print it elsewhere again. Scanning logs in each
/// scenario's prelude or in `/init` after the scenario depends on those
/// paths and on the scenario reaching its end (not a timeout, a freeze or
/// an L1 panic). Every L2 triple fault, under any VMM, jailed or not,
/// passes through the L1 kernel's KVM; the kernel prints it to ttyS0 at
/// once, and QEMU writes that to `console.log` on this host, which the
/// harness reads after every attempt. Only this tracepoint is enabled, and
/// it records only shutdowns (its filter runs on each exit to a VMM, a
/// small cost next to the exit itself). A kernel without the tracepoint
/// fails the run at setup rather than losing the detection silently.
pub const L2_SHUTDOWN_WATCH: &str = r#"tr=/sys/kernel/tracing
mount -t tracefs tracefs $tr 2>/dev/null
ev=$tr/events/kvm/kvm_userspace_exit
{ echo 'reason == 8' > $ev/filter && echo 1 > $ev/enable; } 2>/dev/null ||
    fail "cannot watch for L2 triple faults: no tracepoint $ev"
"#;

/// The oldest QEMU major version whose emulated SVM the harness trusts.
///
/// Under bookworm's QEMU 7.2, L2 guests triple-faulted (or the L1 panicked
/// in the world switch) in a few percent of heavy runs, and in every run of
/// the vsock flood once the L1 and L2 kernels shared virtual addresses
/// (`nokaslr` in the L1: 9 of 9); bookworm-backports' 10.0 ran that worst
/// case clean. `scripts/setup.sh` installs it.
pub const MIN_QEMU_MAJOR: u32 = 10;

/// The major version in `qemu-system-x86_64 --version`'s first line.
pub fn qemu_major_version(version_output: &str) -> Option<u32> {
    let line = version_output.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

/// Warns once per process when the QEMU on `PATH` is older than
/// [`MIN_QEMU_MAJOR`]: runs still work, but expect emulator faults (each is
/// detected and rerun, see `run`).
fn warn_if_old_qemu() {
    static CHECK: std::sync::Once = std::sync::Once::new();
    CHECK.call_once(|| {
        let Ok(out) = Command::new("qemu-system-x86_64").arg("--version").output() else {
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(major) = qemu_major_version(&text)
            && major < MIN_QEMU_MAJOR
        {
            eprintln!(
                "harness: warning: QEMU {major} emulates SVM with bugs that triple-fault L2 guests \
                 under load; install QEMU {MIN_QEMU_MAJOR} from bookworm-backports with \
                 `scripts/setup.sh --packages`"
            );
        }
    });
}

/// The L1 kernel's command line: serial console, reboot on panic (QEMU runs
/// with `-no-reboot`, so that ends the run), no THP, then the scenario's
/// extras.
fn l1_kernel_cmdline(sc: &Scenario) -> String {
    // No transparent huge pages in the L1: L2 guests under QEMU's emulated
    // SVM triple-faulted more often with them (sessions 1 and 2; the
    // Firecracker peer faults too, so it lowers an emulator flake, it does
    // not fix one of ours). A soft lockup of the L1's own kernel panics it
    // (`softlockup_panic=1`) so that the run ends at once instead of at its
    // timeout (seen once in ~275 runs: both L1 CPUs spinning in
    // nf_conntrack's hashing inside a connect(2), for 10 minutes).
    //
    // KASLR stays on in the L1: with `nokaslr` the L1 kernel sits at the
    // same virtual addresses as the L2's (0xffffffff81000000), and the L2
    // triple-faulted under the vsock flood in every run (9 of 9) under QEMU
    // 7.2, against a few percent with KASLR, and still hung (vCPU spinning)
    // in 3 of 9 under QEMU 10.0: QEMU TCG seems to mix up the two kernels'
    // translations across the emulated world switch.
    //
    // `tp_printk` sends enabled trace events to the console: the only one
    // is the L2 triple-fault watch (`L2_SHUTDOWN_WATCH`); it must be on
    // the command line, the sysctl alone does nothing without it.
    let mut cmdline = String::from(
        "console=ttyS0 panic=-1 mitigations=off transparent_hugepage=never softlockup_panic=1 \
         tp_printk",
    );
    for arg in &sc.l1_kernel_args {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_major_version_reads_the_first_line() {
        let v10 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright";
        assert_eq!(qemu_major_version(v10), Some(10));
        let v7 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";
        assert_eq!(qemu_major_version(v7), Some(7));
        assert_eq!(qemu_major_version(""), None);
        assert_eq!(qemu_major_version("qemu: not a version line"), None);
    }
}
