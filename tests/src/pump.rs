//! Reads a scenario's output channel line by line: keeps a bounded copy,
//! writes everything to `output.log`, optionally echoes it live, and notes
//! when the harness's marker lines arrive.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// In-memory output is capped at this many bytes; `output.log` has all of it.
pub const OUTPUT_CAP: usize = 8 << 20;

/// Marker lines, each followed by a space and a value, tagged with a
/// per-run nonce so that a scenario cannot forge them by accident.
#[derive(Debug, Clone)]
pub struct Markers {
    /// `<prefix>-READY`
    pub ready: String,
    /// `<prefix>-ERROR`
    pub error: String,
    /// `<prefix>-EXIT`
    pub exit: String,
}

impl Markers {
    /// Markers for one run.
    pub fn new(nonce: &str) -> Markers {
        Markers {
            ready: format!("KINDLING-{nonce}-READY"),
            error: format!("KINDLING-{nonce}-ERROR"),
            exit: format!("KINDLING-{nonce}-EXIT"),
        }
    }
}

/// What the pump has seen so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// Output lines that were not markers (newline-terminated), capped.
    pub output: String,
    /// Whether `output` was cut at `OUTPUT_CAP`.
    pub truncated: bool,
    /// When the ready marker arrived.
    pub ready_at: Option<Instant>,
    /// The setup error the L1 reported, if any.
    pub setup_error: Option<String>,
    /// When the exit marker arrived, and the code it carried.
    pub exit: Option<(Instant, i32)>,
}

/// A running reader thread.
pub struct Pump {
    seen: Arc<Mutex<Seen>>,
    handle: JoinHandle<()>,
}

impl Pump {
    /// Starts reading `source` until EOF.
    pub fn start(
        source: impl Read + Send + 'static,
        log_path: &Path,
        markers: Markers,
        echo: bool,
    ) -> std::io::Result<Pump> {
        let mut log = std::fs::File::create(log_path)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        let handle = std::thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                let _ = writeln!(log, "{line}");
                let now = Instant::now();
                let mut seen = shared.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(rest) = marker_value(&line, &markers.ready) {
                    let _ = rest;
                    seen.ready_at = Some(now);
                } else if let Some(rest) = marker_value(&line, &markers.error) {
                    seen.setup_error = Some(rest.to_string());
                } else if let Some(rest) = marker_value(&line, &markers.exit) {
                    let code = rest.trim().parse().unwrap_or(-1);
                    seen.exit = Some((now, code));
                } else {
                    if echo {
                        eprintln!("  | {line}");
                    }
                    if seen.output.len() + line.len() < OUTPUT_CAP {
                        seen.output.push_str(&line);
                        seen.output.push('\n');
                    } else {
                        seen.truncated = true;
                    }
                }
            }
        });
        Ok(Pump { seen, handle })
    }

    /// Whether the exit marker has arrived.
    pub fn exited(&self) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exit
            .is_some()
    }

    /// Waits for EOF and returns everything seen.
    pub fn finish(self) -> Seen {
        let _ = self.handle.join();
        match Arc::try_unwrap(self.seen) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(arc) => std::mem::take(&mut *arc.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

/// `Some(value)` when `line` is `marker` followed by end of line or a space.
fn marker_value<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?;
    if rest.is_empty() {
        Some(rest)
    } else {
        rest.strip_prefix(' ')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_markers_from_output() {
        let m = Markers::new("abc");
        let text = format!(
            "boot noise\r\n{} 1.5\nhello\r\nKINDLING-other-EXIT 9\n{} 7\n",
            m.ready, m.exit
        );
        let dir = tempfile::tempdir().unwrap();
        let pump = Pump::start(
            std::io::Cursor::new(text.into_bytes()),
            &dir.path().join("o.log"),
            m,
            false,
        )
        .unwrap();
        let seen = pump.finish();
        assert_eq!(seen.output, "boot noise\nhello\nKINDLING-other-EXIT 9\n");
        assert!(seen.ready_at.is_some());
        assert_eq!(seen.exit.map(|e| e.1), Some(7));
        let log = std::fs::read_to_string(dir.path().join("o.log")).unwrap();
        assert!(log.contains("hello") && log.contains("-EXIT 7"));
    }

    #[test]
    fn a_marker_prefix_inside_a_word_is_not_a_marker() {
        assert_eq!(
            marker_value("KINDLING-n-EXIT 3", "KINDLING-n-EXIT"),
            Some("3")
        );
        assert_eq!(marker_value("KINDLING-n-EXITED 3", "KINDLING-n-EXIT"), None);
    }
}
