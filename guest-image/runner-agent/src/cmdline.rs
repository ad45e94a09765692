//! The agent's settings on the kernel command line.
//!
//! As PID 1 the agent gets no useful arguments (the kernel hands init the
//! words it does not recognise, which are nobody's flags), and parameters
//! with a dot are never passed to init at all. So the host configures the
//! guest with `kindling.*` parameters, which the agent reads from
//! `/proc/cmdline`:
//!
//! | parameter | meaning |
//! |---|---|
//! | `kindling.scratch=/dev/vdb` | block device holding an (empty) ext4 filesystem for the writable layer; default: tmpfs |
//! | `kindling.hostname=NAME` | guest hostname; default: the one `ip=` set, else `kindling` |
//! | `kindling.connect=ENDPOINT` | host endpoint (see [`crate::channel::Endpoint`]); default `vsock:2:10000` |
//! | `kindling.log=LEVEL` | agent log level: `error`, `warn`, `info` (default), `debug`, `trace` |

use std::path::PathBuf;

/// Why a `kindling.*` parameter was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// A parameter we know has a value we cannot use.
    #[error("kernel parameter {name}={value:?}: {problem}")]
    BadValue {
        /// The parameter name.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A `kindling.*` parameter we do not know (probably a typo).
    #[error("unknown kernel parameter {0}")]
    Unknown(String),
}

/// The `kindling.*` parameters of one kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelParams {
    /// `kindling.scratch`: device of the writable layer.
    pub scratch_device: Option<PathBuf>,
    /// `kindling.hostname`.
    pub hostname: Option<String>,
    /// `kindling.connect`, unparsed.
    pub connect: Option<String>,
    /// `kindling.log`, unparsed.
    pub log_level: Option<String>,
}

/// Longest hostname Linux accepts (`HOST_NAME_MAX`).
const MAX_HOSTNAME_LEN: usize = 64;

impl KernelParams {
    /// Parses a command line (the contents of `/proc/cmdline`). Returns the
    /// parameters it understood and an error for each it refused; a refused
    /// parameter keeps its default.
    pub fn parse(cmdline: &str) -> (Self, Vec<CmdlineError>) {
        let mut params = Self::default();
        let mut errors = Vec::new();
        for word in split_words(cmdline) {
            let Some(rest) = word.strip_prefix("kindling.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let bad = |problem| CmdlineError::BadValue {
                name: format!("kindling.{key}"),
                value: value.to_owned(),
                problem,
            };
            match key {
                "scratch" if value.starts_with("/dev/") && !value.contains("..") => {
                    params.scratch_device = Some(PathBuf::from(value));
                }
                "scratch" => errors.push(bad("must be a device path under /dev/")),
                "hostname" if is_hostname(value) => params.hostname = Some(value.to_owned()),
                "hostname" => errors.push(bad("must be 1-64 letters, digits, '-' or '.'")),
                "connect" if !value.is_empty() => params.connect = Some(value.to_owned()),
                "log" if !value.is_empty() => params.log_level = Some(value.to_owned()),
                "connect" | "log" => errors.push(bad("must not be empty")),
                _ => errors.push(CmdlineError::Unknown(format!("kindling.{key}"))),
            }
        }
        (params, errors)
    }
}

/// Splits a kernel command line into words, honouring double quotes as the
/// kernel does (`name="a value"` is one word, quotes removed).
fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// Whether `name` is an acceptable hostname.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kindling_parameters_and_ignores_the_rest() {
        let (params, errors) = KernelParams::parse(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=erofs \
             init=/sbin/runner-agent ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off \
             kindling.scratch=/dev/vdb kindling.hostname=vm-7 kindling.log=debug\n",
        );
        assert_eq!(errors, vec![]);
        assert_eq!(params.scratch_device, Some(PathBuf::from("/dev/vdb")));
        assert_eq!(params.hostname.as_deref(), Some("vm-7"));
        assert_eq!(params.log_level.as_deref(), Some("debug"));
        assert_eq!(params.connect, None);
    }

    #[test]
    fn quoted_values_are_one_word() {
        let (params, errors) =
            KernelParams::parse(r#"foo="a b" kindling.connect="unix:/tmp/a b.sock""#);
        assert_eq!(errors, vec![]);
        assert_eq!(params.connect.as_deref(), Some("unix:/tmp/a b.sock"));
    }

    #[test]
    fn bad_and_unknown_parameters_are_reported() {
        let (params, errors) = KernelParams::parse(
            "kindling.scratch=vdb kindling.hostname=bad_name! kindling.scrath=/dev/vdb kindling.log=",
        );
        assert_eq!(params, KernelParams::default());
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            matches!(&errors[0], CmdlineError::BadValue { name, .. } if name == "kindling.scratch")
        );
        assert!(matches!(&errors[2], CmdlineError::Unknown(name) if name == "kindling.scrath"));
        let (_, errors) = KernelParams::parse("kindling.scratch=/dev/../etc/passwd");
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn hostnames() {
        assert!(is_hostname("kindling-vm.local"));
        assert!(!is_hostname(""));
        assert!(!is_hostname(&"a".repeat(65)));
        assert!(!is_hostname("a b"));
    }
}
