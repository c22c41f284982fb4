//! Helpers shared by the end-to-end tests.

pub mod fleet;
pub mod postgres;

/// Whether privileged (eBPF) tests must run: on CI they must, and fail if they cannot.
pub fn ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
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

/// A tool that the project's `cargo xtask setup` installs. Returns None (after
/// printing one line) when it is missing outside CI; on CI a missing tool
/// is a failure of the set-up, so this panics.
pub fn provisioned_tool(path: &std::path::Path, test: &str) -> Option<std::path::PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    assert!(
        !ci(),
        "{test}: {} is missing on CI: `cargo xtask setup` should have installed it",
        path.display()
    );
    println!(
        "skipping {test}: {} is not installed (run `cargo xtask setup`)",
        path.display()
    );
    None
}

/// Where `cargo xtask setup` keeps what it installs.
pub fn sci_home() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::PathBuf::from(home).join(".local/share/sci-cf")
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds (once per test binary) and returns the path of a workspace binary,
/// so end-to-end tests run the real executables whatever was built before.
pub fn cargo_bin(package: &str, bin: &str) -> std::path::PathBuf {
    use std::sync::Mutex;
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target_dir.join("debug").join(bin);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_string());
    }
    path
}
