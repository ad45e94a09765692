//! Nested-virtualization test harness.
//!
//! Runs a shell *scenario* where a real Linux guest can run on KVM: inside an
//! L1 Linux booted under QEMU TCG with emulated AMD SVM (which gives the L1 a
//! working `/dev/kvm`) when this host's KVM cannot run guests at speed, or
//! directly on the host when it has hardware KVM. Used by the end-to-end
//! tests (as a library) and by the README commands (as the `harness` CLI).

pub mod assets;
pub mod direct;
pub mod e2e;
pub mod heartbeat;
pub mod host;
pub mod initramfs;
pub mod l1;
pub mod ldd;
pub mod nested;
pub mod pump;
pub mod run;
pub mod scenario;

pub use host::{ExecMode, HostKvm};
pub use run::{HarnessError, run};
pub use scenario::{Asset, ModeChoice, Outcome, Scenario, Status};

/// The path of a binary built from this workspace, next to the running test
/// or tool (`target/<profile>/<name>`); `$KINDLING_BIN_DIR` overrides the
/// directory.
pub fn workspace_binary(name: &str) -> Result<std::path::PathBuf, HarnessError> {
    let dir = match std::env::var_os("KINDLING_BIN_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| HarnessError::Io("finding the running executable".into(), e))?;
            // target/<profile>/deps/<test>-<hash> or target/<profile>/<tool>
            let mut dir = exe.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Missing(format!(
            "{} (build it with `cargo build --workspace --bins`)",
            path.display()
        )))
    }
}
