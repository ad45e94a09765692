//! Where the host agent is reached.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use protocol::ports;

/// Why an endpoint string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Not `vsock:CID:PORT`, `unix:PATH` or `serial:PATH`.
    #[error("endpoint {0:?} is not vsock:CID:PORT, unix:PATH or serial:PATH")]
    Syntax(String),
    /// A CID or port that is not a 32-bit number.
    #[error("endpoint {0:?}: CID and port must be 32-bit numbers")]
    Number(String),
}

/// The host side of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK stream socket to `cid:port`: the production channel.
    Vsock {
        /// Context id to dial (the host is [`ports::HOST_CID`]).
        cid: u32,
        /// Port to dial.
        port: u32,
    },
    /// Unix stream socket: running the agent on a host, in tests.
    Unix(PathBuf),
    /// A serial line (e.g. `/dev/ttyS1`), switched to raw mode: for booting
    /// an image under a VMM that has no vsock device (QEMU without
    /// vhost-vsock). A serial line has no end-of-stream, so the agent cannot
    /// notice a host that went away; use only for debugging.
    Serial(PathBuf),
}

impl Default for Endpoint {
    /// The host agent's runner port on the host CID.
    fn default() -> Self {
        Self::Vsock {
            cid: ports::HOST_CID,
            port: ports::RUNNER_AGENT_PORT,
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || EndpointError::Syntax(text.to_owned());
        let (scheme, rest) = text.split_once(':').ok_or_else(syntax)?;
        match scheme {
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(syntax)?;
                let number = |s: &str| {
                    s.parse::<u32>()
                        .map_err(|_| EndpointError::Number(text.to_owned()))
                };
                Ok(Self::Vsock {
                    cid: number(cid)?,
                    port: number(port)?,
                })
            }
            "unix" if !rest.is_empty() => Ok(Self::Unix(PathBuf::from(rest))),
            "serial" if rest.starts_with('/') => Ok(Self::Serial(PathBuf::from(rest))),
            _ => Err(syntax()),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Serial(path) => write!(f, "serial:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_kind() {
        for text in ["vsock:2:10000", "unix:/run/host.sock", "serial:/dev/ttyS1"] {
            let endpoint: Endpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
        }
        assert_eq!(Endpoint::default().to_string(), "vsock:2:10000");
    }

    #[test]
    fn refuses_malformed_endpoints() {
        for text in [
            "",
            "vsock",
            "vsock:2",
            "tcp:1.2.3.4:5",
            "unix:",
            "serial:ttyS1",
        ] {
            assert!(
                matches!(text.parse::<Endpoint>(), Err(EndpointError::Syntax(_))),
                "{text}"
            );
        }
        assert!(matches!(
            "vsock:two:10000".parse::<Endpoint>(),
            Err(EndpointError::Number(_))
        ));
        assert!(matches!(
            "vsock:2:99999999999".parse::<Endpoint>(),
            Err(EndpointError::Number(_))
        ));
    }
}
