//! The agent's own bookkeeping of its VMs, outside every jailed directory.
//!
//! What a clean-up acts on after a crash (which process group to kill,
//! which VM id to deregister) must not come from the VM directory: that
//! directory belongs to the VM's uid, so a compromised VMM could point any
//! file there at another VM, or at a stranger. Each VM therefore has a
//! record `<state_dir>/vm-records/<name>.json`, in a directory only root
//! can enter (0700), written by the agent alone (0600, via a temporary file
//! and a rename, so a crash leaves the old record or the new one), and
//! removed last in the VM's teardown. Reads are bounded, do not follow
//! symlinks and validate every field.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process::ProcessIdentity;

/// The records' directory under the state directory.
pub const RECORDS_DIR: &str = "vm-records";
/// The longest record read, in bytes.
pub const MAX_RECORD_LEN: u64 = 4096;
/// The longest VM name or VM id a record may hold.
const MAX_ID_LEN: usize = 128;

/// Errors writing or reading a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The record is not one the agent could have written.
    #[error("{path}: {reason}")]
    Invalid {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What the agent knows about one of its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// The VM's name (its directory and cgroup name).
    pub name: String,
    /// The process the agent spawned for it (the VMM, or the jailer whose
    /// process group holds the VMM), once spawned.
    #[serde(default)]
    pub process: Option<ProcessIdentity>,
    /// Its id at the orchestrator, once known.
    #[serde(default)]
    pub vm_id: Option<String>,
}

/// Whether `s` may be a VM name or VM id (also safe as a file name).
pub fn is_plausible_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl VmRecord {
    fn check(&self) -> Result<(), String> {
        if !is_plausible_id(&self.name) {
            return Err("bad VM name".into());
        }
        if let Some(id) = &self.vm_id
            && !is_plausible_id(id)
        {
            return Err("bad VM id".into());
        }
        if let Some(p) = &self.process
            && p.pid <= 1
        {
            return Err(format!("bad pid {}", p.pid));
        }
        Ok(())
    }
}

/// `<state_dir>/vm-records`.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORDS_DIR)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |source| RecordError::Io { what, path, source }
}

/// Creates the records' directory (0700), or checks that the existing one
/// is a real directory of ours and makes it 0700.
pub fn ensure_dir(dir: &Path) -> Result<(), RecordError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io("inspecting", dir))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(RecordError::Invalid {
            path: dir.to_path_buf(),
            reason: "not a directory owned by the agent".into(),
        });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("protecting", dir))
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes `record` atomically (temporary file, fsync, rename).
pub fn write(dir: &Path, record: &VmRecord) -> Result<(), RecordError> {
    let path = path_of(dir, &record.name);
    record.check().map_err(|reason| RecordError::Invalid {
        path: path.clone(),
        reason,
    })?;
    ensure_dir(dir)?;
    let tmp = dir.join(format!(".{}.json.tmp", record.name));
    let _ = std::fs::remove_file(&tmp);
    let text = serde_json::to_vec(record).map_err(|e| RecordError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))
}

/// Removes the record of VM `name` (absent is fine).
pub fn remove(dir: &Path, name: &str) -> Result<(), RecordError> {
    let path = path_of(dir, name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &path)(e)),
    }
}

/// Reads one record: a regular file (not followed if a symlink), at most
/// [`MAX_RECORD_LEN`] bytes, every field valid.
pub fn read(path: &Path) -> Result<VmRecord, RecordError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io("opening", path))?;
    let invalid = |reason: String| RecordError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let meta = file.metadata().map_err(io("inspecting", path))?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > MAX_RECORD_LEN {
        return Err(invalid(format!(
            "{} bytes, over {MAX_RECORD_LEN}",
            meta.len()
        )));
    }
    let mut text = Vec::new();
    file.take(MAX_RECORD_LEN + 1)
        .read_to_end(&mut text)
        .map_err(io("reading", path))?;
    if text.len() as u64 > MAX_RECORD_LEN {
        return Err(invalid("grew past the limit".into()));
    }
    let record: VmRecord = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    record.check().map_err(invalid)?;
    if path.file_name() != path_of(Path::new(""), &record.name).file_name() {
        return Err(invalid(format!("names VM {}", record.name)));
    }
    Ok(record)
}

/// Every record in `dir` (none if it does not exist). Entries that are not
/// valid records are logged and returned as paths, for removal.
pub fn read_all(dir: &Path) -> Result<(Vec<VmRecord>, Vec<PathBuf>), RecordError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut records = Vec::new();
    let mut junk = Vec::new();
    for entry in entries {
        let path = entry.map_err(io("listing", dir))?.path();
        match read(&path) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!("ignoring a VM record: {e}");
                junk.push(path);
            }
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((records, junk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            process: Some(ProcessIdentity {
                pid: 4242,
                start_time: 99,
            }),
            vm_id: Some("vm-0123".into()),
        }
    }

    #[test]
    fn records_round_trip_in_a_private_directory() {
        let state = tempfile::tempdir().unwrap();
        let dir = records_dir(state.path());
        write(&dir, &record("pool-0-a")).unwrap();
        write(&dir, &record("pool-1-b")).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file_mode = std::fs::metadata(dir.join("pool-0-a.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(file_mode, 0o600);
        let (records, junk) = read_all(&dir).unwrap();
        assert_eq!(records, vec![record("pool-0-a"), record("pool-1-b")]);
        assert!(junk.is_empty());
        remove(&dir, "pool-0-a").unwrap();
        remove(&dir, "pool-0-a").unwrap();
        assert_eq!(read_all(&dir).unwrap().0.len(), 1);
        assert_eq!(read_all(&state.path().join("none")).unwrap().0.len(), 0);
    }

    #[test]
    fn bad_names_and_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "..", "../x", "a/b", "a b"] {
            assert!(write(dir.path(), &record(bad)).is_err(), "{bad:?}");
        }
        let mut r = record("ok");
        r.vm_id = Some("vm/../x y".into());
        assert!(write(dir.path(), &r).is_err());
    }

    #[test]
    fn hostile_files_are_not_records() {
        let state = tempfile::tempdir().unwrap();
        let dir = records_dir(state.path());
        write(&dir, &record("good")).unwrap();
        // A symlink, a FIFO, a huge sparse file, garbage, a record under
        // another VM's name: none is read as a record, none hangs.
        std::fs::write(state.path().join("secret"), "{}").unwrap();
        std::os::unix::fs::symlink(state.path().join("secret"), dir.join("link.json")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::File::create(dir.join("huge.json"))
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        std::fs::write(dir.join("garbage.json"), "not json").unwrap();
        std::fs::write(
            dir.join("other.json"),
            serde_json::to_vec(&record("good")).unwrap(),
        )
        .unwrap();
        let (records, junk) = read_all(&dir).unwrap();
        assert_eq!(records, vec![record("good")]);
        assert_eq!(junk.len(), 5);
    }
}
