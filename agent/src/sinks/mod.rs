pub mod grpc;
pub mod metrics;
pub mod otlp;
pub mod spool;
