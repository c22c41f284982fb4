//! A scratch PostgreSQL server for tests and benchmarks: `initdb` into a fresh
//! folder, `pg_ctl start` on a free loopback port with the socket in that
//! folder, and `pg_ctl stop` plus removal of the folder on drop.
//!
//! The server is Debian's (`postgresql`, installed by `cargo xtask setup`).
//! PostgreSQL refuses to run as root, so as root the folder is given to the
//! `postgres` user and every server command runs as that user (`runuser`).
//! Authentication is `trust` on loopback: the server is reachable only from
//! this machine and lives as long as the test.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A running scratch server; stopped and deleted when dropped.
pub struct ScratchPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    run_as: Option<String>,
}

/// The newest `/usr/lib/postgresql/<major>/bin` that holds `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

fn free_loopback_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

impl ScratchPostgres {
    /// Starts a fresh server, or says why it cannot.
    pub fn start() -> Result<ScratchPostgres, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin_dir = bin_dir().ok_or("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): run `cargo xtask setup`")?;
        let data_dir = std::env::temp_dir().join(format!(
            "sci-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
        let run_as = if crate::is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data_dir)
                .status()
                .map_err(|e| format!("running chown: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "chown postgres {} failed: is there a `postgres` user?",
                    data_dir.display()
                ));
            }
            Some("postgres".to_string())
        } else {
            None
        };
        let mut server = ScratchPostgres {
            bin_dir,
            data_dir,
            port: 0,
            run_as,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data_dir.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        )?;
        // A port can be taken between the probe and the server's bind: retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_loopback_port()?;
            let mut cmd = server.start_command();
            let out = cmd.output().map_err(|e| format!("starting {cmd:?}: {e}"))?;
            if out.status.success() {
                return Ok(server);
            }
            last_error = format!(
                "{}\nserver log:\n{}",
                describe(&cmd, &out),
                std::fs::read_to_string(server.data_dir.join("server.log")).unwrap_or_default()
            );
        }
        Err(last_error)
    }

    /// `pg_ctl start` (waiting until the server accepts connections) on this server's port.
    fn start_command(&self) -> Command {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.data_dir.display()
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-o", &options, "-l"])
            .arg(self.data_dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .current_dir(&self.data_dir);
        cmd
    }

    /// Stops the server and starts it again with `prepare` applied to the
    /// starting command first (e.g. to start it in another cgroup, as a
    /// service manager restarting it would). Returns the `pg_ctl start`
    /// process, for the caller to wait for (it exits once the server
    /// accepts connections).
    pub fn restart_with(
        &self,
        prepare: impl FnOnce(&mut Command),
    ) -> Result<std::process::Child, String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )?;
        let mut cmd = self.start_command();
        prepare(&mut cmd);
        cmd.spawn().map_err(|e| format!("starting {cmd:?}: {e}"))
    }

    /// Starts a server, or returns None after one line saying why, outside CI;
    /// on CI a missing or broken PostgreSQL is a failure of the set-up.
    pub fn start_or_skip(test: &str) -> Option<ScratchPostgres> {
        match ScratchPostgres::start() {
            Ok(server) => Some(server),
            Err(e) if !crate::ci() => {
                crate::record_skip(test, &format!("cannot start PostgreSQL: {e}"));
                None
            }
            Err(e) => panic!("{test}: cannot start PostgreSQL on CI: {e}"),
        }
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        }
    }

    /// Runs one of the server's programs (as the server's user), returning its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.command(program);
        cmd.args(args).current_dir(&self.data_dir);
        let out = cmd.output().map_err(|e| format!("starting {cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(describe(&cmd, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A client program (`psql`, `pgbench`, ...) pointed at this server, as the server's user.
    pub fn client(&self, program: &str) -> Command {
        let mut cmd = self.command(program);
        cmd.args([
            "-h",
            &self.data_dir.display().to_string(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ])
        .current_dir(&self.data_dir);
        cmd
    }

    /// Runs SQL through psql (unaligned, tuples only) and returns its output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_in("postgres", sql)
    }

    /// Runs SQL through psql in `database` (unaligned, tuples only, columns
    /// separated by `|`) and returns its output.
    pub fn psql_in(&self, database: &str, sql: &str) -> Result<String, String> {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
            "-c",
            sql,
        ]);
        let out = cmd.output().map_err(|e| format!("starting {cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(describe(&cmd, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder holding the data and the Unix socket.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn socket_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A connection string for the `postgres` database over loopback TCP.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// A connection string for `database` over loopback TCP.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its connection string.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        self.psql(&format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url_for(name))
    }

    /// The postmaster's PID (first line of `postmaster.pid`).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_server_answers_and_cleans_up() {
        let Some(server) = ScratchPostgres::start_or_skip("scratch_server_answers_and_cleans_up")
        else {
            return;
        };
        let dir = server.data_dir().to_path_buf();
        let pid = server.pid().expect("postmaster.pid");
        assert_eq!(server.psql("SELECT 6 * 7").expect("psql").trim(), "42");
        let url = server.create_database("sci_scratch").expect("create db");
        assert_eq!(
            url,
            format!(
                "postgres://postgres@127.0.0.1:{}/sci_scratch",
                server.port()
            )
        );
        let found = server
            .psql("SELECT count(*) FROM pg_database WHERE datname = 'sci_scratch'")
            .expect("psql");
        assert_eq!(found.trim(), "1");
        drop(server);
        assert!(!dir.exists(), "{} left behind", dir.display());
        // Gone, or a zombie waiting for whichever ancestor reaps orphans.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state.rsplit(')').next().unwrap_or("").trim_start();
        assert!(
            state.is_empty() || state.starts_with('Z'),
            "postmaster {pid} still running: {state}"
        );
    }
}
