//! A config error as an operator meets it: with `RUST_BACKTRACE=1` in the
//! environment, both binaries print one line naming the file, the line and
//! the key, and exit with status 1 (no backtrace, no panic). Needs no root.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use sci_tests::cargo_bin;

/// Runs `bin args... --config <file>` on `text` and returns (status, stderr).
fn run_with_config(package: &str, bin: &str, args: &[&str], text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{bin}.toml"));
    std::fs::write(&file, text).unwrap();
    let output = Command::new(cargo_bin(package, bin))
        .args(args)
        .arg("--config")
        .arg(&file)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        file.display().to_string(),
    )
}

fn assert_one_line_naming(stderr: &str, file: &str, line: usize, key: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let error: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "one error line expected:\n{stderr}");
    let error = error[0];
    assert!(error.contains(file), "the file is not named: {error}");
    assert!(
        error.contains(&format!("line {line}")),
        "the line is not named: {error}"
    );
    assert!(error.contains(key), "the key is not named: {error}");
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("backtrace") && !lower.contains("panicked"),
        "a backtrace or panic:\n{stderr}"
    );
}

#[test]
fn aggregator_config_error_is_one_line_with_file_line_and_key() {
    let (status, stderr, file) = run_with_config(
        "sci-aggregator",
        "sci-aggregator",
        &["serve", "--insecure"],
        "database = \"sci.db\"\n\nperod = \"1m\"\n",
    );
    assert_eq!(status, 1, "{stderr}");
    assert_one_line_naming(&stderr, &file, 3, "perod");
}

#[test]
fn agent_config_error_is_one_line_with_file_line_and_key() {
    let (status, stderr, file) = run_with_config(
        "sci-agent",
        "sci-agent",
        &["run", "--insecure"],
        "[agent]\nspool_dir = \"spool\"\nwindow_lenght = \"1s\"\n",
    );
    assert_eq!(status, 1, "{stderr}");
    assert_one_line_naming(&stderr, &file, 3, "window_lenght");
}
