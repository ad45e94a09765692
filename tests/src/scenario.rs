//! What a harness run is asked to do (`Scenario`) and what came of it
//! (`Outcome`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::host::{ExecMode, HostKvm};

/// Where the caller wants the scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Direct on hardware KVM, nested otherwise.
    #[default]
    Auto,
    /// Always in the L1 under QEMU TCG.
    Nested,
    /// Always on this host.
    Direct,
}

/// A file made available to the scenario as `$ASSETS/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// The file on this host.
    pub host_path: PathBuf,
    /// Its name under `$ASSETS`.
    pub name: String,
}

impl Asset {
    /// Parses `PATH` or `PATH=NAME`.
    pub fn parse(spec: &str) -> Result<Asset, String> {
        let (path, name) = match spec.rsplit_once('=') {
            Some((p, n)) => (p.to_string(), n.to_string()),
            None => {
                let p = PathBuf::from(spec);
                let n = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| format!("asset {spec:?} has no file name"))?
                    .to_string();
                (spec.to_string(), n)
            }
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!("asset name {name:?} must be a plain file name"));
        }
        Ok(Asset {
            host_path: PathBuf::from(path),
            name,
        })
    }
}

/// One scenario: a shell script plus what it needs.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A short name, used for the work directory and in reports.
    pub name: String,
    /// The POSIX shell script to run (busybox `sh` in the L1).
    pub script: String,
    /// Host binaries installed on the scenario's `PATH` (with their shared libraries).
    pub bins: Vec<PathBuf>,
    /// Files exposed under `$ASSETS`.
    pub assets: Vec<Asset>,
    /// Extra L1 kernel modules to load (nested mode only).
    pub modules: Vec<String>,
    /// Wall-clock bound for the whole run, L1 boot included.
    pub timeout: Duration,
    /// L1 memory in MiB.
    pub l1_memory_mib: u32,
    /// L1 vCPUs.
    pub l1_cpus: u32,
    /// Where logs go; a fresh directory under the system temp dir if `None`.
    pub workdir: Option<PathBuf>,
    /// Nested, direct or automatic.
    pub mode: ModeChoice,
    /// Stream the scenario's output to stderr while it runs.
    pub echo: bool,
    /// Extra arguments for the L1 kernel's command line (nested mode only).
    pub l1_kernel_args: Vec<String>,
    /// How long the L1's heartbeat may be silent before the L1 counts as
    /// frozen and is killed (nested mode only; see `heartbeat`).
    pub freeze_limit: Duration,
    /// How many times a run in which an L2 guest triple-faulted runs again
    /// in a fresh L1 (nested mode only; 0: never), however it ended: the L1
    /// kernel reports every such fault on its console
    /// (`nested::L2_SHUTDOWN_WATCH`, `run::l2_triple_faults`), whatever
    /// the scenario prints. QEMU TCG's emulated SVM triple-faults L2 guests
    /// now and then: under a vsock flood, `dockerd`'s start, a fork bomb,
    /// and once in CI a pool VM right after its job began while a second VM
    /// booted beside it. If the last allowed attempt has one too, the run
    /// fails ([`Status::L2TripleFault`] if the script exited 0), so a VMM
    /// that triple-faults its guest every time fails. Default 1.
    pub l2_triple_fault_reruns: u32,
    /// The scenario makes or counts L2 triple faults itself (a test of a
    /// VMM's triple-fault handling, a tally of emulator faults): they are
    /// its results, never rerun nor turned into a failure, only counted in
    /// [`Outcome::l2_triple_faults`]. Default false.
    pub l2_triple_faults_expected: bool,
    /// How many times a run in which an L2 guest hung is repeated in a
    /// fresh L1 (nested mode only; 0: never), however it ended. A hung
    /// guest is one the host agent failed with a reason that starts
    /// `guest hang:` (its vCPU ran flat out while it sent nothing for
    /// 30 s; see `host-agent`'s `vcpu_load`), found in the scenario's
    /// output (`run::l2_hangs`). QEMU TCG's emulated SVM wedges an L2 now
    /// and then, under our VMM and Firecracker alike (README, "Soak"). If
    /// the last allowed attempt has one too, the run fails
    /// ([`Status::L2Hang`] if the script exited 0), so a VMM that wedges its
    /// guest every time fails. Default 1.
    pub l2_hang_reruns: u32,
    /// The scenario makes L2 hangs itself (a test of the host agent's hang
    /// report): they are its results, never rerun nor turned into a
    /// failure. Default false.
    pub l2_hangs_expected: bool,
}

impl Scenario {
    /// A scenario with defaults: 2 L1 vCPUs, 2 GiB, 300 s, auto mode, echo on,
    /// one rerun on an L2 triple fault (none expected).
    pub fn new(name: &str, script: &str) -> Scenario {
        Scenario {
            name: name.to_string(),
            script: script.to_string(),
            bins: Vec::new(),
            assets: Vec::new(),
            modules: Vec::new(),
            timeout: Duration::from_secs(300),
            l1_memory_mib: 2048,
            l1_cpus: 2,
            workdir: None,
            mode: ModeChoice::Auto,
            echo: true,
            l1_kernel_args: Vec::new(),
            freeze_limit: crate::heartbeat::FREEZE_LIMIT,
            l2_triple_fault_reruns: 1,
            l2_triple_faults_expected: false,
            l2_hang_reruns: 1,
            l2_hangs_expected: false,
        }
    }
}

/// How the scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The script ran to completion with this exit code.
    Exited(i32),
    /// The run exceeded its timeout and was killed.
    TimedOut,
    /// The L1 kernel panicked.
    L1Panic,
    /// The L1 stopped making progress: its heartbeat (a line a second from
    /// a process of its own) was silent for this many seconds, and the L1
    /// was killed.
    L1Frozen(u64),
    /// The L1 (or the direct-mode shell) ended without reporting an exit code.
    Died(String),
    /// The L1 came up but could not prepare the scenario (e.g. no /dev/kvm).
    SetupFailed(String),
    /// The script exited 0, but an L2 guest triple-faulted (this many
    /// times) in the last attempt the scenario's reruns allowed
    /// (`Scenario::l2_triple_fault_reruns`): the emulator's fault may have
    /// spoiled what the script measured, so this is a failure.
    L2TripleFault(u32),
    /// The script exited 0, but the scenario's output reported an L2 guest
    /// hang (this many lines) in the last attempt the scenario's reruns
    /// allowed (`Scenario::l2_hang_reruns`): a failure, as for
    /// [`Status::L2TripleFault`].
    L2Hang(u32),
}

/// Phase timings, as measured by the harness.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Building the initramfs and other preparations.
    pub prepare: Duration,
    /// From starting QEMU to the L1 saying it is ready (KVM loaded).
    pub l1_boot: Option<Duration>,
    /// From L1 ready to the scenario's exit.
    pub scenario: Option<Duration>,
    /// From the scenario's exit to QEMU's exit.
    pub shutdown: Option<Duration>,
    /// Everything, lock wait excluded.
    pub total: Duration,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What the host offers.
    pub host: HostKvm,
    /// Where the scenario ran.
    pub mode: ExecMode,
    /// How it ended.
    pub status: Status,
    /// The scenario's output (stdout and stderr interleaved), possibly truncated.
    pub output: String,
    /// The last lines of the L1 console (kernel log).
    pub console_tail: String,
    /// Phase timings.
    pub timings: Timings,
    /// The directory holding `output.log` and `console.log`.
    pub workdir: PathBuf,
    /// How many times an L2 guest triple-faulted in the final attempt's L1
    /// (nested mode; 0 in direct mode).
    pub l2_triple_faults: u32,
    /// How many `guest hang:` lines the final attempt's output held
    /// (nested mode; 0 in direct mode).
    pub l2_hangs: u32,
}

impl Outcome {
    /// True when the script exited 0.
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }

    /// The exit code the CLI reports: the script's, 124 on timeout, 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Status::Exited(code) => code,
            Status::TimedOut => 124,
            _ => 125,
        }
    }

    /// A multi-line human-readable summary; failures include the console tail.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let secs = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        let _ = writeln!(s, "scenario status: {}", describe(&self.status));
        let _ = writeln!(s, "host: {}; ran {}", self.host, self.mode);
        let _ = writeln!(s, "timings:");
        let _ = writeln!(
            s,
            "  prepare     {:.2} s",
            self.timings.prepare.as_secs_f64()
        );
        let _ = writeln!(s, "  L1 boot     {}", secs(self.timings.l1_boot));
        let _ = writeln!(s, "  scenario    {}", secs(self.timings.scenario));
        let _ = writeln!(s, "  shutdown    {}", secs(self.timings.shutdown));
        let _ = writeln!(s, "  total       {:.2} s", self.timings.total.as_secs_f64());
        if self.l2_triple_faults > 0 {
            let _ = writeln!(s, "L2 triple faults: {}", self.l2_triple_faults);
        }
        if self.l2_hangs > 0 {
            let _ = writeln!(s, "L2 hang reports: {}", self.l2_hangs);
        }
        let _ = writeln!(s, "logs: {}", self.workdir.display());
        if !self.success() && !self.console_tail.is_empty() {
            let _ = writeln!(s, "--- L1 console (last lines) ---\n{}", self.console_tail);
        }
        s
    }
}

/// One line saying how a scenario ended.
pub(crate) fn describe(status: &Status) -> String {
    match status {
        Status::Exited(0) => "passed (exit 0)".into(),
        Status::Exited(c) => format!("FAILED: script exited with {c}"),
        Status::TimedOut => "FAILED: timed out, the L1 was killed".into(),
        Status::L1Panic => "FAILED: the L1 kernel panicked".into(),
        Status::L1Frozen(secs) => {
            format!("FAILED: the L1 froze (no heartbeat for {secs} s), it was killed")
        }
        Status::Died(why) => format!("FAILED: ended without an exit code ({why})"),
        Status::SetupFailed(why) => format!("FAILED: L1 setup failed: {why}"),
        Status::L2TripleFault(n) => format!(
            "FAILED: the script exited 0, but an L2 guest triple-faulted ({n} in the L1) in \
             every attempt (QEMU TCG's emulated SVM, or the VMM)"
        ),
        Status::L2Hang(n) => format!(
            "FAILED: the script exited 0, but an L2 guest hung ({n} report line(s)) in every \
             attempt (QEMU TCG's emulated SVM, or the VMM)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_specs() {
        let a = Asset::parse("/x/vmlinux").unwrap();
        assert_eq!(
            (a.host_path, a.name.as_str()),
            (PathBuf::from("/x/vmlinux"), "vmlinux")
        );
        let b = Asset::parse("/x/bzImage=kernel").unwrap();
        assert_eq!(b.name, "kernel");
        assert!(Asset::parse("/x/y=a/b").is_err());
        assert!(Asset::parse("/x/y=..").is_err());
    }

    #[test]
    fn exit_codes_distinguish_failures() {
        let mut o = Outcome {
            host: HostKvm::Absent,
            mode: ExecMode::Nested,
            status: Status::Exited(0),
            output: String::new(),
            console_tail: "tail".into(),
            timings: Timings::default(),
            workdir: PathBuf::new(),
            l2_triple_faults: 0,
            l2_hangs: 0,
        };
        assert!(o.success());
        assert_eq!(o.exit_code(), 0);
        o.status = Status::Exited(3);
        assert!(!o.success());
        assert_eq!(o.exit_code(), 3);
        assert!(o.report().contains("tail"));
        o.status = Status::TimedOut;
        assert_eq!(o.exit_code(), 124);
        o.status = Status::L1Panic;
        assert_eq!(o.exit_code(), 125);
        o.status = Status::L2TripleFault(2);
        o.l2_triple_faults = 2;
        assert!(!o.success());
        assert_eq!(o.exit_code(), 125);
        assert!(o.report().contains("L2 triple faults: 2"), "{}", o.report());
        o.status = Status::L2Hang(1);
        o.l2_hangs = 1;
        assert_eq!(o.exit_code(), 125);
        assert!(o.report().contains("L2 hang reports: 1"), "{}", o.report());
    }
}
