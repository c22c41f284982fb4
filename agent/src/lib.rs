//! sci-cf host agent.
//!
//! A pipeline in three stages, one folder each:
//! - `sources`: what is measured (`sched`: CPU time per process from eBPF or
//!   procfs; `energy`: RAPL through perf or powercap, or a power model;
//!   `ingest`: transaction counts reported by services);
//! - `transforms`: what is derived (`attribution`: energy to processes;
//!   `scenario`: processes and requests to business scenarios; `carbon`:
//!   operational and embodied carbon; `profile_energy`: energy of the CPU
//!   profile's stacks);
//! - `sinks`: where it goes (`spool`: durable on-disk queue; `grpc`: the
//!   aggregator stream; `metrics`: Prometheus endpoint).
//!
//! `pipeline` runs one window through all stages into a [`window::WindowReport`]
//! (the one schema of the window document); `wire` is its one conversion to
//! and from the `sci.v1` protobuf messages.
pub mod capabilities;
pub mod config;
pub mod error;
pub mod pipeline;
pub mod prefetch;
pub mod service;
pub mod sinks;
pub mod sources;
pub mod transforms;
pub mod window;
pub mod wire;
