//! Platform power from the BMC over IPMI DCMI ("Get Power Reading"), through
//! `ipmitool dcmi power reading` (in-band through `/dev/ipmi0`, or over the
//! network with `-I lanplus`). The readings go through the same poller,
//! integration and split as Redfish's ([`super::redfish`]).
//!
//! Tested here: the parser on recorded outputs, and the fault path against
//! a real simulator, OpenIPMI's `ipmi_sim` (Debian's `openipmi` 2.0.33),
//! which answers DCMI Get Power Reading with completion code 0xC1 (invalid
//! command): it does not implement DCMI. No DCMI simulator exists in
//! Debian's packages, so a successful reading is only tested on recorded
//! output.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::redfish::{failure, Failure, ParsedReading, PlatformSplit, PollSettings, PowerReader};
use super::EnergyError;

/// `[energy.ipmi]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpmiConfig {
    /// The ipmitool program.
    pub ipmitool: PathBuf,
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
            ipmitool: PathBuf::from("ipmitool"),
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
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(config_error(
                "timeout_ms",
                format!("{} must be 1 to 60000 ms", self.timeout_ms),
            ));
        }
        if self.poll_ms < 100 || self.poll_ms > 600_000 {
            return Err(config_error(
                "poll_ms",
                format!("{} must be 100 to 600000 ms", self.poll_ms),
            ));
        }
        if self.stale_after_ms < self.poll_ms {
            return Err(config_error(
                "stale_after_ms",
                format!(
                    "{} is shorter than poll_ms = {}: every reading would be stale",
                    self.stale_after_ms, self.poll_ms
                ),
            ));
        }
        if !self.max_power_w.is_finite() || self.max_power_w <= 0.0 {
            return Err(config_error(
                "max_power_w",
                format!("{} must be a positive number of watts", self.max_power_w),
            ));
        }
        Ok(())
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

/// The fault an ipmitool failure counts as, from what it printed.
fn classify(text: &str) -> &'static str {
    let lower = text.to_lowercase();
    if lower.contains("invalid command") || lower.contains("(c1)") {
        "unsupported"
    } else if lower.contains("unauthorized")
        || lower.contains("rakp")
        || lower.contains("password")
        || lower.contains("invalid user")
    {
        "unauthorized"
    } else if lower.contains("deactivated") || lower.contains("not activated") {
        "inactive"
    } else if lower.contains("unable to establish") || lower.contains("could not open device") {
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
        let mut child = Command::new(&self.cfg.ipmitool)
            .args(self.cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                failure(
                    "unreachable",
                    format!("{}: {e}", self.cfg.ipmitool.display()),
                )
            })?;
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
                        format!("ipmitool gave no answer within {} ms", self.cfg.timeout_ms),
                    ));
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failure("unreachable", format!("ipmitool: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let all = format!("{stdout}\n{stderr}");
        if !out.status.success() {
            let said = all
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            return Err(failure(
                classify(&all),
                format!("ipmitool ({}): {said}", out.status),
            ));
        }
        parse_dcmi_power_reading(&stdout).map_err(|reason| failure(classify(&reason), reason))
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
