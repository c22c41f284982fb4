//! `sci.v1`: the window report and the bidirectional ingest stream between
//! `sci-agent` and `sci-aggregator`, generated from `proto/sci/v1/sci.proto`;
//! `pprof`: the profile format of `proto/perftools/profiles/profile.proto`;
//! `keda`: KEDA's external scaler interface.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("sci.v1");
}

/// KEDA's external scaler service (`externalscaler.ExternalScaler`), which
/// the aggregator serves so KEDA scales deferrable workers by the plan.
pub mod keda {
    tonic::include_proto!("externalscaler");
}

/// pprof's `perftools.profiles` messages (what `go tool pprof` reads).
pub mod pprof {
    tonic::include_proto!("perftools.profiles");
}
