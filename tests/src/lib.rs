//! Helpers shared by the end-to-end tests.

pub mod cgroup;
pub mod fleet;
pub mod procs;
pub mod prometheus;
pub mod spin;
pub mod tls;

// Shared with xtask (which must build before set-up, so without the agent).
pub use sci_test_harness::*;
