//! Scratch cgroup v2 groups: the ground truth (`cpu.stat usage_usec`) for
//! the CPU time of a group of processes, and ways to start a process in one
//! as the real tools do (`cgroup.procs` before exec, as cgexec and runc do;
//! `clone3(CLONE_INTO_CGROUP)`, as systemd does).
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The cgroup2 mount (`/sys/fs/cgroup/unified` on a hybrid layout).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            let (_dev, mount, fstype) = (parts.next()?, parts.next()?, parts.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(mount))
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mounts"))
}

/// `usage_usec` of a `cpu.stat`, in ns.
pub fn cpu_stat_usage_ns(dir: &Path) -> u64 {
    let path = dir.join("cpu.stat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no usage_usec in {text:?}", path.display()));
    usec * 1000
}

/// A scratch cgroup v2 group; on drop its processes go back to the root and
/// it is removed (with the groups it holds).
pub struct ScratchCgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl ScratchCgroup {
    /// A group at `relative` under the cgroup2 root (parents created too).
    pub fn create(relative: &str) -> ScratchCgroup {
        let root = cgroup2_root();
        let dir = root.join(relative.trim_start_matches('/'));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        ScratchCgroup { root, dir }
    }

    /// The path the agent reports (relative to the cgroup2 mount).
    pub fn path(&self) -> String {
        format!(
            "/{}",
            self.dir
                .strip_prefix(&self.root)
                .unwrap_or(&self.dir)
                .display()
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn add(&self, pid: u32) {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("{} <- {pid}: {e}", procs.display()));
    }

    pub fn usage_ns(&self) -> u64 {
        cpu_stat_usage_ns(&self.dir)
    }

    /// Makes `command` join this group between its fork and its exec (what
    /// cgexec does: `echo 0 > cgroup.procs; exec ...`).
    pub fn enter_before_exec(&self, command: &mut Command) {
        let procs = self.dir.join("cgroup.procs");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
        let fd = OwnedFd::from(file);
        // SAFETY: the hook only calls write(2) (async-signal-safe) on a
        // descriptor opened before the fork; "0" moves the writer itself.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Starts `program` with `args` in this group the way systemd starts a
    /// unit's process: `clone3(CLONE_INTO_CGROUP)` places the child in the
    /// group at its birth, and the child execs. Returns its pid.
    pub fn clone_into_and_exec(&self, program: &Path, args: &[&str]) -> u32 {
        const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs {
            flags: u64,
            pidfd: u64,
            child_tid: u64,
            parent_tid: u64,
            exit_signal: u64,
            stack: u64,
            stack_size: u64,
            tls: u64,
            set_tid: u64,
            set_tid_size: u64,
            cgroup: u64,
        }
        let dir = std::fs::File::open(&self.dir)
            .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()));
        let program = CString::new(program.as_os_str().as_encoded_bytes()).unwrap_or_default();
        let words: Vec<CString> = std::iter::once(program.clone())
            .chain(args.iter().map(|a| CString::new(*a).unwrap_or_default()))
            .collect();
        let mut argv: Vec<*const libc::c_char> = words.iter().map(|w| w.as_ptr()).collect();
        argv.push(std::ptr::null());
        let clone_args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..Default::default()
        };
        // SAFETY: clone3 with a valid, fully initialised argument struct and
        // no new stack (fork semantics); the child only calls execv and
        // _exit, both async-signal-safe, on memory prepared before.
        let pid = unsafe {
            let pid = libc::syscall(
                libc::SYS_clone3,
                &clone_args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            );
            if pid == 0 {
                libc::execv(program.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            pid
        };
        assert!(
            pid > 0,
            "clone3(CLONE_INTO_CGROUP) into {}: {}",
            self.dir.display(),
            std::io::Error::last_os_error()
        );
        pid as u32
    }

    pub fn freeze(&self, frozen: bool) {
        std::fs::write(
            self.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()));
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("cgroup {} did not reach {want}", self.dir.display());
    }
}

/// Removes `dir` (a cgroup) and the groups under it, deepest first, moving
/// their processes to `root`.
pub fn remove_cgroup_tree(root: &Path, dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(root, &entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines() {
        let _ = std::fs::write(root.join("cgroup.procs"), pid);
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.root, &self.dir);
    }
}
