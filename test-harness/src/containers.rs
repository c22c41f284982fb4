//! A runc bundle from a busybox-static root file system: a real container
//! for the tests and the benchmarks (Debian's `runc` and `busybox-static`,
//! installed by `cargo xtask setup`).
use std::path::Path;
use std::process::Command;

/// Writes a bundle at `dir`: `rootfs/bin` holding busybox (and `sh`,
/// `sleep`, `true` as its applets) and a `config.json` from `runc spec`
/// that runs `script` with `sh`, without a terminal or a network
/// namespace, its cgroup at `cgroups_path`.
pub fn runc_bundle(
    runc: &Path,
    busybox: &Path,
    dir: &Path,
    script: &str,
    cgroups_path: &str,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    let bin = dir.join("rootfs/bin");
    let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    std::fs::create_dir_all(&bin).map_err(|e| io("creating rootfs/bin", e))?;
    std::fs::copy(busybox, bin.join("busybox")).map_err(|e| io("copying busybox", e))?;
    for applet in ["sh", "sleep", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(|e| io("linking an applet", e))?;
    }
    let spec = Command::new(runc)
        .arg("spec")
        .current_dir(dir)
        .output()
        .map_err(|e| format!("running {} spec: {e}", runc.display()))?;
    if !spec.status.success() {
        return Err(format!(
            "runc spec failed: {}",
            String::from_utf8_lossy(&spec.stderr)
        ));
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io("reading config.json", e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("config.json from runc spec: {e}"))?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
    config["linux"]["cgroupsPath"] = cgroups_path.into();
    config["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}
    ]);
    let bytes = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(&path, bytes).map_err(|e| io("writing config.json", e))
}
