//! Mount helpers for the PID-1 setup.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

/// Why a setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `mount(2)` failed.
    #[error("cannot mount {fstype} {source_name} on {}: {errno}", target.display())]
    Mount {
        /// Filesystem type.
        fstype: String,
        /// Source (device or pseudo name).
        source_name: String,
        /// Mount point.
        target: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// Moving a mount failed.
    #[error("cannot move the mount {} to {}: {errno}", from.display(), to.display())]
    Move {
        /// Current mount point.
        from: PathBuf,
        /// New mount point.
        to: PathBuf,
        /// The error.
        errno: Errno,
    },
    /// Creating a directory failed.
    #[error("cannot create {}: {source}", path.display())]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Inspecting a path failed.
    #[error("cannot inspect {}: {source}", path.display())]
    Stat {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// One filesystem to mount.
#[derive(Debug, Clone, Copy)]
pub struct Mount<'a> {
    /// Source: a device, or the pseudo-filesystem's name.
    pub source: &'a str,
    /// Mount point.
    pub target: &'a str,
    /// Filesystem type.
    pub fstype: &'a str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: Option<&'a str>,
}

impl Mount<'_> {
    /// Creates the mount point if needed and mounts, unless something is
    /// already mounted there (the kernel mounts devtmpfs on /dev itself).
    pub fn ensure(&self) -> Result<(), MountError> {
        let target = Path::new(self.target);
        ensure_dir(target, 0o755)?;
        if is_mount_point(target)? {
            tracing::debug!(target = self.target, "already mounted");
            return Ok(());
        }
        self.mount()
    }

    /// Mounts unconditionally (the mount point must exist).
    pub fn mount(&self) -> Result<(), MountError> {
        mount(
            Some(self.source),
            self.target,
            Some(self.fstype),
            self.flags,
            self.data,
        )
        .map_err(|errno| MountError::Mount {
            fstype: self.fstype.to_owned(),
            source_name: self.source.to_owned(),
            target: PathBuf::from(self.target),
            errno,
        })
    }
}

/// Creates `path` (and its parents) with `mode` if it does not exist.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), MountError> {
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| MountError::Mkdir {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether a filesystem is mounted at `path` (it lives on another device
/// than its parent; `/` always is).
pub fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    let stat = |p: &Path| {
        fs::metadata(p).map_err(|source| MountError::Stat {
            path: p.to_path_buf(),
            source,
        })
    };
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    Ok(stat(path)?.dev() != stat(parent)?.dev())
}

/// Moves the mount at `from` to `to` (`mount --move`).
pub fn move_mount(from: &Path, to: &Path) -> Result<(), MountError> {
    ensure_dir(to, 0o755)?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|errno| {
        MountError::Move {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            errno,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_proc_are_mount_points_but_a_plain_dir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        ensure_dir(&sub, 0o700).unwrap();
        assert!(!is_mount_point(&sub).unwrap());
    }
}
