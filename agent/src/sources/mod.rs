pub mod energy;
pub mod host;
pub(crate) mod https_get;
pub mod ingest;
pub(crate) mod labels;
pub mod node_labels;
pub mod profile;
pub mod sched;
