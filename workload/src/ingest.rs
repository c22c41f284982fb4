//! Completed transactions of a dedicated-role service, reported to the sci-cf
//! agent's UDP ingest endpoint in its line protocol (`<scenario> <count>\n`).
//!
//! Workers add to per-scenario pending counters; every 100 ms (and once more
//! at shutdown) each non-zero counter is taken and sent as one datagram. A
//! failed send puts the count back, so it goes out with the next flush.
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::WorkloadError;
use crate::scenario::Scenario;

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct IngestReporter {
    pending: [AtomicU64; 4],
    sent: [AtomicU64; 4],
    socket: UdpSocket,
    target: SocketAddr,
}

impl IngestReporter {
    /// Reporter to `target`, which must be a loopback address.
    pub fn new(target: SocketAddr) -> Result<IngestReporter, WorkloadError> {
        if !target.ip().is_loopback() {
            return Err(WorkloadError::invalid(
                "ingest address",
                format!("{target} is not a loopback address"),
            ));
        }
        let bind: SocketAddr = if target.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
        };
        let socket = UdpSocket::bind(bind).map_err(|e| {
            WorkloadError::io(format!("binding a UDP socket for ingest to {target}"), e)
        })?;
        Ok(IngestReporter {
            pending: Default::default(),
            sent: Default::default(),
            socket,
            target,
        })
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// One more completed transaction of `scenario`.
    pub fn add_completed(&self, scenario: Scenario) {
        self.pending[scenario.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Transactions of `scenario` sent so far.
    pub fn sent(&self, scenario: Scenario) -> u64 {
        self.sent[scenario.index()].load(Ordering::Relaxed)
    }

    /// Sends every pending count; returns the number of datagrams sent. On a
    /// send error the count stays pending and the error is returned.
    pub fn flush(&self) -> Result<usize, WorkloadError> {
        let mut datagrams = 0;
        for scenario in Scenario::ALL {
            let n = self.pending[scenario.index()].swap(0, Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let line = format!("{scenario} {n}\n");
            match self.socket.send_to(line.as_bytes(), self.target) {
                Ok(_) => {
                    self.sent[scenario.index()].fetch_add(n, Ordering::Relaxed);
                    datagrams += 1;
                }
                Err(e) => {
                    self.pending[scenario.index()].fetch_add(n, Ordering::Relaxed);
                    return Err(WorkloadError::io(
                        format!("sending `{}` to ingest {}", line.trim_end(), self.target),
                        e,
                    ));
                }
            }
        }
        Ok(datagrams)
    }
}
