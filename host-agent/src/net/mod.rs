//! Guest networking on the host: one persistent tap per VM ([`tap`]) with
//! its own /30 ([`addressing`]) configured over rtnetlink ([`link`]), and
//! the isolation policy in the agent's own nftables table ([`policy`]).
//!
//! [`Network`] ties them together. Its life follows the agent's:
//! [`Network::start`] removes what a crashed predecessor left (every
//! `kdl<N>` tap, the whole `inet kindling` table), enables IPv4 forwarding
//! and installs the table for the configured pools; [`Network::attach`]
//! gives one VM its tap, address and policy elements, and
//! [`Network::detach`] removes them again, with the VM's connection-tracking
//! entries ([`conntrack`]); [`Network::shutdown`] deletes
//! the table. Each step that fails rolls back what it did, so a failed
//! attach leaves nothing behind.

pub mod addressing;
pub mod conntrack;
pub mod link;
pub mod policy;
pub mod tap;

use std::net::Ipv4Addr;
use std::sync::Mutex;

use self::addressing::{AddressPool, AddressingError, LINK_PREFIX_LEN, TAP_PREFIX, VmLink};
use self::link::{LinkError, Links};
use self::policy::{Egress, Policy, PolicyError, PoolPolicy};
use crate::config::{Config, PoolNetwork};

/// Where the kernel switch for IPv4 forwarding lives.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Errors setting up networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Address allocation failed.
    #[error(transparent)]
    Addressing(#[from] AddressingError),
    /// Creating the tap failed.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// A netlink operation failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// nftables refused or could not be run.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The `conntrack` tool cannot be run.
    #[error(transparent)]
    Conntrack(#[from] conntrack::ConntrackError),
    /// No resolver for the guests' DNS path could be found.
    #[error("no usable DNS resolver: {0}; set `network.dns` in the agent config")]
    NoResolver(String),
    /// A sysctl could not be written.
    #[error("cannot write {path}: {source}")]
    Sysctl {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The pool has no network in the running policy.
    #[error("pool {0:?} has no network device configured")]
    NoSuchPool(String),
}

/// One VM's network as the VMM and the guest see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetwork {
    /// Its link (tap name, addresses).
    pub link: VmLink,
    /// The guest's resolver address (the gateway; DNAT'd to the upstream).
    pub dns: Ipv4Addr,
    /// Index of its pool's chain in the policy.
    pub pool_index: usize,
    /// Extra `--net` options for the VMM (rate limits), `key=value,...`.
    pub vmm_options: String,
}

impl VmNetwork {
    /// The VMM's `--net` argument (the VMM opens the tap by name).
    pub fn vmm_arg(&self) -> String {
        self.vmm_arg_for(&format!("tap={}", self.link.tap_name()))
    }

    /// The VMM's `--net` argument when the tap is handed to it already
    /// attached, as fd `fd` (a jailed VMM).
    pub fn vmm_arg_with_fd(&self, fd: i32) -> String {
        self.vmm_arg_for(&format!("tap-fd={fd}"))
    }

    fn vmm_arg_for(&self, tap: &str) -> String {
        let mut arg = format!("{tap},mac={}", self.link.guest_mac());
        if !self.vmm_options.is_empty() {
            arg.push(',');
            arg.push_str(&self.vmm_options);
        }
        arg
    }

    /// The guest's `ip=` kernel parameter.
    pub fn kernel_param(&self) -> String {
        self.link.kernel_ip_param(self.dns)
    }
}

/// Host networking for all VMs of this agent.
pub struct Network {
    nft: String,
    conntrack: String,
    policy: Policy,
    /// Pool name -> chain index, for pools with a network device.
    pools: Vec<String>,
    addresses: Mutex<AddressPool>,
}

impl Network {
    /// Removes leftovers, enables forwarding and installs the policy for
    /// the pools of `config` that have a network.
    pub async fn start(config: &Config) -> Result<Network, NetError> {
        let net = &config.network;
        let dns_upstream = match net.dns {
            Some(dns) => dns,
            None => host_resolver()?,
        };
        let mut pools = Vec::new();
        let mut pool_policies = Vec::new();
        for pool in &config.pools {
            let egress = match pool.network {
                PoolNetwork::None => continue,
                PoolNetwork::Nat => Egress::Nat,
                PoolNetwork::DenyAll => Egress::DenyAll,
            };
            pools.push(pool.name.clone());
            pool_policies.push(PoolPolicy {
                name: pool.name.clone(),
                egress,
                allow: pool.allow.clone(),
                conntrack_limit: pool.conntrack_limit,
            });
        }
        let policy = Policy {
            subnet: net.subnet,
            dns_upstream,
            pools: pool_policies,
        };
        let addresses = Mutex::new(AddressPool::new(net.subnet)?);
        conntrack::check(&net.conntrack)?;
        remove_leftovers(&net.nft, true).await?;
        std::fs::write(IP_FORWARD, "1").map_err(|source| NetError::Sysctl {
            path: IP_FORWARD.into(),
            source,
        })?;
        policy::apply(
            &net.nft,
            &policy.render_table(),
            "install the policy table",
            false,
        )?;
        tracing::info!(subnet = %net.subnet, dns = %dns_upstream, "network policy installed");
        Ok(Network {
            nft: net.nft.clone(),
            conntrack: net.conntrack.clone(),
            policy,
            pools,
            addresses,
        })
    }

    /// Gives a VM of `pool` its tap (owned by `owner`, for a jailed VMM),
    /// address and policy elements.
    pub async fn attach(
        &self,
        pool: &str,
        owner: Option<(u32, u32)>,
        vmm_options: String,
    ) -> Result<VmNetwork, NetError> {
        let pool_index = self
            .pools
            .iter()
            .position(|p| p == pool)
            .ok_or_else(|| NetError::NoSuchPool(pool.to_string()))?;
        let link = self.lock().allocate()?;
        let network = VmNetwork {
            link,
            dns: link.gateway,
            pool_index,
            vmm_options,
        };
        match self.plumb(&network, owner).await {
            Ok(()) => Ok(network),
            Err(e) => {
                self.detach(&network).await;
                Err(e)
            }
        }
    }

    async fn plumb(&self, network: &VmNetwork, owner: Option<(u32, u32)>) -> Result<(), NetError> {
        let tap = network.link.tap_name();
        tap::create_persistent_tap(&tap, owner)?;
        // The host side needs no IPv6 (and gets no link-local address).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
        Links::connect()?
            .configure(&tap, network.link.gateway, LINK_PREFIX_LEN)
            .await?;
        let add = self
            .policy
            .render_add_vm(&tap, network.link.guest, network.pool_index);
        policy::apply(&self.nft, &add, &format!("add {tap} to the policy"), false)?;
        Ok(())
    }

    /// Removes a VM's policy elements and tap (with its address and route)
    /// and frees its address. Never fails: what cannot be removed is
    /// logged, and the next start-up clean-up removes it.
    pub async fn detach(&self, network: &VmNetwork) {
        let tap = network.link.tap_name();
        let remove = self
            .policy
            .render_remove_vm(&tap, network.link.guest, network.pool_index);
        // Fails harmlessly when the elements were never added.
        let _ = policy::apply(&self.nft, &remove, "remove a VM", false);
        // With its source gone from `vm_sources`, the VM sends nothing more:
        // what it started is all there is to delete.
        match conntrack::flush_source(&self.conntrack, network.link.guest) {
            Ok(n) => tracing::debug!(%tap, entries = n, "connection tracking entries deleted"),
            Err(e) => {
                tracing::warn!(%tap, "the VM's connection tracking entries stay until they time out: {e}")
            }
        }
        match Links::connect() {
            Ok(links) => {
                if let Err(e) = links.delete(&tap).await {
                    tracing::warn!(%tap, "cannot delete the tap: {e}");
                }
            }
            Err(e) => tracing::warn!(%tap, "cannot delete the tap: {e}"),
        }
        self.lock().release(&network.link);
    }

    /// Deletes the policy table (agent shutdown). Taps are gone already.
    pub fn shutdown(&self) {
        if let Err(e) = policy::apply(
            &self.nft,
            &policy::render_delete_table(),
            "delete the table",
            false,
        ) {
            tracing::warn!("cannot delete the nftables table: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AddressPool> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`remove_leftovers`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetLeftovers {
    /// Taps deleted.
    pub taps: Vec<String>,
}

/// Deletes every `kdl<N>` tap and the agent's nftables table. With
/// `require_nft` false, failing to run `nft` is not an error (a host whose
/// pools have no network need not have nftables installed).
pub async fn remove_leftovers(nft: &str, require_nft: bool) -> Result<NetLeftovers, NetError> {
    let links = Links::connect()?;
    let mut removed = NetLeftovers::default();
    for tap in links.names_with_prefix(TAP_PREFIX).await? {
        if links.delete(&tap).await? {
            removed.taps.push(tap);
        }
    }
    match policy::apply(
        nft,
        &policy::render_delete_table(),
        "delete the table",
        false,
    ) {
        Ok(()) => {}
        Err(e) if require_nft => return Err(e.into()),
        // No networked pool: nftables may be absent, or we may lack the
        // right to use it (then we cannot have created the table either).
        Err(e) => tracing::debug!("not removing the nftables table: {e}"),
    }
    if !removed.taps.is_empty() {
        tracing::warn!(taps = ?removed.taps, "removed taps a previous run left behind");
    }
    Ok(removed)
}

/// The host's first usable IPv4 resolver: from `/etc/resolv.conf`, else
/// (when that only names a local stub such as systemd-resolved's
/// 127.0.0.53) from systemd-resolved's list of upstream servers.
fn host_resolver() -> Result<Ipv4Addr, NetError> {
    let files = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];
    for file in files {
        if let Some(addr) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| first_resolver(&text))
        {
            return Ok(addr);
        }
    }
    Err(NetError::NoResolver(format!(
        "no non-loopback IPv4 nameserver in {}",
        files.join(" or ")
    )))
}

/// The first `nameserver` line with a usable IPv4 address. Loopback
/// resolvers are skipped: a packet DNAT'd from a tap to 127.0.0.0/8 is a
/// martian the kernel drops (unless `route_localnet`, which we do not
/// turn on).
pub fn first_resolver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<Ipv4Addr>().ok())
            .flatten()
            .filter(|a| !a.is_loopback() && !a.is_unspecified() && !a.is_multicast())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_loopback_ipv4_nameserver_is_used() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver fe80::1\nsearch x\nnameserver 10.0.0.2\nnameserver 1.1.1.1\n";
        assert_eq!(first_resolver(text), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(first_resolver("nameserver 127.0.0.1\n"), None);
        assert_eq!(first_resolver(""), None);
    }

    #[test]
    fn the_vmm_argument_names_tap_mac_and_options() {
        let link = VmLink {
            index: 3,
            gateway: "198.18.0.13".parse().unwrap(),
            guest: "198.18.0.14".parse().unwrap(),
        };
        let mut n = VmNetwork {
            link,
            dns: link.gateway,
            pool_index: 0,
            vmm_options: String::new(),
        };
        assert_eq!(n.vmm_arg(), "tap=kdl3,mac=02:6b:64:00:00:03");
        n.vmm_options = "rx-bytes-per-sec=1000".into();
        assert_eq!(
            n.vmm_arg(),
            "tap=kdl3,mac=02:6b:64:00:00:03,rx-bytes-per-sec=1000"
        );
        assert_eq!(
            n.vmm_arg_with_fd(3),
            "tap-fd=3,mac=02:6b:64:00:00:03,rx-bytes-per-sec=1000"
        );
        assert_eq!(
            n.kernel_param(),
            "ip=198.18.0.14::198.18.0.13:255.255.255.252::eth0:off:198.18.0.13"
        );
    }
}
