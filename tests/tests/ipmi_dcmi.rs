//! Platform power over IPMI DCMI, against a real IPMI simulator: OpenIPMI's
//! `ipmi_sim` (Debian's `openipmi`) over RMCP+ with `ipmitool`. The
//! simulator does not implement DCMI: it answers Get Power Reading with
//! completion code 0xC1 (invalid command). The agent must say so by name,
//! count it, and carry on with its other source, inventing no energy. (A
//! successful reading is tested on recorded output, in the agent's unit
//! tests.) The same with FreeIPMI's `ipmi-dcmi` as the client.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use sci_agent::sources::energy::ipmi::{IpmiClient, IpmiConfig};
use sci_agent::sources::energy::{select_energy_source, EnergyConfig, WindowEnergy};
use sci_agent::sources::sched::CpuSample;
use sci_agent::window::{CpuSource, LossCounters};
use sci_tests::{provisioned_tool, wait_until};

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// ipmi_sim on a free loopback port, with user `ipmiusr` / `test` (admin).
fn start_sim(sim: &Path, dir: &Path) -> (Sim, u16) {
    let port = free_udp_port();
    std::fs::write(
        dir.join("lan.conf"),
        format!(
            "name \"sci\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n    allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n    allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n    guid a123456789abcdefa123456789abcdef\n  endlan\nuser 2 true \"ipmiusr\" \"test\" admin 10 none md2 md5 straight\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("sim.emu"),
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
    )
    .unwrap();
    std::fs::create_dir(dir.join("state")).unwrap();
    let sim = Sim(Command::new(sim)
        .current_dir(dir)
        .args(["-c", "lan.conf", "-f", "sim.emu", "-s", "state", "-n"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    (sim, port)
}

/// Windows of the source chosen for `ipmi` (on a machine without RAPL)
/// until one counts `fault`; that window and every warning seen.
fn window_counting(ipmi: IpmiConfig, dir: &Path, fault: &str) -> (WindowEnergy, Vec<String>) {
    let cfg = EnergyConfig {
        sysfs_root: dir.join("no-sysfs"),
        ipmi: Some(ipmi),
        ..EnergyConfig::default()
    };
    let (mut source, warnings) = select_energy_source(&cfg, 2);
    assert_eq!(source.name(), "ipmi", "{warnings:?}");
    let mut seen = Vec::new();
    let mut found = None;
    wait_until(&format!("a window counting {fault}"), || {
        let end = unix_ns();
        let sample = CpuSample {
            source: CpuSource::Procfs,
            start_unix_ns: end - 100_000_000,
            end_unix_ns: end,
            cpus: 2,
            idle_ns_per_cpu: vec![100_000_000; 2],
            unowned_busy_ns_per_cpu: vec![0; 2],
            processes: Vec::new(),
            lost: LossCounters::default(),
        };
        let e = source.window_energy(&sample).unwrap();
        seen.extend(e.warnings.iter().cloned());
        let hit = e.faults.contains_key(fault);
        if hit {
            found = Some(e);
        }
        hit
    });
    let e = found.unwrap();
    println!("{:?}\n{seen:?}", e.faults);
    // The model's estimate for an idle 2-vCPU window (CCF: 2 x 0.74 W x 0.1 s), flagged.
    assert!(e.estimated && e.source.starts_with("model"), "{e:?}");
    assert!((e.host_energy_j() - 0.148).abs() < 1e-9, "{e:?}");
    assert!(e.faults.contains_key("ipmi/missing"), "{:?}", e.faults);
    (e, seen)
}

#[test]
fn ipmi_sim_without_dcmi_is_named_counted_and_costs_no_energy() {
    let test = "ipmi_sim_without_dcmi_is_named_counted_and_costs_no_energy";
    let (Some(sim), Some(ipmitool)) = (
        provisioned_tool(Path::new("/usr/bin/ipmi_sim"), test),
        provisioned_tool(Path::new("/usr/bin/ipmitool"), test),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_sim, port) = start_sim(&sim, dir.path());
    let password = dir.path().join("password");
    std::fs::write(&password, "test\n").unwrap();
    let (_, seen) = window_counting(
        IpmiConfig {
            ipmitool,
            host: Some("127.0.0.1".into()),
            port,
            username: Some("ipmiusr".into()),
            password_file: Some(password),
            cipher_suite: Some(3),
            poll_ms: 200,
            stale_after_ms: 1_000,
            ..IpmiConfig::default()
        },
        dir.path(),
        "ipmi/unsupported",
    );
    assert!(
        seen.iter()
            .any(|w| w.contains("Invalid command (c1)") && w.contains("unsupported")),
        "{seen:?}"
    );
}

/// The same simulator through FreeIPMI's ipmi-dcmi (Debian's
/// freeipmi-tools): with the right password (given on stdin to `-P`) it
/// reaches the BMC, which refuses DCMI (`unsupported`); with a wrong one the
/// BMC refuses the session (`unauthorized`). Both are named, counted, and
/// cost the window only its platform power.
#[test]
fn freeipmi_against_ipmi_sim_names_the_bmc_refusal_and_a_wrong_password() {
    let test = "freeipmi_against_ipmi_sim_names_the_bmc_refusal_and_a_wrong_password";
    let (Some(sim), Some(ipmi_dcmi)) = (
        provisioned_tool(Path::new("/usr/bin/ipmi_sim"), test),
        provisioned_tool(Path::new("/usr/sbin/ipmi-dcmi"), test),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_sim, port) = start_sim(&sim, dir.path());
    for (password, fault, said) in [
        ("test", "ipmi/unsupported", "command invalid or unsupported"),
        ("wrong", "ipmi/unauthorized", "password invalid"),
    ] {
        let file = dir.path().join(format!("password-{password}"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let (_, seen) = window_counting(
            IpmiConfig {
                client: IpmiClient::Freeipmi,
                ipmi_dcmi: ipmi_dcmi.clone(),
                host: Some("127.0.0.1".into()),
                port,
                username: Some("ipmiusr".into()),
                password_file: Some(file),
                cipher_suite: Some(3),
                workaround_flags: Some("opensesspriv".into()),
                poll_ms: 200,
                stale_after_ms: 1_000,
                ..IpmiConfig::default()
            },
            dir.path(),
            fault,
        );
        assert!(
            seen.iter()
                .any(|w| w.contains(said) && w.contains("ipmi-dcmi")),
            "{password}: {seen:?}"
        );
        assert!(
            !seen.iter().any(|w| w.contains(&format!(" {password}"))),
            "the password in a warning: {seen:?}"
        );
    }
}
