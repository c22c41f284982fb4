//! Helpers shared by the workload's integration tests: real service
//! processes on loopback, a real UDP socket standing in for the agent's
//! ingest endpoint.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SCENARIOS: [&str; 4] = ["credit", "drawdown", "repayment", "query"];

pub struct ServiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServiceProcess {
    /// Starts `sci-finance-service --role ROLE --listen 127.0.0.1:0 ...` and
    /// waits for its `listening ADDR` line.
    pub fn start(role: &str, ingest: Option<SocketAddr>, db: &Path) -> ServiceProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sci-finance-service"));
        cmd.args(["--role", role, "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(addr) = ingest {
            cmd.args(["--ingest-udp", &addr.to_string()]);
        }
        let mut child = cmd.spawn().expect("start sci-finance-service");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read first line");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("first line `{line}`"))
            .parse()
            .expect("address");
        ServiceProcess { child, addr }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "service did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One blocking client connection speaking the line protocol.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn ask(&mut self, line: &str) -> String {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("answer");
        answer.trim_end().to_string()
    }

    /// `stats` answer as scenario -> field -> value.
    pub fn stats(&mut self) -> HashMap<String, HashMap<String, u64>> {
        let line = self.ask("stats");
        let mut out = HashMap::new();
        for part in line.strip_prefix("stats ").expect("stats line").split(' ') {
            let (scenario, fields) = part.split_once(':').expect("scenario:fields");
            let fields = fields
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    (k.to_string(), v.parse().expect("number"))
                })
                .collect();
            out.insert(scenario.to_string(), fields);
        }
        out
    }
}

/// A UDP socket standing in for the agent's ingest endpoint.
pub struct IngestSink {
    pub socket: UdpSocket,
}

impl IngestSink {
    pub fn bind() -> IngestSink {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        IngestSink { socket }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("addr")
    }

    /// Reads datagrams until `expected` (per scenario) is reached and then
    /// `quiet` passes with nothing more; returns the sums per scenario.
    pub fn collect(
        &self,
        expected: &HashMap<String, u64>,
        quiet: Duration,
    ) -> HashMap<String, u64> {
        let mut sums: HashMap<String, u64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut reached_at: Option<Instant> = None;
        let mut buf = [0u8; 2048];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = std::str::from_utf8(&buf[..n]).expect("utf-8 datagram");
                assert!(text.ends_with('\n'), "datagram `{text}` lacks its newline");
                for line in text.lines() {
                    let (scenario, count) = line.split_once(' ').expect("`<scenario> <n>`");
                    assert!(SCENARIOS.contains(&scenario), "scenario `{scenario}`");
                    *sums.entry(scenario.to_string()).or_default() +=
                        count.parse::<u64>().expect("count");
                }
            }
            let reached = expected
                .iter()
                .all(|(k, v)| sums.get(k).copied().unwrap_or(0) >= *v);
            match (reached, reached_at) {
                (true, None) => reached_at = Some(Instant::now()),
                (true, Some(t)) if t.elapsed() >= quiet => return sums,
                _ => {}
            }
            if Instant::now() > deadline {
                return sums;
            }
        }
    }
}
