//! Attribution that follows the process (issue 23), with the agent running
//! first and the workloads started after it, as on a node where pods come
//! and go: a runc container, a unit started the way systemd starts one
//! (clone into its cgroup), PostgreSQL restarted into a cgroup under
//! `pgbench -C`, nginx reloaded; each against its cgroup's own `cpu.stat`.
//! And the first slice after load of a thread older than the agent,
//! against schedstat. Privileged: skipped (with one line) without root
//! outside CI.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use sci_agent::config::AgentConfig;
use sci_agent::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use sci_agent::sources::sched::{CpuSample, CpuSampler};
use sci_agent::transforms::scenario::ScenarioStage;
use sci_tests::cgroup::{cgroup2_root, cpu_stat_usage_ns, remove_cgroup_tree, ScratchCgroup};
use sci_tests::containers::runc_bundle;
use sci_tests::postgres::ScratchPostgres;
use sci_tests::procs::{load_sampler, schedstat_ns, wait_child_rusage_ns, wait_rusage_ns};
use sci_tests::spin::spin_thread_cpu_ns;
use sci_tests::{provisioned_tool, skip_privileged, wait_until};

const BURN: &str = env!("CARGO_BIN_EXE_sci-burn");

/// The rules of an agent.toml `[scenarios]` section, compiled.
fn stage(rules_toml: &str) -> ScenarioStage {
    let config = AgentConfig::from_toml_str(rules_toml, Path::new("test.toml")).unwrap();
    ScenarioStage::new(&config.scenarios).unwrap()
}

/// CPU time of the windows' process records that the rules gave `service`
/// (each record judged as the agent judges it: cached per process, judged
/// again when what the rules look at changed).
fn caught_ns(stage: &mut ScenarioStage, windows: &[&CpuSample], service: &str) -> u64 {
    windows
        .iter()
        .flat_map(|w| w.processes.iter())
        .filter(|p| stage.assign(p).service.as_deref() == Some(service))
        .map(|p| p.cpu_ns)
        .sum()
}

/// Asserts that `caught_ns` is at least 99.5% of the group's `truth_ns`, and
/// not more than 100.5% (nothing outside the group was caught).
fn assert_share(what: &str, caught_ns: u64, truth_ns: u64) {
    let share = caught_ns as f64 / truth_ns as f64;
    println!(
        "{what}: rule caught {caught_ns} ns of the group's cpu.stat {truth_ns} ns: {:.3}%",
        share * 100.0
    );
    assert!(
        (0.995..=1.005).contains(&share),
        "{what}: the rule caught {:.3}% of the group's CPU ({caught_ns} of {truth_ns} ns)",
        share * 100.0
    );
}

/// A 64-hex-digit container id, unique to this test run.
fn container_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:0>64}", format!("5c1{:x}{:x}", std::process::id(), nanos))
}

/// `runc delete -f` and the bundle and the cgroups' parents removed on drop.
struct RuncContainer {
    runc: PathBuf,
    name: String,
    bundle: PathBuf,
    parent_cgroup: String,
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new(&self.runc)
            .args(["delete", "-f", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.bundle);
        // runc removes the container's own groups; their parent, in every
        // hierarchy it made one, is ours to remove.
        let v2 = cgroup2_root();
        remove_cgroup_tree(&v2, &v2.join(&self.parent_cgroup));
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&self.parent_cgroup));
            }
        }
    }
}

#[test]
fn a_runc_container_started_after_the_agent_is_caught_by_its_container_rule() {
    let name = "a_runc_container_started_after_the_agent_is_caught_by_its_container_rule";
    if skip_privileged(name) {
        return;
    }
    let (Some(runc), Some(busybox)) = (
        provisioned_tool(Path::new("/usr/sbin/runc"), name),
        provisioned_tool(Path::new("/bin/busybox"), name),
    ) else {
        return;
    };
    let id = container_id();
    let parent_cgroup = format!("sci-test-runc-{}", std::process::id());
    let cgroups_path = format!("/{parent_cgroup}/{id}");
    let container = RuncContainer {
        runc: runc.clone(),
        name: format!("sci-test-{}", std::process::id()),
        bundle: std::env::temp_dir().join(format!("sci-runc-{}", std::process::id())),
        parent_cgroup,
    };
    // Work in the shell itself, then in forked and exec'd children, then
    // the container idles (its init execs sleep).
    let script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; \
                  for j in 1 2 3 4 5 6 7 8 9 10; do true; (k=0; while [ $k -lt 5000 ]; do k=$((k+1)); done); done; \
                  exec sleep 600";
    runc_bundle(&runc, &busybox, &container.bundle, script, &cgroups_path).unwrap();
    let mut rules = stage(&format!(
        "[[scenarios.rules]]\ncontainer = \"{}\"\nservice = \"container-app\"\nscenario = \"query\"\n",
        &id[..12]
    ));

    let mut sampler = load_sampler();
    // Detached, the container keeps runc's standard streams: a file, not a
    // pipe whose end would never come.
    let log = container.bundle.join("runc.log");
    let run = Command::new(&runc)
        .args(["run", "-d", "--bundle"])
        .arg(&container.bundle)
        .arg(&container.name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(
        run.success(),
        "runc run: {run}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let state = Command::new(&runc)
        .args(["state", &container.name])
        .output()
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    let init = state["pid"].as_u64().unwrap() as u32;
    wait_until("the container's init to exec sleep", || {
        std::fs::read_to_string(format!("/proc/{init}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let window = sampler.sample().unwrap();
    let group = cgroup2_root().join(cgroups_path.trim_start_matches('/'));
    let truth_ns = cpu_stat_usage_ns(&group);
    let caught = caught_ns(&mut rules, &[&window], "container-app");
    let in_group: Vec<_> = window
        .processes
        .iter()
        .filter(|p| p.info.container_id.as_deref() == Some(id.as_str()))
        .map(|p| (p.pid, p.info.comm.to_string(), p.cpu_ns))
        .collect();
    println!("container {id}: init {init}, processes labelled with it: {in_group:?}");
    assert!(
        truth_ns > 200_000_000,
        "the container barely ran: {truth_ns} ns"
    );
    assert_share("runc container, `container` rule", caught, truth_ns);
    drop(container);
}

#[test]
fn a_unit_cloned_into_its_cgroup_is_caught_by_its_systemd_unit_rule() {
    let name = "a_unit_cloned_into_its_cgroup_is_caught_by_its_systemd_unit_rule";
    if skip_privileged(name) {
        return;
    }
    // systemd starts a unit's process with clone3(CLONE_INTO_CGROUP) into
    // /<slice>/<unit>.service; where PID 1 is not systemd (as on these
    // VMs) `systemd-run` cannot work, so the test does what systemd does.
    let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    println!(
        "PID 1 is {:?}: the unit's process is started with clone3(CLONE_INTO_CGROUP), as systemd starts one",
        init.trim()
    );
    let unit = format!("sci-burn-{}", std::process::id());
    // The slice is removed after the unit (dropped in reverse order).
    let slice = format!("sci-test-{}.slice", std::process::id());
    let _slice = ScratchCgroup::create(&slice);
    let group = ScratchCgroup::create(&format!("{slice}/{unit}.service"));
    let mut rules = stage(&format!(
        "[[scenarios.rules]]\nsystemd_unit = \"{unit}\"\nservice = \"unit-app\"\nscenario = \"credit\"\n"
    ));

    let mut sampler = load_sampler();
    // One child execs at once (as a unit's ExecStart does); the other burns first.
    let first = group.clone_into_and_exec(Path::new(BURN), &["800"]);
    let second = group.clone_into_and_exec(Path::new(BURN), &["--duty", "60", "--seconds", "1"]);
    let truth_children = wait_rusage_ns(first) + wait_rusage_ns(second);
    let window = sampler.sample().unwrap();
    let truth_ns = group.usage_ns();
    let caught = caught_ns(&mut rules, &[&window], "unit-app");
    let labelled: Vec<_> = window
        .processes
        .iter()
        .filter(|p| p.pid == first || p.pid == second)
        .map(|p| (p.pid, p.info.cgroup.clone(), p.cpu_ns))
        .collect();
    println!(
        "unit {unit} ({}): children {labelled:?}, their rusage {truth_children} ns",
        group.path()
    );
    assert!(truth_ns > 500_000_000, "the unit barely ran: {truth_ns} ns");
    assert_share(
        "clone3(CLONE_INTO_CGROUP), `systemd_unit` rule",
        caught,
        truth_ns,
    );
}

/// The state letter of a thread (`/proc/<pid>/task/<tid>/stat` field 3).
fn thread_state(pid: u32, tid: u32) -> char {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let rest = &text[text.rfind(')').unwrap() + 1..];
    rest.trim_start().chars().next().unwrap()
}

fn thread_schedstat_ns(pid: u32, tid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_thread_older_than_the_agent_is_charged_its_first_slice_in_full() {
    let name = "a_thread_older_than_the_agent_is_charged_its_first_slice_in_full";
    if skip_privileged(name) {
        return;
    }
    let pid = std::process::id();
    // A thread that exists before the agent, asleep until told to burn 5 ms.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        while go_rx.recv().is_ok() {
            spin_thread_cpu_ns(5_000_000, 200);
            done_tx.send(()).unwrap();
        }
    });
    let tid = tid_rx.recv().unwrap();
    // And a process older than the agent (a shell, waiting on its input)
    // that, after the agent loads, runs and exits inside the first window.
    // Reaped below by wait4 (for its rusage), not through `Child::wait`.
    #[allow(clippy::zombie_processes)]
    let mut shell = Command::new("/bin/sh")
        .args([
            "-c",
            "read line; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let shell_pid = shell.id();
    wait_until("the thread and the shell to sleep", || {
        thread_state(pid, tid) == 'S' && thread_state(shell_pid, shell_pid) == 'S'
    });
    let shell_before_ns = schedstat_ns(shell_pid);

    let mut sampler = EbpfSampler::load(&EbpfOptions {
        track_threads: true,
        proc_root: None,
    })
    .unwrap_or_else(|e| panic!("eBPF must load here (root/CI): {e}"));
    let before_ns = thread_schedstat_ns(pid, tid);
    go_tx.send(()).unwrap();
    done_rx.recv().unwrap();
    wait_until("the thread to sleep again", || {
        thread_state(pid, tid) == 'S'
    });
    use std::io::Write;
    shell.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let shell_ns = wait_rusage_ns(shell_pid) - shell_before_ns;
    let window = sampler.sample().unwrap();
    let truth_ns = thread_schedstat_ns(pid, tid) - before_ns;
    let agent_ns = window
        .processes
        .iter()
        .filter(|p| p.pid == pid)
        .flat_map(|p| p.threads.iter())
        .find(|(t, _)| *t == tid)
        .map_or(0, |(_, ns)| *ns);
    let error = (agent_ns as f64 - truth_ns as f64) / truth_ns as f64;
    println!(
        "thread {tid} older than the agent: first burst {truth_ns} ns by schedstat, {agent_ns} ns by the agent ({:+.3}%)",
        error * 100.0
    );
    assert!(truth_ns >= 5_000_000, "the burst ran {truth_ns} ns");
    assert!(
        error.abs() < 0.005,
        "first slice after load: agent {agent_ns} ns, schedstat {truth_ns} ns"
    );

    let shell_record = window.processes.iter().find(|p| p.pid == shell_pid);
    println!("shell {shell_pid} (older than the agent, exited in the first window): rusage since load {shell_ns} ns, record {shell_record:?}");
    let shell_record = shell_record.expect("the exited shell is in the window");
    assert!(shell_record.exited);
    assert_eq!(shell_record.info.ppid, pid, "its parent");
    let dash = std::fs::canonicalize("/bin/sh").unwrap();
    assert_eq!(
        shell_record.info.exe.as_deref(),
        Some(dash.to_str().unwrap()),
        "its program"
    );
    let shell_error = (shell_record.cpu_ns as f64 - shell_ns as f64) / shell_ns as f64;
    assert!(
        shell_error.abs() < 0.005,
        "the shell's run after load: agent {} ns, rusage {shell_ns} ns",
        shell_record.cpu_ns
    );
    drop(go_tx);
    worker.join().unwrap();
}

/// Freezes the group, closes a window and reads the group's usage (and
/// `also`) while none of its processes runs, then thaws it.
fn frozen_window_and<T>(
    sampler: &mut EbpfSampler,
    group: &ScratchCgroup,
    also: impl FnOnce() -> T,
) -> (CpuSample, u64, T) {
    group.freeze(true);
    let window = sampler.sample().unwrap();
    let usage_ns = group.usage_ns();
    let also = also();
    group.freeze(false);
    (window, usage_ns, also)
}

fn frozen_window(sampler: &mut EbpfSampler, group: &ScratchCgroup) -> (CpuSample, u64) {
    let (window, usage_ns, ()) = frozen_window_and(sampler, group, || ());
    (window, usage_ns)
}

#[test]
fn postgres_restarted_into_a_cgroup_under_pgbench_c_is_caught_by_cgroup_and_title_rules() {
    let name =
        "postgres_restarted_into_a_cgroup_under_pgbench_c_is_caught_by_cgroup_and_title_rules";
    if skip_privileged(name) {
        return;
    }
    let Some(server) = ScratchPostgres::start_or_skip(name) else {
        return;
    };
    server
        .client("pgbench")
        .args(["-i", "-q", "-s", "2", "postgres"])
        .output()
        .map(|o| assert!(o.status.success(), "pgbench -i: {o:?}"))
        .unwrap();
    let group = ScratchCgroup::create(&format!("sci-test-pg-restart-{}", std::process::id()));
    let mut by_cgroup = stage(&format!(
        "[[scenarios.rules]]\ncgroup = \"{}\"\nservice = \"pg\"\nscenario = \"query\"\n",
        group.path()
    ));
    let mut by_title = stage(
        "[[scenarios.rules]]\ncmdline = '^postgres: '\nservice = \"pg\"\nscenario = \"query\"\n",
    );

    let mut sampler = load_sampler();
    // Restarted into the group the way cgexec (or a service manager) does:
    // the starting command joins the group, the server it starts is born there.
    let launcher = server
        .restart_with(|cmd| group.enter_before_exec(cmd))
        .unwrap();
    let launcher_ns = wait_child_rusage_ns(launcher);
    assert_eq!(server.psql("SELECT 1").unwrap().trim(), "1");
    let postmaster = server.pid().unwrap();
    let (first, restart_ns, postmaster_before_ns) =
        frozen_window_and(&mut sampler, &group, || schedstat_ns(postmaster));
    let bench = server
        .client("pgbench")
        .args(["-C", "-c", "4", "-j", "2", "-T", "5", "-n", "postgres"])
        .output()
        .unwrap();
    assert!(bench.status.success(), "pgbench -C: {bench:?}");
    let summary = String::from_utf8_lossy(&bench.stdout);
    let (second, truth_ns, postmaster_after_ns) =
        frozen_window_and(&mut sampler, &group, || schedstat_ns(postmaster));
    let windows = [&first, &second];
    println!(
        "{}",
        summary
            .lines()
            .filter(|l| l.contains("tps") || l.contains("transactions actually"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let forked: usize = windows
        .iter()
        .flat_map(|w| w.processes.iter())
        .filter(|p| p.info.ppid == postmaster)
        .count();
    println!("postmaster {postmaster}: {forked} children in the windows");
    assert!(
        truth_ns > 500_000_000,
        "the server barely ran: {truth_ns} ns"
    );
    assert!(forked > 100, "pgbench -C forks a backend per transaction");
    // Everything the group ran since it was made (after the agent loaded):
    // the restart (pg_ctl, the server's start) and the benchmark.
    assert_share(
        "PostgreSQL restarted into a cgroup, `cgroup` rule",
        caught_ns(&mut by_cgroup, &windows, "pg"),
        truth_ns,
    );
    // The title rule matches what the server titled: under the benchmark,
    // everything in the group but the postmaster (which keeps its command
    // line). (The first window also holds the old server's shutdown, its
    // titled processes outside the group: it is judged, not counted.)
    let _ = caught_ns(&mut by_title, &[&first], "pg");
    let postmaster_ns = postmaster_after_ns - postmaster_before_ns;
    let titled_ns = truth_ns - restart_ns - postmaster_ns;
    println!(
        "titled: group {} ns under pgbench - postmaster {postmaster_ns} ns (schedstat); the restart {restart_ns} ns, of which the starting commands {launcher_ns} ns (rusage)",
        truth_ns - restart_ns
    );
    assert_share(
        "PostgreSQL under pgbench -C, `cmdline = '^postgres: '` rule",
        caught_ns(&mut by_title, &[&second], "pg"),
        titled_ns,
    );
}

/// `count` HTTP/1.1 requests for `path` (gzip wanted), one connection each.
fn http_requests(port: u16, path: &str, count: usize) {
    use std::io::{Read, Write};
    for _ in 0..count {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert!(
            reply.starts_with(b"HTTP/1.1 200"),
            "nginx answered {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        );
    }
}

/// Load from two client threads.
fn http_load(port: u16, count: usize) {
    let clients: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http_requests(port, "/page.txt", count)))
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

/// nginx stopped and its scratch folder removed on drop.
struct ScratchNginx {
    nginx: PathBuf,
    dir: PathBuf,
}

impl ScratchNginx {
    fn conf(&self) -> PathBuf {
        self.dir.join("nginx.conf")
    }

    fn master(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("nginx.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn signal(&self, signal: &str) {
        let out = Command::new(&self.nginx)
            .args(["-c"])
            .arg(self.conf())
            .args(["-s", signal])
            .output()
            .unwrap();
        assert!(out.status.success(), "nginx -s {signal}: {out:?}");
    }
}

impl Drop for ScratchNginx {
    fn drop(&mut self) {
        if let Some(master) = self.master() {
            // SAFETY: kill(2) on the master this test started.
            unsafe { libc::kill(master as i32, libc::SIGTERM) };
            wait_until("nginx to stop", || {
                !Path::new(&format!("/proc/{master}")).exists()
                    || thread_state(master, master) == 'Z'
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn nginx_reloaded_under_load_is_caught_by_per_role_title_rules() {
    let name = "nginx_reloaded_under_load_is_caught_by_per_role_title_rules";
    if skip_privileged(name) {
        return;
    }
    let Some(nginx) = provisioned_tool(Path::new("/usr/sbin/nginx"), name) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sci-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("html")).unwrap();
    // A page that costs the workers CPU to compress.
    let page: String = (0..4_000)
        .map(|i| format!("line {i} of a page {}\n", i * 7919 % 10007))
        .collect();
    std::fs::write(dir.join("html/page.txt"), page).unwrap();
    let port = sci_tests::http::free_port();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon on;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             gzip on;\n gzip_comp_level 9;\n gzip_types text/plain;\n\
             server {{ listen 127.0.0.1:{port}; root {d}/html; }}\n}}\n"
        ),
    )
    .unwrap();
    let server = ScratchNginx {
        nginx: nginx.clone(),
        dir,
    };
    let group = ScratchCgroup::create(&format!("sci-test-nginx-{}", std::process::id()));
    let mut rules = stage(
        "[[scenarios.rules]]\ncmdline = '^nginx: master process'\nservice = \"nginx-master\"\n\
         [[scenarios.rules]]\ncmdline = '^nginx: worker process'\nservice = \"nginx-worker\"\nscenario = \"query\"\n",
    );

    let mut sampler = load_sampler();
    let mut start = Command::new(&nginx);
    start.arg("-c").arg(server.conf());
    group.enter_before_exec(&mut start);
    let launcher = start.spawn().unwrap();
    // The launcher forks the master (daemon) and exits.
    let launcher_ns = wait_child_rusage_ns(launcher);
    wait_until("nginx's master", || server.master().is_some());
    let master = server.master().unwrap();
    http_load(port, 100);
    let first = sampler.sample().unwrap();
    let workers_before = sci_tests::procs::children_of(master);
    server.signal("reload");
    wait_until("new workers after the reload", || {
        let now = sci_tests::procs::children_of(master);
        now.iter().filter(|p| !workers_before.contains(p)).count() >= 2
    });
    http_load(port, 100);
    wait_until("the old workers to exit", || {
        workers_before
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists() || thread_state(*p, *p) == 'Z')
    });
    let (second, truth_ns) = frozen_window(&mut sampler, &group);
    let windows = [&first, &second];
    // Each process by its role: the master, and its workers (old and new).
    let master_ns: u64 = windows
        .iter()
        .flat_map(|w| w.processes.iter())
        .filter(|p| p.pid == master && rules.assign(p).service.as_deref() == Some("nginx-master"))
        .map(|p| p.cpu_ns)
        .sum();
    let workers_ns: u64 = windows
        .iter()
        .flat_map(|w| w.processes.iter())
        .filter(|p| {
            p.pid != master
                && p.info.ppid == master
                && rules.assign(p).service.as_deref() == Some("nginx-worker")
        })
        .map(|p| p.cpu_ns)
        .sum();
    let roles: Vec<_> = windows
        .iter()
        .flat_map(|w| w.processes.iter())
        .filter(|p| p.pid == master || p.info.ppid == master)
        .map(|p| (p.pid, p.info.cmdline.clone(), p.cpu_ns))
        .collect();
    println!("nginx master {master}, workers before the reload {workers_before:?}: {roles:?}");
    // The command that started nginx (it forks the master and exits) ran
    // in the group under its own command line.
    let served_ns = truth_ns - launcher_ns;
    println!("group {truth_ns} ns - launcher {launcher_ns} ns (rusage): master {master_ns} ns, workers {workers_ns} ns");
    assert!(served_ns > 300_000_000, "nginx barely ran: {served_ns} ns");
    assert_share(
        "nginx reloaded, per-role `cmdline` rules",
        master_ns + workers_ns,
        served_ns,
    );
    drop(server);
}
