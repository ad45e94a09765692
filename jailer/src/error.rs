//! The jailer's errors: each names the step that failed.

/// Errors of the jailer (each names the step that failed).
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// A system call of a jail step failed.
    #[error("jailer: {step}: {source}")]
    Sys {
        /// The step.
        step: String,
        /// The errno.
        source: nix::Error,
    },
    /// A file operation of a jail step failed.
    #[error("jailer: {step}: {source}")]
    Io {
        /// The step.
        step: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An argument is unusable.
    #[error("jailer: {0}")]
    Invalid(String),
}

/// Maps a failed system call of `step` to [`JailerError::Sys`].
pub(crate) fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailerError {
    let step = step.into();
    move |source| JailerError::Sys { step, source }
}

/// Maps a failed file operation of `step` to [`JailerError::Io`].
pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailerError {
    let step = step.into();
    move |source| JailerError::Io { step, source }
}
