//! The host agent's TOML configuration, validated as a whole before anything
//! is started: a bad file is one clear error naming the field.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::net::addressing::{AddressPool, DEFAULT_SUBNET, LINK_PREFIX_LEN};
use crate::net::policy::AllowRule;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A field has a value the agent cannot use.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's identity towards the orchestrator.
    pub host_id: String,
    /// Directory for per-VM directories (sockets, serial logs); the agent
    /// owns it and removes whatever a previous run left there.
    pub state_dir: PathBuf,
    /// Path of the `vmm` binary.
    pub vmm: PathBuf,
    /// Address of the Prometheus metrics endpoint, if any.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// On SIGTERM/SIGINT: how long running jobs may go on before their VMs
    /// are killed (seconds, default 60). Idle VMs stop at once.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// How to reach the orchestrator.
    pub orchestrator: OrchestratorConfig,
    /// What the agent may use of this host, at most.
    pub limits: Limits,
    /// Guest networking shared by all pools.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The VM pools.
    #[serde(rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// How VMMs are jailed (`[jail]`; on by default).
    #[serde(default)]
    pub jail: crate::jail::JailConfig,
}

/// `[network]`: host-wide settings of the VMs' network (used only by pools
/// whose `network` is not `"none"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The subnet every VM gets a /30 of (default `198.18.0.0/16`; see
    /// `net::addressing` for why).
    #[serde(default = "default_subnet")]
    pub subnet: ipnet::Ipv4Net,
    /// The resolver the guests' DNS queries (sent to their gateway) are
    /// DNAT'd to; default: the host's first non-loopback IPv4 nameserver.
    #[serde(default)]
    pub dns: Option<std::net::Ipv4Addr>,
    /// The `nft` binary.
    #[serde(default = "default_nft")]
    pub nft: String,
    /// The `conntrack` binary (Debian package `conntrack`), which deletes a
    /// VM's connection-tracking entries when it goes (`net::conntrack`).
    #[serde(default = "default_conntrack")]
    pub conntrack: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            subnet: default_subnet(),
            dns: None,
            nft: default_nft(),
            conntrack: default_conntrack(),
        }
    }
}

fn default_subnet() -> ipnet::Ipv4Net {
    DEFAULT_SUBNET.parse().expect("the default subnet parses")
}

fn default_nft() -> String {
    "nft".into()
}

fn default_conntrack() -> String {
    "conntrack".into()
}

/// A pool's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolNetwork {
    /// No network device at all (such VMs also take `network: false` jobs).
    #[default]
    None,
    /// A tap with NAT egress to everything but the forbidden destinations
    /// (plus the pool's `allow` entries).
    Nat,
    /// A tap through which only DNS and the pool's `allow` entries pass.
    DenyAll,
}

/// The orchestrator endpoint and this host's credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    /// Base URL, e.g. `https://orchestrator.internal:8443`; `http://` only
    /// on loopback unless `allow_insecure_http`.
    pub url: String,
    /// The host credential (bearer token for registering VMs).
    pub host_credential: String,
    /// Trust only this CA certificate (PEM) for an `https://` URL; the
    /// system's roots if absent.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Allow `http://` to a non-loopback orchestrator (credentials, tokens
    /// and secrets then cross the network in clear).
    #[serde(default)]
    pub allow_insecure_http: bool,
}

impl OrchestratorConfig {
    /// How the agent's client reaches the orchestrator.
    pub fn transport(&self) -> orchestrator::client::Transport {
        orchestrator::client::Transport {
            ca_cert: self.ca_cert.clone(),
            allow_insecure_http: self.allow_insecure_http,
        }
    }
}

/// Host capacity the agent may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Total vCPUs over all VMs.
    pub vcpus: u32,
    /// Total guest memory over all VMs, in MiB.
    pub memory_mib: u64,
}

/// One pool of identical warm VMs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name (used in VM names, logs and metrics).
    pub name: String,
    /// Labels of every VM in the pool.
    pub labels: Vec<String>,
    /// How many VMs to keep warm.
    pub size: u32,
    /// vCPUs per VM.
    pub vcpus: u8,
    /// Memory per VM in MiB.
    pub memory_mib: u32,
    /// Guest kernel (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Read-only root image (erofs) shared by the pool's VMs.
    pub image: PathBuf,
    /// Extra kernel command-line arguments.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Seconds a VM may take from VMM start to the runner agent's `Hello`.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
    /// Most job log the host relays per second for one VM, in KiB; 0 means
    /// no limit (default 4096 = 4 MiB/s). A job printing faster is slowed
    /// down inside its own VM (backpressure), so a log flood cannot spend
    /// the host's CPU on relaying at its neighbours' expense.
    #[serde(default = "default_log_kib_per_sec")]
    pub log_kib_per_sec: u64,
    /// The VMs' network: `"none"` (default), `"nat"` or `"deny-all"`.
    #[serde(default)]
    pub network: PoolNetwork,
    /// Destinations allowed even if forbidden by default (checked first).
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// Per-VM bandwidth and packet-rate limits (token buckets in the VMM).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Most connections (conntrack entries) one VM may have open at once
    /// (default 4096); its further new connections are dropped, so a VM
    /// cannot fill the host's connection-tracking table. Only used by pools
    /// with a network.
    #[serde(default = "default_conntrack_limit")]
    pub conntrack_limit: u32,
}

/// Default of [`PoolConfig::conntrack_limit`].
pub const DEFAULT_CONNTRACK_LIMIT: u32 = 4096;

/// Largest accepted [`PoolConfig::conntrack_limit`].
pub const MAX_CONNTRACK_LIMIT: u32 = 1 << 20;

fn default_conntrack_limit() -> u32 {
    DEFAULT_CONNTRACK_LIMIT
}

/// `[pool.rate_limit]`: per-VM limits, per direction (`rx`: to the guest,
/// `tx`: from it). Unset means unlimited. Bursts are the VMM's default (a
/// tenth of a second's worth, at least one 64 KiB frame / one packet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes per second to the guest.
    pub rx_bytes_per_sec: Option<u64>,
    /// Bytes per second from the guest.
    pub tx_bytes_per_sec: Option<u64>,
    /// Packets per second to the guest.
    pub rx_packets_per_sec: Option<u64>,
    /// Packets per second from the guest.
    pub tx_packets_per_sec: Option<u64>,
}

impl RateLimitConfig {
    fn fields(&self) -> [(&'static str, Option<u64>); 4] {
        [
            ("rx-bytes-per-sec", self.rx_bytes_per_sec),
            ("tx-bytes-per-sec", self.tx_bytes_per_sec),
            ("rx-packets-per-sec", self.rx_packets_per_sec),
            ("tx-packets-per-sec", self.tx_packets_per_sec),
        ]
    }

    /// The VMM's `--net` options for these limits (`key=value,...`).
    pub fn vmm_options(&self) -> String {
        self.fields()
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn default_boot_timeout() -> u64 {
    60
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_identifier("host_id", &self.host_id)?;
        self.jail
            .validate()
            .map_err(|e| invalid("jail", e.to_string()))?;
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        if !self.vmm.is_file() {
            return Err(invalid(
                "vmm",
                format!("{} is not a file", self.vmm.display()),
            ));
        }
        let url = &self.orchestrator.url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "orchestrator.url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        // The client applies the transport rules (plain HTTP on loopback
        // only, a readable CA): build one now so that a bad setting is a
        // config error, not a failure at the first request.
        if let Err(e) =
            orchestrator::client::ApiClient::with_transport(url, &self.orchestrator.transport())
        {
            let field = match e {
                orchestrator::client::ClientError::Tls(_) => "orchestrator.ca_cert",
                _ => "orchestrator.url",
            };
            return Err(invalid(field, e.to_string()));
        }
        if self.orchestrator.host_credential.len() < 16 {
            return Err(invalid(
                "orchestrator.host_credential",
                "must be at least 16 characters",
            ));
        }
        if self.shutdown_grace_secs > 24 * 3600 {
            return Err(invalid(
                "shutdown_grace_secs",
                "must be at most 86400 (a day)",
            ));
        }
        if let Some(addr) = &self.metrics_listen {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid("metrics_listen", format!("{addr:?}: {e}")))?;
        }
        if self.pools.is_empty() {
            return Err(invalid("pool", "at least one [[pool]] is required"));
        }
        let mut names = HashSet::new();
        let (mut vcpus, mut memory, mut links) = (0u64, 0u64, 0u64);
        for (i, pool) in self.pools.iter().enumerate() {
            let at = |f: &str| format!("pool[{i}].{f}");
            check_identifier(&at("name"), &pool.name)?;
            if !names.insert(pool.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("duplicate pool name {:?}", pool.name),
                ));
            }
            if pool.labels.is_empty() {
                return Err(invalid(at("labels"), "at least one label is required"));
            }
            for label in &pool.labels {
                check_identifier(&at("labels"), label)?;
            }
            if pool.size == 0 || pool.size > 64 {
                return Err(invalid(at("size"), "must be between 1 and 64"));
            }
            if pool.vcpus == 0 || pool.vcpus > 32 {
                return Err(invalid(at("vcpus"), "must be between 1 and 32"));
            }
            if pool.memory_mib < 64 || pool.memory_mib > 64 * 1024 {
                return Err(invalid(at("memory_mib"), "must be between 64 and 65536"));
            }
            if !pool.kernel.is_file() {
                return Err(invalid(
                    at("kernel"),
                    format!("{} is not a file", pool.kernel.display()),
                ));
            }
            if !is_file_or_block_device(&pool.image) {
                return Err(invalid(
                    at("image"),
                    format!(
                        "{} is neither a file nor a block device",
                        pool.image.display()
                    ),
                ));
            }
            if pool.log_kib_per_sec > 1 << 30 {
                return Err(invalid(
                    at("log_kib_per_sec"),
                    "must be at most 1073741824 (1 TiB/s); 0 means no limit",
                ));
            }
            if pool.boot_timeout_secs == 0 || pool.boot_timeout_secs > 600 {
                return Err(invalid(
                    at("boot_timeout_secs"),
                    "must be between 1 and 600",
                ));
            }
            if pool.network == PoolNetwork::None && !pool.allow.is_empty() {
                return Err(invalid(
                    at("allow"),
                    "needs `network = \"nat\"` or `\"deny-all\"` (the pool has no network)",
                ));
            }
            for (j, rule) in pool.allow.iter().enumerate() {
                // An allow entry is accepted before the VM-to-VM drop: one
                // reaching into the VM subnet would connect VMs.
                let subnet = self.network.subnet;
                if rule.cidr.contains(&subnet.network()) || subnet.contains(&rule.cidr.network()) {
                    return Err(invalid(
                        format!("pool[{i}].allow[{j}].cidr"),
                        format!(
                            "pool {:?}: allow entry {} overlaps the VM subnet {subnet} \
                             (network.subnet), so its VMs could reach other VMs; allow \
                             only destinations outside the VM subnet",
                            pool.name, rule.cidr
                        ),
                    ));
                }
                if rule.ports.contains(&0) {
                    return Err(invalid(
                        format!("pool[{i}].allow[{j}].ports"),
                        "port 0 is not a port",
                    ));
                }
                if rule.ports.len() > 64 {
                    return Err(invalid(
                        format!("pool[{i}].allow[{j}].ports"),
                        "at most 64 ports",
                    ));
                }
            }
            for (key, value) in pool.rate_limit.fields() {
                if value == Some(0) {
                    return Err(invalid(
                        format!("pool[{i}].rate_limit.{}", key.replace('-', "_")),
                        "0 would stop all traffic; leave it unset for no limit",
                    ));
                }
            }
            if pool.conntrack_limit == 0 || pool.conntrack_limit > MAX_CONNTRACK_LIMIT {
                return Err(invalid(
                    at("conntrack_limit"),
                    format!("must be between 1 and {MAX_CONNTRACK_LIMIT}"),
                ));
            }
            if pool.network == PoolNetwork::None && pool.rate_limit != RateLimitConfig::default() {
                return Err(invalid(at("rate_limit"), "the pool has no network"));
            }
            if pool.network != PoolNetwork::None {
                links += u64::from(pool.size);
            }
            vcpus += u64::from(pool.size) * u64::from(pool.vcpus);
            memory += u64::from(pool.size) * u64::from(pool.memory_mib);
        }
        self.validate_network(links)?;
        if vcpus > u64::from(self.limits.vcpus) {
            return Err(invalid(
                "limits.vcpus",
                format!(
                    "the pools need {vcpus} vCPUs but the limit is {}",
                    self.limits.vcpus
                ),
            ));
        }
        if memory > self.limits.memory_mib {
            return Err(invalid(
                "limits.memory_mib",
                format!(
                    "the pools need {memory} MiB but the limit is {}",
                    self.limits.memory_mib
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// `[network]`, given how many VM links the pools need at most.
    fn validate_network(&self, links: u64) -> Result<(), ConfigError> {
        let net = &self.network;
        if let Some(dns) = net.dns
            && (dns.is_loopback()
                || dns.is_unspecified()
                || dns.is_multicast()
                || dns.is_broadcast())
        {
            return Err(invalid(
                "network.dns",
                format!(
                    "{dns} cannot be reached from a VM's tap (a DNAT to loopback is dropped \
                     as a martian); give a resolver on a real interface"
                ),
            ));
        }
        if net.nft.is_empty() {
            return Err(invalid("network.nft", "must name the nft binary"));
        }
        if net.conntrack.is_empty() {
            return Err(invalid(
                "network.conntrack",
                "must name the conntrack binary",
            ));
        }
        let pool =
            AddressPool::new(net.subnet).map_err(|e| invalid("network.subnet", e.to_string()))?;
        let capacity = 1u64 << (LINK_PREFIX_LEN - pool.subnet().prefix_len());
        if links > capacity {
            return Err(invalid(
                "network.subnet",
                format!("holds {capacity} VM links (/30 each) but the pools need {links}"),
            ));
        }
        Ok(())
    }
}

/// Ids and labels: 1-64 characters of `[A-Za-z0-9._-]`.
fn default_log_kib_per_sec() -> u64 {
    4096
}

fn default_shutdown_grace_secs() -> u64 {
    60
}

/// A guest image may be a regular file or a block device (a read-only disk
/// holding the erofs image, as the VMM's own check accepts); symlinks are
/// followed.
fn is_file_or_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() || m.file_type().is_block_device())
        .unwrap_or(false)
}

fn check_identifier(field: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value:?} must be 1-64 characters of [A-Za-z0-9._-]"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> String {
        for f in ["vmm", "vmlinux", "image.erofs"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        format!(
            r#"
host_id = "host-1"
state_dir = "{d}/state"
vmm = "{d}/vmm"
[orchestrator]
url = "http://127.0.0.1:8080"
host_credential = "0123456789abcdef"
[limits]
vcpus = 4
memory_mib = 1024
[[pool]]
name = "small"
labels = ["linux", "x64"]
size = 2
vcpus = 1
memory_mib = 256
kernel = "{d}/vmlinux"
image = "{d}/image.erofs"
"#,
            d = dir.display()
        )
    }

    fn load(text: &str, dir: &Path) -> Result<Config, ConfigError> {
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn a_valid_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&sample(dir.path()), dir.path()).unwrap();
        assert_eq!(c.pools[0].boot_timeout_secs, 60);
        assert_eq!(c.shutdown_grace_secs, 60);
        assert_eq!(c.pools[0].labels, ["linux", "x64"]);
    }

    #[test]
    fn each_bad_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = sample(dir.path());
        let cases = [
            ("size = 2", "size = 0", "pool[0].size"),
            ("vcpus = 4", "vcpus = 1", "limits.vcpus"),
            ("memory_mib = 1024", "memory_mib = 100", "limits.memory_mib"),
            (
                "\"linux\", \"x64\"",
                "\"linux\", \"x 64\"",
                "pool[0].labels",
            ),
            ("http://127.0.0.1:8080", "ftp://x", "orchestrator.url"),
            // Plain HTTP off loopback: secrets would cross the network.
            (
                "http://127.0.0.1:8080",
                "http://192.0.2.10:8080",
                "orchestrator.url",
            ),
            (
                "url = \"http://127.0.0.1:8080\"",
                "url = \"https://127.0.0.1:8443\"\nca_cert = \"/nonexistent/ca.pem\"",
                "orchestrator.ca_cert",
            ),
            ("image.erofs\"", "missing.erofs\"", "pool[0].image"),
            ("host_id = \"host-1\"", "host_id = \"\"", "host_id"),
            (
                "vmm = ",
                "shutdown_grace_secs = 100000\nvmm = ",
                "shutdown_grace_secs",
            ),
            (
                "[limits]",
                "[network]\ndns = \"127.0.0.53\"\n[limits]",
                "network.dns",
            ),
            (
                "[limits]",
                "[network]\nsubnet = \"198.18.0.0/31\"\n[limits]",
                "network.subnet",
            ),
            (
                "image.erofs\"",
                "image.erofs\"\nnetwork = \"none\"\nallow = [{ cidr = \"10.0.0.0/8\" }]",
                "pool[0].allow",
            ),
            (
                "image.erofs\"",
                "image.erofs\"\nnetwork = \"nat\"\nallow = [{ cidr = \"10.0.0.0/8\", ports = [0] }]",
                "pool[0].allow[0].ports",
            ),
        ];
        for (from, to, field) in cases {
            let text = good.replacen(from, to, 1);
            assert_ne!(text, good, "{from}");
            let err = load(&text, dir.path()).unwrap_err().to_string();
            assert!(err.contains(field), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn an_image_may_be_a_block_device_but_not_another_special_file() {
        let dir = tempfile::tempdir().unwrap();
        let image = format!("{}/image.erofs", dir.path().display());
        let text = sample(dir.path()).replace(&image, "/dev/null");
        let err = load(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("pool[0].image"), "{err}");
        assert!(err.contains("neither a file nor a block device"), "{err}");
        // A block device, where the machine has one (not in every container).
        let block = std::fs::read_dir("/dev").ok().and_then(|entries| {
            use std::os::unix::fs::FileTypeExt;
            entries
                .flatten()
                .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        });
        if let Some(block) = block {
            let text = sample(dir.path()).replace(&image, &block.path().display().to_string());
            load(&text, dir.path()).unwrap();
        }
    }

    #[test]
    fn network_settings_parse_and_the_subnet_must_hold_every_vm() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path()).replace(
            "[limits]",
            "[network]\nsubnet = \"10.77.0.0/24\"\ndns = \"192.0.2.53\"\n[limits]",
        ) + "network = \"deny-all\"\nallow = [{ cidr = \"10.1.0.0/16\", ports = [443] }]\n";
        let c = load(&text, dir.path()).unwrap();
        assert_eq!(c.network.subnet.to_string(), "10.77.0.0/24");
        assert_eq!(c.pools[0].network, PoolNetwork::DenyAll);
        assert_eq!(c.pools[0].allow[0].ports, [443]);
        // Defaults: no network, the RFC 2544 subnet.
        let c = load(&sample(dir.path()), dir.path()).unwrap();
        assert_eq!(c.pools[0].network, PoolNetwork::None);
        assert_eq!(c.network.subnet.to_string(), "198.18.0.0/16");
        // Two VMs need two /30s: a /30 holds one.
        let small = text.replace("10.77.0.0/24", "10.77.0.0/30");
        let err = load(&small, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("network.subnet") && err.contains("need 2"),
            "{err}"
        );
        let limited = format!(
            "{text}[pool.rate_limit]\nrx_bytes_per_sec = 1048576\ntx_packets_per_sec = 500\n"
        );
        let c = load(&limited, dir.path()).unwrap();
        assert_eq!(
            c.pools[0].rate_limit.vmm_options(),
            "rx-bytes-per-sec=1048576,tx-packets-per-sec=500"
        );
        let zero = limited.replace("= 500", "= 0");
        let err = load(&zero, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("pool[0].rate_limit.tx_packets_per_sec"),
            "{err}"
        );
        let bad = text.replace("deny-all", "open");
        assert!(load(&bad, dir.path()).is_err());
    }

    #[test]
    fn an_allow_entry_overlapping_the_vm_subnet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path())
            .replace("[limits]", "[network]\nsubnet = \"10.77.0.0/24\"\n[limits]")
            + "network = \"nat\"\n";
        for cidr in ["10.77.0.0/24", "10.77.0.8/30", "10.0.0.0/8", "0.0.0.0/0"] {
            let text = format!(
                "{base}allow = [{{ cidr = \"192.0.2.0/24\" }}, {{ cidr = \"{cidr}\", ports = [22] }}]\n"
            );
            let err = load(&text, dir.path()).unwrap_err().to_string();
            assert!(err.contains("pool[0].allow[1].cidr"), "{cidr}: {err}");
            assert!(err.contains("pool \"small\""), "{cidr}: {err}");
            assert!(
                err.contains(&format!("allow entry {cidr}")),
                "{cidr}: {err}"
            );
            assert!(err.contains("VM subnet 10.77.0.0/24"), "{cidr}: {err}");
        }
        // Next to it, but not overlapping: fine.
        let text = format!("{base}allow = [{{ cidr = \"10.77.1.0/24\" }}]\n");
        let c = load(&text, dir.path()).unwrap();
        assert_eq!(c.pools[0].conntrack_limit, DEFAULT_CONNTRACK_LIMIT);
    }

    #[test]
    fn the_conntrack_limit_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path()) + "network = \"nat\"\n";
        let c = load(&format!("{base}conntrack_limit = 100\n"), dir.path()).unwrap();
        assert_eq!(c.pools[0].conntrack_limit, 100);
        for bad in [0, MAX_CONNTRACK_LIMIT + 1] {
            let err = load(&format!("{base}conntrack_limit = {bad}\n"), dir.path())
                .unwrap_err()
                .to_string();
            assert!(err.contains("pool[0].conntrack_limit"), "{err}");
        }
    }

    #[test]
    fn the_documented_example_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let _ = sample(dir.path()); // creates vmm, vmlinux, image.erofs
        let d = dir.path().display().to_string();
        let text = include_str!("../examples/agent.toml")
            .replace(
                "/var/lib/kindling/assets/debian.erofs",
                &format!("{d}/image.erofs"),
            )
            .replace("/var/lib/kindling/assets/vmlinux", &format!("{d}/vmlinux"))
            .replace("/usr/local/bin/vmm", &format!("{d}/vmm"));
        let c = load(&text, dir.path()).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].network, PoolNetwork::Nat);
        assert_eq!(c.pools[0].log_kib_per_sec, 4096);
        assert_eq!(c.pools[1].network, PoolNetwork::None);
        assert!(c.jail.enabled);
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_rejected_with_a_location() {
        let dir = tempfile::tempdir().unwrap();
        let text = sample(dir.path()).replace("size = 2", "size = 2\nsizee = 3");
        let err = load(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("sizee"), "{err}");
        let err = load("host_id = ", dir.path()).unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
    }
}
