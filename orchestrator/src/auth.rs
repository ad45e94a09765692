//! Credentials and tokens: the two shared credentials (host agents, job
//! submitters), the per-VM tokens, bearer parsing, constant-time comparison,
//! and the random ids the orchestrator hands out.
//!
//! Three kinds of bearer tokens exist and none can stand in for another:
//!
//! * the **host credential** registers and deregisters VMs;
//! * a **VM token** (issued at registration, 256 random bits) acquires at
//!   most one job for its VM and posts that job's events;
//! * the **client credential** submits, reads and cancels jobs.
//!
//! Every comparison of a presented secret goes through [`Secret::matches`]
//! (constant time in the secret's content), so response timing does not leak
//! how many leading bytes of a guess were right.

use std::fmt;

use protocol::api::{VmId, VmToken};
use protocol::message::JobId;
use subtle::ConstantTimeEq;

/// Shortest accepted shared credential, in bytes.
pub const MIN_CREDENTIAL_LEN: usize = 16;

/// Random bytes in a VM token (256 bits).
const TOKEN_BYTES: usize = 32;

/// Random bytes in a job or VM id (128 bits).
const ID_BYTES: usize = 16;

/// Why a credential or a random value could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A shared credential is too short to resist guessing.
    #[error("the {what} must be at least {MIN_CREDENTIAL_LEN} bytes long")]
    WeakCredential {
        /// Which credential.
        what: &'static str,
    },
    /// The host and client credentials are equal, so a job submitter could
    /// register VMs (and the other way round).
    #[error("the host credential and the client credential must differ")]
    SharedCredential,
    /// The operating system's random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(getrandom::Error),
}

/// A secret value compared in constant time; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self(value.into())
    }

    /// Whether `presented` equals this secret. Runs in time independent of
    /// the secret's content (the length may leak, which is public anyway).
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_slice().ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The two shared credentials of an orchestrator.
#[derive(Debug, Clone)]
pub struct Credentials {
    host: Secret,
    client: Secret,
}

impl Credentials {
    /// Checks that both credentials are long enough and differ.
    pub fn new(host: &str, client: &str) -> Result<Self, AuthError> {
        if host.len() < MIN_CREDENTIAL_LEN {
            return Err(AuthError::WeakCredential {
                what: "host credential",
            });
        }
        if client.len() < MIN_CREDENTIAL_LEN {
            return Err(AuthError::WeakCredential {
                what: "client credential",
            });
        }
        if host == client {
            return Err(AuthError::SharedCredential);
        }
        Ok(Self {
            host: Secret::new(host),
            client: Secret::new(client),
        })
    }

    /// Whether `bearer` is the host credential.
    pub fn is_host(&self, bearer: Option<&str>) -> bool {
        bearer.is_some_and(|b| self.host.matches(b))
    }

    /// Whether `bearer` is the client credential.
    pub fn is_client(&self, bearer: Option<&str>) -> bool {
        bearer.is_some_and(|b| self.client.matches(b))
    }
}

/// The bearer a route needs, checked before its body is read (see
/// `http`): a wrong credential is refused without reading a byte of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// None (metrics).
    Public,
    /// The host credential.
    Host,
    /// The client credential.
    Client,
    /// The token of this VM.
    Vm(VmId),
    /// The token of the VM that holds (or held) this job.
    JobVm(JobId),
    /// The client credential or the token of this job's VM.
    ClientOrJobVm(JobId),
    /// Any credential or registered VM token: routes without a rule of
    /// their own (their handlers check exactly).
    Any,
}

/// The token of an `Authorization: Bearer <token>` header value, if the value
/// has that shape (scheme case-insensitive, token non-empty).
pub fn parse_bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A fresh VM token: 256 random bits, hex-encoded.
pub fn new_vm_token() -> Result<VmToken, AuthError> {
    random_hex(TOKEN_BYTES).map(VmToken)
}

/// A fresh VM id: `vm-` and 128 random bits in hex.
pub fn new_vm_id() -> Result<VmId, AuthError> {
    Ok(VmId(format!("vm-{}", random_hex(ID_BYTES)?)))
}

/// A fresh job id: `job-` and 128 random bits in hex (a valid identifier, so
/// it can name archive files).
pub fn new_job_id() -> Result<JobId, AuthError> {
    Ok(JobId(format!("job-{}", random_hex(ID_BYTES)?)))
}

/// `len` random bytes from the OS, as lowercase hex (credentials, ids).
pub fn random_hex(len: usize) -> Result<String, AuthError> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(AuthError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(parse_bearer("Bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("bearer  abc "), Some("abc"));
        assert_eq!(parse_bearer("Basic abc"), None);
        assert_eq!(parse_bearer("Bearer "), None);
        assert_eq!(parse_bearer("Bearer"), None);
    }

    #[test]
    fn secrets_compare_exactly_and_hide_in_debug() {
        let secret = Secret::new("correct horse battery");
        assert!(secret.matches("correct horse battery"));
        assert!(!secret.matches("correct horse batterz"));
        assert!(!secret.matches("correct horse"));
        assert!(!secret.matches(""));
        assert!(!format!("{secret:?}").contains("horse"));
    }

    #[test]
    fn credentials_must_be_long_and_distinct() {
        assert!(matches!(
            Credentials::new("short", "client-credential-1"),
            Err(AuthError::WeakCredential { .. })
        ));
        assert!(matches!(
            Credentials::new("host-credential-1", "short"),
            Err(AuthError::WeakCredential { .. })
        ));
        assert!(matches!(
            Credentials::new("same-credential-1", "same-credential-1"),
            Err(AuthError::SharedCredential)
        ));
        let creds = Credentials::new("host-credential-1", "client-credential-1").unwrap();
        assert!(creds.is_host(Some("host-credential-1")));
        assert!(!creds.is_host(Some("client-credential-1")));
        assert!(creds.is_client(Some("client-credential-1")));
        assert!(!creds.is_client(Some("host-credential-1")));
        assert!(!creds.is_client(None));
    }

    #[test]
    fn tokens_and_ids_are_random_and_well_formed() {
        let a = new_vm_token().unwrap();
        let b = new_vm_token().unwrap();
        assert_eq!(a.0.len(), 64);
        assert!(a.0.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let job = new_job_id().unwrap();
        assert!(protocol::validation::is_identifier(&job.0));
        assert!(job.0.starts_with("job-"));
        assert!(new_vm_id().unwrap().0.starts_with("vm-"));
    }
}
