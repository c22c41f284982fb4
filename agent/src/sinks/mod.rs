pub mod grpc;
pub mod metrics;
pub mod spool;
