//! The VM configuration: what the `vmm` binary is asked to run.
//!
//! A configuration comes from a JSON file (`--config`), from command-line
//! flags, or both (flags override scalar fields of the file and add
//! devices). [`VmConfig::validate`] checks every field before anything is
//! created, and names the offending field in its error, e.g.
//! `drives[1].path: /x.img does not exist`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::rate_limiter::{BucketConfig, RateLimit};

/// Highest number of vCPUs (the guest kernel is built with NR_CPUS=32).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest guest memory accepted, in MiB (256 GiB).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Largest number of block devices.
pub const MAX_DRIVES: usize = 8;
/// Largest number of network devices.
pub const MAX_NETS: usize = 4;
/// Longest kernel command line given by the user, in bytes; the VMM
/// appends device entries to it.
pub const MAX_USER_CMDLINE: usize = 2048;
/// Longest path that fits a Unix socket address (`sun_path` minus NUL).
const MAX_UNIX_PATH: usize = 107;
/// Longest suffix the vsock device appends to its socket path (`_4294967295`).
const VSOCK_PORT_SUFFIX_LEN: usize = 11;
/// Default serial output bound: 16 MiB.
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 16 << 20;
/// Smallest VMM log cap accepted (`log_max_bytes`).
pub const MIN_LOG_MAX_BYTES: u64 = 1024;

/// The kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// A rejected configuration, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field has an invalid value.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `drives[0].path` or `--vsock`.
        field: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid JSON for [`VmConfig`].
    #[error("config file {path}: {source}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parse error (includes line and column).
        source: serde_json::Error,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Discarded.
    Null,
    /// Appended to a file (created if missing, truncated first).
    File(PathBuf),
}

impl FromStr for SerialOutput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" | "none" => Ok(Self::Null),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(format!(
                    "expected `stdout`, `null` or `file:PATH`, got `{s}`"
                )),
            },
        }
    }
}

/// Serial console settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Destination of the guest's output.
    #[serde(default)]
    pub output: SerialOutput,
    /// Bytes written at most; further output is dropped (and counted).
    #[serde(default = "default_serial_max_bytes")]
    pub max_bytes: u64,
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            output: SerialOutput::default(),
            max_bytes: DEFAULT_SERIAL_MAX_BYTES,
        }
    }
}

fn default_serial_max_bytes() -> u64 {
    DEFAULT_SERIAL_MAX_BYTES
}

/// A raw disk image exposed as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Path of the image file or block device.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for DriveConfig {
    type Err = String;

    /// Parses `path=P[,ro]` or `path=P,read_only=true|false`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut read_only = false;
        for (key, value) in key_values(s)? {
            match (key, value) {
                ("path", Some(v)) => path = Some(PathBuf::from(v)),
                ("ro", None) => read_only = true,
                ("read_only" | "ro", Some(v)) => read_only = parse_bool(v)?,
                _ => return Err(format!("unknown key `{key}` (expected path, ro)")),
            }
        }
        let path = path.ok_or("missing `path=`")?;
        Ok(Self { path, read_only })
    }
}

/// The virtio-vsock device and its host-side Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The host Unix socket the VMM listens on; guest-initiated connections
    /// to port P are made to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = String;

    /// Parses `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut uds = None;
        for (key, value) in key_values(s)? {
            match (key, value) {
                ("cid" | "guest_cid", Some(v)) => {
                    cid = Some(v.parse().map_err(|_| format!("bad cid `{v}`"))?)
                }
                ("uds" | "uds_path", Some(v)) => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("unknown key `{key}` (expected cid, uds)")),
            }
        }
        Ok(Self {
            guest_cid: cid.ok_or("missing `cid=`")?,
            uds_path: uds.ok_or("missing `uds=`")?,
        })
    }
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddress(pub [u8; 6]);

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .ok_or(format!("`{s}` has fewer than 6 octets"))?;
            if part.len() != 2 {
                return Err(format!("`{s}`: octet `{part}` is not two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("`{s}`: octet `{part}` is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(format!("`{s}` has more than 6 octets"));
        }
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for MacAddress {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddress> for String {
    fn from(mac: MacAddress) -> Self {
        mac.to_string()
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A virtio-net device backed by a host tap device, named or inherited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of an existing tap device (empty when `tap_fd` is given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// An already attached tap the VMM inherited as this fd (instead of
    /// `tap`): a jailed VMM in an empty network namespace cannot open one
    /// by name. It must be a tap attached with `IFF_NO_PI | IFF_VNET_HDR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address.
    pub mac: MacAddress,
    /// Limits of the frames to the guest (host -> guest).
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub rx_limit: RateLimit,
    /// Limits of the frames from the guest (guest -> host).
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub tx_limit: RateLimit,
}

/// Smallest byte burst: the largest frame must fit, or it would never pass.
pub const MIN_BYTE_BURST: u64 = crate::devices::virtio::net::MAX_FRAME as u64;

/// The burst a rate gets when none is given: a tenth of a second's worth,
/// at least [`MIN_BYTE_BURST`] bytes / one frame.
fn default_burst(rate: u64, min: u64) -> u64 {
    (rate / 10).max(min)
}

impl FromStr for NetConfig {
    type Err = String;

    /// Parses `tap=NAME,mac=aa:bb:cc:dd:ee:ff` (or `tap-fd=N` instead of
    /// `tap=`: an inherited, attached tap) plus optional limits per
    /// direction (`rx` to the guest, `tx` from it):
    /// `{rx,tx}-bytes-per-sec=N`, `{rx,tx}-bytes-burst=N`,
    /// `{rx,tx}-packets-per-sec=N`, `{rx,tx}-packets-burst=N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut tap_fd = None;
        let mut mac = None;
        // [rx, tx] x [bytes rate, bytes burst, packets rate, packets burst]
        let mut limits = [[None::<u64>; 4]; 2];
        for (key, value) in key_values(s)? {
            let number = |v: Option<&str>| -> Result<u64, String> {
                let v = v.ok_or(format!("`{key}` needs a value"))?;
                v.parse::<u64>().map_err(|e| format!("`{key}={v}`: {e}"))
            };
            let limit_slot = |key: &str| -> Option<(usize, usize)> {
                let (dir, rest) = key.split_once('-')?;
                let d = ["rx", "tx"].iter().position(|x| *x == dir)?;
                let k = [
                    "bytes-per-sec",
                    "bytes-burst",
                    "packets-per-sec",
                    "packets-burst",
                ]
                .iter()
                .position(|x| *x == rest)?;
                Some((d, k))
            };
            match (key, value) {
                ("tap", Some(v)) => tap = Some(v.to_string()),
                ("tap-fd", Some(v)) => {
                    tap_fd = Some(v.parse::<i32>().map_err(|e| format!("`tap-fd={v}`: {e}"))?)
                }
                ("mac", Some(v)) => mac = Some(v.parse()?),
                _ => match limit_slot(key) {
                    Some((d, k)) => limits[d][k] = Some(number(value)?),
                    None => {
                        return Err(format!(
                            "unknown key `{key}` (expected tap, tap-fd, mac, \
                             {{rx,tx}}-{{bytes,packets}}-{{per-sec,burst}})"
                        ));
                    }
                },
            }
        }
        let direction = |l: [Option<u64>; 4], dir: &str| -> Result<RateLimit, String> {
            let bucket =
                |rate: Option<u64>, burst: Option<u64>, what: &str, min: u64| match (rate, burst) {
                    (None, None) => Ok(None),
                    (None, Some(_)) => {
                        Err(format!("`{dir}-{what}-burst` needs `{dir}-{what}-per-sec`"))
                    }
                    (Some(rate), burst) => Ok(Some(BucketConfig {
                        rate,
                        burst: burst.unwrap_or_else(|| default_burst(rate, min)),
                    })),
                };
            Ok(RateLimit {
                bytes: bucket(l[0], l[1], "bytes", MIN_BYTE_BURST)?,
                ops: bucket(l[2], l[3], "packets", 1)?,
            })
        };
        let tap = match (tap, tap_fd) {
            (Some(_), Some(_)) => return Err("give `tap=` or `tap-fd=`, not both".into()),
            (None, None) => return Err("missing `tap=` (or `tap-fd=`)".into()),
            (tap, _) => tap.unwrap_or_default(),
        };
        Ok(Self {
            tap,
            tap_fd,
            mac: mac.ok_or("missing `mac=`")?,
            rx_limit: direction(limits[0], "rx")?,
            tx_limit: direction(limits[1], "tx")?,
        })
    }
}

fn key_values(s: &str) -> Result<Vec<(&str, Option<&str>)>, String> {
    s.split(',')
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k, Some(v))),
            None if !item.is_empty() => Ok((item, None)),
            _ => Err(format!("malformed item `{item}` in `{s}`")),
        })
        .collect()
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(format!("`{v}` is not a boolean")),
    }
}

/// A complete microVM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: ELF `vmlinux` or `bzImage`.
    pub kernel: PathBuf,
    /// Kernel command line (virtio-mmio device entries are appended).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Block devices, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Whether to add a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Serial console settings.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Whether guest writes to the boot-timer port are logged.
    #[serde(default)]
    pub boot_timer: bool,
    /// Bytes of VMM log (stderr) written at most; then one "log truncated"
    /// line and nothing more.
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
}

fn default_log_max_bytes() -> u64 {
    crate::logger::DEFAULT_MAX_BYTES
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u32 {
    128
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn with_kernel(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            drives: Vec::new(),
            vsock: None,
            net: Vec::new(),
            rng: false,
            serial: SerialConfig::default(),
            boot_timer: false,
            log_max_bytes: default_log_max_bytes(),
        }
    }

    /// Reads a JSON configuration file (not yet validated).
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_regular_file("kernel", &self.kernel)?;
        if self.cmdline.len() > MAX_USER_CMDLINE {
            return Err(invalid(
                "cmdline",
                format!(
                    "{} bytes, at most {MAX_USER_CMDLINE} allowed",
                    self.cmdline.len()
                ),
            ));
        }
        if let Some(c) = self.cmdline.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(invalid(
                "cmdline",
                format!("contains the non-printable or non-ASCII character {c:?}"),
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is not in 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(invalid(
                "drives",
                format!("{} drives, at most {MAX_DRIVES}", self.drives.len()),
            ));
        }
        for (i, drive) in self.drives.iter().enumerate() {
            check_disk(&format!("drives[{i}].path"), &drive.path)?;
        }
        if let Some(vsock) = &self.vsock {
            validate_vsock(vsock)?;
        }
        if self.net.len() > MAX_NETS {
            return Err(invalid(
                "net",
                format!("{} devices, at most {MAX_NETS}", self.net.len()),
            ));
        }
        for (i, net) in self.net.iter().enumerate() {
            validate_net(i, net)?;
        }
        validate_tap_fds(&self.net)?;
        if self.serial.max_bytes == 0 {
            return Err(invalid("serial.max_bytes", "must be at least 1"));
        }
        if let SerialOutput::File(path) = &self.serial.output {
            check_parent_dir("serial.output", path)?;
        }
        if self.log_max_bytes < MIN_LOG_MAX_BYTES {
            return Err(invalid(
                "log_max_bytes",
                format!(
                    "{} is below {MIN_LOG_MAX_BYTES} (room for the start-up lines)",
                    self.log_max_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn validate_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    if vsock.guest_cid < 3 || vsock.guest_cid == u32::MAX {
        return Err(invalid(
            "vsock.guest_cid",
            format!(
                "{} is reserved (0-2 and {:#x} are not guest CIDs)",
                vsock.guest_cid,
                u32::MAX
            ),
        ));
    }
    let len = vsock.uds_path.as_os_str().len();
    if len == 0 {
        return Err(invalid("vsock.uds_path", "is empty"));
    }
    if len + VSOCK_PORT_SUFFIX_LEN > MAX_UNIX_PATH {
        return Err(invalid(
            "vsock.uds_path",
            format!(
                "{len} bytes; with the `_PORT` suffix it must fit a Unix socket address \
                 ({} bytes at most)",
                MAX_UNIX_PATH - VSOCK_PORT_SUFFIX_LEN
            ),
        ));
    }
    check_parent_dir("vsock.uds_path", &vsock.uds_path)
}

fn validate_net(index: usize, net: &NetConfig) -> Result<(), ConfigError> {
    if let Some(fd) = net.tap_fd {
        let field = format!("net[{index}].tap_fd");
        if !net.tap.is_empty() {
            return Err(invalid(field, "give a tap name or a tap fd, not both"));
        }
        if fd < 3 {
            return Err(invalid(
                field,
                format!("{fd} is stdin, stdout or stderr (or not an fd)"),
            ));
        }
    } else {
        validate_tap_name(index, &net.tap)?;
    }
    if net.mac.0[0] & 1 != 0 {
        return Err(invalid(
            format!("net[{index}].mac"),
            format!("{} is a multicast address", net.mac),
        ));
    }
    for (dir, limit) in [("rx", &net.rx_limit), ("tx", &net.tx_limit)] {
        let buckets = [
            ("bytes", limit.bytes, MIN_BYTE_BURST),
            ("packets", limit.ops, 1),
        ];
        for (what, bucket, min_burst) in buckets {
            let Some(b) = bucket else { continue };
            let field = format!("net[{index}].{dir}_limit.{what}");
            if b.rate == 0 {
                return Err(invalid(
                    field,
                    "a rate of 0 would stop all traffic; leave it unset for no limit",
                ));
            }
            if b.burst < min_burst {
                return Err(invalid(
                    field,
                    format!(
                        "burst {} is below {min_burst} (the largest frame must fit in it)",
                        b.burst
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Inherited tap fds are adopted (closed with their device): each may be
/// named once, and only when the VMM opens no tap of its own, so that a
/// `tap-fd` can only name a tap it was handed, never one it opened.
fn validate_tap_fds(nets: &[NetConfig]) -> Result<(), ConfigError> {
    let by_fd = nets.iter().filter(|n| n.tap_fd.is_some()).count();
    if by_fd != 0 && by_fd != nets.len() {
        return Err(invalid(
            "net",
            "either every device gives `tap-fd` or none does",
        ));
    }
    for (i, net) in nets.iter().enumerate() {
        if net.tap_fd.is_some() && nets[..i].iter().any(|n| n.tap_fd == net.tap_fd) {
            return Err(invalid(
                format!("net[{i}].tap_fd"),
                "the same fd is given to two devices",
            ));
        }
    }
    Ok(())
}

fn validate_tap_name(index: usize, tap: &str) -> Result<(), ConfigError> {
    let field = format!("net[{index}].tap");
    if tap.is_empty() || tap.len() > 15 {
        return Err(invalid(field, "an interface name has 1 to 15 bytes"));
    }
    if tap
        .bytes()
        .any(|b| b == b'/' || b == b':' || !b.is_ascii_graphic())
    {
        return Err(invalid(
            field,
            format!("`{tap}` is not a valid interface name"),
        ));
    }
    Ok(())
}

fn check_regular_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(())
}

fn check_disk(field: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(invalid(
            field,
            format!("{} is neither a file nor a block device", path.display()),
        ));
    }
    Ok(())
}

fn check_parent_dir(field: &str, path: &Path) -> Result<(), ConfigError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(invalid(
            field,
            format!("directory {} does not exist", parent.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> PathBuf {
        // Any existing regular file is a valid `kernel` for validation.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        VmConfig::with_kernel(kernel_file()).validate().unwrap();
    }

    #[test]
    fn missing_kernel_names_the_field() {
        let cfg = VmConfig::with_kernel("/nonexistent/vmlinux");
        assert_eq!(field_of(cfg.validate().unwrap_err()), "kernel");
    }

    #[test]
    fn out_of_range_scalars_are_rejected() {
        let mut cfg = VmConfig::with_kernel(kernel_file());
        cfg.vcpus = 0;
        assert_eq!(field_of(cfg.validate().unwrap_err()), "vcpus");
        cfg.vcpus = MAX_VCPUS + 1;
        assert_eq!(field_of(cfg.validate().unwrap_err()), "vcpus");
        cfg.vcpus = 2;
        cfg.memory_mib = 8;
        assert_eq!(field_of(cfg.validate().unwrap_err()), "memory_mib");
        cfg.memory_mib = 128;
        cfg.cmdline = "console=ttyS0\n".into();
        assert_eq!(field_of(cfg.validate().unwrap_err()), "cmdline");
        cfg.cmdline = "x".repeat(MAX_USER_CMDLINE + 1);
        assert_eq!(field_of(cfg.validate().unwrap_err()), "cmdline");
        cfg.cmdline = DEFAULT_CMDLINE.into();
        cfg.serial.max_bytes = 0;
        assert_eq!(field_of(cfg.validate().unwrap_err()), "serial.max_bytes");
        cfg.serial.max_bytes = 1;
        cfg.log_max_bytes = MIN_LOG_MAX_BYTES - 1;
        assert_eq!(field_of(cfg.validate().unwrap_err()), "log_max_bytes");
    }

    #[test]
    fn bad_drive_is_named_by_index() {
        let mut cfg = VmConfig::with_kernel(kernel_file());
        cfg.drives.push(DriveConfig {
            path: kernel_file(),
            read_only: true,
        });
        cfg.drives.push("path=/nonexistent.img".parse().unwrap());
        assert_eq!(field_of(cfg.validate().unwrap_err()), "drives[1].path");
        cfg.drives[1].path = PathBuf::from("/");
        assert_eq!(field_of(cfg.validate().unwrap_err()), "drives[1].path");
    }

    #[test]
    fn vsock_fields_are_checked() {
        let mut cfg = VmConfig::with_kernel(kernel_file());
        cfg.vsock = Some("cid=2,uds=/tmp/v.sock".parse().unwrap());
        assert_eq!(field_of(cfg.validate().unwrap_err()), "vsock.guest_cid");
        cfg.vsock = Some("cid=3,uds=/nonexistent-dir/v.sock".parse().unwrap());
        assert_eq!(field_of(cfg.validate().unwrap_err()), "vsock.uds_path");
        let long = format!("/tmp/{}", "a".repeat(100));
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: long.into(),
        });
        assert_eq!(field_of(cfg.validate().unwrap_err()), "vsock.uds_path");
        cfg.vsock = Some("cid=3,uds=/tmp/v.sock".parse().unwrap());
        cfg.validate().unwrap();
    }

    #[test]
    fn net_fields_are_checked() {
        let mut cfg = VmConfig::with_kernel(kernel_file());
        cfg.net
            .push("tap=tap0,mac=02:00:00:00:00:01".parse().unwrap());
        cfg.validate().unwrap();
        cfg.net[0].tap = "a-very-long-tap-name".into();
        assert_eq!(field_of(cfg.validate().unwrap_err()), "net[0].tap");
        cfg.net[0].tap = "tap0".into();
        cfg.net[0].mac = "03:00:00:00:00:01".parse().unwrap();
        assert_eq!(field_of(cfg.validate().unwrap_err()), "net[0].mac");
        cfg.net[0].mac = "02:00:00:00:00:01".parse().unwrap();
        cfg.net[0].tx_limit.bytes = Some(BucketConfig {
            rate: 0,
            burst: 1 << 20,
        });
        assert_eq!(
            field_of(cfg.validate().unwrap_err()),
            "net[0].tx_limit.bytes"
        );
        cfg.net[0].tx_limit.bytes = Some(BucketConfig {
            rate: 1000,
            burst: 1500,
        });
        assert_eq!(
            field_of(cfg.validate().unwrap_err()),
            "net[0].tx_limit.bytes"
        );
        cfg.net[0].tx_limit.bytes = Some(BucketConfig {
            rate: 1000,
            burst: MIN_BYTE_BURST,
        });
        cfg.validate().unwrap();
    }

    #[test]
    fn a_tap_is_named_or_inherited_as_an_fd() {
        let n: NetConfig = "tap-fd=3,mac=02:00:00:00:00:01,rx-bytes-per-sec=1048576"
            .parse()
            .unwrap();
        assert_eq!((n.tap.as_str(), n.tap_fd), ("", Some(3)));
        assert_eq!(n.rx_limit.bytes.map(|b| b.rate), Some(1 << 20));
        let n: NetConfig = "tap=t0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.tap_fd), ("t0", None));
        for (bad, why) in [
            ("tap=t0,tap-fd=3,mac=02:00:00:00:00:01", "not both"),
            ("mac=02:00:00:00:00:01", "missing `tap=`"),
            ("tap-fd=x,mac=02:00:00:00:00:01", "tap-fd=x"),
            ("tap-fd=,mac=02:00:00:00:00:01", "tap-fd="),
            ("tap-fd=3", "missing `mac=`"),
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }

        let mut cfg = VmConfig::with_kernel(kernel_file());
        cfg.net
            .push("tap-fd=3,mac=02:00:00:00:00:01".parse().unwrap());
        cfg.validate().unwrap();
        cfg.net[0].tap_fd = Some(2);
        assert_eq!(field_of(cfg.validate().unwrap_err()), "net[0].tap_fd");
        cfg.net[0].tap_fd = Some(3);
        cfg.net
            .push("tap-fd=3,mac=02:00:00:00:00:02".parse().unwrap());
        assert_eq!(field_of(cfg.validate().unwrap_err()), "net[1].tap_fd");
        cfg.net[1].tap_fd = Some(4);
        cfg.validate().unwrap();
        // A named tap next to inherited ones: refused (the fd it opened
        // could be named by a `tap-fd`).
        cfg.net[1] = "tap=t1,mac=02:00:00:00:00:02".parse().unwrap();
        assert_eq!(field_of(cfg.validate().unwrap_err()), "net");
        // JSON: `tap_fd` instead of `tap`.
        let json = serde_json::to_string(&cfg.net[0]).unwrap();
        assert_eq!(json, r#"{"tap_fd":3,"mac":"02:00:00:00:00:01"}"#);
        assert_eq!(
            serde_json::from_str::<NetConfig>(&json).unwrap(),
            cfg.net[0]
        );
    }

    #[test]
    fn rate_limits_parse_per_direction_with_default_bursts() {
        let n: NetConfig = "tap=t,mac=02:00:00:00:00:01,rx-bytes-per-sec=1048576,\
            tx-packets-per-sec=100,tx-packets-burst=5"
            .parse()
            .unwrap();
        assert_eq!(
            n.rx_limit.bytes,
            Some(BucketConfig {
                rate: 1 << 20,
                burst: MIN_BYTE_BURST.max((1 << 20) / 10)
            })
        );
        assert_eq!(n.rx_limit.ops, None);
        assert_eq!(
            n.tx_limit.ops,
            Some(BucketConfig {
                rate: 100,
                burst: 5
            })
        );
        assert!(n.tx_limit.bytes.is_none());
        for bad in [
            "tap=t,mac=02:00:00:00:00:01,rx-bytes-per-sec=x",
            "tap=t,mac=02:00:00:00:00:01,rx-bytes-burst=100000",
            "tap=t,mac=02:00:00:00:00:01,up-bytes-per-sec=1",
            "tap=t,mac=02:00:00:00:00:01,rx-bytes-per-sec",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn flag_syntax_parses_and_rejects() {
        let d: DriveConfig = "path=/a.img,ro".parse().unwrap();
        assert!(d.read_only);
        let d: DriveConfig = "path=/a.img,read_only=false".parse().unwrap();
        assert!(!d.read_only);
        assert!("ro".parse::<DriveConfig>().is_err());
        assert!("path=/a,colour=red".parse::<DriveConfig>().is_err());
        assert!("cid=x,uds=/a".parse::<VsockConfig>().is_err());
        assert!("tap=t,mac=00:11:22:33:44".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=00:11:22:33:44:5g".parse::<NetConfig>().is_err());
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let json = r#"{"kernel":"/k","vcpus":2,"drives":[{"path":"/d","read_only":true}],
            "vsock":{"guest_cid":3,"uds_path":"/tmp/v"},"net":[{"tap":"t0","mac":"02:00:00:00:00:01"}],
            "serial":{"output":{"file":"/tmp/s.log"},"max_bytes":1000},"boot_timer":true}"#;
        let cfg: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.serial.output, SerialOutput::File("/tmp/s.log".into()));
        let again: VmConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","vcpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("vcpu"));
    }
}
