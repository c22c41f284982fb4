//! The rules an operator or node label follows, wherever it comes from
//! (`[host] labels`, `labels_file`, the Kubernetes node).
use crate::error::AgentError;

/// Longest label key and value (Kubernetes' limit for a name segment and a value).
pub const MAX_LABEL_BYTES: usize = 63;
/// Most labels per host.
pub const MAX_LABELS: usize = 32;

fn config_error(key: &str, message: String) -> AgentError {
    AgentError::Config {
        path: key.into(),
        message,
    }
}

/// A label key: 1 to 63 bytes of letters, digits, `.`, `_`, `-` and `/`
/// (Kubernetes' prefixed names); a value: at most 63 bytes, no control
/// characters.
pub(crate) fn check_label(key: &str, value: &str, at: &str) -> Result<(), AgentError> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_LABEL_BYTES
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !key_ok {
        return Err(config_error(
            at,
            format!("label key {key:?} must be 1 to {MAX_LABEL_BYTES} letters, digits, '.', '_', '-' or '/'"),
        ));
    }
    if value.len() > MAX_LABEL_BYTES || value.chars().any(char::is_control) {
        return Err(config_error(
            at,
            format!("label {key:?}: value of {} bytes (at most {MAX_LABEL_BYTES}, no control characters)", value.len()),
        ));
    }
    Ok(())
}
