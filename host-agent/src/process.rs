//! Which process a pid is: its start time, process group and state from
//! `/proc/<pid>/stat`. A pid alone can be reused once its process is gone;
//! pid plus start time (clock ticks since boot) names one process for the
//! life of the machine, so the agent records both when it spawns a VMM and
//! kills a recorded pid only while both still match.

use std::io::Read;

use serde::{Deserialize, Serialize};

/// One process, as recorded when the agent spawned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Its pid (also its process group: the agent spawns VMMs as group
    /// leaders).
    pub pid: i32,
    /// Its start time, in clock ticks after boot (`/proc/<pid>/stat`
    /// field 22).
    pub start_time: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Its process group.
    pub pgid: i32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Whether it is a zombie (dead, waiting to be reaped) or dead.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The longest read of a small `/proc` file (`stat`, `comm`: a few
/// hundred bytes in practice).
const MAX_PROC_FILE_LEN: u64 = 4096;

/// Reads a small `/proc` file, at most [`MAX_PROC_FILE_LEN`] bytes; `None`
/// if it cannot be read.
pub fn read_proc_file(path: &std::path::Path) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_PROC_FILE_LEN)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist (or the
/// text cannot be parsed).
pub fn stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&read_proc_file(std::path::Path::new(&format!(
        "/proc/{pid}/stat"
    )))?)
}

/// Parses a `stat` line. The command name (field 2) is in parentheses and
/// may itself hold spaces and parentheses: fields are counted after the
/// last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, pgrp field 5, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let pgid = fields.get(2)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        state,
        pgid,
        start_time,
    })
}

/// The CPU time (user plus system, in clock ticks) a `stat` line of a
/// process or thread reports: fields 14 and 15, counted after the last `)`.
pub fn parse_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

impl ProcessIdentity {
    /// The identity of the running process `pid`.
    pub fn of(pid: i32) -> Option<ProcessIdentity> {
        stat(pid).map(|s| ProcessIdentity {
            pid,
            start_time: s.start_time,
        })
    }

    /// Whether the process still runs (same pid, same start time, not a
    /// zombie).
    pub fn is_running(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start_time == self.start_time && !s.is_dead())
    }

    /// Live processes of this process's group that started no earlier than
    /// it did (the leader itself included, while it runs). Its group is
    /// only counted while the leader is the recorded process or gone: a
    /// reused pid leads a stranger's group.
    pub fn live_group_members(&self) -> Vec<i32> {
        if let Some(leader) = stat(self.pid)
            && leader.start_time != self.start_time
        {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                stat(pid).is_some_and(|s| {
                    s.pgid == self.pid && s.start_time >= self.start_time && !s.is_dead()
                })
            })
            .collect()
    }

    /// Sends SIGKILL to the process and its group, if it is still the
    /// recorded process; returns whether it was.
    pub fn kill_group(&self) -> bool {
        if !self.is_running() {
            return false;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let line = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                pgid: 1234,
                start_time: 987654
            }
        );
        assert_eq!(parse_cpu_ticks(line), Some(3), "utime 1 + stime 2");
        assert!(parse_stat("garbage").is_none());
        assert!(parse_cpu_ticks("1 (x) S 1").is_none());
        assert!(parse_stat("1 (x) S 1").is_none());
    }

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_running());
        let stranger = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!stranger.is_running());
        assert!(!stranger.kill_group(), "a reused pid is not killed");
        assert!(stranger.live_group_members().is_empty());
        assert!(ProcessIdentity::of(-1).is_none());
    }
}
