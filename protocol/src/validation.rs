//! The shared vocabulary of validation errors: a field path plus a problem.
//!
//! Job specs, wire messages and API bodies are all checked with the same
//! (crate-private) `Checker`, so every rejection reads the same way, for example
//! `steps[1].run: must not be empty`. All problems found are reported at once
//! rather than only the first, so a user fixes a spec in one round trip.

use std::collections::BTreeMap;
use std::fmt;

use crate::limits;

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A required string or list is empty.
    #[error("must not be empty")]
    Empty,
    /// A string is longer than allowed.
    #[error("is {len} bytes long, more than the maximum of {max}")]
    TooLong {
        /// Actual length in bytes.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// A list or map has more entries than allowed.
    #[error("has {count} entries, more than the maximum of {max}")]
    TooMany {
        /// Actual number of entries.
        count: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// A string contains a NUL byte (cannot go into argv, env or a path).
    #[error("contains a NUL byte")]
    ContainsNul,
    /// Not a portable environment variable name.
    #[error("is not a valid environment variable name (expected [A-Za-z_][A-Za-z0-9_]*)")]
    BadEnvName,
    /// Not an identifier (ids and labels).
    #[error("must contain only ASCII letters, digits, '.', '_' and '-', and not start with '.'")]
    BadIdentifier,
    /// A number that must be positive is zero.
    #[error("must be at least 1")]
    Zero,
    /// A number is larger than allowed.
    #[error("is {value}, more than the maximum of {max}")]
    TooBig {
        /// Actual value.
        value: u64,
        /// Allowed maximum.
        max: u64,
    },
    /// A step timeout is longer than the timeout of its whole job.
    #[error("is longer than the job timeout ({job_limit})")]
    ExceedsJobTimeout {
        /// The job's timeout, with its unit.
        job_limit: String,
    },
    /// A step index does not name a step of the job.
    #[error("refers to step {step}, but the job has {count} steps")]
    NoSuchStep {
        /// The step index given.
        step: u32,
        /// Number of steps in the job.
        count: usize,
    },
    /// A sequence number does not follow the previous one.
    #[error("is {got}, expected {expected} (one more than the previous)")]
    NotConsecutive {
        /// The sequence number that should have come.
        expected: u64,
        /// The one given.
        got: u64,
    },
}

/// One problem at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where: a field path such as `steps[1].env["1X"]`.
    pub path: String,
    /// What is wrong there.
    pub problem: Problem,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// A non-empty list of violations: the error returned by every `validate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// The individual violations, in the order they were found.
    pub fn list(&self) -> &[Violation] {
        &self.0
    }

    /// Whether some violation is at `path` with `problem`.
    pub fn contains(&self, path: &str, problem: &Problem) -> bool {
        self.0
            .iter()
            .any(|v| v.path == path && &v.problem == problem)
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

/// Whether `name` is a portable environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `id` is a safe identifier: ASCII letters, digits, `.`, `_`, `-`,
/// not starting with `.` (so it can name a file or directory safely).
pub fn is_identifier(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Collects violations while walking a value.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    found: Vec<Violation>,
}

impl Checker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records `problem` at `path`.
    pub(crate) fn report(&mut self, path: impl Into<String>, problem: Problem) {
        self.found.push(Violation {
            path: path.into(),
            problem,
        });
    }

    /// `Ok` if nothing was reported.
    pub(crate) fn finish(self) -> Result<(), Violations> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(Violations(self.found))
        }
    }

    /// Checks a free-text string: bounded length, no NUL, optionally non-empty.
    pub(crate) fn text(&mut self, path: &str, value: &str, max: usize, required: bool) {
        if required && value.trim().is_empty() {
            self.report(path, Problem::Empty);
        } else if value.len() > max {
            self.report(
                path,
                Problem::TooLong {
                    len: value.len(),
                    max,
                },
            );
        } else if value.contains('\0') {
            self.report(path, Problem::ContainsNul);
        }
    }

    /// Checks an identifier (ids, labels).
    pub(crate) fn identifier(&mut self, path: &str, value: &str, max: usize) {
        if value.is_empty() {
            self.report(path, Problem::Empty);
        } else if value.len() > max {
            self.report(
                path,
                Problem::TooLong {
                    len: value.len(),
                    max,
                },
            );
        } else if !is_identifier(value) {
            self.report(path, Problem::BadIdentifier);
        }
    }

    /// Checks a count of entries against a maximum.
    pub(crate) fn count(&mut self, path: &str, count: usize, max: usize) {
        if count > max {
            self.report(path, Problem::TooMany { count, max });
        }
    }

    /// Checks a timeout: at least 1, at most `max`.
    pub(crate) fn timeout(&mut self, path: &str, value: u64, max: u64) {
        if value == 0 {
            self.report(path, Problem::Zero);
        } else if value > max {
            self.report(path, Problem::TooBig { value, max });
        }
    }

    /// Checks an environment map: entry count, names, value sizes.
    pub(crate) fn env(&mut self, path: &str, env: &BTreeMap<String, String>) {
        self.count(path, env.len(), limits::MAX_ENV_VARS);
        for (name, value) in env {
            let entry = format!("{path}[{name:?}]");
            self.env_name(&entry, name);
            self.text(&entry, value, limits::MAX_ENV_VALUE_LEN, false);
        }
    }

    /// Checks an environment variable (or secret) name.
    pub(crate) fn env_name(&mut self, path: &str, name: &str) {
        if name.len() > limits::MAX_ENV_NAME_LEN {
            self.report(
                path,
                Problem::TooLong {
                    len: name.len(),
                    max: limits::MAX_ENV_NAME_LEN,
                },
            );
        } else if !is_env_name(name) {
            self.report(path, Problem::BadEnvName);
        }
    }

    /// Checks a list of labels: non-empty, bounded, each an identifier.
    pub(crate) fn labels(&mut self, path: &str, labels: &[String]) {
        if labels.is_empty() {
            self.report(path, Problem::Empty);
        }
        self.count(path, labels.len(), limits::MAX_LABELS);
        for (i, label) in labels.iter().enumerate() {
            self.identifier(&format!("{path}[{i}]"), label, limits::MAX_LABEL_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for good in ["A", "_", "PATH", "cargo_home", "X1_2"] {
            assert!(is_env_name(good), "{good}");
        }
        for bad in ["", "1X", "A-B", "A B", "A=B", "É", "A\0"] {
            assert!(!is_env_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn identifiers() {
        for good in ["job-1", "x64", "ubuntu.22_04", "a"] {
            assert!(is_identifier(good), "{good}");
        }
        for bad in ["", ".hidden", "..", "a/b", "a b", "ü"] {
            assert!(!is_identifier(bad), "{bad:?}");
        }
    }

    #[test]
    fn violations_display_lists_every_path() {
        let mut checker = Checker::new();
        checker.text("steps[0].run", "", 10, true);
        checker.timeout("timeout-minutes", 0, 10);
        let err = checker.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "steps[0].run: must not be empty; timeout-minutes: must be at least 1"
        );
        assert!(err.contains("timeout-minutes", &Problem::Zero));
    }
}
