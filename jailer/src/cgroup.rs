//! The VM's cgroup v2 group: created with its limits before the VMM
//! starts, removed after it ends.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::JailerArgs;
use crate::error::{JailerError, io};

/// Writes `value` to the control file `path`.
pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), JailerError> {
    std::fs::write(path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

/// Removes a VM's cgroup, retrying while its last processes finish exiting.
pub fn remove_cgroup(cgroup: &Path) {
    let mut last = None;
    for _ in 0..150 {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(e) = last {
        eprintln!("jailer: cannot remove cgroup {}: {e}", cgroup.display());
    }
}

/// Creates the VM's cgroup with its limits (controllers enabled on the way
/// down from the cgroup root).
pub(crate) fn setup_cgroup(args: &JailerArgs) -> Result<(), JailerError> {
    let parent = args.cgroup.parent().ok_or_else(|| {
        JailerError::Invalid(format!("cgroup {} has no parent", args.cgroup.display()))
    })?;
    std::fs::create_dir_all(parent).map_err(io(format!("creating cgroup {}", parent.display())))?;
    // Enable the controllers from the root down to the parent.
    let mut dirs: Vec<&Path> = parent.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        let control = dir.join("cgroup.subtree_control");
        if !control.exists() {
            continue;
        }
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for controller in ["cpu", "memory", "pids", "io"] {
            if available.split_whitespace().any(|c| c == controller) {
                // Already enabled, or not allowed here: the limit writes
                // below report what really matters.
                let _ = std::fs::write(&control, format!("+{controller}"));
            }
        }
    }
    match std::fs::create_dir(&args.cgroup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("creating cgroup {}", args.cgroup.display()))(e)),
    }
    if let Some(cpu) = &args.cpu_max {
        write_file(&args.cgroup.join("cpu.max"), cpu)?;
    }
    if let Some(bytes) = args.memory_max {
        write_file(&args.cgroup.join("memory.max"), &bytes.to_string())?;
        let swap = args.cgroup.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
    }
    if let Some(pids) = args.pids_max {
        write_file(&args.cgroup.join("pids.max"), &pids.to_string())?;
    }
    if let Some(limits) = &args.io_max
        && let Some(dir) = args.rw_binds.first()
    {
        let dev = std::fs::metadata(dir)
            .map_err(io(format!("stat {}", dir.display())))?
            .dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        // Only real block devices can be throttled (not tmpfs/overlay).
        let block = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        if major != 0 && block.exists() && args.cgroup.join("io.max").exists() {
            write_file(
                &args.cgroup.join("io.max"),
                &format!("{major}:{minor} {limits}"),
            )?;
        }
    }
    Ok(())
}
