//! Builds marker/examples/threads.c with the system C compiler against the
//! crate's `libsci_marker.so` and runs it: several C threads mark flows and the
//! program checks the library's counters against its own tally.
#![allow(clippy::unwrap_used)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cdylib cargo built next to this test binary.
fn cdylib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libsci_marker.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!("libsci_marker.so not found next to {}", exe.display());
}

#[test]
fn c_threads_counters_match() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = cdylib_dir();
    let out = tempfile_dir().join("threads");
    let status = Command::new("cc")
        .arg("-O2")
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("examples/threads.c"))
        .arg("-o")
        .arg(&out)
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-lsci_marker")
        .arg("-lpthread")
        .status()
        .expect("a C compiler (cc) is needed to build the C example");
    assert!(status.success(), "cc failed");
    let run = Command::new(&out)
        .args(["6", "20000"])
        .env("LD_LIBRARY_PATH", &lib_dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "C example found wrong counters:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // 6 threads x 20000 flows + the one credit flow of the name check.
    let total_begun: u64 = stdout
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total_begun, 6 * 20_000 + 1);
}

#[test]
fn marker_symbols_are_exported_from_the_cdylib() {
    let lib = cdylib_dir().join("libsci_marker.so");
    let bytes = std::fs::read(&lib).unwrap();
    // The uprobes attach by symbol name: both must be in the dynamic symbol table.
    let out = Command::new("nm")
        .arg("-D")
        .arg("--defined-only")
        .arg(&lib)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            for sym in [
                "sci_scenario_begin",
                "sci_scenario_end",
                "sci_scenario_completed",
            ] {
                assert!(
                    text.lines()
                        .any(|l| l.split_whitespace().last() == Some(sym)
                            && l.split_whitespace().nth(1) == Some("T")),
                    "{sym} is not an exported function of {}:\n{text}",
                    lib.display()
                );
            }
        }
        _ => {
            // Without binutils, at least the names must be in the file.
            for sym in ["sci_scenario_begin", "sci_scenario_end"] {
                assert!(bytes.windows(sym.len()).any(|w| w == sym.as_bytes()));
            }
        }
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sci-marker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
