//! A real PostgreSQL under `pgbench -C` (a new forked backend per
//! transaction, each living a few milliseconds): the CPU time the eBPF
//! sampler gives the processes of the server's cgroup against the cgroup's
//! own `cpu.stat usage_usec` (cgroup v2), over the same window. Privileged:
//! skipped (with one line) without root outside CI; on CI a missing
//! PostgreSQL is a set-up failure.
#![allow(clippy::unwrap_used)]

use sci_agent::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use sci_agent::sources::sched::{CpuSample, CpuSampler};
use sci_tests::cgroup::ScratchCgroup;
use sci_tests::postgres::ScratchPostgres;
use sci_tests::procs::children_of;
use sci_tests::skip_privileged;

/// Freezes the group, closes a window and reads the group's usage while
/// none of its processes runs, then thaws it.
fn frozen_window(sampler: &mut EbpfSampler, group: &ScratchCgroup) -> (CpuSample, u64) {
    group.freeze(true);
    let window = sampler.sample().unwrap();
    let usage_ns = group.usage_ns();
    group.freeze(false);
    (window, usage_ns)
}

#[test]
fn postgres_under_pgbench_c_matches_its_cgroup_cpu_stat() {
    if skip_privileged("postgres_under_pgbench_c_matches_its_cgroup_cpu_stat") {
        return;
    }
    let group = ScratchCgroup::create(&format!("sci-test-pg-{}", std::process::id()));
    let Some(server) =
        ScratchPostgres::start_or_skip("postgres_under_pgbench_c_matches_its_cgroup_cpu_stat")
    else {
        return;
    };
    let postmaster = server.pid().expect("postmaster.pid");
    server
        .client("pgbench")
        .args(["-i", "-q", "-s", "2", "postgres"])
        .output()
        .map(|o| assert!(o.status.success(), "pgbench -i: {o:?}"))
        .unwrap();
    // The server and its workers into the group; every backend forked from now on is born there.
    group.add(postmaster);
    for child in children_of(postmaster) {
        group.add(child);
    }
    let mut sampler = EbpfSampler::load(&EbpfOptions::default())
        .unwrap_or_else(|e| panic!("eBPF must load here (root/CI): {e}"));

    let (_, before_ns) = frozen_window(&mut sampler, &group);
    let bench = server
        .client("pgbench")
        .args(["-C", "-c", "4", "-j", "2", "-T", "6", "-n", "postgres"])
        .output()
        .unwrap();
    assert!(bench.status.success(), "pgbench -C: {bench:?}");
    let summary = String::from_utf8_lossy(&bench.stdout);
    let (window, after_ns) = frozen_window(&mut sampler, &group);

    let truth_ns = after_ns - before_ns;
    let path = group.path();
    let in_group: Vec<_> = window
        .processes
        .iter()
        .filter(|p| p.info.cgroup.as_deref() == Some(path.as_str()))
        .collect();
    let agent_ns: u64 = in_group.iter().map(|p| p.cpu_ns).sum();
    let backends: Vec<_> = in_group
        .iter()
        .filter(|p| p.info.ppid == postmaster)
        .collect();
    let exited = in_group.iter().filter(|p| p.exited).count();
    let error = (agent_ns as f64 - truth_ns as f64) / truth_ns as f64;
    println!(
        "{}\npostgres cgroup {path}: agent {agent_ns} ns over {} processes ({} children of the postmaster, {exited} exited), cpu.stat {truth_ns} ns, error {:+.4}%",
        summary.lines().filter(|l| l.contains("tps") || l.contains("transactions actually")).collect::<Vec<_>>().join("\n"),
        in_group.len(),
        backends.len(),
        error * 100.0
    );
    assert!(
        truth_ns > 500_000_000,
        "the server barely ran: {truth_ns} ns"
    );
    assert!(
        error.abs() < 0.005,
        "agent {agent_ns} ns vs cgroup cpu.stat {truth_ns} ns"
    );
    // Backends are forked without exec: they are described by the postmaster.
    let postmaster_exe = std::fs::read_link(format!("/proc/{postmaster}/exe"))
        .unwrap()
        .display()
        .to_string();
    assert!(
        backends.len() > 100,
        "pgbench -C forks a backend per transaction"
    );
    for backend in &backends {
        assert_eq!(
            backend.info.exe.as_deref(),
            Some(postmaster_exe.as_str()),
            "{backend:?}"
        );
        assert!(!backend.info.comm.is_empty(), "{backend:?}");
    }
    // The postmaster's CPU time is not everyone else's either: no process outside the group is in it.
    for p in &window.processes {
        assert!(
            p.info.cgroup.is_some(),
            "pid {} has no cgroup: {p:?}",
            p.pid
        );
    }
    drop(server);
}
