//! Assembles the L1's initramfs (a `newc` cpio archive) in memory order:
//! directories are created on demand, host files are streamed in, and every
//! entry is owned by root.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// An archive path was not absolute or contained `..`.
    #[error("bad path in initramfs: {0} (must be absolute, without ..)")]
    BadPath(String),
    /// A host file could not be read.
    #[error("cannot read {path} for the initramfs: {source}")]
    Read {
        /// The host file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file is too large for a newc archive (4 GiB limit).
    #[error("{0} is too large for the initramfs; pass it as a disk asset instead")]
    TooLarge(PathBuf),
    /// Writing the archive failed.
    #[error("cannot write the initramfs to {path}: {source}")]
    Write {
        /// The archive being written.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
enum Content {
    Dir,
    Bytes(Vec<u8>, u32),
    HostFile(PathBuf, u32),
    Symlink(String),
}

/// The contents of an initramfs, keyed by absolute archive path.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Content>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str) -> Result<&mut Self, InitramfsError> {
        let key = key_of(path)?;
        self.parents(&key);
        self.entries.insert(key, Content::Dir);
        Ok(self)
    }

    /// Adds a file with the given bytes and permission bits.
    pub fn bytes(
        &mut self,
        path: &str,
        data: Vec<u8>,
        perm: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let key = key_of(path)?;
        self.parents(&key);
        self.entries
            .insert(key, Content::Bytes(data, perm & 0o7777));
        Ok(self)
    }

    /// Adds a copy of a host file (symlinks followed), keeping its permission bits.
    pub fn host_file(&mut self, path: &str, host: &Path) -> Result<&mut Self, InitramfsError> {
        let meta = std::fs::metadata(host).map_err(|source| InitramfsError::Read {
            path: host.to_path_buf(),
            source,
        })?;
        if meta.len() > u64::from(u32::MAX) {
            return Err(InitramfsError::TooLarge(host.to_path_buf()));
        }
        use std::os::unix::fs::PermissionsExt;
        let perm = meta.permissions().mode() & 0o7777;
        let key = key_of(path)?;
        self.parents(&key);
        self.entries
            .insert(key, Content::HostFile(host.to_path_buf(), perm));
        Ok(self)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        let key = key_of(path)?;
        self.parents(&key);
        self.entries
            .insert(key, Content::Symlink(target.to_string()));
        Ok(self)
    }

    /// Whether the archive already holds `path`.
    pub fn contains(&self, path: &str) -> bool {
        key_of(path).is_ok_and(|k| self.entries.contains_key(&k))
    }

    fn parents(&mut self, key: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = key.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Content::Dir);
        }
    }

    /// Writes the archive to `out`; returns its size in bytes.
    pub fn write_to(&self, out: &Path) -> Result<u64, InitramfsError> {
        let werr = |source| InitramfsError::Write {
            path: out.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(out).map_err(werr)?;
        let mut w = BufWriter::new(file);
        // BTreeMap order puts every directory before its children.
        for (ino, (name, content)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(ino + 1).unwrap_or(u32::MAX);
            let entry = Builder::new(name).ino(ino).uid(0).gid(0);
            w = match content {
                Content::Dir => finish(
                    entry
                        .mode(0o755)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    w,
                    &[],
                )
                .map_err(werr)?,
                Content::Bytes(data, perm) => finish(
                    entry.mode(*perm).set_mode_file_type(ModeFileType::Regular),
                    w,
                    data,
                )
                .map_err(werr)?,
                Content::Symlink(target) => finish(
                    entry.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
                    w,
                    target.as_bytes(),
                )
                .map_err(werr)?,
                Content::HostFile(host, perm) => {
                    let rerr = |source| InitramfsError::Read {
                        path: host.clone(),
                        source,
                    };
                    let mut src = std::fs::File::open(host).map_err(rerr)?;
                    let len = src.metadata().map_err(rerr)?.len();
                    let len =
                        u32::try_from(len).map_err(|_| InitramfsError::TooLarge(host.clone()))?;
                    let mut cw = entry
                        .mode(*perm)
                        .set_mode_file_type(ModeFileType::Regular)
                        .write(w, len);
                    let copied = io::copy(&mut src, &mut cw).map_err(rerr)?;
                    if copied != u64::from(len) {
                        return Err(rerr(io::Error::other("file changed size while copying")));
                    }
                    cw.finish().map_err(werr)?
                }
            };
        }
        let mut w = cpio::newc::trailer(w).map_err(werr)?;
        w.flush().map_err(werr)?;
        let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
        Ok(file.metadata().map_err(werr)?.len())
    }
}

fn finish<W: Write>(entry: Builder, w: W, data: &[u8]) -> io::Result<W> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("entry too large"))?;
    let mut cw = entry.write(w, len);
    cw.write_all(data)?;
    cw.finish()
}

/// `/a/b` -> `a/b`; rejects relative paths and `..`.
fn key_of(path: &str) -> Result<String, InitramfsError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(InitramfsError::BadPath(path.into()));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| InitramfsError::BadPath(path.into()))?,
            ),
            _ => return Err(InitramfsError::BadPath(path.into())),
        }
    }
    if parts.is_empty() {
        return Err(InitramfsError::BadPath(path.into()));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_round_trips_through_a_cpio_reader() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.bin");
        std::fs::write(&host, b"host file").unwrap();
        let mut fs = Initramfs::new();
        fs.bytes("/init", b"#!/bin/sh\n".to_vec(), 0o755).unwrap();
        fs.host_file("/usr/local/bin/tool", &host).unwrap();
        fs.symlink("/bin/sh", "busybox").unwrap();
        let out = dir.path().join("out.cpio");
        fs.write_to(&out).unwrap();

        let mut r = std::fs::File::open(&out).unwrap();
        let mut seen = Vec::new();
        loop {
            let entry = cpio::newc::Reader::new(r).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            let name = entry.entry().name().to_string();
            let mode = entry.entry().mode();
            let mut data = Vec::new();
            let mut entry = entry;
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            seen.push((name, mode, data));
            r = entry.finish().unwrap();
        }
        let names: Vec<_> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "init",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/tool"
            ]
        );
        assert_eq!(seen[2].1, 0o100755);
        assert_eq!(seen[1].2, b"busybox");
        assert_eq!(seen[6].2, b"host file");
    }

    #[test]
    fn rejects_relative_and_parent_paths() {
        let mut fs = Initramfs::new();
        assert!(fs.dir("relative").is_err());
        assert!(fs.dir("/a/../b").is_err());
        assert!(fs.dir("/").is_err());
    }
}
