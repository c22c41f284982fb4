//! Prometheus text exposition (format 0.0.4) of figures kept elsewhere, by
//! the `prometheus-client` crate: one encoder, one escaping rule, for the
//! agent's and the aggregator's `/metrics`.
//!
//! Callers describe a scrape as [`Family`] values (name, help, kind, labelled
//! values) built from their own state; [`render`] hands them to
//! prometheus-client as a collector. Counter names are written in full
//! (`..._total`) by the callers, as they appear on the wire.
use std::borrow::ToOwned;
use std::string::String;
use std::vec::Vec;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Label pairs of one series, in the order they are written.
pub type Labels = Vec<(String, String)>;

/// One metric family of a scrape.
#[derive(Debug, Clone)]
pub struct Family {
    /// The name on the wire (a counter's ends in `_total`).
    pub name: String,
    pub help: String,
    pub kind: Kind,
    /// Labelled values (empty labels: the unlabelled series). Non-finite
    /// values are written as 0.
    pub series: Vec<(Labels, f64)>,
}

impl Family {
    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, Kind::Counter)
    }

    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, Kind::Gauge)
    }

    fn new(name: &str, help: &str, kind: Kind) -> Family {
        Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            series: Vec::new(),
        }
    }

    /// Adds a series; `labels` as (name, value) pairs.
    pub fn with(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        self.push(labels, value);
        self
    }

    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.series.push((labels, value));
    }

    /// A family with one unlabelled series.
    pub fn single(self, value: f64) -> Family {
        self.with(&[], value)
    }
}

#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), core::fmt::Error> {
        for family in &self.0 {
            let kind = match family.kind {
                Kind::Counter => prometheus_client::metrics::MetricType::Counter,
                Kind::Gauge => prometheus_client::metrics::MetricType::Gauge,
            };
            // prometheus-client adds the `_total` of a counter itself.
            let name = match family.kind {
                Kind::Counter => family.name.strip_suffix("_total").unwrap_or(&family.name),
                Kind::Gauge => &family.name,
            };
            let mut metric = encoder.encode_descriptor(name, &family.help, None, kind)?;
            for (labels, value) in &family.series {
                let value = if value.is_finite() { *value } else { 0.0 };
                // Whole numbers are written as such (`30`, not `30.0`).
                let whole = value.fract() == 0.0 && value.abs() < 9.0e15;
                let encode = |m: prometheus_client::encoding::MetricEncoder| match family.kind {
                    Kind::Counter if whole && value >= 0.0 => {
                        ConstCounter::new(value as u64).encode(m)
                    }
                    Kind::Counter => ConstCounter::new(value).encode(m),
                    Kind::Gauge if whole => ConstGauge::new(value as i64).encode(m),
                    Kind::Gauge => ConstGauge::new(value).encode(m),
                };
                if labels.is_empty() {
                    encode(metric.encode_family(&Vec::<(String, String)>::new())?)?;
                } else {
                    encode(metric.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The families as Prometheus text (format 0.0.4).
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(std::boxed::Box::new(Scrape(families)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_labels_and_escapes() {
        let text = render(std::vec![
            Family::counter("sci_x_joules_total", "Energy.").single(2.5),
            Family::counter("sci_windows_total", "Windows.").single(30.0),
            Family::gauge("sci_pue", "PUE.")
                .with(&[("source", "a\"b\\c\nd")], 1.2)
                .with(&[("source", "e"), ("kind", "f")], f64::NAN),
        ]);
        assert_eq!(
            text,
            "# HELP sci_x_joules_total Energy.\n# TYPE sci_x_joules_total counter\n\
             sci_x_joules_total 2.5\n\
             # HELP sci_windows_total Windows.\n# TYPE sci_windows_total counter\n\
             sci_windows_total 30\n\
             # HELP sci_pue PUE.\n# TYPE sci_pue gauge\n\
             sci_pue{source=\"a\\\"b\\\\c\\nd\"} 1.2\n\
             sci_pue{source=\"e\",kind=\"f\"} 0\n"
        );
    }
}
