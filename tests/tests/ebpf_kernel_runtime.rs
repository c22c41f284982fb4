//! CPU time is the kernel's own runtime, on the workload where the wall
//! clock between switches is furthest from it (request/response pairs), and
//! processes are described however they were born (forked without exec,
//! renamed). Privileged: skipped (with one line) without root outside CI.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use sci_agent::config::AgentConfig;
use sci_agent::sources::sched::ebpf::EbpfSampler;
use sci_agent::sources::sched::{CpuSample, CpuSampler};
use sci_agent::transforms::scenario::ScenarioStage;
use sci_tests::procs::{children_of, cpu_of, load_sampler, schedstat_ns, Reaped};
use sci_tests::skip_privileged;

const BURN: &str = env!("CARGO_BIN_EXE_sci-burn");
const PINGPONG: &str = env!("CARGO_BIN_EXE_sci-pingpong");

/// A client and its forked server; returns (client, server).
fn start_pair(children: &mut Reaped, extra: &[&str]) -> (u32, u32) {
    let child = Command::new(PINGPONG).args(extra).spawn().unwrap();
    let client = child.id();
    children.0.push(child);
    for _ in 0..100 {
        if let Some(server) = children_of(client).first() {
            return (client, *server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("sci-pingpong {client} forked no server");
}

fn signal(pids: &[u32], signal: i32) {
    for pid in pids {
        // SAFETY: plain kill(2) on our own children.
        unsafe { libc::kill(*pid as i32, signal) };
    }
}

/// Stops the workload, closes a window and reads the kernel's figures while
/// nothing runs, then lets the workload go on: the window and the ground
/// truth then cover exactly the same runtime.
fn frozen_window(sampler: &mut EbpfSampler, pids: &[u32]) -> (CpuSample, HashMap<u32, u64>) {
    signal(pids, libc::SIGSTOP);
    for pid in pids {
        sci_tests::procs::wait_stopped(*pid);
    }
    let window = sampler.sample().unwrap();
    let truth = pids.iter().map(|p| (*p, schedstat_ns(*p))).collect();
    signal(pids, libc::SIGCONT);
    (window, truth)
}

#[test]
fn request_response_processes_match_schedstat_within_half_a_percent() {
    if skip_privileged("request_response_processes_match_schedstat_within_half_a_percent") {
        return;
    }
    let mut sampler = load_sampler();
    let mut children = Reaped(Vec::new());
    let (client_a, server_a) = start_pair(&mut children, &["--work-us", "15"]);
    let (client_b, server_b) = start_pair(&mut children, &["--work-us", "40"]);
    let busy = Command::new(BURN)
        .args(["--duty", "100", "--seconds", "60"])
        .spawn()
        .unwrap();
    let busy_pid = busy.id();
    children.0.push(busy);
    let pids = [client_a, server_a, client_b, server_b, busy_pid];
    // Ready when the burner runs its program and every process has run.
    sci_tests::wait_for_exec(busy_pid, std::path::Path::new(BURN));
    for pid in pids {
        sci_tests::wait_until(&format!("pid {pid} on a CPU"), || schedstat_ns(pid) > 0);
    }

    let (_, before) = frozen_window(&mut sampler, &pids);
    std::thread::sleep(Duration::from_secs(4));
    let (window, after) = frozen_window(&mut sampler, &pids);

    for pid in pids {
        let truth = after[&pid] - before[&pid];
        let agent = cpu_of(&window, pid);
        let error = (agent as f64 - truth as f64) / truth as f64;
        println!(
            "pid {pid}: agent {agent} ns, schedstat {truth} ns, error {:+.4}%",
            error * 100.0
        );
        assert!(truth > 50_000_000, "pid {pid} barely ran ({truth} ns)");
        assert!(
            error.abs() < 0.005,
            "pid {pid}: agent {agent} ns vs schedstat {truth} ns"
        );
    }
    // Time is still conserved on the host: busy + idle covers the window
    // (less steal time, which is neither).
    let window_ns = window.end_unix_ns - window.start_unix_ns;
    let accounted = window.busy_cpu_ns() + window.idle_cpu_ns() + sampler.steal_cpu_ns();
    let capacity = window_ns * u64::from(window.cpus);
    let gap = (accounted as f64 - capacity as f64) / capacity as f64;
    println!(
        "busy {} + idle {} + steal {} = {accounted} ns of {capacity} ns ({:+.3}%)",
        window.busy_cpu_ns(),
        window.idle_cpu_ns(),
        sampler.steal_cpu_ns(),
        gap * 100.0
    );
    assert!(
        gap.abs() < 0.02,
        "busy+idle+steal {accounted} vs {capacity}"
    );
}

#[test]
fn forked_children_are_described_by_their_parent() {
    if skip_privileged("forked_children_are_described_by_their_parent") {
        return;
    }
    let mut sampler = load_sampler();
    let mut children = Reaped(Vec::new());
    let (client, server) = start_pair(&mut children, &[]);
    // Ready when both have run since the sampler loaded.
    for pid in [client, server] {
        sci_tests::wait_until(&format!("pid {pid} on a CPU"), || schedstat_ns(pid) > 0);
    }
    let window = sampler.sample().unwrap();
    let client_record = window.processes.iter().find(|p| p.pid == client).unwrap();
    let server_record = window.processes.iter().find(|p| p.pid == server).unwrap();
    println!("client {client_record:?}\nserver {server_record:?}");
    assert!(server_record.cpu_ns > 0);
    assert_eq!(server_record.info.ppid, client, "true parent");
    assert_eq!(
        server_record.info.exe.as_deref(),
        Some(PINGPONG),
        "a child that never exec'd runs its parent's program"
    );
    assert_eq!(server_record.info.exe, client_record.info.exe);
    assert_eq!(server_record.info.cmdline, client_record.info.cmdline);
    assert_eq!(&*server_record.info.comm, "sci-pingpong");
    let truth_cgroup = std::fs::read_to_string(format!("/proc/{server}/cgroup")).unwrap();
    let truth_cgroup = truth_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_string();
    assert_eq!(
        server_record.info.cgroup.as_deref(),
        Some(truth_cgroup.as_str())
    );
    // Every process in the window has a name and a cgroup.
    for p in &window.processes {
        assert!(!p.info.comm.is_empty(), "pid {} has no comm: {p:?}", p.pid);
        assert!(
            p.info.cgroup.is_some(),
            "pid {} has no cgroup: {p:?}",
            p.pid
        );
    }
}

#[test]
fn a_renamed_process_is_seen_by_a_comm_rule() {
    if skip_privileged("a_renamed_process_is_seen_by_a_comm_rule") {
        return;
    }
    let config = AgentConfig::from_toml_str(
        r#"
[[scenarios.rules]]
comm = "sci-renamed"
service = "renamed-worker"
scenario = "query"
"#,
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let mut stage = ScenarioStage::new(&config.scenarios).unwrap();
    let mut sampler = load_sampler();
    let mut children = Reaped(Vec::new());
    let (_client, server) = start_pair(
        &mut children,
        &["--rename", "sci-renamed", "--rename-after-ms", "700"],
    );
    sci_tests::wait_until(&format!("pid {server} on a CPU"), || {
        schedstat_ns(server) > 0
    });
    let early = sampler.sample().unwrap();
    let before = early.processes.iter().find(|p| p.pid == server).unwrap();
    assert_eq!(&*before.info.comm, "sci-pingpong");
    assert_eq!(stage.assign(before).service, None);

    // Ready when the kernel has renamed it (the rename event is then in
    // the ring the next window drains) and it has run again since.
    let comm = || std::fs::read_to_string(format!("/proc/{server}/comm")).unwrap();
    sci_tests::wait_until(&format!("pid {server} renamed"), || {
        comm().trim() == "sci-renamed"
    });
    let renamed_ns = schedstat_ns(server);
    sci_tests::wait_until(&format!("pid {server} on a CPU after its rename"), || {
        schedstat_ns(server) > renamed_ns
    });
    let late = sampler.sample().unwrap();
    let after = late.processes.iter().find(|p| p.pid == server).unwrap();
    let truth = comm();
    assert_eq!(truth.trim(), "sci-renamed");
    assert_eq!(
        &*after.info.comm, "sci-renamed",
        "the rename reached the window"
    );
    let assignment = stage.assign(after);
    assert_eq!(assignment.service.as_deref(), Some("renamed-worker"));
    assert!(assignment.scenario.is_some());
}

/// `readlink /proc/PID/exe` and `/proc/PID/cmdline` (words joined by
/// spaces), read while the process lives: what the kernel carries in the
/// exec event must equal them.
fn procfs_description(pid: u32) -> (String, String) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let words: Vec<String> = args
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (exe.to_string_lossy().into_owned(), words.join(" "))
}

#[test]
fn an_exec_is_described_by_the_kernel_as_procfs_describes_it() {
    if skip_privileged("an_exec_is_described_by_the_kernel_as_procfs_describes_it") {
        return;
    }
    let mut sampler = load_sampler();
    // No environment wanted: execs are described from the kernel's event alone.
    sampler.set_read_environ(false).unwrap();
    // A program on another mount (tmpfs under /dev), reached through a
    // symlink, with a space in an argument; and one with arguments longer
    // than the event carries (read from procfs instead).
    let dir = std::path::PathBuf::from(format!("/dev/shm/sci-exec-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("deeper/still")).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let copy = dir.join("deeper/still/sci-exec-burn");
    std::fs::copy(BURN, &copy).unwrap();
    let link = dir.join("via-link");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    let long_argument = "x".repeat(3000);
    let mut children = Reaped(Vec::new());
    let mut spawn = |program: &std::path::Path, args: &[&str]| {
        let child = Command::new(program).args(args).spawn().unwrap();
        let pid = child.id();
        children.0.push(child);
        pid
    };
    let on_tmpfs = spawn(&link, &["--duty", "5", "--seconds", "3", "--", "two words"]);
    let plain = spawn(
        std::path::Path::new(BURN),
        &["--duty", "5", "--seconds", "3"],
    );
    let long = spawn(
        std::path::Path::new(BURN),
        &["--duty", "5", "--seconds", "3", "--", &long_argument],
    );
    // Ready when each runs its program with its arguments in place
    // (/proc/PID/exe changes before the new command line is set up).
    sci_tests::wait_for_exec(on_tmpfs, &link);
    for pid in [plain, long] {
        sci_tests::wait_for_exec(pid, std::path::Path::new(BURN));
    }
    for pid in [on_tmpfs, plain, long] {
        sci_tests::wait_until(&format!("pid {pid}'s command line"), || {
            procfs_description(pid).1.contains("--duty")
        });
    }
    let truth: Vec<(u32, (String, String))> = [on_tmpfs, plain, long]
        .iter()
        .map(|pid| (*pid, procfs_description(*pid)))
        .collect();
    // A process that is gone before the event thread's next poll: only the
    // kernel's reading can describe it.
    let short = Command::new("/bin/true")
        .arg("short lived")
        .status()
        .unwrap();
    assert!(short.success());
    let true_exe = std::fs::canonicalize("/bin/true").unwrap();
    // Windows until every process has been described in one (the burners
    // run 5% of the time: a short window may miss them).
    let mut records = Vec::new();
    sci_tests::wait_until("all four processes described in a window", || {
        records.extend(sampler.sample().unwrap().processes);
        truth
            .iter()
            .all(|(pid, _)| records.iter().any(|p| p.pid == *pid))
            && records
                .iter()
                .any(|p| p.info.cmdline.as_deref() == Some("/bin/true short lived"))
    });
    for (pid, (exe, cmdline)) in &truth {
        // The latest description (a long command line is completed from
        // procfs after the first window that sees the process).
        let record = records.iter().rev().find(|p| p.pid == *pid).unwrap();
        println!(
            "{pid}: {:?} {:?}",
            record.info.exe,
            record.info.cmdline.as_deref().map(|c| c.len())
        );
        assert_eq!(
            record.info.exe.as_deref(),
            Some(exe.as_str()),
            "exe of {pid}"
        );
        assert_eq!(
            record.info.cmdline.as_deref(),
            Some(cmdline.as_str()),
            "cmdline of {pid}"
        );
    }
    assert!(truth[0].1 .0.starts_with("/dev/shm/"), "{:?}", truth[0]);
    assert!(truth[2].1 .1.len() > 3000);
    let short_record = records
        .iter()
        .find(|p| p.info.cmdline.as_deref() == Some("/bin/true short lived"))
        .unwrap_or_else(|| panic!("the short-lived /bin/true is described in the window"));
    assert_eq!(
        short_record.info.exe.as_deref(),
        Some(true_exe.to_string_lossy().as_ref())
    );
}
