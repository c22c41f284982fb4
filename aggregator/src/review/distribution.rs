//! Energy per transaction as a distribution: the kernel's per-request CPU
//! histograms (log2 bins, bin i holding 2^(i-1) <= t < 2^i ns, bin 0 t = 0)
//! merged over a range per service and scenario (bin-wise sums), and their
//! p50/p90/p99. A quantile falls in a bin; within it the value is
//! interpolated linearly between the bin's bounds (so it is exact to within
//! a factor of 2 by construction; the mean is exact from the CPU sum).
//! Energy per transaction = CPU per transaction x the J per CPU-ns of the
//! requests' service and scenario over the range (their energy / their CPU).
use serde::Serialize;

use crate::store::RequestCpuRow;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub service: String,
    pub scenario: String,
    pub requests: f64,
    pub mean_cpu_ns: Option<f64>,
    pub p50_cpu_ns: Option<f64>,
    pub p90_cpu_ns: Option<f64>,
    pub p99_cpu_ns: Option<f64>,
    /// J per CPU-ns of these requests over the range.
    pub energy_j_per_cpu_ns: Option<f64>,
    pub mean_energy_j: Option<f64>,
    pub p50_energy_j: Option<f64>,
    pub p90_energy_j: Option<f64>,
    pub p99_energy_j: Option<f64>,
    /// Requests per log2 bin.
    pub bins: Vec<f64>,
}

/// Bounds of log2 bin `i` in ns: [lower, upper).
pub fn bin_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        (0.0, 1.0)
    } else {
        (2f64.powi(i as i32 - 1), 2f64.powi(i as i32))
    }
}

/// The `q` quantile (0..=1) of a log2 histogram, linear within the bin.
pub fn quantile(bins: &[f64], q: f64) -> Option<f64> {
    let total: f64 = bins.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut below = 0.0;
    for (i, &n) in bins.iter().enumerate() {
        if n > 0.0 && below + n >= rank {
            let (lo, hi) = bin_bounds(i);
            if i == 0 {
                return Some(0.0);
            }
            return Some(lo + (hi - lo) * ((rank - below) / n).clamp(0.0, 1.0));
        }
        below += n;
    }
    bins.iter().rposition(|&n| n > 0.0).map(|i| bin_bounds(i).1)
}

impl Distribution {
    pub fn of(row: &RequestCpuRow) -> Distribution {
        let per_cpu = (row.cpu_ns > 0.0).then(|| row.energy_j / row.cpu_ns);
        let energy = |cpu: Option<f64>| cpu.zip(per_cpu).map(|(c, e)| c * e);
        let (p50, p90, p99) = (
            quantile(&row.bins, 0.5),
            quantile(&row.bins, 0.9),
            quantile(&row.bins, 0.99),
        );
        let mean = (row.requests > 0.0).then(|| row.cpu_ns / row.requests);
        Distribution {
            service: row.service.clone(),
            scenario: row.scenario.clone(),
            requests: row.requests,
            mean_cpu_ns: mean,
            p50_cpu_ns: p50,
            p90_cpu_ns: p90,
            p99_cpu_ns: p99,
            energy_j_per_cpu_ns: per_cpu,
            mean_energy_j: energy(mean),
            p50_energy_j: energy(p50),
            p90_energy_j: energy(p90),
            p99_energy_j: energy(p99),
            bins: row.bins.clone(),
        }
    }
}

/// Rows of one scenario (over the services `service` allows) merged.
pub fn merge_rows<'a>(
    rows: impl IntoIterator<Item = &'a RequestCpuRow>,
    service: &str,
    scenario: &str,
) -> RequestCpuRow {
    let mut out = RequestCpuRow {
        service: service.to_string(),
        scenario: scenario.to_string(),
        ..Default::default()
    };
    for r in rows {
        if out.bins.len() < r.bins.len() {
            out.bins.resize(r.bins.len(), 0.0);
        }
        for (sum, n) in out.bins.iter_mut().zip(&r.bins) {
            *sum += n;
        }
        out.requests += r.requests;
        out.cpu_ns += r.cpu_ns;
        out.energy_j += r.energy_j;
    }
    out
}

/// p50/p90/p99 of a scenario in both ranges (no interval: the histograms
/// are over requests, not periods).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistributionComparison {
    pub service: String,
    pub scenario: String,
    pub baseline: Distribution,
    pub candidate: Distribution,
}

/// Per (service, scenario) in either range, both distributions.
pub fn compare_distributions(
    baseline: &[RequestCpuRow],
    candidate: &[RequestCpuRow],
    service: Option<&str>,
) -> Vec<DistributionComparison> {
    let mut keys: Vec<(String, String)> = baseline
        .iter()
        .chain(candidate)
        .filter(|r| service.is_none_or(|s| s == r.service))
        .map(|r| (r.service.clone(), r.scenario.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|(service, scenario)| {
            let pick = |rows: &[RequestCpuRow]| {
                Distribution::of(&merge_rows(
                    rows.iter()
                        .filter(|r| r.service == service && r.scenario == scenario),
                    &service,
                    &scenario,
                ))
            };
            DistributionComparison {
                baseline: pick(baseline),
                candidate: pick(candidate),
                service,
                scenario,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_log2_histogram_by_hand() {
        // 100 requests: 50 in [512, 1024), 40 in [1024, 2048), 10 in [4096, 8192).
        let mut bins = vec![0.0; 14];
        bins[10] = 50.0;
        bins[11] = 40.0;
        bins[13] = 10.0;
        // p50: rank 50, the end of bin 10 -> 1024.
        assert_eq!(quantile(&bins, 0.5), Some(1024.0));
        // p90: rank 90 = end of bin 11 -> 2048.
        assert_eq!(quantile(&bins, 0.9), Some(2048.0));
        // p99: rank 99 = 9/10 into bin 13: 4096 + 0.9 * 4096.
        assert!((quantile(&bins, 0.99).unwrap() - 7782.4).abs() < 1e-9);
        // p25: rank 25, half of bin 10: 768.
        assert_eq!(quantile(&bins, 0.25), Some(768.0));
        assert_eq!(quantile(&[0.0; 4], 0.5), None);
        let row = RequestCpuRow {
            service: "s".into(),
            scenario: "credit".into(),
            bins,
            requests: 100.0,
            cpu_ns: 150_000.0,
            energy_j: 0.3,
        };
        let d = Distribution::of(&row);
        assert_eq!(d.mean_cpu_ns, Some(1500.0));
        assert!((d.p50_energy_j.unwrap() - 1024.0 * 2e-6).abs() < 1e-15);
    }
}
