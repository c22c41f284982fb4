//! `sci.v1`: the window report and the bidirectional ingest stream between
//! `sci-agent` and `sci-aggregator`, generated from `proto/sci/v1/sci.proto`;
//! `pprof`: the profile format of `proto/perftools/profiles/profile.proto`.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("sci.v1");
}

/// pprof's `perftools.profiles` messages (what `go tool pprof` reads).
pub mod pprof {
    tonic::include_proto!("perftools.profiles");
}
