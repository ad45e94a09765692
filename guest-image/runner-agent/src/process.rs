//! Signalling the job's processes: a step's process group, and every
//! descendant of the agent when the job ends.
//!
//! A step runs in its own process group, so one `killpg` reaches the shell
//! and everything it started (`sleep 100 &` included), unless a process
//! moved itself to another group or session (`setsid`, daemons). At the end
//! of a job the agent therefore also walks `/proc` for every descendant of
//! itself (as PID 1 that is every process; in tests the agent is a child
//! subreaper, so orphans stay its descendants) and kills those too.

use std::collections::HashMap;
use std::fs;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Rounds of "find descendants, kill them" before giving up on a fork bomb
/// (SIGKILLed processes cannot fork, so two rounds normally suffice).
const MAX_KILL_ROUNDS: usize = 20;

/// Sends `signal` to process group `pgid`; a group that no longer exists is
/// not an error.
pub fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => tracing::warn!(%pgid, ?signal, error = %err, "killpg failed"),
    }
}

/// One entry of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    parent: Pid,
    zombie: bool,
}

/// Parses the fields we need from a `/proc/<pid>/stat` line: the state and
/// the parent pid, which follow the command name in parentheses (the name
/// itself may contain spaces and parentheses, so we split after the last `)`).
fn parse_stat(line: &str) -> Option<ProcStat> {
    let after_name = &line[line.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    let parent: i32 = fields.next()?.parse().ok()?;
    Some(ProcStat {
        parent: Pid::from_raw(parent),
        zombie: state == "Z" || state == "X",
    })
}

/// Every live (non-zombie) process whose ancestry leads to `root`.
pub fn live_descendants(root: Pid) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut table = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(stat) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            table.insert(Pid::from_raw(pid), stat);
        }
    }
    descendants_in(&table, root)
}

fn descendants_in(table: &HashMap<Pid, ProcStat>, root: Pid) -> Vec<Pid> {
    let mut found = Vec::new();
    for (&pid, stat) in table {
        if stat.zombie || pid == root {
            continue;
        }
        let mut ancestor = stat.parent;
        // Bounded walk: a parent loop cannot happen, but a racy table could.
        for _ in 0..table.len() {
            if ancestor == root {
                found.push(pid);
                break;
            }
            match table.get(&ancestor) {
                Some(next) if ancestor.as_raw() > 1 => ancestor = next.parent,
                _ => break,
            }
        }
    }
    found.sort();
    found
}

/// SIGKILLs every descendant of this process, repeating while new ones
/// appear; returns how many were killed.
pub fn kill_descendants() -> usize {
    let me = nix::unistd::getpid();
    let mut killed = 0;
    for _ in 0..MAX_KILL_ROUNDS {
        let victims = live_descendants(me);
        if victims.is_empty() {
            return killed;
        }
        for pid in victims {
            if kill(pid, Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    tracing::warn!("processes kept appearing while killing the job's leftovers");
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_odd_command_names() {
        let stat = parse_stat("1234 (my (weird) cmd) S 77 1234 1234 0 -1 4194560").unwrap();
        assert_eq!(stat.parent, Pid::from_raw(77));
        assert!(!stat.zombie);
        let zombie = parse_stat("9 (sh) Z 1 9 9").unwrap();
        assert!(zombie.zombie);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S notanumber"), None);
    }

    #[test]
    fn finds_descendants_at_any_depth_only() {
        let entry = |parent: i32, zombie: bool| ProcStat {
            parent: Pid::from_raw(parent),
            zombie,
        };
        let table = HashMap::from([
            (Pid::from_raw(1), entry(0, false)),
            (Pid::from_raw(10), entry(1, false)),  // root
            (Pid::from_raw(11), entry(10, false)), // child
            (Pid::from_raw(12), entry(11, false)), // grandchild
            (Pid::from_raw(13), entry(11, true)),  // zombie grandchild
            (Pid::from_raw(20), entry(1, false)),  // unrelated
            (Pid::from_raw(21), entry(20, false)), // unrelated child
        ]);
        assert_eq!(
            descendants_in(&table, Pid::from_raw(10)),
            [Pid::from_raw(11), Pid::from_raw(12)]
        );
    }

    #[test]
    fn live_walk_finds_a_real_child_and_grandchild() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild = Pid::from_raw(line.trim().parse().unwrap());
        let found = live_descendants(nix::unistd::getpid());
        let child_pid = Pid::from_raw(child.id() as i32);
        kill(grandchild, Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(found.contains(&child_pid), "{found:?}");
        assert!(found.contains(&grandchild), "{found:?}");
    }
}
