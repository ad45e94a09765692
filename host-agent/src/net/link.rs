//! The host side of a VM's tap over rtnetlink: give it its address (the
//! connected /30 route comes with it), bring it up, find leftovers by name
//! prefix, delete it. Deleting the link also deletes its addresses and
//! routes, so teardown is one call.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

/// Errors managing links.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Connect(std::io::Error),
    /// A netlink request failed.
    #[error("{what} {name}: {source}")]
    Request {
        /// What was being done.
        what: &'static str,
        /// The interface.
        name: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// The interface does not exist.
    #[error("no interface named {0}")]
    NotFound(String),
}

/// A netlink connection (its driver runs as a tokio task until dropped).
pub struct Links {
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Links {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Links {
    /// Opens a route-netlink connection.
    pub fn connect() -> Result<Links, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        let driver = tokio::spawn(connection);
        Ok(Links { handle, driver })
    }

    /// Every interface as (index, name).
    async fn all(&self) -> Result<Vec<(u32, String)>, LinkError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Request {
                what: "listing links",
                name: "*".into(),
                source,
            })?;
        Ok(messages
            .into_iter()
            .filter_map(|m| {
                let name = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some((m.header.index, name))
            })
            .collect())
    }

    async fn index_of(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .find_map(|(i, n)| (n == name).then_some(i)))
    }

    /// Names of the interfaces whose name starts with `prefix` followed by
    /// digits only (so `kdl` never matches an unrelated `kdlfoo`).
    pub async fn names_with_prefix(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .map(|(_, n)| n)
            .filter(|n| {
                n.strip_prefix(prefix).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .collect())
    }

    /// Gives `name` the address `address/prefix_len` and brings it up.
    pub async fn configure(
        &self,
        name: &str,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), LinkError> {
        let index = self
            .index_of(name)
            .await?
            .ok_or_else(|| LinkError::NotFound(name.to_string()))?;
        let fail = |what| {
            let name = name.to_string();
            move |source| LinkError::Request { what, name, source }
        };
        self.handle
            .address()
            .add(index, address.into(), prefix_len)
            .execute()
            .await
            .map_err(fail("adding the address to"))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(fail("bringing up"))?;
        Ok(())
    }

    /// Deletes `name` (with its addresses and routes); `false` if it did
    /// not exist.
    pub async fn delete(&self, name: &str) -> Result<bool, LinkError> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| LinkError::Request {
                what: "deleting",
                name: name.to_string(),
                source,
            })?;
        Ok(true)
    }
}
