//! Helpers shared by the end-to-end tests.

/// Whether privileged (eBPF) tests must run: on CI they must, and fail if they cannot.
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Whether this process runs as root (privileged tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when a privileged test should be skipped, printing one line
/// saying why. On CI it never skips: the test then fails if eBPF cannot load.
pub fn skip_privileged(test: &str) -> bool {
    if ci() || is_root() {
        return false;
    }
    println!("skipping {test}: needs root to load eBPF (runs on CI, where CI=true)");
    true
}
