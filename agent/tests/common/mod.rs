//! Set-up shared by the agent's ingest tests.
use std::net::SocketAddr;
use std::sync::Arc;

use sci_agent::sources::ingest::{IngestConfig, IngestCounters, IngestEndpoint};

/// A real ingest endpoint on a UDP loopback port the kernel picks, with the
/// rest of `cfg`: (endpoint, its counters, the address to send to). The
/// endpoint stops when dropped.
pub async fn udp_endpoint(cfg: IngestConfig) -> (IngestEndpoint, Arc<IngestCounters>, SocketAddr) {
    let cfg = IngestConfig {
        udp_listen: Some("127.0.0.1:0".into()),
        ..cfg
    };
    let counters = IngestCounters::new();
    let endpoint = IngestEndpoint::start(&cfg, counters.clone())
        .await
        .expect("starting the UDP ingest endpoint");
    let addr = endpoint.udp_addr().expect("the endpoint's UDP address");
    (endpoint, counters, addr)
}
