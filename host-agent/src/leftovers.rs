//! What a run left on this host, measured rather than assumed: VMM
//! processes still alive, VM directories and records, taps, nftables
//! elements, cgroups. `host-agent run` measures this after its VM's
//! teardown and before it removes its state directory, and fails loudly
//! when anything is left.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::ProcessIdentity;

/// Where to look.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// The agent's state directory (its `vms/` and records).
    pub state_dir: PathBuf,
    /// Every process the agent spawned for a VM (their process groups are
    /// searched too).
    pub spawned: Vec<ProcessIdentity>,
    /// The VMs' cgroups, if they were jailed.
    pub cgroups: Vec<PathBuf>,
    /// The nft binary, if the VMs had a network (then taps and the
    /// nftables table are the agent's to check).
    pub nft: Option<String>,
}

/// What was left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Live processes (pids) spawned for a VM, of their process groups,
    /// or naming a VM directory of this state directory in their command
    /// line.
    pub processes: Vec<i32>,
    /// Entries of `<state_dir>/vms`.
    pub vm_dirs: Vec<String>,
    /// The agent's VM records not removed.
    pub records: usize,
    /// `kdl*` taps.
    pub taps: Vec<String>,
    /// Elements in the `vm_sources` set and `vm_policy` map of the table
    /// `inet kindling`.
    pub nft_elements: usize,
    /// Whether the table `inet kindling` still exists.
    pub nft_table: bool,
    /// The VMs' cgroups that still exist.
    pub cgroups: Vec<PathBuf>,
}

impl Leftovers {
    /// How many things were left, all kinds together.
    pub fn total(&self) -> usize {
        self.processes.len()
            + self.vm_dirs.len()
            + self.records
            + self.taps.len()
            + self.nft_elements
            + usize::from(self.nft_table)
            + self.cgroups.len()
    }

    /// One line per kind that is not empty.
    pub fn breakdown(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.processes.is_empty() {
            lines.push(format!(
                "VMM processes alive: {} (pids {:?})",
                self.processes.len(),
                self.processes
            ));
        }
        if !self.vm_dirs.is_empty() {
            lines.push(format!("VM directories: {:?}", self.vm_dirs));
        }
        if self.records > 0 {
            lines.push(format!("VM records: {}", self.records));
        }
        if !self.taps.is_empty() {
            lines.push(format!("taps: {:?}", self.taps));
        }
        if self.nft_table {
            lines.push(format!(
                "nftables table inet kindling, with {} VM element(s)",
                self.nft_elements
            ));
        }
        if !self.cgroups.is_empty() {
            lines.push(format!("cgroups: {:?}", self.cgroups));
        }
        lines
    }
}

/// Measures what is left; while something is, measures again for up to
/// `settle` (killed processes take a moment to exit).
pub async fn measure_settled(probe: &Probe, settle: Duration) -> Leftovers {
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        let left = measure(probe).await;
        if left.total() == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Measures what is left, once.
pub async fn measure(probe: &Probe) -> Leftovers {
    let mut left = Leftovers {
        processes: processes(probe),
        vm_dirs: names_in(&probe.state_dir.join("vms")),
        records: names_in(&crate::records::records_dir(&probe.state_dir)).len(),
        cgroups: probe
            .cgroups
            .iter()
            .filter(|c| c.is_dir())
            .cloned()
            .collect(),
        ..Leftovers::default()
    };
    if let Some(nft) = &probe.nft {
        left.taps = taps().await;
        if let Some(elements) = nft_elements(nft) {
            left.nft_table = true;
            left.nft_elements = elements;
        }
    }
    left
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Live processes of the spawned groups, and any process whose command
/// line names a VM directory of this state directory (a VMM that left its
/// process group is found that way).
fn processes(probe: &Probe) -> Vec<i32> {
    let mut pids: Vec<i32> = probe
        .spawned
        .iter()
        .flat_map(|p| p.live_group_members())
        .collect();
    let marker = probe.state_dir.join("vms");
    let marker = marker.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if pid != me
            && cmdline(pid).is_some_and(|c| contains(&c, marker))
            && crate::process::stat(pid).is_some_and(|s| !s.is_dead())
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The first 64 KiB of a process's command line.
fn cmdline(pid: i32) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn taps() -> Vec<String> {
    let prefix = crate::net::addressing::TAP_PREFIX;
    match crate::net::link::Links::connect() {
        Ok(links) => links.names_with_prefix(prefix).await.unwrap_or_default(),
        Err(e) => {
            tracing::warn!("cannot list taps: {e}");
            Vec::new()
        }
    }
}

/// The number of VM elements in the table `inet kindling`, or `None` when
/// the table does not exist (or nft cannot tell).
fn nft_elements(nft: &str) -> Option<usize> {
    let out = std::process::Command::new(nft)
        .args(["-j", "list", "table", "inet", crate::net::policy::TABLE])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(count_vm_elements(&out.stdout))
}

/// Counts the elements of the `vm_sources` set and `vm_policy` map in
/// `nft -j list table` output.
pub fn count_vm_elements(json: &[u8]) -> usize {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return 0;
    };
    let Some(items) = value.get("nftables").and_then(|v| v.as_array()) else {
        return 0;
    };
    items
        .iter()
        .filter_map(|item| item.get("set").or_else(|| item.get("map")))
        .filter(|set| {
            matches!(
                set.get("name").and_then(|n| n.as_str()),
                Some("vm_sources" | "vm_policy")
            )
        })
        .map(|set| {
            set.get("elem")
                .and_then(|e| e.as_array())
                .map_or(0, Vec::len)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[tokio::test]
    async fn a_clean_state_dir_has_nothing_left() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("vms")).unwrap();
        let probe = Probe {
            state_dir: state.path().to_path_buf(),
            cgroups: vec![state.path().join("no-such-cgroup")],
            ..Probe::default()
        };
        assert_eq!(measure(&probe).await, Leftovers::default());
    }

    #[tokio::test]
    async fn a_live_vmm_and_its_directory_are_counted() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("vms/run-0-abc")).unwrap();
        let mut vmm = std::process::Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .unwrap();
        let spawned = ProcessIdentity::of(vmm.id() as i32).unwrap();
        // One that left its process group, found by its command line: a
        // shell blocked in its `read` builtin, which forks nothing (a
        // forked child would carry the marker too until it execs, and be
        // counted: that raced once in CI).
        let marker = state.path().join("vms/run-0-abc/vsock.sock");
        let mut escaped = std::process::Command::new("sh")
            .args(["-c", "read -r line", "leftover"])
            .arg(&marker)
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let probe = Probe {
            state_dir: state.path().to_path_buf(),
            spawned: vec![spawned],
            ..Probe::default()
        };
        let left = measure(&probe).await;
        let mut expected = vec![vmm.id() as i32, escaped.id() as i32];
        expected.sort_unstable();
        assert_eq!(left.processes, expected);
        assert_eq!(left.vm_dirs, vec!["run-0-abc".to_string()]);
        assert_eq!(left.total(), 3);
        assert_eq!(left.breakdown().len(), 2);
        for child in [&mut vmm, &mut escaped] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        std::fs::remove_dir(state.path().join("vms/run-0-abc")).unwrap();
        assert_eq!(
            measure_settled(&probe, Duration::from_secs(2))
                .await
                .total(),
            0
        );
    }

    #[test]
    fn counts_vm_elements_in_nft_json() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "kindling"}}, {"set": {"family": "inet", "name": "forbidden_v4", "elem": ["10.0.0.0/8"]}}, {"set": {"name": "vm_sources", "elem": [{"concat": ["kdl0", "10.0.0.2"]}]}}, {"map": {"name": "vm_policy", "map": "verdict", "elem": [["kdl0", {"jump": {"target": "pool_0"}}]]}}]}"#;
        assert_eq!(count_vm_elements(json), 2);
        assert_eq!(count_vm_elements(b"not json"), 0);
    }
}
