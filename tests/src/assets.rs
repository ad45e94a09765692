//! The project's expensive artefacts, as the end-to-end tests find them:
//! from the environment the test script exports, or by asking the build
//! scripts (which build on a cache miss and print the cached path).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::run::HarnessError;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn print_path(script: &str, args: &[&str]) -> Result<PathBuf, HarnessError> {
    let path = repo_root().join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| HarnessError::Spawn {
            what: path.display().to_string(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(HarnessError::Missing(format!(
            "{} {} failed ({})",
            path.display(),
            args.join(" "),
            out.status
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The guest kernel's ELF `vmlinux`: `$KINDLING_KERNEL_DIR/vmlinux`, or
/// from `kernel-config/build.sh --print-dir`.
pub fn guest_kernel() -> Result<PathBuf, HarnessError> {
    let dir = match std::env::var_os("KINDLING_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => print_path("kernel-config/build.sh", &["--print-dir"])?,
    };
    Ok(dir.join("vmlinux"))
}

/// The minimal guest image: `$KINDLING_IMAGE`, or from
/// `guest-image/build.sh minimal --print-path`.
pub fn minimal_image() -> Result<PathBuf, HarnessError> {
    match std::env::var_os("KINDLING_IMAGE") {
        Some(p) => Ok(PathBuf::from(p)),
        None => print_path("guest-image/build.sh", &["minimal", "--print-path"]),
    }
}

/// The Debian guest image: `$KINDLING_DEBIAN_IMAGE`, or from
/// `guest-image/build.sh debian --print-path` (builds it on a cache miss:
/// a few minutes with access to the Debian mirror).
pub fn debian_image() -> Result<PathBuf, HarnessError> {
    match std::env::var_os("KINDLING_DEBIAN_IMAGE") {
        Some(p) => Ok(PathBuf::from(p)),
        None => print_path("guest-image/build.sh", &["debian", "--print-path"]),
    }
}

/// The assets most scenarios need, under the names the scenarios use:
/// the guest kernel as `$ASSETS/vmlinux` and the minimal image as
/// `$ASSETS/minimal.erofs`.
pub fn kernel_and_minimal_image() -> Result<Vec<crate::Asset>, HarnessError> {
    Ok(vec![
        crate::Asset {
            host_path: guest_kernel()?,
            name: "vmlinux".into(),
        },
        crate::Asset {
            host_path: minimal_image()?,
            name: "minimal.erofs".into(),
        },
    ])
}
