//! Consumer-finance workload for sci-cf: the four business scenarios of
//! T/CQJR 032.2—2025 (credit 授信, drawdown 支用, repayment 还款, query 查询)
//! served by `sci-finance-service`, and `sci-loadgen`, which drives them with
//! a daily traffic shape compressed in time.
pub mod error;
pub mod flows;
pub mod ingest;
pub mod loadgen;
pub mod rng;
pub mod scenario;
pub mod service;
pub mod shape;
pub mod sys;

pub use error::WorkloadError;
pub use scenario::{Role, Scenario};
