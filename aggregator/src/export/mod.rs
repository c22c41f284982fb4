//! Export of the fleet's rollups to the engines operators already run:
//! Prometheus remote-write ([`remote_write`]) and OTLP ([`otlp`]) of
//! the series [`series`] builds from the store.
pub mod otlp;
pub mod prompb;
pub mod remote_write;
pub mod series;
