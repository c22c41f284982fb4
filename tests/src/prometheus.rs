//! A real Prometheus (Debian's 2.42) for the tests: started on a free
//! loopback port with a scratch TSDB, the remote-write receiver on and the
//! rule files given; queried over its HTTP API. Killed on drop.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fleet::{free_port, http_get};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

pub struct Prometheus {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

/// Percent-encodes a query parameter's value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts `binary` with `rule_files` in `dir`; samples up to 30 days
    /// old are accepted out of order (a backfill arrives after the rules
    /// have written samples at now).
    pub fn start(binary: &Path, dir: &Path, rule_files: &[PathBuf]) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        let mut text = String::from(
            "global:\n  evaluation_interval: 1m\nstorage:\n  tsdb:\n    out_of_order_time_window: 30d\nrule_files:\n",
        );
        for f in rule_files {
            text.push_str(&format!("  - {}\n", f.display()));
        }
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let log = std::fs::File::create(dir.join("prometheus.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut p = Prometheus {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = http_get(port, "/-/ready") {
                break;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}): {}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// GET an API path; its `data` (panics on an error answer).
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) =
            http_get(self.port, path).unwrap_or_else(|| panic!("no answer from {path}"));
        assert_eq!(status, 200, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query at `time_s`: (labels, value) per series.
    pub fn query(&self, promql: &str, time_s: u64) -> Vec<(serde_json::Value, f64)> {
        let data = self.api(&format!(
            "/api/v1/query?query={}&time={time_s}",
            encode(promql)
        ));
        data["result"]
            .as_array()
            .unwrap_or_else(|| panic!("no result in {data}"))
            .iter()
            .map(|r| {
                let value: f64 = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("value of {r}"));
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The loaded rules: (name, query, type, health).
    pub fn rules(&self) -> Vec<(String, String, String, String)> {
        let data = self.api("/api/v1/rules");
        let mut out = Vec::new();
        for g in data["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                out.push((s("name"), s("query"), s("type"), s("health")));
            }
        }
        out
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
