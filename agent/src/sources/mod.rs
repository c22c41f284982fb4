pub mod energy;
pub mod ingest;
pub mod sched;
