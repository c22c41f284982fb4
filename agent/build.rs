//! Builds agent-ebpf for bpfel-unknown-none with aya-build (nightly + bpf-linker,
//! both provisioned by `cargo xtask setup`, which every xtask command runs first).
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    // bpf-linker lives where `cargo xtask setup` installs it; make it findable
    // without asking the developer to edit PATH.
    if let Some(home) = env::var_os("HOME") {
        let linker_bin = PathBuf::from(home).join(".local/share/sci-cf/bpf-linker/bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![linker_bin];
        paths.extend(env::split_paths(&path));
        let joined = env::join_paths(paths).context("PATH")?;
        // SAFETY-free in edition 2021: build scripts are single-threaded here.
        env::set_var("PATH", joined);
    }
    println!("cargo:rerun-if-changed=../agent-common/src");
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = PathBuf::from(manifest_dir).join("../agent-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    // The benchmark's baseline program goes into the object only for sci-bench.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["bench"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building agent-ebpf (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}
