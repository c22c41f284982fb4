pub mod energy;
pub mod host;
pub mod ingest;
pub mod profile;
pub mod sched;
