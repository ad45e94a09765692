//! Start-up clean-up: whatever a previous (crashed) run of the agent left in
//! its state directory goes before any new VM is created.
//!
//! What is acted on comes only from the agent's own records
//! ([`crate::records`], outside every jailed directory), never from a file
//! in a VM directory (the VM's uid owns those: a compromised VMM could name
//! another VM's process or id there). For each record: its process group
//! is killed if the recorded process still runs (same pid *and* start
//! time, so a reused pid never hits a stranger); with the jail, the VM's
//! cgroup is killed whole and removed; its VM id is returned so that the
//! agent can deregister it, which revokes its token and fails a job it
//! still held (with a reason) instead of leaving it to its timeout. Then
//! every VM directory is removed without reading anything in it, and the
//! records last (a crash midway leaves them for the next clean-up).

use std::path::Path;

use crate::records::{self, VmRecord};

/// What the clean-up removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// VMM processes killed (one per recorded VM that still ran).
    pub processes: usize,
    /// VM directories removed.
    pub dirs: usize,
    /// Orchestrator ids of the removed VMs (to deregister).
    pub vm_ids: Vec<String>,
}

/// Kills leftover VMMs, removes every directory under `<state_dir>/vms`
/// and every record; with `jail`, each leftover VM's cgroup is killed and
/// removed too.
pub fn remove_leftovers(
    state_dir: &Path,
    jail: Option<&crate::jail::JailConfig>,
) -> std::io::Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    let records_dir = records::records_dir(state_dir);
    let (records, junk) = records::read_all(&records_dir).map_err(std::io::Error::other)?;
    for record in &records {
        if kill_recorded(record, jail) {
            cleaned.processes += 1;
        }
        if let Some(id) = &record.vm_id {
            cleaned.vm_ids.push(id.clone());
        }
    }
    let vms_dir = state_dir.join("vms");
    match std::fs::read_dir(&vms_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                if let (Some(jail), Some(name)) = (jail, path.file_name()) {
                    crate::jail::remove_cgroup(&jail.cgroup_parent.join(name));
                }
                // Not followed if a symlink: the entry itself goes.
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
                cleaned.dirs += 1;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for record in &records {
        records::remove(&records_dir, &record.name).map_err(std::io::Error::other)?;
    }
    for path in junk {
        let _ = std::fs::remove_file(path);
    }
    Ok(cleaned)
}

/// Kills what `record` names: the recorded process group while its leader
/// is still the recorded process, and with the jail the VM's whole cgroup.
/// Returns whether anything was still running.
fn kill_recorded(record: &VmRecord, jail: Option<&crate::jail::JailConfig>) -> bool {
    let mut killed = record.process.is_some_and(|p| p.kill_group());
    if let Some(jail) = jail {
        let cgroup = jail.cgroup_parent.join(&record.name);
        if kill_cgroup(&cgroup) {
            killed = true;
        }
        crate::jail::remove_cgroup(&cgroup);
    }
    killed
}

/// Kills every process in `cgroup` (`cgroup.kill`); returns whether it had
/// any.
fn kill_cgroup(cgroup: &Path) -> bool {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    if procs.trim().is_empty() {
        return false;
    }
    if let Err(e) = std::fs::write(cgroup.join("cgroup.kill"), "1") {
        tracing::warn!(cgroup = %cgroup.display(), "cannot kill the cgroup: {e}");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ProcessIdentity;
    use crate::records::{records_dir, write};
    use std::os::unix::process::CommandExt;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn alive(child: &mut std::process::Child) -> bool {
        child.try_wait().unwrap().is_none()
    }

    #[test]
    fn kills_recorded_vmms_and_removes_their_directories() {
        let state = tempfile::tempdir().unwrap();
        let vms = state.path().join("vms");
        let records = records_dir(state.path());
        // A leftover "VMM" the agent recorded.
        let mut vmm = sleeper();
        std::fs::create_dir_all(vms.join("pool-0-a")).unwrap();
        write(
            &records,
            &VmRecord {
                name: "pool-0-a".into(),
                process: ProcessIdentity::of(vmm.id() as i32),
                vm_id: Some("vm-0123abcd".into()),
            },
        )
        .unwrap();
        // A recorded pid that was reused by a stranger (start time differs).
        let mut stranger = sleeper();
        let mut reused = ProcessIdentity::of(stranger.id() as i32).unwrap();
        reused.start_time -= 1;
        std::fs::create_dir_all(vms.join("pool-1-b")).unwrap();
        write(
            &records,
            &VmRecord {
                name: "pool-1-b".into(),
                process: Some(reused),
                vm_id: None,
            },
        )
        .unwrap();
        let cleaned = remove_leftovers(state.path(), None).unwrap();
        assert_eq!(
            cleaned,
            Cleaned {
                processes: 1,
                dirs: 2,
                vm_ids: vec!["vm-0123abcd".into()],
            }
        );
        assert!(!vmm.wait().unwrap().success(), "the VMM was not killed");
        assert!(
            alive(&mut stranger),
            "a stranger on a reused pid was killed"
        );
        stranger.kill().unwrap();
        let _ = stranger.wait();
        assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
        assert_eq!(
            remove_leftovers(&state.path().join("none"), None).unwrap(),
            Cleaned::default()
        );
    }

    /// A compromised VMM plants files in its own directory: pid files
    /// naming a bystander, ids naming another VM, symlinks to secrets,
    /// FIFOs and huge sparse files. The clean-up acts only on what the
    /// agent recorded, reads nothing there, and does not hang.
    #[test]
    fn files_a_vmm_planted_in_its_directory_steer_nothing() {
        let state = tempfile::tempdir().unwrap();
        let vm = state.path().join("vms/pool-0-a");
        std::fs::create_dir_all(&vm).unwrap();
        let mut bystander = sleeper();
        let secret = state.path().join("secret");
        std::fs::write(&secret, "vm-victim").unwrap();
        std::fs::write(vm.join("vmm.pid"), bystander.id().to_string()).unwrap();
        std::fs::write(vm.join("vm-id"), "vm-victim").unwrap();
        std::os::unix::fs::symlink(&secret, vm.join("vmm.log")).unwrap();
        nix::unistd::mkfifo(&vm.join("serial.log"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::File::create(vm.join("huge"))
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        // A symlink where a VM directory would be: removed, not followed.
        let outside = state.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, state.path().join("vms/pool-9-z")).unwrap();
        write(
            &records_dir(state.path()),
            &VmRecord {
                name: "pool-0-a".into(),
                process: None,
                vm_id: Some("vm-recorded".into()),
            },
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = state.path().to_path_buf();
        std::thread::spawn(move || tx.send(remove_leftovers(&dir, None).unwrap()));
        let cleaned = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the clean-up hung");
        assert_eq!(
            cleaned,
            Cleaned {
                processes: 0,
                dirs: 2,
                vm_ids: vec!["vm-recorded".into()],
            }
        );
        assert!(alive(&mut bystander), "the bystander was killed");
        bystander.kill().unwrap();
        let _ = bystander.wait();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "vm-victim");
        assert!(outside.join("keep").exists(), "followed a symlink");
    }
}
