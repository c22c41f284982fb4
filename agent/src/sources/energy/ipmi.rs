//! Platform power from the BMC over IPMI DCMI ("Get Power Reading"), through
//! `ipmitool dcmi power reading` or FreeIPMI's `ipmi-dcmi
//! --get-system-power-statistics` (`client`; in-band through `/dev/ipmi0`,
//! or over the network: ipmitool `-I lanplus`, FreeIPMI `-D LAN_2_0`). The
//! readings go through the same poller, integration and split as Redfish's
//! ([`super::redfish`]).
//!
//! The password never reaches a command line: ipmitool reads the file
//! (`-f`); FreeIPMI has no such option, so it is started with `-P` (password
//! prompt) in a session of its own (no controlling terminal: it reads the
//! prompt's answer from stdin), and the file's first line is written to it.
//!
//! Tested here: the parsers on recorded outputs, and the fault path against
//! a real simulator, OpenIPMI's `ipmi_sim` (Debian's `openipmi` 2.0.33),
//! which answers DCMI Get Power Reading with completion code 0xC1 (invalid
//! command): it does not implement DCMI. No DCMI simulator exists in
//! Debian's packages, so a successful reading is only tested on recorded
//! output. FreeIPMI 1.6.10 reaches ipmi_sim only with the workaround
//! `opensesspriv` (`workaround_flags`; without it: "privilege level cannot
//! be obtained for this user").
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::redfish::{failure, Failure, ParsedReading, PlatformSplit, PollSettings, PowerReader};
use super::EnergyError;

/// Which IPMI client asks the BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpmiClient {
    /// `ipmitool dcmi power reading`.
    Ipmitool,
    /// FreeIPMI's `ipmi-dcmi --get-system-power-statistics`.
    Freeipmi,
}

/// `[energy.ipmi]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpmiConfig {
    pub client: IpmiClient,
    /// The ipmitool program.
    pub ipmitool: PathBuf,
    /// FreeIPMI's ipmi-dcmi program.
    pub ipmi_dcmi: PathBuf,
    /// FreeIPMI workarounds (`-W`, e.g. `opensesspriv`); FreeIPMI only.
    pub workaround_flags: Option<String>,
    /// BMC host for `-I lanplus`; none: in-band (`/dev/ipmi0`).
    pub host: Option<String>,
    pub port: u16,
    pub username: Option<String>,
    /// File holding the password (ipmitool `-f`): never on the command line.
    pub password_file: Option<PathBuf>,
    /// RMCP+ cipher suite (`-C`, e.g. 3 or 17); none: ipmitool asks the BMC,
    /// which BMCs (and ipmi_sim) that do not answer "Get Channel Cipher
    /// Suites" make take seconds.
    pub cipher_suite: Option<u8>,
    pub timeout_ms: u64,
    pub poll_ms: u64,
    pub stale_after_ms: u64,
    pub max_power_w: f64,
    pub split: PlatformSplit,
}

impl Default for IpmiConfig {
    fn default() -> Self {
        IpmiConfig {
            client: IpmiClient::Ipmitool,
            ipmitool: PathBuf::from("ipmitool"),
            ipmi_dcmi: PathBuf::from("ipmi-dcmi"),
            workaround_flags: None,
            host: None,
            port: 623,
            username: None,
            password_file: None,
            cipher_suite: None,
            timeout_ms: 5_000,
            poll_ms: 2_000,
            stale_after_ms: 15_000,
            max_power_w: 20_000.0,
            split: PlatformSplit::CpuShare,
        }
    }
}

fn config_error(key: &str, reason: impl std::fmt::Display) -> EnergyError {
    EnergyError::Config(format!("energy.ipmi.{key}: {reason}"))
}

impl IpmiConfig {
    /// Check the section; the message names the key.
    pub fn validate(&self) -> Result<(), EnergyError> {
        if self.host.is_none()
            && (self.username.is_some()
                || self.password_file.is_some()
                || self.cipher_suite.is_some())
        {
            return Err(config_error(
                "host",
                "username, password_file and cipher_suite are for a BMC over the network: set host",
            ));
        }
        if self
            .host
            .as_deref()
            .is_some_and(|h| h.is_empty() || h.starts_with('-'))
        {
            return Err(config_error(
                "host",
                format!("{:?} is not a host", self.host),
            ));
        }
        if let Some(flags) = &self.workaround_flags {
            if self.client != IpmiClient::Freeipmi {
                return Err(config_error(
                    "workaround_flags",
                    "FreeIPMI's -W: only with client = \"freeipmi\"",
                ));
            }
            let word =
                |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !flags.split(',').all(word) {
                return Err(config_error(
                    "workaround_flags",
                    format!("{flags:?} must be FreeIPMI workaround names separated by commas"),
                ));
            }
        }
        self.settings().validate("energy.ipmi", self.timeout_ms)
    }

    pub(crate) fn settings(&self) -> PollSettings {
        PollSettings {
            kind: "ipmi",
            poll_ms: self.poll_ms,
            stale_after_ms: self.stale_after_ms,
            max_power_w: self.max_power_w,
            split: self.split,
        }
    }

    /// The program and its arguments for one reading.
    fn command(&self) -> (&std::path::Path, Vec<String>) {
        match self.client {
            IpmiClient::Ipmitool => (&self.ipmitool, self.args()),
            IpmiClient::Freeipmi => (&self.ipmi_dcmi, self.freeipmi_args()),
        }
    }

    /// The ipmi-dcmi arguments: `-P` (the password on stdin), never `-p`.
    fn freeipmi_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(host) = &self.host {
            args.extend(["-D".into(), "LAN_2_0".into()]);
            args.extend(["-h".into(), format!("{host}:{}", self.port)]);
            if let Some(c) = self.cipher_suite {
                args.extend(["-I".into(), c.to_string()]);
            }
            if let Some(user) = &self.username {
                args.extend(["-u".into(), user.clone()]);
            }
            if self.password_file.is_some() {
                args.push("-P".into());
            }
            args.extend(["--session-timeout".into(), self.timeout_ms.to_string()]);
        }
        if let Some(flags) = &self.workaround_flags {
            args.extend(["-W".into(), flags.clone()]);
        }
        args.push("--get-system-power-statistics".into());
        args
    }

    /// The ipmitool arguments before `dcmi power reading`.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(host) = &self.host {
            args.extend(["-I".into(), "lanplus".into(), "-H".into(), host.clone()]);
            args.extend(["-p".into(), self.port.to_string()]);
            if let Some(c) = self.cipher_suite {
                args.extend(["-C".into(), c.to_string()]);
            }
            if let Some(user) = &self.username {
                args.extend(["-U".into(), user.clone()]);
            }
            if let Some(file) = &self.password_file {
                args.extend(["-f".into(), file.display().to_string()]);
            }
        }
        args.extend(["dcmi".into(), "power".into(), "reading".into()]);
        args
    }
}

/// Parse `ipmitool dcmi power reading` (its output, or its error text).
pub fn parse_dcmi_power_reading(output: &str) -> Result<ParsedReading, String> {
    let value = |label: &str| {
        output.lines().find_map(|l| {
            let (key, rest) = l.split_once(':')?;
            (key.trim() == label).then(|| rest.trim().to_string())
        })
    };
    if let Some(state) = value("Power reading state is") {
        if state != "activated" {
            return Err(format!("power reading state is {state:?}, not activated"));
        }
    }
    let text = value("Instantaneous power reading").ok_or_else(|| {
        let first = output.lines().map(str::trim).find(|l| !l.is_empty());
        format!(
            "no \"Instantaneous power reading\" in ipmitool's output ({:?})",
            first.unwrap_or("")
        )
    })?;
    let watts = text
        .strip_suffix("Watts")
        .map(str::trim)
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| format!("instantaneous power {text:?} is not \"N Watts\""))?;
    Ok(ParsedReading {
        watts,
        reading_time_ns: None,
    })
}

/// Parse `ipmi-dcmi --get-system-power-statistics` (FreeIPMI).
pub fn parse_freeipmi_power_statistics(output: &str) -> Result<ParsedReading, String> {
    let value = |label: &str| {
        output.lines().find_map(|l| {
            let (key, rest) = l.split_once(':')?;
            (key.trim() == label).then(|| rest.trim().to_string())
        })
    };
    if let Some(state) = value("Power Measurement") {
        if state != "Active" {
            return Err(format!("power measurement is {state:?}, not activated"));
        }
    }
    let text = value("Current Power").ok_or_else(|| {
        let first = output.lines().map(str::trim).find(|l| !l.is_empty());
        format!(
            "no \"Current Power\" in ipmi-dcmi's output ({:?})",
            first.unwrap_or("")
        )
    })?;
    let watts = text
        .strip_suffix("Watts")
        .or_else(|| text.strip_suffix("watts"))
        .map(str::trim)
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| format!("current power {text:?} is not \"N Watts\""))?;
    Ok(ParsedReading {
        watts,
        reading_time_ns: None,
    })
}

/// The fault an ipmitool or ipmi-dcmi failure counts as, from what it printed.
fn classify(text: &str) -> &'static str {
    let lower = text.to_lowercase();
    if lower.contains("invalid command")
        || lower.contains("(c1)")
        || lower.contains("command invalid or unsupported")
    {
        "unsupported"
    } else if lower.contains("unauthorized")
        || lower.contains("rakp")
        || lower.contains("password")
        || lower.contains("invalid user")
        || lower.contains("username invalid")
        || lower.contains("privilege level")
    {
        "unauthorized"
    } else if lower.contains("deactivated")
        || lower.contains("not activated")
        || lower.contains("not available")
    {
        "inactive"
    } else if lower.contains("unable to establish")
        || lower.contains("could not open device")
        || lower.contains("connection timeout")
        || lower.contains("could not find inband device")
    {
        "unreachable"
    } else {
        "garbage"
    }
}

pub(crate) struct IpmitoolReader {
    cfg: IpmiConfig,
}

impl IpmitoolReader {
    pub(crate) fn new(cfg: &IpmiConfig) -> Result<IpmitoolReader, EnergyError> {
        cfg.validate()?;
        Ok(IpmitoolReader { cfg: cfg.clone() })
    }
}

impl PowerReader for IpmitoolReader {
    fn read(&mut self) -> Result<ParsedReading, Failure> {
        let (program, args) = self.cfg.command();
        let tool = program.display().to_string();
        // FreeIPMI's -P: its answer goes to stdin, read here each time (a
        // rotated password is picked up).
        let password = match (&self.cfg.password_file, self.cfg.client) {
            (Some(file), IpmiClient::Freeipmi) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| failure("unauthorized", format!("{}: {e}", file.display())))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => None,
        };
        let mut command = Command::new(program);
        command
            .args(&args)
            .stdin(if password.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if password.is_some() {
            // SAFETY: setsid is async-signal-safe; no controlling terminal,
            // so the prompt is answered from stdin, never from the agent's tty.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| failure("unreachable", format!("{tool}: {e}")))?;
        if let (Some(password), Some(mut stdin)) = (password, child.stdin.take()) {
            // A client that exits before reading fails below with what it said.
            let _ = writeln!(stdin, "{password}");
        }
        let deadline = Instant::now() + Duration::from_millis(self.cfg.timeout_ms);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failure(
                        "timeout",
                        format!("{tool} gave no answer within {} ms", self.cfg.timeout_ms),
                    ));
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failure("unreachable", format!("{tool}: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let all = format!("{stdout}\n{stderr}");
        if !out.status.success() {
            let said = all
                .lines()
                .map(|l| l.trim().trim_start_matches("Password:").trim())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            return Err(failure(
                classify(&all),
                format!("{tool} ({}): {said}", out.status),
            ));
        }
        match self.cfg.client {
            IpmiClient::Ipmitool => parse_dcmi_power_reading(&stdout),
            IpmiClient::Freeipmi => parse_freeipmi_power_statistics(&stdout),
        }
        .map_err(|reason| failure(classify(&reason), reason))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The layout ipmitool 1.8 prints for a BMC that answers (one label and
    /// `N Watts` per line); the figures are illustrative, not from one machine.
    const ANSWER: &str = "
    Instantaneous power reading:                   236 Watts
    Minimum during sampling period:                 88 Watts
    Maximum during sampling period:                412 Watts
    Average power reading over sample period:      231 Watts
    IPMI timestamp:                           Tue Mar  5 09:41:22 2024
    Sampling period:                          00000001 Seconds.
    Power reading state is:                   activated

";

    /// A BMC whose power reading is switched off.
    const DEACTIVATED: &str = "
    Instantaneous power reading:                     0 Watts
    Minimum during sampling period:                  0 Watts
    Maximum during sampling period:                  0 Watts
    Average power reading over sample period:        0 Watts
    IPMI timestamp:                           Thu Jan  1 00:00:00 1970
    Sampling period:                          00000000 Seconds.
    Power reading state is:                   deactivated

";

    #[test]
    fn recorded_outputs() {
        assert_eq!(
            parse_dcmi_power_reading(ANSWER),
            Ok(ParsedReading {
                watts: 236.0,
                reading_time_ns: None
            })
        );
        let e = parse_dcmi_power_reading(DEACTIVATED).unwrap_err();
        assert!(e.contains("deactivated"), "{e}");
        assert_eq!(classify(&e), "inactive");
        // What ipmi_sim answers (recorded here from Debian's openipmi 2.0.33).
        let sim = "\n    DCMI request failed because: Invalid command (c1)\n";
        let e = parse_dcmi_power_reading(sim).unwrap_err();
        assert!(e.contains("DCMI request failed"), "{e}");
        assert_eq!(classify(sim), "unsupported");
        let e = parse_dcmi_power_reading("    Instantaneous power reading:  lots\n").unwrap_err();
        assert!(e.contains("\"lots\""), "{e}");
    }

    /// The layout FreeIPMI 1.6 prints (`ipmi-dcmi --get-system-power-statistics`);
    /// the figures are illustrative, not from one machine.
    const FREEIPMI_ANSWER: &str = "Current Power                        : 241 Watts
Minimum Power over sampling duration : 90 watts
Maximum Power over sampling duration : 405 watts
Average Power over sampling duration : 233 watts
Time Stamp                           : 03/05/2024 - 09:41:22
Statistics reporting time period     : 1000 milliseconds
Power Measurement                    : Active
";

    #[test]
    fn freeipmi_recorded_outputs() {
        assert_eq!(
            parse_freeipmi_power_statistics(FREEIPMI_ANSWER),
            Ok(ParsedReading {
                watts: 241.0,
                reading_time_ns: None
            })
        );
        let off = FREEIPMI_ANSWER.replace(": Active", ": Not Available");
        let e = parse_freeipmi_power_statistics(&off).unwrap_err();
        assert!(e.contains("Not Available"), "{e}");
        assert_eq!(classify(&e), "inactive");
        // What ipmi-dcmi 1.6.10 says to ipmi_sim (recorded here), and its other refusals.
        for (said, fault) in [
            (
                "ipmi_cmd_dcmi_get_power_reading: command invalid or unsupported",
                "unsupported",
            ),
            ("ipmi-dcmi: password invalid", "unauthorized"),
            ("ipmi-dcmi: username invalid", "unauthorized"),
            (
                "ipmi-dcmi: privilege level cannot be obtained for this user",
                "unauthorized",
            ),
            ("ipmi-dcmi: connection timeout", "unreachable"),
            ("could not find inband device", "unreachable"),
        ] {
            assert_eq!(classify(said), fault, "{said}");
        }
        // ipmitool's output is not FreeIPMI's.
        let e = parse_freeipmi_power_statistics(ANSWER).unwrap_err();
        assert!(e.contains("no \"Current Power\""), "{e}");
        let e = parse_freeipmi_power_statistics("Current Power : 12 kW\n").unwrap_err();
        assert!(e.contains("\"12 kW\""), "{e}");
    }

    #[test]
    fn freeipmi_arguments_keep_the_password_off_the_command_line() {
        let cfg = IpmiConfig {
            client: IpmiClient::Freeipmi,
            host: Some("10.0.0.9".into()),
            username: Some("root".into()),
            password_file: Some("/etc/sci/ipmi.pass".into()),
            cipher_suite: Some(3),
            workaround_flags: Some("opensesspriv".into()),
            ..Default::default()
        };
        cfg.validate().unwrap();
        let (program, args) = cfg.command();
        assert_eq!(program, std::path::Path::new("ipmi-dcmi"));
        assert_eq!(
            args.join(" "),
            "-D LAN_2_0 -h 10.0.0.9:623 -I 3 -u root -P --session-timeout 5000 -W opensesspriv --get-system-power-statistics"
        );
        let in_band = IpmiConfig {
            client: IpmiClient::Freeipmi,
            ..Default::default()
        };
        assert_eq!(
            in_band.command().1.join(" "),
            "--get-system-power-statistics"
        );
        for (cfg, key) in [
            (
                IpmiConfig {
                    workaround_flags: Some("opensesspriv".into()),
                    ..Default::default()
                },
                "energy.ipmi.workaround_flags",
            ),
            (
                IpmiConfig {
                    workaround_flags: Some("a b".into()),
                    ..cfg.clone()
                },
                "energy.ipmi.workaround_flags",
            ),
            (
                IpmiConfig {
                    poll_ms: 50,
                    ..cfg.clone()
                },
                "energy.ipmi.poll_ms",
            ),
            (
                IpmiConfig {
                    timeout_ms: 0,
                    ..cfg.clone()
                },
                "energy.ipmi.timeout_ms",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn arguments_keep_the_password_off_the_command_line() {
        let cfg = IpmiConfig {
            host: Some("10.0.0.9".into()),
            username: Some("root".into()),
            password_file: Some("/etc/sci/ipmi.pass".into()),
            ..Default::default()
        };
        assert_eq!(
            cfg.args().join(" "),
            "-I lanplus -H 10.0.0.9 -p 623 -U root -f /etc/sci/ipmi.pass dcmi power reading"
        );
        assert_eq!(IpmiConfig::default().args().join(" "), "dcmi power reading");
        let e = IpmiConfig {
            username: Some("root".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("energy.ipmi.host"), "{e}");
    }
}
