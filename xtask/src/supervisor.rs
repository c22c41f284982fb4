//! Child processes of the demo: each in its own process group, so that a
//! terminal Ctrl-C reaches only xtask, which then stops them all (SIGTERM,
//! then SIGKILL after a grace period) and leaves no process behind.
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catch SIGINT/SIGTERM: the demo polls [`interrupted`] and shuts down cleanly.
pub fn catch_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps up to `duration`, returning early (false) if interrupted.
pub fn sleep_unless_interrupted(duration: Duration) -> bool {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if interrupted() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    !interrupted()
}

pub struct Supervisor {
    children: Vec<(String, Child)>,
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor {
            children: Vec::new(),
        }
    }

    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<u32> {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Takes charge of a child started elsewhere (it must have been put in
    /// its own process group).
    pub fn adopt(&mut self, name: &str, child: Child) {
        self.children.push((name.to_string(), child));
    }

    /// The first child that has exited, if any (name and status).
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Some((name.clone(), status));
            }
        }
        None
    }

    /// Stops one child (by name) and waits for it.
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, child) = self.children.remove(i);
            stop_children(vec![child]);
        }
    }

    pub fn stop_all(&mut self) {
        let children = self.children.drain(..).rev().map(|(_, c)| c).collect();
        stop_children(children);
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

fn stop_children(mut children: Vec<Child>) {
    for child in &children {
        // SAFETY: signalling the child's own process group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in &mut children {
        // SAFETY: as above; whatever ignored SIGTERM is killed.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}
