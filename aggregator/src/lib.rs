//! sci-cf aggregator: receives agents' windows over gRPC, stores them
//! (SQLite), and computes the fleet SCI_CF per measurement period as
//! Appendix A of T/CQJR 032.2 sets out.
pub mod auth;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod export;
pub mod figures;
pub mod hotspots;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod params;
pub mod plan;
pub mod profiles;
pub mod report;
pub mod review;
pub mod sci;
pub mod server;
pub mod services;
pub mod store;
pub mod validate;
pub mod views;
