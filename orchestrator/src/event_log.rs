//! A job's event log on disk: one JSON line per [`JobEvent`], appended as
//! events arrive, read back in pages by followers.
//!
//! The log of an active job is written straight into the archive directory
//! (`<job id>.log.jsonl`), so memory holds none of a job's output: only the
//! counters and a small sparse index of line offsets ([`SparseIndex`]). A
//! page read seeks to the indexed line at or before the requested `seq` and
//! scans forward, so following a long log costs a bounded scan per page,
//! not a scan from the start.
//!
//! The file only grows while the job runs, and readers never read past the
//! length committed by the last completed append, so they see whole lines
//! only. An append that fails is cut back off the file, so the file never
//! holds a partial line either.
//!
//! Output is bounded per job, in bytes and in events ([`LogBounds`]). Every
//! event is charged [`EVENT_COST_BYTES`] on top of its output, so a flood
//! of tiny chunks fills the byte budget as its lines fill the disk. Once a
//! bound is reached, the chunk that crosses it is replaced by a notice and
//! later log chunks are not stored at all: their `seq`s are skipped (the
//! log has gaps from there on; readers never assume it has none). Step
//! results and the job's end are always stored (there are at most a few
//! hundred of them), so the job can finish and report normally.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::api::{JobEvent, JobEventKind};
use protocol::limits::EVENT_COST_BYTES;
use serde::{Deserialize, Serialize};

/// Longest line a log file may contain (a full 64 KiB chunk in base64 is
/// about 88 KiB of JSON).
const MAX_LINE_BYTES: usize = 256 * 1024;

/// Most entries of a [`SparseIndex`]; when exceeded, every other entry is
/// dropped and the stride doubles.
const INDEX_MAX_ENTRIES: usize = 1024;

/// Index stride a new log starts with.
const INDEX_FIRST_STRIDE: u64 = 64;

/// Why the event log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// A file operation failed.
    #[error("event log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Events handed to `append` do not continue the log.
    #[error("event log append starts at seq {got}, expected {expected}")]
    OutOfOrder {
        /// The next seq of the log.
        expected: u64,
        /// The first seq given.
        got: u64,
    },
    /// A line of the file is not an event (the file was changed behind our back).
    #[error("event log {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// Offset of the bad line.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The blocking I/O task died.
    #[error("event log I/O task failed: {0}")]
    Task(String),
}

impl EventLogError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Byte offsets of every `stride`-th event's line, for seeking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseIndex {
    stride: u64,
    /// `(seq, offset)` pairs in ascending order.
    entries: Vec<(u64, u64)>,
}

impl Default for SparseIndex {
    fn default() -> Self {
        Self {
            stride: INDEX_FIRST_STRIDE,
            entries: Vec::new(),
        }
    }
}

impl SparseIndex {
    /// Notes that the line of event `seq` starts at `offset`.
    fn record(&mut self, seq: u64, offset: u64) {
        if !seq.is_multiple_of(self.stride) {
            return;
        }
        self.entries.push((seq, offset));
        if self.entries.len() > INDEX_MAX_ENTRIES {
            self.stride *= 2;
            let stride = self.stride;
            self.entries.retain(|(seq, _)| seq.is_multiple_of(stride));
        }
    }

    /// The indexed `(seq, offset)` closest at or before `seq`.
    pub fn locate(&self, seq: u64) -> (u64, u64) {
        let after = self.entries.partition_point(|(s, _)| *s <= seq);
        after
            .checked_sub(1)
            .map(|i| self.entries[i])
            .unwrap_or((0, 0))
    }
}

/// The bounds of one job's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Most bytes charged: output plus [`EVENT_COST_BYTES`] per event.
    pub max_bytes: u64,
    /// Most events (lines) stored before log chunks are dropped.
    pub max_events: u64,
}

/// What is known about a log file without reading it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    /// The next seq (one more than the last event received, stored or not).
    pub events: u64,
    /// Length of the file, in bytes.
    pub file_bytes: u64,
    /// Output bytes kept (data of the log chunks).
    pub output_bytes: u64,
    /// Whether output was dropped because of a bound.
    pub truncated: bool,
    /// Events stored in the file (fewer than `events` once output is dropped).
    #[serde(default)]
    pub stored_events: u64,
    /// Bytes charged against [`LogBounds::max_bytes`].
    #[serde(default)]
    pub charged_bytes: u64,
    /// Offsets for seeking.
    pub index: SparseIndex,
}

impl LogSummary {
    /// Where to read events `>= after` of the log at `path`.
    pub fn cursor(&self, path: PathBuf, after: u64) -> ReadCursor {
        let (_, offset) = self.index.locate(after);
        ReadCursor {
            path,
            start: offset.min(self.file_bytes),
            end: self.file_bytes,
        }
    }
}

/// The counters of a [`LogSummary`] an append changes.
#[derive(Debug, Clone, Copy)]
struct Counters {
    output_bytes: u64,
    truncated: bool,
    stored_events: u64,
    charged_bytes: u64,
}

impl Counters {
    fn of(summary: &LogSummary) -> Self {
        Self {
            output_bytes: summary.output_bytes,
            truncated: summary.truncated,
            stored_events: summary.stored_events,
            charged_bytes: summary.charged_bytes,
        }
    }
}

/// A byte range of a log file holding whole lines.
#[derive(Debug, Clone)]
pub struct ReadCursor {
    path: PathBuf,
    start: u64,
    end: u64,
}

/// The appending side of a job's log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Arc<File>,
    summary: LogSummary,
    bounds: LogBounds,
}

impl EventLog {
    /// Creates a new, empty log file (owner-only permissions; fails if it
    /// exists). Blocking.
    pub fn create(path: PathBuf, bounds: LogBounds) -> Result<Self, EventLogError> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|err| EventLogError::io(&path, err))?;
        Ok(Self {
            path,
            file: Arc::new(file),
            summary: LogSummary::default(),
            bounds,
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The seq the next appended event must have.
    pub fn next_seq(&self) -> u64 {
        self.summary.events
    }

    /// Counters and index of the log.
    pub fn summary(&self) -> &LogSummary {
        &self.summary
    }

    /// Where to read events `>= after`.
    pub fn cursor(&self, after: u64) -> ReadCursor {
        self.summary.cursor(self.path.clone(), after)
    }

    /// Appends `events`, which must continue the log without a gap. Output
    /// over a bound is dropped (see the module docs).
    pub async fn append(&mut self, events: &mut [JobEvent]) -> Result<(), EventLogError> {
        let mut expected = self.summary.events;
        let mut next = Counters::of(&self.summary);
        let mut buffer = Vec::new();
        let mut index_points = Vec::with_capacity(events.len());
        for event in events.iter_mut() {
            if event.seq != expected {
                return Err(EventLogError::OutOfOrder {
                    expected,
                    got: event.seq,
                });
            }
            expected += 1;
            if let JobEventKind::LogChunk(chunk) = &mut event.event {
                if next.truncated {
                    continue;
                }
                let len = chunk.data.len() as u64;
                let cost = len.saturating_add(EVENT_COST_BYTES as u64);
                if next.stored_events >= self.bounds.max_events {
                    next.truncated = true;
                    chunk.data = format!(
                        "\n[kindling: log limit of {} events reached; \
                         further output of this job is dropped]\n",
                        self.bounds.max_events
                    )
                    .into_bytes();
                } else if next.charged_bytes.saturating_add(cost) > self.bounds.max_bytes {
                    next.truncated = true;
                    chunk.data = format!(
                        "\n[kindling: output limit of {} bytes reached (output plus {} \
                         bytes per event); further output of this job is dropped]\n",
                        self.bounds.max_bytes, EVENT_COST_BYTES
                    )
                    .into_bytes();
                } else {
                    next.output_bytes += len;
                }
            }
            next.charged_bytes = next
                .charged_bytes
                .saturating_add(EVENT_COST_BYTES as u64)
                .saturating_add(match &event.event {
                    JobEventKind::LogChunk(chunk) => chunk.data.len() as u64,
                    _ => 0,
                });
            next.stored_events += 1;
            index_points.push((event.seq, self.summary.file_bytes + buffer.len() as u64));
            serde_json::to_writer(&mut buffer, &event).map_err(|err| {
                EventLogError::io(&self.path, io::Error::new(io::ErrorKind::InvalidData, err))
            })?;
            buffer.push(b'\n');
        }
        if !buffer.is_empty() {
            let file = Arc::clone(&self.file);
            let old_len = self.summary.file_bytes;
            let buffer_len = buffer.len() as u64;
            tokio::task::spawn_blocking(move || write_or_roll_back(&file, &buffer, old_len))
                .await
                .map_err(|err| EventLogError::Task(err.to_string()))?
                .map_err(|err| EventLogError::io(&self.path, err))?;
            self.summary.file_bytes += buffer_len;
        }
        self.summary.events = expected;
        self.summary.output_bytes = next.output_bytes;
        self.summary.truncated = next.truncated;
        self.summary.stored_events = next.stored_events;
        self.summary.charged_bytes = next.charged_bytes;
        for (seq, offset) in index_points {
            self.summary.index.record(seq, offset);
        }
        Ok(())
    }

    /// Flushes the file to stable storage.
    pub async fn sync(&self) -> Result<(), EventLogError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|err| EventLogError::Task(err.to_string()))?
            .map_err(|err| EventLogError::io(&self.path, err))
    }
}

fn write_or_roll_back(file: &File, buffer: &[u8], old_len: u64) -> io::Result<()> {
    let mut writer = file;
    if let Err(err) = writer.write_all(buffer) {
        // Best effort: cut the partial line off so readers never see it.
        let _ = file.set_len(old_len);
        return Err(err);
    }
    Ok(())
}

/// Reads the events `>= after` in `cursor`'s range: at most `max_events`,
/// and no more output than `max_bytes` unless the first event alone has more.
/// Blocking.
pub fn read_page(
    cursor: &ReadCursor,
    after: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<Vec<JobEvent>, EventLogError> {
    let path = &cursor.path;
    let mut events = Vec::new();
    if cursor.start >= cursor.end {
        return Ok(events);
    }
    let mut file = File::open(path).map_err(|err| EventLogError::io(path, err))?;
    file.seek(SeekFrom::Start(cursor.start))
        .map_err(|err| EventLogError::io(path, err))?;
    let mut reader = BufReader::new(file.take(cursor.end - cursor.start));
    let mut offset = cursor.start;
    let mut line = Vec::new();
    let mut bytes = 0usize;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|err| EventLogError::io(path, err))?;
        if read == 0 {
            break;
        }
        let corrupt = |reason: String| EventLogError::Corrupt {
            path: path.clone(),
            offset,
            reason,
        };
        if line.last() != Some(&b'\n') {
            return Err(corrupt("line too long or unterminated".into()));
        }
        let event: JobEvent =
            serde_json::from_slice(&line).map_err(|err| corrupt(err.to_string()))?;
        offset += read as u64;
        if event.seq < after {
            continue;
        }
        let size = match &event.event {
            JobEventKind::LogChunk(chunk) => chunk.data.len(),
            _ => 0,
        };
        if !events.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        events.push(event);
        if events.len() >= max_events {
            break;
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use protocol::message::{JobFinished, JobResult, LogChunk, OutputStream, StepStarted};

    use super::*;

    fn chunk(seq: u64, data: &[u8]) -> JobEvent {
        JobEvent {
            seq,
            event: JobEventKind::LogChunk(LogChunk {
                step: 0,
                stream: OutputStream::Stdout,
                seq,
                data: data.to_vec(),
            }),
        }
    }

    fn bounds(max_bytes: u64) -> LogBounds {
        LogBounds {
            max_bytes,
            max_events: u64::MAX,
        }
    }

    fn data_of(event: &JobEvent) -> &[u8] {
        match &event.event {
            JobEventKind::LogChunk(chunk) => &chunk.data,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    fn read_all(log: &EventLog, after: u64) -> Vec<JobEvent> {
        read_page(&log.cursor(after), after, usize::MAX, usize::MAX).unwrap()
    }

    #[tokio::test]
    async fn append_then_read_pages_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::create(dir.path().join("j.log.jsonl"), bounds(1 << 20)).unwrap();
        let started = JobEvent {
            seq: 0,
            event: JobEventKind::StepStarted(StepStarted {
                step: 0,
                name: "s".into(),
            }),
        };
        log.append(&mut [started.clone(), chunk(1, b"one\n")])
            .await
            .unwrap();
        log.append(&mut [chunk(2, b"two\n"), chunk(3, &[0, 0xff])])
            .await
            .unwrap();
        assert_eq!(log.next_seq(), 4);
        let all = read_all(&log, 0);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], started);
        assert_eq!(data_of(&all[3]), &[0, 0xff]);
        let tail = read_all(&log, 2);
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        assert!(read_all(&log, 4).is_empty());
        let limited = read_page(&log.cursor(0), 0, 2, usize::MAX).unwrap();
        assert_eq!(limited.len(), 2);
        let by_bytes = read_page(&log.cursor(1), 1, 10, 5).unwrap();
        assert_eq!(by_bytes.len(), 1, "4 + 4 bytes exceed 5");
        let first_always = read_page(&log.cursor(1), 1, 10, 1).unwrap();
        assert_eq!(first_always.len(), 1, "a page always holds one event");
    }

    #[tokio::test]
    async fn gaps_are_refused_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log.jsonl");
        let mut log = EventLog::create(path.clone(), bounds(1 << 20)).unwrap();
        let err = log.append(&mut [chunk(1, b"x")]).await.unwrap_err();
        assert!(matches!(
            err,
            EventLogError::OutOfOrder {
                expected: 0,
                got: 1
            }
        ));
        assert_eq!(log.summary().file_bytes, 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            EventLog::create(path, bounds(1)).is_err(),
            "never reuses a file"
        );
    }

    #[tokio::test]
    async fn output_over_the_limit_is_dropped_but_step_events_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cost = EVENT_COST_BYTES as u64;
        // Room for two 8-byte chunks with their fixed cost, not a third.
        let max = 2 * (8 + cost) + 4;
        let mut log = EventLog::create(dir.path().join("j.log.jsonl"), bounds(max)).unwrap();
        let finished = JobEvent {
            seq: 5,
            event: JobEventKind::JobFinished(JobFinished {
                result: JobResult::Succeeded,
            }),
        };
        let step = |seq| JobEvent {
            seq,
            event: JobEventKind::StepStarted(StepStarted {
                step: 0,
                name: "s".into(),
            }),
        };
        log.append(&mut [
            chunk(0, b"12345678"),
            chunk(1, b"abcdefgh"),
            chunk(2, b"more"),
            chunk(3, b"dropped"),
            step(4),
            finished.clone(),
        ])
        .await
        .unwrap();
        let all = read_all(&log, 0);
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [0, 1, 2, 4, 5]
        );
        assert_eq!(data_of(&all[0]), b"12345678");
        assert_eq!(data_of(&all[1]), b"abcdefgh");
        assert!(
            String::from_utf8_lossy(data_of(&all[2]))
                .contains(&format!("output limit of {max} bytes")),
            "notice replaces the chunk that crosses the limit"
        );
        assert_eq!(all[3], step(4), "step events are kept");
        assert_eq!(all[4], finished);
        let summary = log.summary();
        assert!(summary.truncated);
        assert_eq!(summary.output_bytes, 16);
        assert_eq!(summary.events, 6, "the next seq counts dropped events");
        assert_eq!(summary.stored_events, 5);
        // A later append continues after the gap.
        log.append(&mut [chunk(6, b"late")]).await.unwrap();
        assert_eq!(log.next_seq(), 7);
        assert_eq!(read_all(&log, 0).len(), 5);
        assert!(read_all(&log, 5).iter().all(|e| e.seq == 5));
    }

    #[tokio::test]
    async fn tiny_chunks_are_charged_their_fixed_cost() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::create(dir.path().join("j.log.jsonl"), bounds(1024)).unwrap();
        let mut seq = 0;
        while seq < 51_200 {
            let mut batch: Vec<_> = (seq..seq + 256).map(|s| chunk(s, b"x")).collect();
            log.append(&mut batch).await.unwrap();
            seq += 256;
        }
        let summary = log.summary();
        let kept = 1024 / (1 + EVENT_COST_BYTES as u64);
        assert_eq!(summary.output_bytes, kept);
        assert_eq!(
            summary.stored_events,
            kept + 1,
            "the kept chunks and the notice"
        );
        assert!(summary.file_bytes < 4096, "{} bytes", summary.file_bytes);
        assert_eq!(log.next_seq(), 51_200);
    }

    #[tokio::test]
    async fn the_events_cap_drops_later_chunks_with_one_notice() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = LogBounds {
            max_bytes: u64::MAX,
            max_events: 10,
        };
        let mut log = EventLog::create(dir.path().join("j.log.jsonl"), bounds).unwrap();
        let mut batch: Vec<_> = (0..100).map(|s| chunk(s, b"line\n")).collect();
        batch.push(JobEvent {
            seq: 100,
            event: JobEventKind::JobFinished(JobFinished {
                result: JobResult::Succeeded,
            }),
        });
        log.append(&mut batch).await.unwrap();
        let all = read_all(&log, 0);
        assert_eq!(all.len(), 12, "10 chunks, the notice, the end");
        assert!(String::from_utf8_lossy(data_of(&all[10])).contains("log limit of 10 events"));
        assert_eq!(all[11].seq, 100);
        assert!(matches!(all[11].event, JobEventKind::JobFinished(_)));
    }

    #[tokio::test]
    async fn index_stays_small_and_seeks_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::create(dir.path().join("j.log.jsonl"), bounds(u64::MAX)).unwrap();
        let total = 100_000u64;
        let mut seq = 0;
        while seq < total {
            let mut batch: Vec<_> = (seq..(seq + 256).min(total))
                .map(|s| chunk(s, s.to_string().as_bytes()))
                .collect();
            log.append(&mut batch).await.unwrap();
            seq += 256;
        }
        let index = &log.summary().index;
        assert!(index.entries.len() <= INDEX_MAX_ENTRIES);
        assert!(index.stride > INDEX_FIRST_STRIDE);
        for after in [0, 1, 63, 64, 65_537, total - 1] {
            let (indexed, _) = index.locate(after);
            assert!(indexed <= after);
            assert!(after - indexed < index.stride);
            let page = read_page(&log.cursor(after), after, 1, usize::MAX).unwrap();
            assert_eq!(page[0].seq, after);
            assert_eq!(data_of(&page[0]), after.to_string().as_bytes());
        }
    }

    #[test]
    fn corrupt_lines_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.log.jsonl");
        std::fs::write(&path, b"{\"seq\":0}\n").unwrap();
        let summary = LogSummary {
            events: 1,
            file_bytes: 10,
            ..LogSummary::default()
        };
        let err = read_page(&summary.cursor(path, 0), 0, 10, 10).unwrap_err();
        assert!(
            matches!(err, EventLogError::Corrupt { offset: 0, .. }),
            "{err}"
        );
    }
}
