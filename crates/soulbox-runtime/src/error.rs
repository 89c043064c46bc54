//! The runtime's error type.

use std::io;

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("invalid sandbox id {0:?}: expected 20 characters of [a-z0-9]")]
    InvalidId(String),
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("sandbox {0} has no kept state to resume")]
    NotFound(String),
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    #[error("no free uid range for another sandbox")]
    NoUidRange,
    #[error("host not supported: {0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The sandbox's PID 1 failed while setting itself up, before it ran anything.
    #[error("sandbox init failed at {step}: {source}")]
    Init {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("timed out {0}")]
    Timeout(String),
}

/// Attaches what was being done to an OS error.
pub(crate) trait Context<T> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, RuntimeError>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::Io {
            context: what().into(),
            source: e.into(),
        })
    }
}
