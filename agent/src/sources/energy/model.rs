//! Power model for hosts without RAPL (virtual machines).
//!
//! Two models, both driven by the window's CPU utilisation
//! `u = busy / (busy + idle)` summed over all CPUs:
//! - linear per vCPU (Cloud Carbon Footprint): `P = n_vcpu * (P_idle + (P_max - P_idle) * u)`,
//!   default 0.74 W idle and 3.5 W at full load per vCPU (CCF's averages for cloud CPUs);
//! - TDP curve (Teads): `P = TDP * f(u)` with `f` piecewise linear through
//!   0 %, 10 %, 50 %, 100 % load -> 0.12, 0.32, 0.75, 1.02.
//!
//! The model's idle power `P(0)` is given to attribution as the idle baseline.
use super::{DomainKind, DomainReading, EnergyError, EnergySource, WindowEnergy};
use crate::sources::sched::CpuSample;

/// Teads' TDP curve: (load, fraction of TDP).
pub const TEADS_TDP_CURVE: [(f64, f64); 4] =
    [(0.0, 0.12), (0.10, 0.32), (0.50, 0.75), (1.00, 1.02)];
/// Cloud Carbon Footprint's per-vCPU minimum (idle) watts.
pub const CCF_IDLE_W_PER_VCPU: f64 = 0.74;
/// Cloud Carbon Footprint's per-vCPU maximum watts.
pub const CCF_MAX_W_PER_VCPU: f64 = 3.5;

/// A utilisation -> power model.
#[derive(Debug, Clone, PartialEq)]
pub enum PowerModel {
    /// Per vCPU idle and full-load watts.
    LinearPerVcpu {
        idle_w_per_vcpu: f64,
        max_w_per_vcpu: f64,
    },
    /// Teads' curve scaled by the host's TDP in watts.
    TdpCurve { tdp_w: f64 },
}

impl PowerModel {
    pub fn ccf() -> PowerModel {
        PowerModel::LinearPerVcpu {
            idle_w_per_vcpu: CCF_IDLE_W_PER_VCPU,
            max_w_per_vcpu: CCF_MAX_W_PER_VCPU,
        }
    }

    /// Short name used in `energy_source` (`model-linear`, `model-tdp`).
    pub fn name(&self) -> &'static str {
        match self {
            PowerModel::LinearPerVcpu { .. } => "model-linear",
            PowerModel::TdpCurve { .. } => "model-tdp",
        }
    }

    /// The model with its parameters and their source, as disclosed in each window.
    pub fn describe(&self) -> String {
        match *self {
            PowerModel::LinearPerVcpu {
                idle_w_per_vcpu,
                max_w_per_vcpu,
            } => {
                let source = if *self == PowerModel::ccf() {
                    " (Cloud Carbon Footprint's per-vCPU averages)"
                } else {
                    " (configured)"
                };
                format!(
                    "{}: P = vCPUs x ({idle_w_per_vcpu} W + ({max_w_per_vcpu} W - {idle_w_per_vcpu} W) x utilisation){source}",
                    self.name()
                )
            }
            PowerModel::TdpCurve { tdp_w } => format!(
                "{}: P = {tdp_w} W TDP x Teads' curve (0%: 0.12, 10%: 0.32, 50%: 0.75, 100%: 1.02)",
                self.name()
            ),
        }
    }

    /// Host power in watts at utilisation `u` (clamped to 0..=1) with `vcpus` CPUs.
    pub fn power_w(&self, utilisation: f64, vcpus: u32) -> f64 {
        let u = if utilisation.is_finite() {
            utilisation.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match *self {
            PowerModel::LinearPerVcpu {
                idle_w_per_vcpu,
                max_w_per_vcpu,
            } => f64::from(vcpus) * (idle_w_per_vcpu + (max_w_per_vcpu - idle_w_per_vcpu) * u),
            PowerModel::TdpCurve { tdp_w } => tdp_w * teads_fraction(u),
        }
    }
}

/// Fraction of TDP at load `u` on Teads' curve (piecewise linear).
pub fn teads_fraction(u: f64) -> f64 {
    let u = u.clamp(0.0, 1.0);
    for pair in TEADS_TDP_CURVE.windows(2) {
        let ((u0, f0), (u1, f1)) = (pair[0], pair[1]);
        if u <= u1 {
            return f0 + (f1 - f0) * (u - u0) / (u1 - u0);
        }
    }
    TEADS_TDP_CURVE[TEADS_TDP_CURVE.len() - 1].1
}

/// Parse `--power-model`: `ccf`, `linear:IDLE_W:MAX_W` (watts per vCPU), `tdp:WATTS` (host TDP).
pub fn parse_power_model(spec: &str) -> Result<PowerModel, EnergyError> {
    let bad = |reason: &str| EnergyError::PowerModel {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let number = |text: &str, what: &str| -> Result<f64, EnergyError> {
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| {
                bad(&format!(
                    "{what} {text:?} is not a non-negative number of watts"
                ))
            })
    };
    let parts: Vec<&str> = spec.trim().split(':').collect();
    match parts.as_slice() {
        ["ccf"] => Ok(PowerModel::ccf()),
        ["linear", idle, max] => {
            let (idle_w_per_vcpu, max_w_per_vcpu) = (number(idle, "idle")?, number(max, "max")?);
            if max_w_per_vcpu < idle_w_per_vcpu {
                return Err(bad("max watts per vCPU is below idle watts per vCPU"));
            }
            Ok(PowerModel::LinearPerVcpu {
                idle_w_per_vcpu,
                max_w_per_vcpu,
            })
        }
        ["tdp", tdp] => {
            let tdp_w = number(tdp, "TDP")?;
            if tdp_w == 0.0 {
                return Err(bad("TDP must be above 0 W"));
            }
            Ok(PowerModel::TdpCurve { tdp_w })
        }
        _ => Err(bad(
            "expected `ccf`, `linear:IDLE_W:MAX_W` (per vCPU) or `tdp:WATTS`",
        )),
    }
}

/// Energy estimated from a [`PowerModel`].
#[derive(Debug, Clone)]
pub struct ModelSource {
    model: PowerModel,
    cpus: u32,
}

impl ModelSource {
    /// `cpus` is used when a sample does not say how many CPUs it covers.
    pub fn new(model: PowerModel, cpus: u32) -> ModelSource {
        ModelSource { model, cpus }
    }

    pub fn model(&self) -> &PowerModel {
        &self.model
    }
}

/// `busy / (busy + idle)` of a sample, 0 when it has no time at all.
pub fn utilisation(sample: &CpuSample) -> f64 {
    let busy = sample.busy_cpu_ns() as f64;
    let idle = sample.idle_cpu_ns() as f64;
    if busy + idle > 0.0 {
        busy / (busy + idle)
    } else {
        0.0
    }
}

impl EnergySource for ModelSource {
    fn name(&self) -> &str {
        self.model.name()
    }

    fn estimated(&self) -> bool {
        true
    }

    fn model_description(&self) -> Option<String> {
        Some(self.model.describe())
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        let cpus = if sample.cpus > 0 {
            sample.cpus
        } else {
            self.cpus
        };
        let duration_ns = sample.end_unix_ns.saturating_sub(sample.start_unix_ns);
        let duration_s = duration_ns as f64 / 1e9;
        let power_w = self.model.power_w(utilisation(sample), cpus);
        Ok(WindowEnergy {
            source: self.model.name().to_string(),
            estimated: true,
            duration_ns,
            domains: vec![DomainReading {
                name: "model".to_string(),
                kind: DomainKind::Model,
                package: None,
                cpus: (0..cpus).collect(),
                energy_j: power_w * duration_s,
                counts_toward_host: true,
                idle_power_w: Some(self.model.power_w(0.0, cpus)),
                known_idle_j: None,
            }],
            warnings: Vec::new(),
            faults: Default::default(),
            sample_interval_ns: duration_ns,
            host_factors: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_power_model("ccf").ok(), Some(PowerModel::ccf()));
        assert_eq!(
            parse_power_model("linear:1:4").ok(),
            Some(PowerModel::LinearPerVcpu {
                idle_w_per_vcpu: 1.0,
                max_w_per_vcpu: 4.0
            })
        );
        assert_eq!(
            parse_power_model("tdp:150").ok(),
            Some(PowerModel::TdpCurve { tdp_w: 150.0 })
        );
        for bad in [
            "",
            "linear:4:1",
            "linear:x:1",
            "tdp:0",
            "tdp:-5",
            "nvml",
            "linear:1",
        ] {
            assert!(parse_power_model(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ccf_by_hand() {
        // 4 vCPU at 25 %: 4 * (0.74 + 2.76 * 0.25) = 5.72 W.
        assert!((PowerModel::ccf().power_w(0.25, 4) - 5.72).abs() < 1e-12);
    }

    #[test]
    fn teads_curve_by_hand() {
        let m = PowerModel::TdpCurve { tdp_w: 100.0 };
        assert!((m.power_w(0.0, 8) - 12.0).abs() < 1e-9);
        assert!((m.power_w(0.10, 8) - 32.0).abs() < 1e-9);
        // Halfway between 10 % (32) and 50 % (75): 30 % -> 53.5 W.
        assert!((m.power_w(0.30, 8) - 53.5).abs() < 1e-9);
        assert!((m.power_w(0.75, 8) - 88.5).abs() < 1e-9);
        assert!((m.power_w(1.0, 8) - 102.0).abs() < 1e-9);
    }
}
