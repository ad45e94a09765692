//! The archive sink: where finished jobs go. A directory with, per job,
//!
//! * `<job id>.log.jsonl`: the job's events, one JSON line each (written
//!   while the job runs, see [`crate::event_log`]);
//! * `<job id>.json`: the [`ArchiveRecord`] (final report and log summary),
//!   written atomically (temporary file, fsync, rename, directory fsync)
//!   once the log is complete and synced.
//!
//! A job is archived exactly when its record exists. A log without a record
//! belongs to a job that was active when a previous orchestrator process
//! died; [`Archive::open`] removes such leftovers (the queue of that process
//! is gone with it). Secrets are never part of either file: the record is
//! built from the report, which has no secret field, and log output is
//! masked by the runner agent before it leaves the guest.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use protocol::limits;
use protocol::message::JobId;
use protocol::validation::is_identifier;
use serde::{Deserialize, Serialize};

use crate::event_log::LogSummary;
use crate::report::JobReport;

/// Largest record file read back (a report of 256 steps plus the log index
/// is well under this).
const MAX_RECORD_BYTES: u64 = 4 * 1024 * 1024;

const RECORD_SUFFIX: &str = ".json";
const LOG_SUFFIX: &str = ".log.jsonl";
const TMP_SUFFIX: &str = ".tmp";

/// Why the archive could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file operation failed.
    #[error("archive {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A record does not parse.
    #[error("archive record {path} is corrupt: {reason}")]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The blocking I/O task died.
    #[error("archive I/O task failed: {0}")]
    Task(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything kept of a finished job besides its log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    /// The final report.
    pub report: JobReport,
    /// Size, counters and seek index of the log file.
    pub log: LogSummary,
}

/// The archive directory.
#[derive(Debug, Clone)]
pub struct Archive {
    dir: PathBuf,
}

impl Archive {
    /// Opens (creating it if needed) the archive at `dir` and removes what an
    /// interrupted previous run left: temporary files and logs without a
    /// record. Returns the archive and the number of files removed. Blocking.
    pub fn open(dir: PathBuf) -> Result<(Self, usize), ArchiveError> {
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan_log = name
                .strip_suffix(LOG_SUFFIX)
                .is_some_and(|id| !dir.join(format!("{id}{RECORD_SUFFIX}")).exists());
            if name.ends_with(TMP_SUFFIX) || orphan_log {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_error(&path))?;
                removed += 1;
            }
        }
        Ok((Self { dir }, removed))
    }

    /// The archive directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the log of job `id`, or `None` if `id` cannot be a job id
    /// (so a path from a request can never leave the directory).
    pub fn log_path(&self, id: &JobId) -> Option<PathBuf> {
        self.file_path(id, LOG_SUFFIX)
    }

    fn file_path(&self, id: &JobId, suffix: &str) -> Option<PathBuf> {
        let valid = id.0.len() <= limits::MAX_ID_LEN && is_identifier(&id.0);
        valid.then(|| self.dir.join(format!("{id}{suffix}")))
    }

    /// Writes the record of a finished job atomically.
    pub async fn store(&self, record: &ArchiveRecord) -> Result<(), ArchiveError> {
        let id = &record.report.status.id;
        let path = self
            .file_path(id, RECORD_SUFFIX)
            .ok_or_else(|| ArchiveError::Corrupt {
                path: self.dir.clone(),
                reason: format!("job id {id:?} is not an identifier"),
            })?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|err| ArchiveError::Corrupt {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_atomically(&dir, &path, &bytes))
            .await
            .map_err(|err| ArchiveError::Task(err.to_string()))?
    }

    /// The record of job `id`, if it was archived.
    pub async fn load(&self, id: &JobId) -> Result<Option<ArchiveRecord>, ArchiveError> {
        let Some(path) = self.file_path(id, RECORD_SUFFIX) else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || read_record(&path))
            .await
            .map_err(|err| ArchiveError::Task(err.to_string()))?
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn read_record(path: &Path) -> Result<Option<ArchiveRecord>, ArchiveError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_error(path)(err)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    let corrupt = |reason: String| ArchiveError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(corrupt(format!("larger than {MAX_RECORD_BYTES} bytes")));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| corrupt(err.to_string()))
}

#[cfg(test)]
mod tests {
    use protocol::api::{JobState, JobStatus};

    use super::*;

    fn record(id: &str) -> ArchiveRecord {
        ArchiveRecord {
            report: JobReport {
                status: JobStatus {
                    id: JobId(id.into()),
                    name: "build".into(),
                    runs_on: vec!["linux".into()],
                    state: JobState::Succeeded,
                    steps: vec![],
                },
                detail: None,
                vm_id: None,
                timeout_secs: 60,
                submitted_at_ms: 1,
                assigned_at_ms: None,
                finished_at_ms: Some(2),
            },
            log: LogSummary::default(),
        }
    }

    #[tokio::test]
    async fn records_round_trip_and_unknown_ids_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let (archive, removed) = Archive::open(dir.path().join("archive")).unwrap();
        assert_eq!(removed, 0);
        let rec = record("job-1");
        archive.store(&rec).await.unwrap();
        assert_eq!(
            archive.load(&rec.report.status.id).await.unwrap(),
            Some(rec)
        );
        assert_eq!(archive.load(&JobId("job-2".into())).await.unwrap(), None);
        for bad in ["../etc/passwd", ".hidden", "", "a/b"] {
            let id = JobId(bad.into());
            assert_eq!(archive.load(&id).await.unwrap(), None, "{bad}");
            assert_eq!(archive.log_path(&id), None, "{bad}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(archive.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["job-1.json"], "no temporary file remains");
    }

    #[tokio::test]
    async fn open_removes_leftovers_of_an_interrupted_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let (archive, _) = Archive::open(path.clone()).unwrap();
        archive.store(&record("job-done")).await.unwrap();
        std::fs::write(path.join("job-done.log.jsonl"), b"").unwrap();
        std::fs::write(path.join("job-lost.log.jsonl"), b"").unwrap();
        std::fs::write(path.join("job-x.json.tmp"), b"{").unwrap();
        let (_, removed) = Archive::open(path.clone()).unwrap();
        assert_eq!(removed, 2);
        assert!(path.join("job-done.log.jsonl").exists());
        assert!(!path.join("job-lost.log.jsonl").exists());
    }

    #[tokio::test]
    async fn corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (archive, _) = Archive::open(dir.path().to_owned()).unwrap();
        std::fs::write(dir.path().join("job-1.json"), b"{not json").unwrap();
        let err = archive.load(&JobId("job-1".into())).await.unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
    }
}
