//! Start-up clean-up: whatever a previous (crashed) run of the agent left in
//! its state directory goes before any new VM is created. Each VM directory
//! may hold `vmm.pid`; the process it names is killed (with its process
//! group) only if it still runs the configured VMM binary, so a recycled pid
//! never hits an unrelated process. It may also hold `vm-id`, the VM's id at
//! the orchestrator: the ids found are returned so that the agent can
//! deregister those VMs, which revokes their tokens and fails a job one of
//! them still held (with a reason) instead of leaving it to its timeout.

use std::path::Path;

/// The file in a VM directory that holds the VM's orchestrator id.
pub const VM_ID_FILE: &str = "vm-id";

/// What the clean-up removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// VMM processes killed.
    pub processes: usize,
    /// VM directories removed.
    pub dirs: usize,
    /// Orchestrator ids of the removed VMs (to deregister).
    pub vm_ids: Vec<String>,
}

/// Records `vm_id` in the VM directory `dir`, for a later clean-up.
pub fn record_vm_id(dir: &Path, vm_id: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(VM_ID_FILE), vm_id)
}

/// The id in `dir/vm-id`, if it is there and looks like an id.
fn recorded_vm_id(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(VM_ID_FILE)).ok()?;
    let id = text.trim();
    let plausible = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    plausible.then(|| id.to_string())
}

/// Kills leftover VMMs and removes every directory under `vms_dir`. A
/// `vmm.pid` may name the VMM itself or, with the jail, `kindling-jailer`
/// (whose process group holds the VMM); with `jail`, each leftover VM's
/// cgroup is removed too.
pub fn remove_leftovers(
    vms_dir: &Path,
    vmm: &Path,
    jail: Option<&crate::jail::JailConfig>,
) -> std::io::Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    let entries = match std::fs::read_dir(vms_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cleaned),
        Err(e) => return Err(e),
    };
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut binaries = vec![canonical(vmm)];
    if let Some(jail) = jail {
        binaries.push(canonical(&jail.jailer_path()));
    }
    for entry in entries {
        let dir = entry?.path();
        if let Some(pid) = std::fs::read_to_string(dir.join("vmm.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            && binaries.iter().any(|b| runs(pid, b))
        {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            cleaned.processes += 1;
        }
        if let Some(id) = recorded_vm_id(&dir) {
            cleaned.vm_ids.push(id);
        }
        if let (Some(jail), Some(name)) = (jail, dir.file_name()) {
            crate::jail::remove_cgroup(&jail.cgroup_parent.join(name));
        }
        if dir.is_dir() {
            std::fs::remove_dir_all(&dir)?;
        } else {
            std::fs::remove_file(&dir)?;
        }
        cleaned.dirs += 1;
    }
    Ok(cleaned)
}

/// Whether process `pid` executes `binary`.
fn runs(pid: i32, binary: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_leftover_vmms_and_removes_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        // A leftover "VMM": a sleep process, so the configured binary is sleep.
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        let mut child = std::process::Command::new(&sleep)
            .arg("600")
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::create_dir_all(vms.join("pool-0-a")).unwrap();
        std::fs::write(vms.join("pool-0-a/vmm.pid"), child.id().to_string()).unwrap();
        record_vm_id(&vms.join("pool-0-a"), "vm-0123abcd").unwrap();
        std::fs::create_dir_all(vms.join("pool-1-b")).unwrap();
        // A pid that runs something else must not be killed.
        std::fs::write(vms.join("pool-1-b/vmm.pid"), std::process::id().to_string()).unwrap();
        // An id that is not one is ignored.
        record_vm_id(&vms.join("pool-1-b"), "vm/../x y").unwrap();
        let cleaned = remove_leftovers(&vms, &sleep, None).unwrap();
        assert_eq!(
            cleaned,
            Cleaned {
                processes: 1,
                dirs: 2,
                vm_ids: vec!["vm-0123abcd".into()],
            }
        );
        let status = child.wait().unwrap();
        assert!(!status.success(), "the leftover VMM was not killed");
        assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 0);
        assert_eq!(
            remove_leftovers(&dir.path().join("none"), &sleep, None).unwrap(),
            Cleaned::default()
        );
    }

    use std::os::unix::process::CommandExt;
}
