//! How every sci-cf binary ends on an error: the message and its causes on
//! one line (`error: loading agent.toml: TOML parse error at line 3 ...`)
//! and exit status 1. Returning the error from `main` would print its Debug
//! form instead, a stack backtrace whenever RUST_BACKTRACE is set.
use std::process::ExitCode;

/// Prints `error: {e:#}` to stderr for an error (anyhow's alternate form
/// joins the chain of causes) and turns the result into an exit status.
pub fn exit_code<E: core::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            std::eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
