use std::path::PathBuf;

/// Errors of the workload library.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("SQLite database {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("SQLite query in the {scenario} flow: {source}")]
    Flow {
        scenario: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl WorkloadError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        WorkloadError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        WorkloadError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}
