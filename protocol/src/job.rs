//! The job spec: what a user submits, in YAML (or JSON), familiar to GitHub
//! Actions users.
//!
//! ```yaml
//! name: build
//! runs-on: [linux, x64]        # or a single label: runs-on: linux
//! timeout-minutes: 10          # default 60, at most 1440
//! env: { CARGO_TERM_COLOR: always }
//! steps:
//!   - name: hello              # optional; default "Run <first line of run>"
//!     run: echo "hello from $(uname -r)"
//!     working-directory: src   # optional
//!     env: { RUST_LOG: debug } # optional
//!     timeout-minutes: 5       # optional, at most the job's timeout
//! network: false               # optional: run in a VM without any network device
//! ```
//!
//! Unknown fields are errors (a misspelt `timeout-minute` must not silently
//! mean "no timeout"). Secrets are never part of the spec: they are supplied
//! at submission ([`crate::api::SubmitJobRequest`]) and joined to the spec by
//! [`JobSpec::to_job`].
//!
//! YAML is parsed with `serde-saphyr` (pure Rust, panic-free, with budgets
//! against alias bombs and deep nesting) rather than the archived
//! `serde_yaml`. Syntax and type errors name the field path
//! (`steps[1].timeout-minutes`) and, for YAML, the line and column.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::message::{Job, JobId, JobStep, Secrets};
use crate::validation::{Checker, Problem, Violations};

/// A parsed job spec. Construct with [`JobSpec::from_yaml`] or
/// [`JobSpec::from_json`], which also validate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobSpec {
    /// Display name of the job.
    pub name: String,
    /// Labels a VM must all have to run the job (`runs-on`; a string or a list).
    #[serde(deserialize_with = "labels")]
    pub runs_on: Vec<String>,
    /// Wall-clock limit of the job, in minutes (default
    /// [`limits::DEFAULT_JOB_TIMEOUT_MINUTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
    /// Environment of every step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Steps, run in order until one fails.
    pub steps: Vec<StepSpec>,
    /// Whether the job may have a network device (default `true`).
    /// `network: false` is a guarantee: the job only runs in a VM that was
    /// booted without any network device.
    #[serde(default = "network_default", skip_serializing_if = "is_true")]
    pub network: bool,
}

fn network_default() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// One step of a [`JobSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StepSpec {
    /// Display name (default: `Run <first line of run>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Shell script.
    pub run: String,
    /// Directory the script runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Environment added for this step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of this step, in minutes (default: the job's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
}

/// Why a job spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The document is larger than [`limits::MAX_SPEC_BYTES`].
    #[error("job spec is {len} bytes, more than the maximum of {max}")]
    TooLarge {
        /// Document length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The document is not valid YAML/JSON, or does not have the spec's shape
    /// (unknown field, missing field, wrong type).
    #[error("invalid job spec {format} at {path}: {message}")]
    Syntax {
        /// "YAML" or "JSON".
        format: &'static str,
        /// Field path where parsing failed (`.` for the document root).
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The document parsed but breaks a rule of the spec.
    #[error("invalid job spec: {0}")]
    Invalid(#[from] Violations),
}

impl JobSpec {
    /// Parses and validates a YAML job spec.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        check_size(text)?;
        let options = serde_saphyr::options! { with_snippet: false };
        let mut failed_at = None;
        let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            serde_path_to_error::deserialize(de).map_err(|err| {
                failed_at = Some(err.path().to_string());
                err.into_inner()
            })
        });
        let spec: Self = parsed.map_err(|err| SpecError::Syntax {
            format: "YAML",
            path: failed_at.filter(|p| p != "?").unwrap_or_else(|| ".".into()),
            message: err.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a JSON job spec.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        check_size(text)?;
        let syntax = |path: String, err: serde_json::Error| SpecError::Syntax {
            format: "JSON",
            path,
            message: err.to_string(),
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let spec: Self = serde_path_to_error::deserialize(&mut de)
            .map_err(|err| syntax(err.path().to_string(), err.into_inner()))?;
        de.end().map_err(|err| syntax(".".into(), err))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The labels a VM must have to run the job: `runs-on`, plus
    /// [`crate::api::NO_NETWORK_LABEL`] when the job asks for `network: false`
    /// (only VMs booted without a network device carry it).
    pub fn required_labels(&self) -> Vec<String> {
        let mut labels = self.runs_on.clone();
        if !self.network {
            labels.push(crate::api::NO_NETWORK_LABEL.to_string());
        }
        labels
    }

    /// The job's timeout in minutes, default applied.
    pub fn effective_timeout_minutes(&self) -> u32 {
        self.timeout_minutes
            .unwrap_or(limits::DEFAULT_JOB_TIMEOUT_MINUTES)
    }

    /// Checks every rule of the spec; reports all violations at once, each
    /// with the path of the offending field.
    pub fn validate(&self) -> Result<(), Violations> {
        let mut checker = Checker::new();
        checker.text("name", &self.name, limits::MAX_NAME_LEN, true);
        checker.labels("runs-on", &self.runs_on);
        let max_minutes = u64::from(limits::MAX_TIMEOUT_MINUTES);
        if let Some(minutes) = self.timeout_minutes {
            checker.timeout("timeout-minutes", u64::from(minutes), max_minutes);
        }
        checker.env("env", &self.env);
        if self.steps.is_empty() {
            checker.report("steps", Problem::Empty);
        }
        checker.count("steps", self.steps.len(), limits::MAX_STEPS);
        let job_minutes = self.effective_timeout_minutes();
        for (i, step) in self.steps.iter().enumerate() {
            let path = format!("steps[{i}]");
            if let Some(name) = &step.name {
                checker.text(&format!("{path}.name"), name, limits::MAX_NAME_LEN, true);
            }
            checker.text(&format!("{path}.run"), &step.run, limits::MAX_RUN_LEN, true);
            if let Some(dir) = &step.working_directory {
                let dir_path = format!("{path}.working-directory");
                checker.text(&dir_path, dir, limits::MAX_PATH_LEN, true);
            }
            checker.env(&format!("{path}.env"), &step.env);
            if let Some(minutes) = step.timeout_minutes {
                let timeout_path = format!("{path}.timeout-minutes");
                checker.timeout(&timeout_path, u64::from(minutes), max_minutes);
                if minutes > job_minutes && minutes <= limits::MAX_TIMEOUT_MINUTES {
                    checker.report(
                        timeout_path,
                        Problem::ExceedsJobTimeout {
                            job_limit: format!("{job_minutes} minutes"),
                        },
                    );
                }
            }
        }
        let checked = checker.finish();
        if checked.is_ok() {
            // The job itself (without secrets) must fit in one frame.
            return self
                .build_job(JobId("size-check".into()), Secrets::default())
                .validate();
        }
        checked
    }

    /// The job to send to a guest: the spec with `id` and `secrets` joined
    /// and every default applied. Validates the result, secrets included.
    pub fn to_job(&self, id: JobId, secrets: Secrets) -> Result<Job, Violations> {
        self.validate()?;
        let job = self.build_job(id, secrets);
        job.validate()?;
        Ok(job)
    }

    fn build_job(&self, id: JobId, secrets: Secrets) -> Job {
        Job {
            id,
            name: self.name.clone(),
            steps: self
                .steps
                .iter()
                .map(|step| JobStep {
                    name: step
                        .name
                        .clone()
                        .unwrap_or_else(|| default_step_name(&step.run)),
                    run: step.run.clone(),
                    working_directory: step.working_directory.clone(),
                    env: step.env.clone(),
                    timeout_secs: step.timeout_minutes.map(|m| u64::from(m) * 60),
                })
                .collect(),
            env: self.env.clone(),
            secrets,
            timeout_secs: u64::from(self.effective_timeout_minutes()) * 60,
        }
    }
}

fn check_size(text: &str) -> Result<(), SpecError> {
    if text.len() > limits::MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge {
            len: text.len(),
            max: limits::MAX_SPEC_BYTES,
        });
    }
    Ok(())
}

/// `Run <first non-empty line of the script>`, cut to [`limits::MAX_NAME_LEN`].
fn default_step_name(run: &str) -> String {
    let first_line = run
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut name = format!("Run {first_line}");
    if name.len() > limits::MAX_NAME_LEN {
        let mut cut = limits::MAX_NAME_LEN;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

/// Deserializes `runs-on`: one label or a list of labels.
fn labels<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct LabelsVisitor;

    impl<'de> Visitor<'de> for LabelsVisitor {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a label or a list of labels")
        }

        fn visit_str<E: de::Error>(self, label: &str) -> Result<Vec<String>, E> {
            Ok(vec![label.to_owned()])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut labels = Vec::new();
            while let Some(label) = seq.next_element::<String>()? {
                if labels.len() == limits::MAX_LABELS {
                    return Err(de::Error::invalid_length(
                        limits::MAX_LABELS + 1,
                        &"at most 32 labels",
                    ));
                }
                labels.push(label);
            }
            Ok(labels)
        }
    }

    deserializer.deserialize_any(LabelsVisitor)
}

#[cfg(test)]
mod tests;
