//! The one rule for privileged (eBPF) tests, shared by the agent's own tests
//! and the end-to-end tests (feature `test-support`, never in the agent).
//!
//! On CI (`CI` set to true/1/yes/on, any case) a privileged test always runs
//! and fails if eBPF cannot load; elsewhere it runs as root and otherwise
//! skips with one line saying why. libtest captures the output of passing
//! tests, so a skip is also appended to the file named by `SCI_SKIP_LOG`
//! (set by `cargo xtask test`), which counts the skips from that file and
//! fails when any happened under CI.
use std::io::Write as _;
use std::string::String;

/// Environment variable naming the file that skips are appended to.
pub const SKIP_LOG_ENV: &str = "SCI_SKIP_LOG";

/// Whether `value` of an environment variable means "on".
pub fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on"
    )
}

/// Whether this runs on CI, where privileged tests must run (and fail if they cannot).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| is_truthy(&v))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when a privileged test must be skipped (not root, not CI), after
/// recording the skip with `reason`; on CI or as root it never skips.
pub fn skip_privileged_because(test: &str, reason: &str) -> bool {
    if ci() || is_root() {
        return false;
    }
    record_skip(test, reason);
    true
}

/// [`skip_privileged_because`] for the usual reason: loading eBPF needs root.
pub fn skip_privileged(test: &str) -> bool {
    skip_privileged_because(test, "needs root to load eBPF (runs on CI, where CI=true)")
}

/// Prints `skipping TEST: REASON` and appends the same line to the file
/// named by `SCI_SKIP_LOG`, when set.
pub fn record_skip(test: &str, reason: &str) {
    let line: String = std::format!("skipping {test}: {reason}\n");
    std::print!("{line}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    // One write of the whole line on an O_APPEND file: lines of tests
    // running in parallel do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = written {
        std::eprintln!(
            "cannot record the skip of {test} in {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::is_truthy;

    #[test]
    fn ci_values_in_any_spelling() {
        for on in [
            "true", "TRUE", "True", "1", "yes", "YES", "on", "On", " true\n",
        ] {
            assert!(is_truthy(on), "{on:?}");
        }
        for off in ["", "false", "0", "no", "off", "2", "truthy"] {
            assert!(!is_truthy(off), "{off:?}");
        }
    }
}
