//! What procfs says about a process: enrichment for the window document.
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::window::Text;

/// Identity and labels of a process, read from `/proc/<pid>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub comm: Text,
    pub exe: Option<Text>,
    pub cmdline: Option<Text>,
    pub cgroup: Option<Text>,
    pub container_id: Option<Text>,
    /// Environment variables the scenario rules may look at (only `SCI_*` ones are kept).
    pub env: Vec<(String, String)>,
    pub start_ticks: u64,
    /// CLOCK_MONOTONIC at the fork that made this process a copy of its
    /// origin, while it has not exec'd and its own command line (the title a
    /// server gives its workers) is still to be read; 0 otherwise.
    pub forked_ktime_ns: u64,
}

impl ProcInfo {
    /// The description of a process nobody could read (one shared value).
    pub fn undescribed() -> Arc<ProcInfo> {
        static UNDESCRIBED: OnceLock<Arc<ProcInfo>> = OnceLock::new();
        Arc::clone(UNDESCRIBED.get_or_init(|| Arc::new(ProcInfo::default())))
    }

    /// Moves the description to the cgroup at `path` (the container id follows).
    pub fn set_cgroup(&mut self, path: Text) {
        self.container_id = container_id_from_cgroup(&path).map(Text::from);
        self.cgroup = Some(path);
    }

    /// Gives a window's process this description (its CPU figures stay).
    pub fn describe(self: &Arc<Self>, process: &mut super::ProcessCpu) {
        process.info = Arc::clone(self);
        process.start_ticks = Some(self.start_ticks);
    }
}

/// Fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    pub ppid: u32,
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat` text: `pid (comm) state ppid ... utime stime ... starttime ...`.
/// The comm may contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<(String, StatFields)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some((
        comm,
        StatFields {
            ppid: field(4)? as u32,
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            start_ticks: field(22)?,
        },
    ))
}

pub fn read_stat(proc_root: &Path, pid: u32) -> Option<(String, StatFields)> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text)
}

/// The cgroup v2 path of a process (the `0::` line of /proc/<pid>/cgroup).
pub fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|p| p.to_string())
}

/// Container id named by a cgroup path: docker, containerd/CRI-O and podman
/// scopes and the plain `/docker/<id>` layout all end in a 64-hex-digit id.
pub fn container_id_from_cgroup(path: &str) -> Option<String> {
    path.split('/').rev().find_map(|component| {
        let trimmed = component.strip_suffix(".scope").unwrap_or(component);
        let candidate = trimmed.rsplit(['-', ':']).next().unwrap_or(trimmed);
        (candidate.len() == 64 && candidate.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| candidate.to_string())
    })
}

/// Only the `SCI_*` variables are kept: scenario rules may look at them, the
/// rest of a process's environment is none of the agent's business.
pub fn parse_sci_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter(|entry| entry.starts_with("SCI_"))
        .filter_map(|entry| entry.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Reads everything the window document shows about `pid`; None when the process is gone.
pub fn read_proc_info(proc_root: &Path, pid: u32) -> Option<ProcInfo> {
    read_proc_info_with(proc_root, pid, true)
}

/// [`read_proc_info`]; the `SCI_*` environment only with `environ` (no
/// scenario rule looks at it otherwise: one procfs read saved per process).
pub fn read_proc_info_with(proc_root: &Path, pid: u32, environ: bool) -> Option<ProcInfo> {
    let dir = proc_root.join(pid.to_string());
    let (comm, stat) = read_stat(proc_root, pid)?;
    let exe = std::fs::read_link(dir.join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let cmdline = read_cmdline(&dir);
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| parse_cgroup_v2(&text));
    let container_id = cgroup.as_deref().and_then(container_id_from_cgroup);
    let env = if environ {
        read_sci_environ(&dir)
    } else {
        Vec::new()
    };
    Some(ProcInfo {
        pid,
        ppid: stat.ppid,
        comm: comm.into(),
        exe: exe.map(Text::from),
        cmdline: cmdline.map(Text::from),
        container_id: container_id.map(Text::from),
        cgroup: cgroup.map(Text::from),
        env,
        start_ticks: stat.start_ticks,
        forked_ktime_ns: 0,
    })
}

/// Re-reads what an exec changes (exe, cmdline, `SCI_*` environment) into
/// the description a process had before it: its parent, start and cgroup
/// stay. Three reads instead of [`read_proc_info`]'s five. When the process
/// is gone already, what exec changed is unknown: exe, cmdline and
/// environment are cleared (not left as the parent's) and false is returned.
pub fn refresh_after_exec(proc_root: &Path, info: &mut ProcInfo, environ: bool) -> bool {
    let dir = proc_root.join(info.pid.to_string());
    let exe = std::fs::read_link(dir.join("exe")).ok();
    if exe.is_none() && !dir.exists() {
        info.exe = None;
        info.cmdline = None;
        info.env.clear();
        return false;
    }
    info.exe = exe.map(|p| Text::from(p.to_string_lossy()));
    info.cmdline = read_cmdline(&dir).map(Text::from);
    info.env = if environ {
        read_sci_environ(&dir)
    } else {
        Vec::new()
    };
    true
}

/// The capabilities this agent lacks to read another user's
/// `/proc/<pid>/environ`: opening the file (mode 0400, owned by the
/// process's user) needs CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE), and the
/// access check behind it CAP_SYS_PTRACE. What deploy/ grants (BPF,
/// PERFMON, SYS_PTRACE) is not enough. Empty when none is missing.
fn environ_capabilities_missing() -> Vec<&'static str> {
    use crate::capabilities::missing_capabilities;
    let mut missing = Vec::new();
    if missing_capabilities(&[("CAP_DAC_READ_SEARCH", 2)]).len()
        + missing_capabilities(&[("CAP_DAC_OVERRIDE", 1)]).len()
        == 2
    {
        missing.push("CAP_DAC_READ_SEARCH");
    }
    missing.extend(missing_capabilities(&[("CAP_SYS_PTRACE", 19)]));
    missing
}

/// The note said once when other users' environments cannot be read.
static ENVIRON_NOTE: std::sync::Once = std::sync::Once::new();

/// Says once, at start, when `env` or `from_env` scenario rules cannot see
/// the environment of other users' processes (a root service with
/// `SCI_SCENARIO=credit` stayed unmatched in silence), naming the
/// capabilities the agent lacks. True when they can.
pub fn say_if_environs_unreadable() -> bool {
    let missing = environ_capabilities_missing();
    if missing.is_empty() {
        return true;
    }
    ENVIRON_NOTE.call_once(|| {
        tracing::warn!(
            "permission: `env` scenario rules cannot read other users' process environments (/proc/<pid>/environ): they match only the processes of this agent's user; grant {} (see deploy/systemd/sci-agent.service)",
            missing.join(" and ")
        )
    });
    false
}

/// The `SCI_*` variables of `<dir>/environ`; empty when the process is gone
/// or the file cannot be read. Whether `env` rules can read other users'
/// environments at all is said once at start ([`say_if_environs_unreadable`],
/// only when a rule reads them: the environment is also read without rules,
/// where a refusal means nothing).
pub fn read_sci_environ(dir: &Path) -> Vec<(String, String)> {
    std::fs::read(dir.join("environ"))
        .map(|bytes| parse_sci_environ(&bytes))
        .unwrap_or_default()
}

/// The command line of a live process as procfs has it now (its title, for
/// a server that rewrites its argument area); None when it is gone.
pub fn read_title(proc_root: &Path, pid: u32) -> Option<String> {
    read_cmdline(&proc_root.join(pid.to_string()))
}

fn read_cmdline(dir: &Path) -> Option<String> {
    std::fs::read(dir.join("cmdline"))
        .ok()
        .and_then(|bytes| cmdline_from_args(&bytes))
}

/// A command line from an argument vector as /proc/PID/cmdline holds it
/// (NUL-separated words): the words joined by spaces; None when empty.
pub fn cmdline_from_args(args: &[u8]) -> Option<String> {
    let words: Vec<String> = args
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// Maps cgroup v2 ids (as `bpf_get_current_cgroup_id` returns them: the inode
/// number of the cgroup's directory) back to paths: groups made while the
/// agent runs are learnt from the moves into them (their path comes with
/// the event) or, for a fork placed straight into one, by walking the
/// hierarchy again. Each walk replaces the map, so removed groups leave
/// it; one is forced once the map has doubled since the last.
#[derive(Debug, Default)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    by_id: HashMap<u64, Text>,
    /// Entries the last walk found.
    walked: usize,
    /// Ids the last walk did not find (asked again, they do not walk again).
    missed: std::collections::HashSet<u64>,
    /// Walks of the hierarchy since start (for the cost of following groups).
    pub walks: u64,
}

impl CgroupPaths {
    /// Finds the cgroup2 mount (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
    pub fn discover() -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = mounts.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            let (_dev, mount, fstype) = (parts.next()?, parts.next()?, parts.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(mount))
        });
        CgroupPaths {
            root,
            ..Default::default()
        }
    }

    pub fn path_of(&mut self, cgroup_id: u64) -> Option<Text> {
        if cgroup_id == 0 {
            return None;
        }
        if let Some(path) = self.by_id.get(&cgroup_id) {
            return Some(path.clone());
        }
        if self.missed.contains(&cgroup_id) {
            return None;
        }
        self.rescan();
        let found = self.by_id.get(&cgroup_id).cloned();
        if found.is_none() {
            self.missed.insert(cgroup_id);
        }
        found
    }

    /// Records the path of a group (from a move into it).
    pub fn learn(&mut self, cgroup_id: u64, path: &str) {
        if cgroup_id == 0 {
            return;
        }
        if self.by_id.len() > 2 * self.walked + 1024 {
            self.rescan();
        }
        self.by_id.insert(cgroup_id, Text::from(path));
    }

    fn rescan(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        self.walks += 1;
        self.by_id.clear();
        self.missed.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = std::fs::metadata(&dir) {
                let relative = dir.strip_prefix(&root).unwrap_or(&dir);
                self.by_id.insert(
                    meta.ino(),
                    Text::from(format!("/{}", relative.to_string_lossy())),
                );
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(entry.path());
                    }
                }
            }
        }
        self.walked = self.by_id.len();
    }
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            ticks as u64
        } else {
            100
        }
    })
}

/// Online CPU numbers, from /sys/devices/system/cpu/online ("0-3,6").
pub fn online_cpus() -> Vec<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut cpus = Vec::new();
    for range in text.trim().split(',').filter(|r| !r.is_empty()) {
        match range.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    cpus.extend(a..=b);
                }
            }
            None => {
                if let Ok(cpu) = range.parse() {
                    cpus.push(cpu);
                }
            }
        }
    }
    if cpus.is_empty() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        cpus.extend(0..n as u32);
    }
    cpus
}

/// Host name from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let text = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 1 0 98765 1000 50 18446744073709551615";
        let (comm, stat) = parse_stat(text).expect("parses");
        assert_eq!(comm, "my (odd) proc");
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.utime_ticks, 250);
        assert_eq!(stat.stime_ticks, 37);
        assert_eq!(stat.start_ticks, 98765);
    }

    #[test]
    fn own_stat_matches_getppid() {
        let (_, stat) = read_stat(Path::new("/proc"), std::process::id()).expect("self");
        // SAFETY: getppid has no preconditions.
        assert_eq!(stat.ppid, unsafe { libc::getppid() } as u32);
    }

    #[test]
    fn container_ids_from_common_layouts() {
        let id = "a".repeat(64);
        assert_eq!(
            container_id_from_cgroup(&format!("/system.slice/docker-{id}.scope")),
            Some(id.clone())
        );
        assert_eq!(
            container_id_from_cgroup(&format!(
                "/kubepods/besteffort/pod1234/cri-containerd-{id}.scope"
            )),
            Some(id.clone())
        );
        assert_eq!(container_id_from_cgroup(&format!("/docker/{id}")), Some(id));
        assert_eq!(
            container_id_from_cgroup("/user.slice/session-3.scope"),
            None
        );
    }

    #[test]
    fn only_sci_variables_are_kept() {
        let env =
            parse_sci_environ(b"HOME=/root\0SCI_SCENARIO=credit\0SECRET=x\0SCI_SERVICE=loan\0");
        assert_eq!(
            env,
            vec![
                ("SCI_SCENARIO".to_string(), "credit".to_string()),
                ("SCI_SERVICE".to_string(), "loan".to_string())
            ]
        );
    }

    #[test]
    fn cgroup_v2_line() {
        assert_eq!(
            parse_cgroup_v2("12:cpu,cpuacct:/x\n0::/system.slice/foo.service\n"),
            Some("/system.slice/foo.service".to_string())
        );
    }
}
