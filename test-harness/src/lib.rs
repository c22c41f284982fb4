//! What `xtask` and the end-to-end tests share. This crate builds with the
//! stable toolchain alone: `cargo xtask` compiles it before set-up has
//! installed nightly's rust-src and bpf-linker, so it must never depend,
//! directly or through another crate, on one whose build script compiles the
//! eBPF object (xtask's `dependency_closure_builds_no_ebpf` test checks).

pub mod containers;
pub mod http;
pub mod postgres;

// The one skip rule of privileged tests (agent-common, feature test-support),
// shared with the agent's own tests.
pub use agent_common::privileged::{
    ci, is_root, record_skip, skip_privileged, skip_privileged_because, SKIP_LOG_ENV,
};

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
    record_skip(
        test,
        &format!(
            "{} is not installed (run `cargo xtask setup`)",
            path.display()
        ),
    );
    None
}

/// Waits until `condition` holds, polling every 5 ms; panics naming `what`
/// after 20 s. Readiness is a condition, never a fixed sleep.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting after 20 s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until the spawned child `pid` runs `program` (its exec is done,
/// so rules on its executable, command line and environment can match).
pub fn wait_for_exec(pid: u32, program: &std::path::Path) {
    let program =
        std::fs::canonicalize(program).unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    wait_until(&format!("pid {pid} to exec {}", program.display()), || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program)
    });
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

/// A cargo command without the variables cargo sets for the package it runs
/// or tests (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...): some build
/// scripts rerun when those change (ring's does, for `CARGO_PKG_NAME`), so
/// a build started from a test or from xtask would otherwise recompile
/// ring and everything above it, in whichever profile it builds.
pub fn cargo() -> std::process::Command {
    const PER_PACKAGE: [&str; 6] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
    ];
    let mut cargo =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(|n| PER_PACKAGE.iter().any(|p| n.starts_with(p)))
        {
            cargo.env_remove(name);
        }
    }
    cargo
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
        let status = cargo()
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_string());
    }
    path
}
