//! The isolation policy, as nftables rules in the agent's own table
//! `inet kindling`. The agent never touches another table: it replaces its
//! own table whole at start-up (one atomic `nft -f -` transaction that also
//! drops whatever a crashed predecessor left in it) and deletes it at
//! shutdown. Adding or removing a VM is one small transaction on two
//! elements keyed by the VM's tap name:
//!
//! - `vm_sources` (tap . guest address): anti-spoofing; a packet from a tap
//!   whose source is not that VM's address is dropped (so masquerade can
//!   never forward a forged source to the uplink);
//! - `vm_policy` (tap : jump pool_N): the VM's pool chain;
//! - `vm_ct_limit` (tap : jump ct_limit_N): its pool's connection limit.
//!
//! Packets from a VM (`iifname "kdl*"`):
//! - a new connection (conntrack state `new`, whatever its destination,
//!   the host included) is counted per tap in the dynamic set `vm_conns`
//!   (`ct count`), in a prerouting filter chain before any accept; one
//!   over the pool's `conntrack_limit` is dropped, so a VM cannot fill the
//!   host's conntrack table. The set's element of a tap outlives its VM;
//!   its count drops as the entries it tracks go, and the agent deletes a
//!   VM's entries when the VM goes ([`super::conntrack`]), so the next VM
//!   on that tap starts from zero.
//! - IPv6: dropped (the guest has no IPv6 configuration).
//! - to the host itself (input hook): dropped, whatever the port (agent,
//!   orchestrator, SSH, ...), except DNS that the prerouting DNAT turned
//!   into a query to a host-local resolver.
//! - forwarded: DNS DNAT'd to the configured resolver is accepted; then the
//!   pool chain: its `allow` entries (CIDR + ports), then the forbidden
//!   destinations (private, link-local incl. 169.254.169.254, loopback,
//!   CGNAT, multicast, reserved, broadcast, and the VM subnet, i.e. every
//!   other VM) are dropped, then `nat` pools accept and `deny-all` pools
//!   drop.
//! - Packets *to* a VM are accepted only as part of a connection the VM
//!   started (conntrack established/related): inbound connections are
//!   refused, from the internet and from other VMs alike.
//! - Egress from the VM subnet is masqueraded behind the host's address.
//!
//! Our base chains accept what they do not drop; a drop in another table
//! (e.g. a host firewall whose forward policy is drop) still applies, so
//! the host's own rules can only make a VM more isolated, never less.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::addressing::TAP_PREFIX;

/// The agent's table (family `inet`).
pub const TABLE: &str = "kindling";

/// Destinations no VM may reach unless a pool `allow` entry says so.
pub const FORBIDDEN_V4: &[&str] = &[
    "0.0.0.0/8",      // "this network"
    "10.0.0.0/8",     // private
    "100.64.0.0/10",  // carrier-grade NAT (often the provider's internal network)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local, incl. the cloud metadata address
    "172.16.0.0/12",  // private
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // private
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, incl. 255.255.255.255 broadcast
];

/// Errors applying the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `nft` could not be run.
    #[error("cannot run `{nft}`: {source} (install the nftables package)")]
    Spawn {
        /// The binary.
        nft: String,
        /// Why.
        source: std::io::Error,
    },
    /// `nft` refused the rules.
    #[error("nft refused to {what}: {stderr}")]
    Refused {
        /// What the transaction was for.
        what: String,
        /// nft's message.
        stderr: String,
    },
}

/// What a pool's VMs may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// The outside world through NAT, minus the forbidden destinations.
    Nat,
    /// Only the pool's `allow` entries (and DNS).
    DenyAll,
}

/// A destination a pool's VMs may reach even if it is forbidden by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Destination network.
    pub cidr: Ipv4Net,
    /// TCP and UDP destination ports; empty means every port and protocol.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// One pool's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPolicy {
    /// Pool name (a comment in the ruleset).
    pub name: String,
    /// Default egress.
    pub egress: Egress,
    /// Extra allowed destinations, checked before the forbidden ranges.
    /// None may overlap the VM subnet (the config refuses it): an accept
    /// there would end the hook before the VM-to-VM drop.
    pub allow: Vec<AllowRule>,
    /// Most connections one VM may have tracked at once.
    pub conntrack_limit: u32,
}

/// The host-wide policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The VM subnet.
    pub subnet: Ipv4Net,
    /// The resolver that DNS to a gateway address is DNAT'd to.
    pub dns_upstream: Ipv4Addr,
    /// Pools with a network device, in order (`pool_<index>` chains).
    pub pools: Vec<PoolPolicy>,
}

fn pool_chain(index: usize) -> String {
    format!("pool_{index}")
}

fn ct_limit_chain(index: usize) -> String {
    format!("ct_limit_{index}")
}

/// Most elements of the `vm_conns` set (one per tap): above every possible
/// number of VM links (a /16 holds 16384), since a full set would let new
/// connections pass uncounted.
const VM_CONNS_SIZE: u32 = 65_535;

impl Policy {
    /// The whole table: replaces any previous version atomically (the
    /// `table` line makes `delete` succeed when none exists).
    pub fn render_table(&self) -> String {
        let tap = format!("\"{TAP_PREFIX}*\"");
        let subnet = self.subnet;
        let dns = self.dns_upstream;
        let mut forbidden: Vec<String> = FORBIDDEN_V4.iter().map(|s| s.to_string()).collect();
        if !FORBIDDEN_V4
            .iter()
            .any(|f| f.parse::<Ipv4Net>().is_ok_and(|f| f.contains(&subnet)))
        {
            forbidden.push(subnet.to_string());
        }
        let mut s = String::new();
        let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
        let _ = writeln!(s, "table inet {TABLE} {{");
        let _ = writeln!(
            s,
            "  set forbidden_v4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}",
            forbidden.join(", ")
        );
        let _ = writeln!(s, "  set vm_sources {{ type ifname . ipv4_addr; }}");
        let _ = writeln!(s, "  map vm_policy {{ type ifname : verdict; }}");
        let _ = writeln!(s, "  map vm_ct_limit {{ type ifname : verdict; }}");
        let _ = writeln!(
            s,
            "  set vm_conns {{ type ifname; size {VM_CONNS_SIZE}; flags dynamic; }}"
        );
        for (i, pool) in self.pools.iter().enumerate() {
            let _ = writeln!(
                s,
                "  chain {} {{\n    add @vm_conns {{ iifname ct count over {} }} drop\n  }}",
                ct_limit_chain(i),
                pool.conntrack_limit
            );
        }
        for (i, pool) in self.pools.iter().enumerate() {
            let _ = writeln!(s, "  chain {} {{", pool_chain(i));
            let _ = writeln!(s, "    comment \"pool {}\"", pool.name.replace('"', ""));
            for rule in &pool.allow {
                if rule.ports.is_empty() {
                    let _ = writeln!(s, "    ip daddr {} accept", rule.cidr);
                } else {
                    let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
                    let _ = writeln!(
                        s,
                        "    ip daddr {} meta l4proto {{ tcp, udp }} th dport {{ {} }} accept",
                        rule.cidr,
                        ports.join(", ")
                    );
                }
            }
            let _ = writeln!(s, "    ip daddr @forbidden_v4 drop");
            let last = match pool.egress {
                Egress::Nat => "accept",
                Egress::DenyAll => "drop",
            };
            let _ = writeln!(s, "    {last}\n  }}");
        }
        let _ = writeln!(
            s,
            "  chain from_vm {{
    meta nfproto ipv6 drop
    iifname . ip saddr != @vm_sources drop
    ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 ct status dnat accept
    iifname vmap @vm_policy
    drop
  }}
  chain new_from_vm {{
    type filter hook prerouting priority mangle; policy accept;
    iifname {tap} ct state new iifname vmap @vm_ct_limit
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {tap} jump from_vm
    oifname {tap} ct state established,related accept
    oifname {tap} drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {tap} meta nfproto ipv4 iifname . ip saddr @vm_sources meta l4proto {{ tcp, udp }} th dport 53 ct status dnat accept
    iifname {tap} drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {tap} ip daddr {subnet} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {dns}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != {tap} masquerade
  }}
}}"
        );
        s
    }

    /// Adds the VM on `tap` with address `guest` to pool `pool_index`.
    pub fn render_add_vm(&self, tap: &str, guest: Ipv4Addr, pool_index: usize) -> String {
        format!(
            "add element inet {TABLE} vm_sources {{ \"{tap}\" . {guest} }}\n\
             add element inet {TABLE} vm_policy {{ \"{tap}\" : jump {} }}\n\
             add element inet {TABLE} vm_ct_limit {{ \"{tap}\" : jump {} }}\n",
            pool_chain(pool_index),
            ct_limit_chain(pool_index)
        )
    }

    /// Removes the VM on `tap` (the counterpart of [`Self::render_add_vm`]).
    pub fn render_remove_vm(&self, tap: &str, guest: Ipv4Addr, pool_index: usize) -> String {
        format!(
            "delete element inet {TABLE} vm_sources {{ \"{tap}\" . {guest} }}\n\
             delete element inet {TABLE} vm_policy {{ \"{tap}\" : jump {} }}\n\
             delete element inet {TABLE} vm_ct_limit {{ \"{tap}\" : jump {} }}\n",
            pool_chain(pool_index),
            ct_limit_chain(pool_index)
        )
    }
}

/// Deletes the agent's table if it exists.
pub fn render_delete_table() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Runs `script` as one atomic nft transaction (`nft -f -`); with `check`,
/// only validates it (`nft -c`), changing nothing.
pub fn apply(nft: &str, script: &str, what: &str, check: bool) -> Result<(), PolicyError> {
    let mut cmd = Command::new(nft);
    if check {
        cmd.arg("-c");
    }
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PolicyError::Spawn {
            nft: nft.to_string(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| PolicyError::Spawn {
            nft: nft.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PolicyError::Refused {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            subnet: "198.18.0.0/16".parse().unwrap(),
            dns_upstream: "203.0.113.53".parse().unwrap(),
            pools: vec![
                PoolPolicy {
                    name: "open".into(),
                    egress: Egress::Nat,
                    allow: vec![AllowRule {
                        cidr: "10.1.2.0/24".parse().unwrap(),
                        ports: vec![443, 8443],
                    }],
                    conntrack_limit: 4096,
                },
                PoolPolicy {
                    name: "closed".into(),
                    egress: Egress::DenyAll,
                    allow: vec![AllowRule {
                        cidr: "192.0.2.7/32".parse().unwrap(),
                        ports: vec![],
                    }],
                    conntrack_limit: 100,
                },
            ],
        }
    }

    fn chain<'a>(text: &'a str, name: &str) -> &'a str {
        let start = text.find(&format!("chain {name} {{")).unwrap();
        let end = text[start..].find("\n  }").unwrap();
        &text[start..start + end]
    }

    #[test]
    fn pool_chains_allow_first_then_forbid_then_their_default() {
        let text = policy().render_table();
        let open = chain(&text, "pool_0");
        let allow = open
            .find("ip daddr 10.1.2.0/24 meta l4proto { tcp, udp } th dport { 443, 8443 } accept")
            .unwrap();
        let forbid = open.find("ip daddr @forbidden_v4 drop").unwrap();
        assert!(allow < forbid);
        assert!(open.trim_end().ends_with("accept"));
        let closed = chain(&text, "pool_1");
        assert!(closed.contains("ip daddr 192.0.2.7/32 accept"));
        assert!(closed.trim_end().ends_with("drop"));
    }

    #[test]
    fn every_forbidden_range_and_the_vm_subnet_are_in_the_set() {
        let text = policy().render_table();
        let set = text
            .lines()
            .find(|l| l.contains("set forbidden_v4"))
            .unwrap();
        for range in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "169.254.0.0/16",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "100.64.0.0/10",
            "198.18.0.0/16",
        ] {
            assert!(set.contains(range), "{range} missing: {set}");
        }
        // A subnet inside a forbidden range is not listed twice.
        let mut p = policy();
        p.subnet = "10.200.0.0/16".parse().unwrap();
        assert!(!p.render_table().contains("10.200.0.0/16,"));
    }

    #[test]
    fn the_table_replaces_itself_and_vms_are_two_elements() {
        let p = policy();
        let text = p.render_table();
        assert!(text.starts_with("table inet kindling\ndelete table inet kindling\n"));
        assert!(text.contains("dnat ip to 203.0.113.53"));
        assert!(text.contains("ip saddr 198.18.0.0/16 oifname != \"kdl*\" masquerade"));
        assert!(text.contains("iifname \"kdl*\" drop"), "input from VMs");
        assert!(text.contains("oifname \"kdl*\" ct state established,related accept"));
        let guest: Ipv4Addr = "198.18.0.6".parse().unwrap();
        let add = p.render_add_vm("kdl1", guest, 1);
        assert_eq!(add.lines().count(), 3);
        assert!(add.contains("\"kdl1\" . 198.18.0.6"));
        assert!(add.contains("\"kdl1\" : jump pool_1"));
        assert_eq!(
            p.render_remove_vm("kdl1", guest, 1),
            add.replace("add element", "delete element")
        );
    }

    #[test]
    fn each_vm_new_connections_are_counted_and_capped_per_pool() {
        let text = policy().render_table();
        assert!(text.contains("set vm_conns { type ifname; size 65535; flags dynamic; }"));
        assert!(text.contains("map vm_ct_limit { type ifname : verdict; }"));
        assert_eq!(
            chain(&text, "ct_limit_0").trim_end(),
            "chain ct_limit_0 {\n    add @vm_conns { iifname ct count over 4096 } drop"
        );
        assert!(chain(&text, "ct_limit_1").contains("ct count over 100 } drop"));
        // Before every accept: prerouting (so the DNS to a host-local
        // resolver counts too), after conntrack (-200), before DNAT (-100).
        let new = chain(&text, "new_from_vm");
        assert!(new.contains("type filter hook prerouting priority mangle; policy accept;"));
        assert!(new.contains("iifname \"kdl*\" ct state new iifname vmap @vm_ct_limit"));
        let add = policy().render_add_vm("kdl7", "198.18.0.30".parse().unwrap(), 0);
        assert!(
            add.contains("vm_ct_limit { \"kdl7\" : jump ct_limit_0 }"),
            "{add}"
        );
    }

    /// The rendered rules are accepted by the real `nft` (check mode: the
    /// kernel validates the transaction, nothing is committed). Skipped
    /// where nft is missing or we are not root.
    #[test]
    fn nft_accepts_the_rendered_rules() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let p = policy();
        let script = format!(
            "{}{}",
            p.render_table(),
            p.render_add_vm("kdl1", "198.18.0.6".parse().unwrap(), 1)
        );
        apply("nft", &script, "check the table", true).unwrap();
        let err = apply("nft", "add rule inet nope x y", "check junk", true).unwrap_err();
        assert!(err.to_string().contains("nft refused"), "{err}");
    }
}
