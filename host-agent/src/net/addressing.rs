//! Per-VM IPv4 addressing: every VM gets its own /30 out of one configured
//! subnet: `.0` network, `.1` the host side of its tap (the guest's gateway
//! and DNS address), `.2` the guest, `.3` broadcast. A point-to-point /30 per
//! tap (instead of a bridge) means the VMs share no L2 segment at all: a
//! guest can only ever send to its own tap, and every packet it sends is
//! routed by the host, where the nftables policy sees it.
//!
//! The default subnet is `198.18.0.0/16` (RFC 2544, reserved for benchmark
//! networks and never routed on the internet): unlike the RFC 1918 ranges it
//! does not collide with the host's LAN/VPC, and unlike `100.64.0.0/10` it
//! does not collide with carrier-grade NAT or overlay VPNs (Tailscale). The
//! subnet itself is always a forbidden destination for VMs, so VMs cannot
//! reach each other.
//!
//! The slot index also names the tap (`kdl<index>`), so a tap, its address
//! and its policy elements are tied together and a leftover is found by its
//! name prefix alone.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Name prefix of every tap the agent creates (and the clean-up removes).
pub const TAP_PREFIX: &str = "kdl";
/// The default VM subnet.
pub const DEFAULT_SUBNET: &str = "198.18.0.0/16";
/// Prefix length of each VM's link.
pub const LINK_PREFIX_LEN: u8 = 30;

/// Errors allocating addresses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressingError {
    /// The subnet is not usable.
    #[error("VM subnet {subnet}: {reason}")]
    BadSubnet {
        /// The subnet.
        subnet: String,
        /// Why.
        reason: String,
    },
    /// Every /30 of the subnet is in use.
    #[error(
        "VM subnet {subnet} is exhausted ({capacity} VM links in use); configure a larger `network.subnet`"
    )]
    Exhausted {
        /// The subnet.
        subnet: Ipv4Net,
        /// How many links it holds.
        capacity: u32,
    },
}

/// One VM's link: addresses and names derived from its slot index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLink {
    /// Slot index in the subnet.
    pub index: u32,
    /// The host side of the tap: the guest's gateway and DNS address.
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
}

impl VmLink {
    /// The tap's name (`kdl<index>`; at most 13 characters).
    pub fn tap_name(&self) -> String {
        format!("{TAP_PREFIX}{}", self.index)
    }

    /// A locally administered unicast MAC address unique per link.
    pub fn guest_mac(&self) -> String {
        let i = self.index.to_be_bytes();
        format!("02:6b:64:{:02x}:{:02x}:{:02x}", i[1], i[2], i[3])
    }

    /// The netmask of the link, dotted.
    pub fn netmask() -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - LINK_PREFIX_LEN))
    }

    /// The kernel's `ip=` parameter for the guest: static address, the host
    /// side as gateway, eth0, no autoconfiguration, and `dns` as the
    /// resolver (the runner agent copies it from `/proc/net/pnp` to
    /// `/etc/resolv.conf`).
    pub fn kernel_ip_param(&self, dns: Ipv4Addr) -> String {
        format!(
            "ip={}::{}:{}::eth0:off:{}",
            self.guest,
            self.gateway,
            Self::netmask(),
            dns
        )
    }
}

/// Hands out the /30 links of one subnet.
#[derive(Debug)]
pub struct AddressPool {
    subnet: Ipv4Net,
    capacity: u32,
    used: BTreeSet<u32>,
}

impl AddressPool {
    /// A pool over `subnet`, which must be a network address with a prefix
    /// of at most /30.
    pub fn new(subnet: Ipv4Net) -> Result<Self, AddressingError> {
        let bad = |reason: &str| AddressingError::BadSubnet {
            subnet: subnet.to_string(),
            reason: reason.into(),
        };
        if subnet.prefix_len() > LINK_PREFIX_LEN {
            return Err(bad("must be /30 or larger"));
        }
        if subnet.trunc() != subnet {
            return Err(bad("has host bits set; give the network address"));
        }
        let capacity = 1u32 << (LINK_PREFIX_LEN - subnet.prefix_len());
        Ok(Self {
            subnet,
            capacity,
            used: BTreeSet::new(),
        })
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The lowest free link.
    pub fn allocate(&mut self) -> Result<VmLink, AddressingError> {
        let index = (0..self.capacity).find(|i| !self.used.contains(i)).ok_or(
            AddressingError::Exhausted {
                subnet: self.subnet,
                capacity: self.capacity,
            },
        )?;
        self.used.insert(index);
        Ok(self.link(index))
    }

    /// Gives a link back.
    pub fn release(&mut self, link: &VmLink) {
        self.used.remove(&link.index);
    }

    fn link(&self, index: u32) -> VmLink {
        let base = u32::from(self.subnet.network()) + index * 4;
        VmLink {
            index,
            gateway: Ipv4Addr::from(base + 1),
            guest: Ipv4Addr::from(base + 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn links_are_disjoint_slash_30s_named_by_index() {
        let mut pool = AddressPool::new(net("198.18.0.0/16")).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!(
            (a.gateway, a.guest),
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap())
        );
        assert_eq!(
            (b.gateway, b.guest),
            ("198.18.0.5".parse().unwrap(), "198.18.0.6".parse().unwrap())
        );
        assert_eq!((a.tap_name(), b.tap_name()), ("kdl0".into(), "kdl1".into()));
        assert_ne!(a.guest_mac(), b.guest_mac());
        assert_eq!(
            a.kernel_ip_param("198.18.0.1".parse().unwrap()),
            "ip=198.18.0.2::198.18.0.1:255.255.255.252::eth0:off:198.18.0.1"
        );
        // A released link is reused; the others keep theirs.
        pool.release(&a);
        assert_eq!(pool.allocate().unwrap(), a);
    }

    #[test]
    fn the_subnet_bounds_the_links_and_names_stay_short() {
        let mut pool = AddressPool::new(net("10.9.0.0/29")).unwrap();
        pool.allocate().unwrap();
        let last = pool.allocate().unwrap();
        assert_eq!(last.guest, "10.9.0.6".parse::<Ipv4Addr>().unwrap());
        assert!(matches!(
            pool.allocate(),
            Err(AddressingError::Exhausted { capacity: 2, .. })
        ));
        let big = AddressPool::new(net("0.0.0.0/0")).unwrap();
        let max = big.link(big.capacity - 1);
        assert_eq!(max.guest, "255.255.255.254".parse::<Ipv4Addr>().unwrap());
        assert!(max.tap_name().len() < 16, "IFNAMSIZ");
    }

    #[test]
    fn bad_subnets_are_refused() {
        assert!(AddressPool::new(net("10.0.0.0/31")).is_err());
        assert!(AddressPool::new(net("10.0.0.1/24")).is_err());
    }
}
