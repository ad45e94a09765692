//! Command-line flags of the `vmm` binary and their merge with a JSON
//! configuration file.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{ConfigError, DriveConfig, NetConfig, SerialOutput, VmConfig, VsockConfig};

/// Runs one microVM until its guest reboots or powers off (exit 0), fails
/// (exit 1, reason on stderr) or the VMM gets SIGTERM (exit 143). An invalid
/// configuration exits 2 before anything is created.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
pub struct Cli {
    /// JSON configuration file; the flags below override or extend it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Block device: `path=FILE[,ro]` (repeatable; vda, vdb, ... in order).
    #[arg(long = "drive")]
    pub drives: Vec<DriveConfig>,
    /// Vsock device: `cid=N,uds=PATH`.
    #[arg(long)]
    pub vsock: Option<VsockConfig>,
    /// Network device: `tap=NAME,mac=aa:bb:cc:dd:ee:ff` (repeatable);
    /// `tap-fd=N` instead of `tap=` uses an inherited, attached tap.
    #[arg(long = "net")]
    pub nets: Vec<NetConfig>,
    /// Add a virtio-rng device.
    #[arg(long)]
    pub rng: bool,
    /// Serial console output: `stdout`, `null` or `file:PATH`.
    #[arg(long)]
    pub serial: Option<SerialOutput>,
    /// Bytes of serial output kept at most.
    #[arg(long)]
    pub serial_max_bytes: Option<u64>,
    /// Log guest writes to the boot-timer port (0x440).
    #[arg(long)]
    pub boot_timer: bool,
    /// Bytes of VMM log (stderr) written at most (default 1 MiB); then one
    /// "log truncated" line and nothing more.
    #[arg(long)]
    pub log_max_bytes: Option<u64>,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl Cli {
    /// The configuration these flags describe (not yet validated).
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let mut config = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_json_file(path)?,
            (None, Some(kernel)) => VmConfig::with_kernel(kernel),
            (None, None) => {
                return Err(ConfigError::Invalid {
                    field: "kernel".into(),
                    reason: "required (give --kernel or --config)".into(),
                });
            }
        };
        if let Some(kernel) = self.kernel {
            config.kernel = kernel;
        }
        if let Some(cmdline) = self.cmdline {
            config.cmdline = cmdline;
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(memory_mib) = self.memory_mib {
            config.memory_mib = memory_mib;
        }
        config.drives.extend(self.drives);
        if self.vsock.is_some() {
            config.vsock = self.vsock;
        }
        config.net.extend(self.nets);
        config.rng |= self.rng;
        if let Some(serial) = self.serial {
            config.serial.output = serial;
        }
        if let Some(max) = self.serial_max_bytes {
            config.serial.max_bytes = max;
        }
        config.boot_timer |= self.boot_timer;
        if let Some(max) = self.log_max_bytes {
            config.log_max_bytes = max;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
            .unwrap()
            .into_config()
    }

    #[test]
    fn flags_build_a_config() {
        let cfg = parse(&[
            "--kernel",
            "/k",
            "--vcpus",
            "2",
            "--memory-mib",
            "256",
            "--drive",
            "path=/a,ro",
            "--drive",
            "path=/b",
            "--vsock",
            "cid=3,uds=/tmp/v",
            "--serial",
            "file:/tmp/s",
            "--boot-timer",
            "--log-max-bytes",
            "65536",
        ])
        .unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/k"));
        assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 256));
        assert_eq!(cfg.drives.len(), 2);
        assert!(cfg.drives[0].read_only && !cfg.drives[1].read_only);
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
        assert!(cfg.boot_timer);
        assert_eq!(cfg.log_max_bytes, 65536);
        let default = parse(&["--kernel", "/k"]).unwrap();
        assert_eq!(default.log_max_bytes, crate::logger::DEFAULT_MAX_BYTES);
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = parse(&["--vcpus", "1"]).unwrap_err();
        assert!(err.to_string().starts_with("kernel:"), "{err}");
    }

    #[test]
    fn malformed_device_flag_is_a_parse_error() {
        let err = Cli::try_parse_from(["vmm", "--kernel", "/k", "--drive", "ro"]).unwrap_err();
        assert!(err.to_string().contains("--drive"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let path = std::env::temp_dir().join(format!("vmm-cli-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"kernel":"/file-kernel","vcpus":4,"memory_mib":512}"#,
        )
        .unwrap();
        let cfg = parse(&["--config", path.to_str().unwrap(), "--vcpus", "2"]).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/file-kernel"));
        assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 512));
    }
}
