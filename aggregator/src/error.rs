use std::path::PathBuf;

/// Errors of the aggregator library.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// aggregator.toml is wrong; the message names the key (and line).
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("store (PostgreSQL): {0}")]
    Postgres(String),
    /// A read query ran past the configured query timeout and was cancelled.
    #[error("query cancelled after the query timeout of {0:?}")]
    QueryTimeout(std::time::Duration),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl AggregatorError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AggregatorError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<AggregatorError> for tonic::Status {
    fn from(e: AggregatorError) -> Self {
        match e {
            AggregatorError::Invalid(m) => tonic::Status::invalid_argument(m),
            AggregatorError::Config { .. } => tonic::Status::failed_precondition(e.to_string()),
            AggregatorError::Store(_)
            | AggregatorError::Postgres(_)
            | AggregatorError::QueryTimeout(_)
            | AggregatorError::Io { .. } => tonic::Status::unavailable(e.to_string()),
        }
    }
}
