//! `[[scenarios.rules]]`: each matcher kind, first match wins, PID reuse,
//! config errors naming the rule and its line, weights. Real processes where
//! the rule reads the process (env, comm, exe, cmdline, cgroup); synthetic
//! `ProcessCpu` for pure logic.
#![allow(clippy::unwrap_used)]
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

use sci_agent::config::AgentConfig;
use sci_agent::sources::sched::proc_info::{read_proc_info, ProcInfo};
use sci_agent::sources::sched::ProcessCpu;
use sci_agent::transforms::scenario::{
    pod_uid_from_cgroup, read_sci_env, systemd_unit_from_cgroup, Assignment, Scenario,
    ScenarioStage,
};

fn stage(toml_text: &str) -> ScenarioStage {
    let config = AgentConfig::from_toml_str(toml_text, Path::new("test.toml")).unwrap();
    ScenarioStage::new(&config.scenarios).unwrap()
}

fn config_error(toml_text: &str) -> String {
    AgentConfig::from_toml_str(toml_text, Path::new("test.toml"))
        .expect_err("config must be refused")
        .to_string()
}

fn process(pid: u32, comm: &str) -> ProcessCpu {
    ProcessCpu {
        pid,
        info: Arc::new(ProcInfo {
            comm: comm.into(),
            ..Default::default()
        }),
        start_ticks: Some(1000 + pid as u64),
        ..Default::default()
    }
}

/// A `sleep` with SCI_* variables, killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn spawn(envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Sleeper(cmd.spawn().unwrap())
    }

    /// The process as the agent's procfs enrichment sees it.
    fn as_process_cpu(&self) -> ProcessCpu {
        let pid = self.0.id();
        let info = read_proc_info(Path::new("/proc"), pid).unwrap();
        ProcessCpu {
            pid,
            start_ticks: Some(info.start_ticks),
            info: Arc::new(ProcInfo {
                env: read_sci_env(pid),
                ..info
            }),
            ..Default::default()
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn read_sci_env_keeps_only_sci_variables_of_a_real_process() {
    let sleeper = Sleeper::spawn(&[
        ("SCI_SCENARIO", "credit"),
        ("SCI_SERVICE", "loan-approval"),
        ("UNRELATED_SECRET", "x"),
    ]);
    // The child may not have exec'd yet: wait until its environ is the new one.
    let pid = sleeper.0.id();
    let mut env = Vec::new();
    for _ in 0..200 {
        env = read_sci_env(pid);
        if env.iter().any(|(k, _)| k == "SCI_SCENARIO") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    env.sort();
    let mut expected = vec![
        ("SCI_SCENARIO".to_string(), "credit".to_string()),
        ("SCI_SERVICE".to_string(), "loan-approval".to_string()),
    ];
    // The test runner's own SCI_* variables, if any, are inherited too.
    expected.extend(
        std::env::vars()
            .filter(|(k, _)| k.starts_with("SCI_") && k != "SCI_SCENARIO" && k != "SCI_SERVICE"),
    );
    expected.sort();
    assert_eq!(env, expected);
    assert!(read_sci_env(u32::MAX).is_empty());
}

fn wait_for_exec(sleeper: &Sleeper) -> ProcessCpu {
    for _ in 0..200 {
        let p = sleeper.as_process_cpu();
        // comm changes early in exec, the argument area a little later.
        if &*p.info.comm == "sleep" && p.info.cmdline.as_deref() == Some("sleep 30") {
            return p;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("child never became sleep");
}

#[test]
fn env_rule_and_from_env_rule_on_a_real_process() {
    let credit = Sleeper::spawn(&[("SCI_SCENARIO", "credit")]);
    let query = Sleeper::spawn(&[("SCI_SCENARIO", "query")]);
    let bogus = Sleeper::spawn(&[("SCI_SCENARIO", "loan")]);
    let mut stage = stage(
        r#"
[[scenarios.rules]]
service = "env-credit"
scenario = "credit"
env = "SCI_SCENARIO=credit"

[[scenarios.rules]]
service = "by-env"
scenario = "from_env"
comm = "sleep"
"#,
    );
    let a = stage.assign(&wait_for_exec(&credit));
    assert_eq!(
        a,
        Assignment {
            scenario: Some(Scenario::Credit),
            service: Some("env-credit".into()),
            rule_index: Some(0)
        }
    );
    let b = stage.assign(&wait_for_exec(&query));
    assert_eq!((b.scenario, b.rule_index), (Some(Scenario::Query), Some(1)));
    // An unknown SCI_SCENARIO does not match `from_env`: unassigned.
    assert_eq!(stage.assign(&wait_for_exec(&bogus)), Assignment::default());
}

#[test]
fn comm_exe_cmdline_cgroup_rules_on_a_real_process() {
    let sleeper = Sleeper::spawn(&[]);
    let p = wait_for_exec(&sleeper);
    let exe = p.info.exe.clone().unwrap();
    let cgroup = p.info.cgroup.clone();

    let by_comm =
        stage("[[scenarios.rules]]\nservice = \"s\"\nscenario = \"query\"\ncomm = \"sle*\"\n");
    assert_eq!(by_comm.evaluate(&p).scenario, Some(Scenario::Query));
    let by_comm_miss = stage("[[scenarios.rules]]\nservice = \"s\"\ncomm = \"bash\"\n");
    assert_eq!(by_comm_miss.evaluate(&p), Assignment::default());

    let by_exe = stage(&format!(
        "[[scenarios.rules]]\nservice = \"s\"\nscenario = \"drawdown\"\nexe = \"{}/*\"\n",
        Path::new(&*exe).parent().unwrap().display()
    ));
    assert_eq!(by_exe.evaluate(&p).scenario, Some(Scenario::Drawdown));
    // `*` does not cross `/` in path globs; `**` does.
    let star = stage("[[scenarios.rules]]\nservice = \"s\"\nexe = \"/*sleep\"\n");
    assert_eq!(star.evaluate(&p).service, None);
    let starstar = stage("[[scenarios.rules]]\nservice = \"s\"\nexe = \"/**/sleep\"\n");
    assert_eq!(starstar.evaluate(&p).service.as_deref(), Some("s"));

    let by_cmdline = stage(
        "[[scenarios.rules]]\nservice = \"s\"\nscenario = \"repayment\"\ncmdline = '^sleep 3\\d$'\n",
    );
    assert_eq!(by_cmdline.evaluate(&p).scenario, Some(Scenario::Repayment));

    if let Some(cgroup) = cgroup {
        let by_cgroup = stage(&format!(
            "[[scenarios.rules]]\nservice = \"s\"\nscenario = \"credit\"\ncgroup = \"{cgroup}\"\n"
        ));
        assert_eq!(by_cgroup.evaluate(&p).scenario, Some(Scenario::Credit));
    }
}

#[test]
fn systemd_unit_container_and_all_matchers_must_match() {
    let mut p = process(10, "java");
    Arc::make_mut(&mut p.info).cgroup = Some("/system.slice/loan-credit.service".into());
    Arc::make_mut(&mut p.info).container_id = Some("4f3c2b1a".repeat(8).into());
    assert_eq!(
        systemd_unit_from_cgroup("/system.slice/a.service/sub"),
        Some("a.service")
    );

    let s = stage("[[scenarios.rules]]\nservice = \"credit-svc\"\nscenario = \"credit\"\nsystemd_unit = \"loan-credit\"\n");
    assert_eq!(s.evaluate(&p).scenario, Some(Scenario::Credit));
    let s = stage("[[scenarios.rules]]\nservice = \"x\"\nsystemd_unit = \"loan-*.service\"\n");
    assert_eq!(s.evaluate(&p).service.as_deref(), Some("x"));
    let s = stage("[[scenarios.rules]]\nservice = \"x\"\nsystemd_unit = \"other\"\n");
    assert_eq!(s.evaluate(&p).service, None);

    let s = stage("[[scenarios.rules]]\nservice = \"c\"\nscenario = \"query\"\ncontainer = \"4f3c2b1a4f3c\"\n");
    assert_eq!(s.evaluate(&p).scenario, Some(Scenario::Query));
    let s = stage("[[scenarios.rules]]\nservice = \"c\"\ncontainer = \"deadbeef\"\n");
    assert_eq!(s.evaluate(&p).service, None);

    // comm matches but the unit does not: the rule as a whole does not match.
    let s = stage(
        "[[scenarios.rules]]\nservice = \"both\"\ncomm = \"java\"\nsystemd_unit = \"other\"\n",
    );
    assert_eq!(s.evaluate(&p).service, None);
    let s = stage("[[scenarios.rules]]\nservice = \"both\"\ncomm = \"java\"\nsystemd_unit = \"loan-credit\"\n");
    assert_eq!(s.evaluate(&p).service.as_deref(), Some("both"));
}

#[test]
fn pod_label_rule_reads_the_pod_labels_directory() {
    let dir = tempfile::tempdir().unwrap();
    let uid = "1b2c3d4e-aaaa-bbbb-cccc-0123456789ab";
    std::fs::write(
        dir.path().join(uid),
        "app=\"loan-credit\"\npod-template-hash=\"7d9f\"\nsci.cf/scenario=\"credit\"\n",
    )
    .unwrap();
    let systemd_path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-abc.scope";
    let cgroupfs_path = "/kubepods/burstable/pod1b2c3d4e-aaaa-bbbb-cccc-0123456789ab/abc";
    assert_eq!(pod_uid_from_cgroup(systemd_path).as_deref(), Some(uid));
    assert_eq!(pod_uid_from_cgroup(cgroupfs_path).as_deref(), Some(uid));
    assert_eq!(pod_uid_from_cgroup("/system.slice/podman.service"), None);

    let s = stage(&format!(
        "[scenarios]\npod_labels_dir = \"{}\"\n[[scenarios.rules]]\nservice = \"loan\"\nscenario = \"credit\"\npod_label = \"app=loan-*\"\n",
        dir.path().display()
    ));
    let mut p = process(20, "java");
    Arc::make_mut(&mut p.info).cgroup = Some(systemd_path.into());
    assert_eq!(s.evaluate(&p).scenario, Some(Scenario::Credit));
    Arc::make_mut(&mut p.info).cgroup = Some(cgroupfs_path.into());
    assert_eq!(s.evaluate(&p).scenario, Some(Scenario::Credit));
    // Another pod (no labels file) and a non-pod cgroup do not match.
    Arc::make_mut(&mut p.info).cgroup = Some(cgroupfs_path.replace("1b2c", "9b2c").into());
    assert_eq!(s.evaluate(&p), Assignment::default());
    Arc::make_mut(&mut p.info).cgroup = Some("/system.slice/x.service".into());
    assert_eq!(s.evaluate(&p), Assignment::default());

    // Labels in a per-pod directory (`<dir>/<uid>/labels`) work too.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir2.path().join(uid)).unwrap();
    std::fs::write(dir2.path().join(uid).join("labels"), "app=\"query-api\"\n").unwrap();
    let s = stage(&format!(
        "[scenarios]\npod_labels_dir = \"{}\"\n[[scenarios.rules]]\nservice = \"q\"\nscenario = \"query\"\npod_label = \"app=query-api\"\n",
        dir2.path().display()
    ));
    Arc::make_mut(&mut p.info).cgroup = Some(cgroupfs_path.into());
    assert_eq!(s.evaluate(&p).scenario, Some(Scenario::Query));
}

#[test]
fn first_match_wins_and_service_only_rules() {
    let s = stage(
        r#"
[[scenarios.rules]]
service = "gateway"
comm = "nginx"

[[scenarios.rules]]
service = "credit-engine"
scenario = "credit"
comm = "java"

[[scenarios.rules]]
service = "catch-all"
scenario = "query"
comm = "*"
"#,
    );
    let nginx = s.evaluate(&process(1, "nginx"));
    assert_eq!(
        nginx,
        Assignment {
            scenario: None,
            service: Some("gateway".into()),
            rule_index: Some(0)
        }
    );
    let java = s.evaluate(&process(2, "java"));
    assert_eq!(
        (java.scenario, java.rule_index),
        (Some(Scenario::Credit), Some(1))
    );
    let other = s.evaluate(&process(3, "postgres"));
    assert_eq!(
        (other.scenario, other.rule_index),
        (Some(Scenario::Query), Some(2))
    );
}

#[test]
fn reused_pid_is_evaluated_again_same_process_is_cached() {
    let mut s = stage(
        "[[scenarios.rules]]\nservice = \"c\"\nscenario = \"credit\"\ncomm = \"credit-worker\"\n[[scenarios.rules]]\nservice = \"q\"\nscenario = \"query\"\ncomm = \"query-worker\"\n",
    );
    let old = ProcessCpu {
        pid: 4242,
        info: Arc::new(ProcInfo {
            comm: "credit-worker".into(),
            ..Default::default()
        }),
        start_ticks: Some(500),
        ..Default::default()
    };
    assert_eq!(s.assign(&old).scenario, Some(Scenario::Credit));
    assert_eq!(s.rule_evaluations(), 1);
    // Same process again (even if its comm changed later): cached verdict.
    let renamed = ProcessCpu {
        info: Arc::new(ProcInfo {
            comm: "renamed".into(),
            ..Default::default()
        }),
        ..old.clone()
    };
    assert_eq!(s.assign(&renamed).scenario, Some(Scenario::Credit));
    assert_eq!(s.rule_evaluations(), 1);
    // Same PID, new start time: a new process with its own scenario.
    let reused = ProcessCpu {
        pid: 4242,
        info: Arc::new(ProcInfo {
            comm: "query-worker".into(),
            ..Default::default()
        }),
        start_ticks: Some(9_000),
        ..Default::default()
    };
    assert_eq!(s.assign(&reused).scenario, Some(Scenario::Query));
    assert_eq!(s.rule_evaluations(), 2);
}

/// Windows through `apply`: verdicts carry over from window to window
/// whatever order the processes come in, each process is judged once while
/// it lives, an exited one is forgotten, and a reused PID is judged afresh.
#[test]
fn verdicts_carry_over_windows_in_any_order_and_exits_are_forgotten() {
    use sci_agent::sources::sched::CpuSample;
    use sci_agent::transforms::scenario::TransactionCounts;
    use sci_agent::window::{CpuSource, ProcessRecord, WindowReport};
    let mut s = stage(
        "[[scenarios.rules]]\nservice = \"c\"\nscenario = \"credit\"\ncomm = \"credit-worker\"\n[[scenarios.rules]]\nservice = \"q\"\nscenario = \"query\"\ncomm = \"query-worker\"\n",
    );
    let run = |s: &mut ScenarioStage, processes: Vec<ProcessCpu>| -> Vec<(u32, Option<String>)> {
        let sample = CpuSample {
            source: CpuSource::Ebpf,
            start_unix_ns: 0,
            end_unix_ns: 1_000_000_000,
            cpus: 1,
            idle_ns_per_cpu: vec![0],
            unowned_busy_ns_per_cpu: vec![0],
            processes,
            lost: Default::default(),
        };
        let mut report =
            WindowReport::new("h".into(), "i".into(), 0, 1_000_000_000, CpuSource::Ebpf, 1);
        report.processes = sample
            .processes
            .iter()
            .map(|p| ProcessRecord {
                pid: p.pid,
                ..Default::default()
            })
            .collect();
        s.apply(&sample, &mut report, &TransactionCounts::default())
            .unwrap();
        report
            .processes
            .iter()
            .map(|r| (r.pid, r.scenario.as_deref().map(str::to_string)))
            .collect()
    };
    let credit = |pid| process(pid, "credit-worker");
    let query = |pid| process(pid, "query-worker");
    let first = run(&mut s, vec![credit(10), query(20), credit(30), query(40)]);
    assert_eq!(s.rule_evaluations(), 4);
    assert_eq!(first[1], (20, Some("query".to_string())));
    // The same processes in reverse order, one of them exiting.
    let mut exiting = credit(10);
    exiting.exited = true;
    let second = run(&mut s, vec![query(40), credit(30), query(20), exiting]);
    assert_eq!(s.rule_evaluations(), 4, "no process was judged again");
    assert_eq!(
        second,
        vec![
            (40, Some("query".to_string())),
            (30, Some("credit".to_string())),
            (20, Some("query".to_string())),
            (10, Some("credit".to_string())),
        ]
    );
    // Pid 10 exited: a process that takes the pid later is a new one, and
    // pid 40, absent from a window, is forgotten too.
    let mut reborn = query(10);
    reborn.start_ticks = Some(99_999);
    let third = run(&mut s, vec![reborn, query(20), credit(30)]);
    assert_eq!(s.rule_evaluations(), 5);
    assert_eq!(third[0], (10, Some("query".to_string())));
    run(&mut s, vec![query(20), query(40)]);
    assert_eq!(
        s.rule_evaluations(),
        6,
        "pid 40 was forgotten when it missed a window"
    );
}

#[test]
fn bad_rules_are_refused_naming_the_rule_and_its_line() {
    let text = "[agent]\ninterval = \"1s\"\n\n[[scenarios.rules]]\nservice = \"ok\"\ncomm = \"a\"\n\n[[scenarios.rules]]\nservice = \"broken\"\ncmdline = \"(unclosed\"\n";
    let e = config_error(text);
    assert!(e.contains("scenarios.rules[1]"), "{e}");
    assert!(e.contains("not a valid regex"), "{e}");
    assert!(e.contains("line 8"), "{e}");

    let e =
        config_error("[[scenarios.rules]]\nservice = \"x\"\nscenario = \"loan\"\ncomm = \"a\"\n");
    assert!(
        e.contains("scenarios.rules[0]") && e.contains("unknown scenario \"loan\""),
        "{e}"
    );
    assert!(e.contains("line 1"), "{e}");

    for (rule, expected) in [
        ("service = \"x\"\n", "at least one matcher"),
        ("comm = \"a\"\n", "a service, a scenario or both"),
        ("service = \"x\"\ncomm = \"[\"\n", "not a valid glob"),
        ("service = \"x\"\nenv = \"NOEQUALS\"\n", "KEY=VALUE"),
        ("service = \"x\"\npod_label = \"=v\"\n", "empty key"),
        (
            "service = \"x\"\ncomm = \"a\"\nuser = \"root\"\n",
            "unknown field `user`",
        ),
    ] {
        let e = config_error(&format!("[[scenarios.rules]]\n{rule}"));
        assert!(
            e.contains("scenarios.rules[0]") && e.contains(expected),
            "{rule}: {e}"
        );
    }
}

#[test]
fn weights_default_override_and_unknown_names() {
    let s = stage("");
    let w = s.weights();
    assert_eq!(
        Scenario::ALL.map(|x| w.get(x)),
        [24.0, 7.0, 3.0, 1.0],
        "the standard's alpha"
    );
    let s = stage("[scenarios.weights]\ncredit = 30\nquery = 0.5\n");
    assert_eq!(
        Scenario::ALL.map(|x| s.weights().get(x)),
        [30.0, 7.0, 3.0, 0.5]
    );
    assert_eq!(
        s.weights().to_map().into_iter().collect::<Vec<_>>(),
        vec![
            ("credit".to_string(), 30.0),
            ("drawdown".to_string(), 7.0),
            ("query".to_string(), 0.5),
            ("repayment".to_string(), 3.0)
        ]
    );
    let e = config_error("[scenarios.weights]\ncredit = 24\nloan = 5\n");
    assert!(
        e.contains("unknown field `loan`") && e.contains("line 3"),
        "{e}"
    );
    let e = config_error("[scenarios.weights]\ndrawdown = -7\n");
    assert!(
        e.contains("finite number > 0") && e.contains("line 2"),
        "{e}"
    );
    let e = config_error("[scenarios.weights]\ndrawdown = 0\n");
    assert!(e.contains("finite number > 0"), "{e}");

    assert_eq!("授信".parse::<Scenario>().unwrap(), Scenario::Credit);
    assert_eq!(Scenario::from_slot(4), Some(Scenario::Query));
    assert_eq!(Scenario::from_slot(0), None);
    let e = "Credit".parse::<Scenario>().unwrap_err().to_string();
    assert!(e.contains("unknown scenario \"Credit\""), "{e}");
}
