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
    /// The database refused the data itself (a value out of its range, a
    /// key too large for an index, a constraint): the same data fails
    /// again, so it is refused, never retried.
    #[error("store refused the data: {0}")]
    Rejected(String),
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
    /// Whether the database refused the data (rather than being down or busy).
    pub fn is_rejected(&self) -> bool {
        match self {
            AggregatorError::Rejected(_) => true,
            AggregatorError::Store(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::TypeMismatch
            ),
            _ => false,
        }
    }

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
            AggregatorError::Rejected(_) => tonic::Status::invalid_argument(e.to_string()),
            AggregatorError::Config { .. } => tonic::Status::failed_precondition(e.to_string()),
            AggregatorError::Store(_)
            | AggregatorError::Postgres(_)
            | AggregatorError::QueryTimeout(_)
            | AggregatorError::Io { .. } => tonic::Status::unavailable(e.to_string()),
        }
    }
}
