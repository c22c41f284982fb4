//! A fresh machine, reproduced: the image's nightly toolchain without
//! rust-src (a copy of the rustup home, the component removed), an empty
//! HOME (no bpf-linker, no cargo registry, nothing set up before), only the
//! rustup proxies on PATH, and a fresh `git clone` of the tree under test.
//! There `cargo xtask setup` must succeed from nothing, and leave a toolchain
//! that builds the eBPF object the way the agent's build script does.
//!
//! `SCI_FRESH_MACHINE_REV` picks another commit to clone (to show that an
//! older one fails); by default the checkout's HEAD.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sci_tests::workspace_root;

/// A scratch folder removed on drop, even when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(what: &str, cmd: &mut Command) -> String {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{cmd:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

fn rustup_home() -> PathBuf {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".rustup"))
}

/// The rustup binary the machine's proxies point at.
fn rustup_binary() -> PathBuf {
    let out = Command::new("which").arg("rustup").output().unwrap();
    assert!(out.status.success(), "no rustup on PATH");
    std::fs::canonicalize(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// The environment of a login on the fresh machine: nothing inherited from
/// this test's cargo (toolchain overrides, target dir, flags), HOME empty.
fn fresh_env(cmd: &mut Command, home: &Path, rustup: &Path, bin: &Path) {
    cmd.env_clear()
        .env("HOME", home)
        .env("CARGO_HOME", home.join(".cargo"))
        .env("RUSTUP_HOME", rustup)
        .env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                bin.display()
            ),
        )
        .env("LANG", "C.UTF-8");
}

#[test]
fn a_fresh_clone_on_a_fresh_machine_sets_itself_up() {
    let root = workspace_root();
    let scratch = Scratch(root.join("target/fresh-machine"));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).unwrap();
    let home = scratch.0.join("home");
    std::fs::create_dir_all(&home).unwrap();

    // The toolchains, copied, with nightly's rust-src taken out.
    let rustup = scratch.0.join("rustup");
    run(
        "copying the rustup home",
        Command::new("cp").arg("-a").arg(rustup_home()).arg(&rustup),
    );
    let bin = scratch.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let rustup_bin = rustup_binary();
    for proxy in [
        "rustup",
        "cargo",
        "rustc",
        "rustdoc",
        "rustfmt",
        "cargo-fmt",
    ] {
        std::os::unix::fs::symlink(&rustup_bin, bin.join(proxy)).unwrap();
    }
    let fresh = |program: &str| {
        let mut cmd = Command::new(bin.join(program));
        fresh_env(&mut cmd, &home, &rustup, &bin);
        cmd
    };
    let installed = run(
        "listing nightly's components",
        fresh("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
    );
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        run(
            "removing rust-src from the copy",
            fresh("rustup").args(["component", "remove", "rust-src", "--toolchain", "nightly"]),
        );
    }
    let sysroot = run(
        "nightly's sysroot",
        fresh("rustc").args(["+nightly", "--print", "sysroot"]),
    );
    let rust_src = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library");
    assert!(!rust_src.exists(), "{} is still there", rust_src.display());
    for dir in std::env::split_paths(&format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    )) {
        assert!(
            !dir.join("bpf-linker").exists(),
            "{} has a bpf-linker: not a fresh machine",
            dir.display()
        );
    }

    // A fresh clone of the tree under test.
    let rev = std::env::var("SCI_FRESH_MACHINE_REV").unwrap_or_else(|_| "HEAD".into());
    let clone = scratch.0.join("clone");
    run(
        "cloning the tree under test",
        Command::new("git")
            .args(["clone", "--quiet", "--no-checkout"])
            .arg(&root)
            .arg(&clone),
    );
    let head = run(
        "resolving the revision",
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["rev-parse", &rev]),
    );
    run(
        "checking out",
        Command::new("git")
            .arg("-C")
            .arg(&clone)
            .args(["checkout", "--quiet", head.trim()]),
    );

    // What the README tells a newcomer to run.
    let mut setup = fresh("cargo");
    setup.args(["xtask", "setup"]).current_dir(&clone);
    let setup_out = run("cargo xtask setup on the fresh machine", &mut setup);
    print!("{setup_out}");

    // It left a working toolchain: rust-src, bpf-linker, and the eBPF object
    // built as agent/build.rs builds it.
    assert!(
        rust_src.join("Cargo.lock").exists(),
        "set-up did not install rust-src"
    );
    let linker_dir = home.join(".local/share/sci-cf/bpf-linker/bin");
    let version = run(
        "bpf-linker --version",
        Command::new(linker_dir.join("bpf-linker")).arg("--version"),
    );
    assert!(version.contains("0.13"), "{version}");
    let mut ebpf = fresh("cargo");
    ebpf.args([
        "+nightly",
        "build",
        "--quiet",
        "--package",
        "agent-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .env(
        "PATH",
        format!(
            "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            linker_dir.display(),
            bin.display()
        ),
    )
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "--cfg=bpf_target_arch=\"x86_64\"\u{1f}-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
    )
    .current_dir(&clone);
    run(
        "building the eBPF object with what set-up installed",
        &mut ebpf,
    );
    let object = clone.join("target/bpfel-unknown-none/release/agent-ebpf");
    let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("{}: {e}", object.display()));
    assert_eq!(
        &bytes[..4],
        b"\x7fELF",
        "{} is not an ELF object",
        object.display()
    );
    // e_machine 247 is EM_BPF.
    assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 247);
}
