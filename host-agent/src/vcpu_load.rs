//! Why a guest went silent: wedged or stopped.
//!
//! A guest that sends nothing (no heartbeat, no output) for
//! `HEARTBEAT_TIMEOUT` fails its job. From outside, two cases look alike
//! but are not: its vCPUs still run flat out while nothing reaches the host
//! (the guest kernel is wedged: a spin with interrupts off, a livelock, or
//! an emulator fault under nested virtualization), or its vCPUs are idle (it
//! waits for something that never comes: a lost interrupt or notification,
//! the VMM's side). The agent samples the CPU time of the VMM's vCPU
//! threads (`/proc/<pid>/task/<tid>/stat` of the threads named `vcpu<N>` in
//! ours, `fc_vcpu <N>` in Firecracker) over a short window and
//! says which case it saw in the job's failure reason, so an operator can
//! tell a guest problem from a VMM one.
//!
//! A wedged guest's reason starts with [`GUEST_HANG`]: the nested test
//! harness recognises that phrase (as it recognises the L2 triple fault)
//! because QEMU TCG's emulated SVM wedges an L2 guest now and then.

use std::time::Duration;

use crate::process::{self, ProcessIdentity};

/// How a silent guest's failure reason starts when its vCPUs were busy.
pub const GUEST_HANG: &str = "guest hang:";

/// The share of the window above which a vCPU thread counts as busy.
const BUSY_PERCENT: u32 = 50;

/// The VMM's vCPU threads over one sample window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuLoad {
    /// How many vCPU threads the VMM had.
    pub threads: usize,
    /// The busiest vCPU thread's CPU time, in percent of the window.
    pub busiest_percent: u32,
    /// The window.
    pub window: Duration,
}

impl VcpuLoad {
    /// Whether some vCPU ran for most of the window: the guest kernel runs
    /// but sends nothing.
    pub fn is_busy(&self) -> bool {
        self.busiest_percent >= BUSY_PERCENT
    }

    /// How a silence that lasted `silent` reads in a failure reason, `during`
    /// naming the step (" during step 2") or empty.
    pub fn silence_reason(&self, silent: Duration, during: &str) -> String {
        let busiest = self.busiest_percent;
        let window = self.window;
        if self.is_busy() {
            format!(
                "{GUEST_HANG} silent for {silent:?}{during} while a vCPU ran {busiest}% of the \
                 last {window:?}: the guest kernel is wedged (a spin or livelock in the guest, \
                 or a fault of nested virtualization)"
            )
        } else {
            format!(
                "guest silent for {silent:?}{during} with its vCPUs idle ({busiest}% at most over \
                 the last {window:?}): the guest waits on something that never came, which \
                 points at the VMM (a lost interrupt or queue notification)"
            )
        }
    }
}

/// CPU ticks (user + system) of each vCPU thread of `pids`, by tid.
fn vcpu_ticks(pids: &[i32]) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            let path = task.path();
            let Some(name) = process::read_proc_file(&path.join("comm")) else {
                continue;
            };
            if !is_vcpu_thread(&name) {
                continue;
            }
            if let Some(ticks) = process::read_proc_file(&path.join("stat"))
                .as_deref()
                .and_then(process::parse_cpu_ticks)
            {
                out.push((tid, ticks));
            }
        }
    }
    out
}

/// Whether a thread name (`comm`) is a vCPU thread's: `vcpu<N>` (ours) or
/// `fc_vcpu <N>` (Firecracker's).
fn is_vcpu_thread(comm: &str) -> bool {
    let name = comm.trim_end();
    let rest = name.strip_prefix("fc_").unwrap_or(name);
    let Some(index) = rest.strip_prefix("vcpu") else {
        return false;
    };
    let index = index.strip_prefix(' ').unwrap_or(index);
    !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())
}

/// The load of `before` and `after` tick samples over `window`, with
/// `ticks_per_second` clock ticks a second; `None` if no vCPU thread was
/// seen in both.
pub fn load_between(
    before: &[(i32, u64)],
    after: &[(i32, u64)],
    window: Duration,
    ticks_per_second: u64,
) -> Option<VcpuLoad> {
    let window_ticks = (window.as_secs_f64() * ticks_per_second as f64).max(1.0);
    let mut threads = 0;
    let mut busiest = 0u32;
    for (tid, end) in after {
        let Some((_, start)) = before.iter().find(|(t, _)| t == tid) else {
            continue;
        };
        threads += 1;
        let percent = (end.saturating_sub(*start) as f64 * 100.0 / window_ticks).round();
        busiest = busiest.max(percent.min(100.0) as u32);
    }
    (threads > 0).then_some(VcpuLoad {
        threads,
        busiest_percent: busiest,
        window,
    })
}

/// Samples the vCPU threads of the VMM that `process` started (the VMM
/// itself, or its jailer and the VMM under it: every live member of its
/// process group) over `window`. `None` if none was found.
pub async fn sample(process: ProcessIdentity, window: Duration) -> Option<VcpuLoad> {
    let members = process.live_group_members();
    let before = vcpu_ticks(&members);
    if before.is_empty() {
        return None;
    }
    tokio::time::sleep(window).await;
    let after = vcpu_ticks(&members);
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100);
    load_between(&before, &after, window, ticks_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_that_ran_most_of_the_window_is_a_hang() {
        let before = [(10, 1_000), (11, 50)];
        let after = [(10, 1_195), (11, 51)];
        let load = load_between(&before, &after, Duration::from_secs(2), 100).unwrap();
        assert_eq!(load.threads, 2);
        assert_eq!(load.busiest_percent, 98);
        assert!(load.is_busy());
        let reason = load.silence_reason(Duration::from_secs(30), " during step 2");
        assert!(reason.starts_with(GUEST_HANG), "{reason}");
        assert!(reason.contains("during step 2"), "{reason}");
        assert!(reason.contains("98%"), "{reason}");
    }

    #[test]
    fn idle_vcpus_point_at_the_vmm_and_are_not_a_hang() {
        let before = [(10, 1_000)];
        let after = [(10, 1_002)];
        let load = load_between(&before, &after, Duration::from_secs(2), 100).unwrap();
        assert!(!load.is_busy());
        let reason = load.silence_reason(Duration::from_secs(30), "");
        assert!(!reason.contains(GUEST_HANG), "{reason}");
        assert!(reason.contains("idle"), "{reason}");
    }

    #[test]
    fn threads_seen_once_only_or_counters_that_go_back_are_bounded() {
        // A thread that appeared during the window is not counted; a
        // counter that went backwards (a reused tid) counts as zero; more
        // ticks than the window holds is 100 %.
        let before = [(10, 500), (12, 0)];
        let after = [(10, 400), (11, 9_999), (12, 9_999)];
        let load = load_between(&before, &after, Duration::from_secs(1), 100).unwrap();
        assert_eq!(load.threads, 2);
        assert_eq!(load.busiest_percent, 100);
        assert_eq!(load_between(&[], &after, Duration::from_secs(1), 100), None);
    }

    #[test]
    fn vcpu_threads_are_known_by_their_names() {
        for vcpu in ["vcpu0", "vcpu12", "fc_vcpu 0", "fc_vcpu 3\n"] {
            assert!(is_vcpu_thread(vcpu), "{vcpu:?}");
        }
        for other in [
            "vcpu",
            "vcpu_load::test",
            "devices",
            "fc_vmm",
            "xvcpu0",
            "vcpu 0x",
        ] {
            assert!(!is_vcpu_thread(other), "{other:?}");
        }
    }

    #[tokio::test]
    async fn the_vcpu_threads_are_found_by_name_and_their_cpu_time_read() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc;
        // This test process stands for the VMM: one vCPU thread spins, one
        // sleeps, and a third thread is no vCPU.
        let stop = Arc::new(AtomicBool::new(false));
        let (tids, tid_rx) = mpsc::channel::<(String, i32)>();
        let start = |name: &str, spin: bool| {
            let stop = stop.clone();
            let tids = tids.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let me = std::thread::current().name().unwrap_or("").to_string();
                    tids.send((me, nix::unistd::gettid().as_raw())).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        if spin {
                            std::hint::spin_loop();
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
                .unwrap()
        };
        let threads = [
            start("vcpu0", true),
            start("vcpu1", false),
            start("devices", true),
        ];
        let named: Vec<(String, i32)> = tid_rx.iter().take(3).collect();
        let tid_of = |name: &str| named.iter().find(|(n, _)| n == name).unwrap().1;
        let (spinner, sleeper, other) = (tid_of("vcpu0"), tid_of("vcpu1"), tid_of("devices"));
        let me = [std::process::id() as i32];
        let before = vcpu_ticks(&me);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = vcpu_ticks(&me);
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let tids: Vec<i32> = before.iter().map(|(t, _)| *t).collect();
        assert!(
            tids.contains(&spinner) && tids.contains(&sleeper),
            "{before:?}"
        );
        assert!(!tids.contains(&other), "not a vCPU: {before:?}");
        let delta = |tid: i32| {
            let b = before.iter().find(|(t, _)| *t == tid).unwrap().1;
            let a = after.iter().find(|(t, _)| *t == tid).unwrap().1;
            a - b
        };
        // The machine may be busy with other tests: the spinner gets some
        // of the 150 ticks, the sleeper next to none.
        assert!(delta(spinner) >= 10, "spinner {} ticks", delta(spinner));
        assert!(delta(sleeper) <= 3, "sleeper {} ticks", delta(sleeper));
    }
}
