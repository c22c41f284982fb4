pub mod energy;
pub mod ingest;
pub mod profile;
pub mod sched;
