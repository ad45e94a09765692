//! How one step's shell is started: shell, arguments, environment, working
//! directory, process group.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use protocol::message::{Job, JobStep};

/// `PATH` of every step (Debian's default for root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where bash may live, in order of preference.
const BASH_CANDIDATES: [&str; 2] = ["/bin/bash", "/usr/bin/bash"];

/// The POSIX shell used when there is no bash.
const POSIX_SHELL: &str = "/bin/sh";

/// Why a step could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The step's working directory is missing or not a directory.
    #[error("working directory {} does not exist or is not a directory", .0.display())]
    WorkingDirectory(PathBuf),
    /// `fork`/`exec` of the shell failed.
    #[error("cannot start {}: {source}", shell.display())]
    Spawn {
        /// The shell we tried.
        shell: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// The shell that runs step scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shell {
    /// Absolute path of the shell binary.
    pub path: PathBuf,
    /// Whether it is bash (so `-o pipefail` and `--noprofile --norc` apply).
    pub is_bash: bool,
}

impl Shell {
    /// bash if the image has it, else `/bin/sh`.
    pub fn detect() -> Self {
        BASH_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|path| path.is_file())
            .map_or_else(|| Self::at(Path::new(POSIX_SHELL)), Self::at)
    }

    /// The shell at `path` (bash if its file name is `bash`).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            is_bash: path.file_name().is_some_and(|name| name == "bash"),
        }
    }

    /// Arguments that run `script` failing on the first failing command
    /// (and, with bash, on a failing pipeline stage), like GitHub Actions'
    /// `bash --noprofile --norc -eo pipefail`.
    pub fn args(&self, script: &str) -> Vec<OsString> {
        let flags: &[&str] = if self.is_bash {
            &["--noprofile", "--norc", "-e", "-o", "pipefail", "-c"]
        } else {
            &["-e", "-c"]
        };
        flags
            .iter()
            .map(OsString::from)
            .chain([OsString::from(script)])
            .collect()
    }
}

/// The environment of step `index`: a clean base, then the job's `env`,
/// then the secrets, then the step's `env` (later entries win). Nothing of
/// the agent's own environment leaks in.
pub fn environment(
    job: &Job,
    step: &JobStep,
    index: u32,
    workspace: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        ("USER".to_owned(), "root".to_owned()),
        ("LOGNAME".to_owned(), "root".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("CI".to_owned(), "true".to_owned()),
        ("KINDLING".to_owned(), "true".to_owned()),
        ("KINDLING_JOB_ID".to_owned(), job.id.0.clone()),
        ("KINDLING_STEP".to_owned(), index.to_string()),
        (
            "KINDLING_WORKSPACE".to_owned(),
            workspace.display().to_string(),
        ),
    ]);
    env.extend(job.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(job.secrets.0.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The step's working directory: the workspace, or its `working_directory`
/// relative to the workspace (an absolute one is used as is). It must exist.
pub fn working_directory(workspace: &Path, step: &JobStep) -> Result<PathBuf, StepError> {
    let dir = match &step.working_directory {
        Some(dir) => workspace.join(dir),
        None => workspace.to_path_buf(),
    };
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(StepError::WorkingDirectory(dir))
    }
}

/// The command running `step`: its own process group (so the whole tree can
/// be signalled at once), stdin from `/dev/null`, stdout and stderr piped.
pub fn command(
    shell: &Shell,
    step: &JobStep,
    env: &BTreeMap<String, String>,
    cwd: &Path,
) -> Command {
    let mut command = Command::new(&shell.path);
    command
        .args(shell.args(&step.run))
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    command
}

#[cfg(test)]
mod tests {
    use protocol::message::{JobId, Secrets};

    use super::*;

    fn job() -> Job {
        Job {
            id: JobId("job-1".into()),
            name: "t".into(),
            steps: vec![step(None)],
            env: BTreeMap::from([
                ("A".into(), "job".into()),
                ("B".into(), "job".into()),
                ("PATH".into(), "/custom".into()),
            ]),
            secrets: Secrets(BTreeMap::from([
                ("B".into(), "secret".into()),
                ("C".into(), "secret".into()),
            ])),
            timeout_secs: 60,
        }
    }

    fn step(dir: Option<&str>) -> JobStep {
        JobStep {
            name: "s".into(),
            run: "true".into(),
            working_directory: dir.map(str::to_owned),
            env: BTreeMap::from([("C".into(), "step".into())]),
            timeout_secs: None,
        }
    }

    #[test]
    fn environment_layers_in_order() {
        let job = job();
        let env = environment(&job, &job.steps[0], 2, Path::new("/workspace"));
        assert_eq!(env["A"], "job");
        assert_eq!(env["B"], "secret", "secrets override the job env");
        assert_eq!(env["C"], "step", "the step env overrides everything");
        assert_eq!(env["PATH"], "/custom");
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["CI"], "true");
        assert_eq!(env["KINDLING_STEP"], "2");
        assert_eq!(env["KINDLING_JOB_ID"], "job-1");
        assert_eq!(env["KINDLING_WORKSPACE"], "/workspace");
    }

    #[test]
    fn working_directory_is_resolved_in_the_workspace() {
        let workspace = tempfile::tempdir().unwrap();
        std::fs::create_dir(workspace.path().join("src")).unwrap();
        assert_eq!(
            working_directory(workspace.path(), &step(None)).unwrap(),
            workspace.path()
        );
        assert_eq!(
            working_directory(workspace.path(), &step(Some("src"))).unwrap(),
            workspace.path().join("src")
        );
        assert_eq!(
            working_directory(workspace.path(), &step(Some("/"))).unwrap(),
            Path::new("/")
        );
        assert!(matches!(
            working_directory(workspace.path(), &step(Some("missing"))),
            Err(StepError::WorkingDirectory(_))
        ));
    }

    #[test]
    fn shell_arguments() {
        let bash = Shell::at(Path::new("/usr/bin/bash"));
        assert!(bash.is_bash);
        assert_eq!(
            bash.args("echo hi"),
            [
                "--noprofile",
                "--norc",
                "-e",
                "-o",
                "pipefail",
                "-c",
                "echo hi"
            ]
        );
        let sh = Shell::at(Path::new("/bin/sh"));
        assert!(!sh.is_bash);
        assert_eq!(sh.args("echo hi"), ["-e", "-c", "echo hi"]);
    }
}
