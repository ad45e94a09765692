//! The writable root: an overlay of the read-only base image and a per-VM
//! layer, switched to with `pivot_root`.
//!
//! The kernel mounts the base image (erofs, read-only) as `/`. The base is
//! shared by every VM and never written; the job writes into a layer that
//! dies with the VM:
//!
//! ```text
//! /run                          tmpfs (the base image has an empty /run)
//! /run/kindling/layer           tmpfs, or the scratch disk (ext4) if kindling.scratch= names one
//! /run/kindling/layer/upper     overlay upperdir: everything the job writes
//! /run/kindling/layer/work      overlay workdir
//! /run/kindling/root            overlay: lowerdir=/ (the base), upper, work
//! ```
//!
//! `lowerdir=/` is the base filesystem itself: an overlay layer is one
//! filesystem, so the mounts stacked on `/` (proc, /run...) are not part of
//! it. Then /dev, /proc and /sys are moved into the new root and
//! `pivot_root(".", ".")` followed by a lazy unmount of the old root (the
//! sequence pivot_root(2) documents) makes the overlay `/`. The old root's
//! mounts, including the staging /run, disappear with it; the overlay keeps
//! private references to its layers, so they stay alive.
//!
//! The overlay is mounted `volatile`: it skips every sync of the upper
//! layer, which nobody will ever read after the VM ends.
//!
//! A few directories bypass the overlay ([`DIRECT_DIRS`]): Docker and
//! containerd build overlay filesystems of their own under them, and
//! overlayfs refuses an overlay as an upper layer (Docker would fall back
//! to its slow `vfs` driver). They are bind mounts of directories of the
//! writable layer itself (`/run/kindling/layer/direct/...`), so they are
//! just as ephemeral.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::unistd::{chdir, pivot_root};

use super::mounts::{Mount, MountError, ensure_dir, move_mount};

/// Where the staging tmpfs is mounted (a directory of the base image).
const STAGING: &str = "/run";
/// Mount point of the writable layer.
const LAYER: &str = "/run/kindling/layer";
/// Mount point of the overlay, before it becomes `/`.
const NEW_ROOT: &str = "/run/kindling/root";
/// Pseudo filesystems moved from the old root into the new one.
const MOVED_MOUNTS: [&str; 3] = ["/dev", "/proc", "/sys"];
/// Directories (relative to `/`) backed directly by the writable layer.
pub const DIRECT_DIRS: [&str; 2] = ["var/lib/docker", "var/lib/containerd"];
/// How long to wait for the scratch device node to appear.
const SCRATCH_WAIT: Duration = Duration::from_secs(5);

/// Why the overlay root could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A mount or directory step failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The base image lacks a directory the setup needs.
    #[error("the base image has no {0} directory")]
    MissingDir(&'static str),
    /// The scratch device never showed up.
    #[error("scratch device {} did not appear within {:?}", .0.display(), SCRATCH_WAIT)]
    NoScratchDevice(PathBuf),
    /// Making the mount tree private failed.
    #[error("cannot make the mount tree private: {0}")]
    Private(Errno),
    /// Switching roots failed.
    #[error("cannot switch to the overlay root ({step}): {errno}")]
    Pivot {
        /// Which call failed.
        step: &'static str,
        /// The error.
        errno: Errno,
    },
}

/// What backs the per-VM writable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritableLayer {
    /// Guest memory.
    Tmpfs,
    /// A block device holding an empty ext4 filesystem.
    Disk(PathBuf),
}

/// Builds the overlay root and makes it `/`. Needs /dev, /proc and /sys
/// mounted on the base root. Returns the problems that do not prevent a
/// job from running (a [`DIRECT_DIRS`] entry that could not be set up).
pub fn switch_to_overlay_root(layer: &WritableLayer) -> Result<Vec<String>, RootfsError> {
    if !Path::new(STAGING).is_dir() {
        return Err(RootfsError::MissingDir(STAGING));
    }
    // pivot_root refuses shared mounts; nothing here should propagate anyway.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(RootfsError::Private)?;
    Mount {
        source: "tmpfs",
        target: STAGING,
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: Some("mode=0755"),
    }
    .mount()?;
    ensure_dir(Path::new(LAYER), 0o755)?;
    mount_layer(layer)?;
    let upper = format!("{LAYER}/upper");
    let work = format!("{LAYER}/work");
    ensure_dir(Path::new(&upper), 0o755)?;
    ensure_dir(Path::new(&work), 0o755)?;
    ensure_dir(Path::new(NEW_ROOT), 0o755)?;
    let options = format!("lowerdir=/,upperdir={upper},workdir={work},volatile");
    Mount {
        source: "overlay",
        target: NEW_ROOT,
        fstype: "overlay",
        flags: MsFlags::empty(),
        data: Some(&options),
    }
    .mount()?;
    let warnings = DIRECT_DIRS
        .iter()
        .filter_map(|dir| bind_direct_dir(dir).err().map(|err| err.to_string()))
        .collect();
    for dir in MOVED_MOUNTS {
        move_mount(Path::new(dir), &Path::new(NEW_ROOT).join(&dir[1..]))?;
    }
    pivot(NEW_ROOT)?;
    Ok(warnings)
}

/// Bind-mounts `<layer>/direct/<dir>` on `<new root>/<dir>`.
fn bind_direct_dir(dir: &str) -> Result<(), MountError> {
    let backing = format!("{LAYER}/direct/{}", dir.replace('/', "-"));
    let target = format!("{NEW_ROOT}/{dir}");
    ensure_dir(Path::new(&backing), 0o711)?;
    ensure_dir(Path::new(&target), 0o711)?;
    Mount {
        source: &backing,
        target: &target,
        fstype: "none",
        flags: MsFlags::MS_BIND,
        data: None,
    }
    .mount()
}

fn mount_layer(layer: &WritableLayer) -> Result<(), RootfsError> {
    match layer {
        WritableLayer::Tmpfs => Mount {
            source: "tmpfs",
            target: LAYER,
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        }
        .mount()?,
        WritableLayer::Disk(device) => {
            wait_for(device)?;
            let source = device.to_string_lossy();
            Mount {
                source: &source,
                target: LAYER,
                fstype: "ext4",
                flags: MsFlags::MS_NOATIME,
                data: None,
            }
            .mount()?;
        }
    }
    Ok(())
}

/// Waits until `device` exists (virtio probing may still be running).
fn wait_for(device: &Path) -> Result<(), RootfsError> {
    let started = Instant::now();
    while !device.exists() {
        if started.elapsed() > SCRATCH_WAIT {
            return Err(RootfsError::NoScratchDevice(device.to_path_buf()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Makes `new_root` the root and drops the old one.
fn pivot(new_root: &str) -> Result<(), RootfsError> {
    let fail = |step| move |errno| RootfsError::Pivot { step, errno };
    chdir(new_root).map_err(fail("chdir to the new root"))?;
    pivot_root(".", ".").map_err(fail("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(fail("detach the old root"))?;
    chdir("/").map_err(fail("chdir /"))?;
    Ok(())
}
