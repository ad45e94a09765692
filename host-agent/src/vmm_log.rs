//! The VMM's stdout/stderr file, read without trusting the VM directory.
//!
//! The VM directory belongs to the VM's uid and is bound read-write into
//! the jail, so a compromised VMM can rename, delete or replace any name in
//! it (with a symlink to `/etc/shadow`, a FIFO, a file of 8 GiB). The host
//! agent (root) therefore never opens the log by name after the VMM
//! started: it creates the file itself before the spawn (`O_EXCL`, so
//! nothing planted there is followed), hands duplicates of that open file
//! to the VMM as stdout and stderr, and keeps one for itself. Reading goes
//! through that descriptor with `pread`, at most [`TAIL_BYTES`] from the
//! end of whatever size the file has: a rename does not matter, a FIFO
//! cannot appear in its place, and a huge (even sparse) file costs one
//! bounded read.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// How many bytes at the end of the log are read for a failure reason.
pub const TAIL_BYTES: usize = 4096;
/// How many of the last lines make the tail.
pub const TAIL_LINES: usize = 5;
/// The longest tail returned, in bytes (it goes into a failure reason).
pub const TAIL_MAX_LEN: usize = 1536;

/// The VMM's log file, as the agent opened it.
#[derive(Debug)]
pub struct VmmLog {
    file: File,
}

impl VmmLog {
    /// Creates `path` (which must not exist yet; a symlink there is not
    /// followed) readable and writable by the agent only.
    pub fn create(path: &Path) -> std::io::Result<VmmLog> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(VmmLog { file })
    }

    /// A new descriptor of the same open file, for the VMM's stdout or
    /// stderr.
    pub fn writer(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// The last [`TAIL_LINES`] lines of the log (from its last
    /// [`TAIL_BYTES`]), joined by " / ", with control characters
    /// replaced and at most [`TAIL_MAX_LEN`] bytes; empty if there is
    /// nothing (or the file cannot be read).
    pub fn tail(&self) -> String {
        let bytes = match self.last_bytes(TAIL_BYTES) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("cannot read the VMM's log: {e}");
                return String::new();
            }
        };
        tail_of(&bytes.data, bytes.cut)
    }

    /// Up to `max` bytes from the end of the file, and whether the read
    /// started after the file's start.
    fn last_bytes(&self, max: usize) -> std::io::Result<LastBytes> {
        let len = self.file.metadata()?.len();
        let start = len.saturating_sub(max as u64);
        let mut data = vec![0; (len - start) as usize];
        let mut filled = 0;
        while filled < data.len() {
            match self
                .file
                .read_at(&mut data[filled..], start + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        data.truncate(filled);
        Ok(LastBytes {
            data,
            cut: start > 0,
        })
    }
}

struct LastBytes {
    data: Vec<u8>,
    /// The read began mid-file (its first line may be partial).
    cut: bool,
}

/// The last lines of `data` as one line; `cut` drops the first (partial)
/// line.
fn tail_of(data: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.lines().collect();
    if cut && lines.len() > 1 {
        lines.remove(0);
    }
    let lines: Vec<String> = lines
        .iter()
        .map(|l| {
            l.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let joined = lines[start..].join(" / ");
    if joined.len() <= TAIL_MAX_LEN {
        joined
    } else {
        crate::reason::bounded(&joined, TAIL_MAX_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = VmmLog::create(&dir.path().join("vmm.log")).unwrap();
        let mut w = log.writer().unwrap();
        for i in 0..20 {
            writeln!(w, "line {i}").unwrap();
        }
        assert_eq!(
            log.tail(),
            "line 15 / line 16 / line 17 / line 18 / line 19"
        );
    }

    #[test]
    fn an_empty_log_has_an_empty_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = VmmLog::create(&dir.path().join("vmm.log")).unwrap();
        assert_eq!(log.tail(), "");
    }

    #[test]
    fn a_planted_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root:$6$hash").unwrap();
        let path = dir.path().join("vmm.log");
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert!(VmmLog::create(&path).is_err());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root:$6$hash");
    }

    #[test]
    fn a_huge_sparse_log_costs_one_bounded_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = VmmLog::create(&dir.path().join("vmm.log")).unwrap();
        let mut w = log.writer().unwrap();
        writeln!(w, "started").unwrap();
        w.set_len(8 << 30).unwrap();
        let t = std::time::Instant::now();
        let tail = log.tail();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(tail.len() <= TAIL_MAX_LEN, "{}", tail.len());
        assert!(!tail.contains('\0'));
    }

    #[test]
    fn long_lines_are_bounded() {
        let text = format!("{}\nlast\n", "y".repeat(10_000));
        let tail = tail_of(text.as_bytes(), false);
        assert!(tail.len() <= TAIL_MAX_LEN);
        assert!(tail.ends_with("last"), "{tail}");
    }
}
