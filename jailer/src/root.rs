//! The jail's root filesystem: a tmpfs holding bind mounts of exactly the
//! files the VMM needs (at their host paths) and its own device nodes,
//! entered with `pivot_root`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chown, pivot_root};

use crate::error::{JailerError, io, sys};

/// `path` under `root` (host absolute path re-rooted).
pub(crate) fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind-mounts `source` at the same path under `root`, read-only or
/// read-write (then noexec).
pub(crate) fn bind(root: &Path, source: &Path, writable: bool) -> Result<(), JailerError> {
    let meta = std::fs::metadata(source).map_err(io(format!("stat {}", source.display())))?;
    let target = under(root, source);
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(io(format!("mkdir {}", target.display())))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        std::fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
    }
    let step = format!("bind-mounting {}", source.display());
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(&*step))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if writable {
        flags |= MsFlags::MS_NOEXEC;
    } else {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(sys(format!(
        "remounting {} with its flags",
        source.display()
    )))
}

/// Creates a device node at `host`'s path under `root` for the device
/// `rdev`, of `kind` (char or block), with `mode`, owned by the VM's ids.
pub(crate) fn device_node(
    root: &Path,
    host: &Path,
    kind: SFlag,
    rdev: u64,
    mode: u32,
    uid: Uid,
    gid: Gid,
) -> Result<(), JailerError> {
    let node = under(root, host);
    if let Some(parent) = node.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
    }
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    mknod(
        &node,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(sys(format!("mknod {}", node.display())))?;
    chown(&node, Some(uid), Some(gid)).map_err(sys(format!("chown {}", node.display())))
}

/// Makes `root` the process's `/`: `pivot_root` and detach the old root.
/// When the old root is the initial ramfs (a host booted into its
/// initramfs, like the test L1), `pivot_root` is refused (EINVAL); then the
/// new root is moved over `/` and entered with `chroot`, as `switch_root`
/// does; the old root stays unreachable because the VMM has no
/// capabilities (no CAP_SYS_CHROOT to escape a chroot).
pub(crate) fn enter_root(root: &Path) -> Result<(), JailerError> {
    let old = root.join("old-root");
    std::fs::create_dir(&old).map_err(io("mkdir old-root"))?;
    match pivot_root(root, &old) {
        Ok(()) => {
            std::env::set_current_dir("/").map_err(io("chdir /"))?;
            umount2("/old-root", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
            std::fs::remove_dir("/old-root").map_err(io("rmdir /old-root"))
        }
        Err(nix::Error::EINVAL) => {
            std::fs::remove_dir(&old).map_err(io("rmdir old-root"))?;
            std::env::set_current_dir(root).map_err(io("chdir to the new root"))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("moving the new root over / (initramfs host)"))?;
            nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
            std::env::set_current_dir("/").map_err(io("chdir /"))
        }
        Err(e) => Err(sys("pivot_root")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_rerooted() {
        assert_eq!(
            under(Path::new("/jail"), Path::new("/a/b")),
            PathBuf::from("/jail/a/b")
        );
    }
}
