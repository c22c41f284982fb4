//! How every figure prints, on every page, report and text: 4 significant
//! digits ([`sig4`]), unit-scaled where the figure has a unit ([`mass_g`]:
//! t .. µg; [`energy_j`]: GJ .. mJ), scientific outside the units' reach.
//! Rounding happens before the unit or the decimals are chosen, so 0.99999 g
//! prints "1.000 g" (not "1000 mg") and 99.999 % prints "100.0%".

/// `v` rounded to 4 significant digits.
fn round4(v: f64) -> f64 {
    format!("{v:.3e}").parse().unwrap_or(v)
}

/// `v` with 4 significant digits (scientific outside 1e-4 ..= 1e6).
pub fn sig4(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return v.to_string();
    }
    let magnitude = round4(v).abs().log10().floor() as i32;
    if !(-4..=5).contains(&magnitude) {
        return format!("{v:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    format!("{v:.decimals$}")
}

/// A count: whole numbers as integers, fractions (shares of windows that
/// straddle a period boundary) with 4 significant digits.
pub fn count(v: f64) -> String {
    if (v - v.round()).abs() <= 1e-9 * v.abs().max(1.0) {
        format!("{}", v.round() as i64)
    } else {
        sig4(v)
    }
}

/// A share (0.25) as a percentage ("25.00%").
pub fn percent(share: f64) -> String {
    format!("{}%", sig4(100.0 * share))
}

/// A relative change (-0.18) as a signed percentage ("-18.00%", "+5.000%").
pub fn signed_percent(change: f64) -> String {
    let sign = if change > 0.0 { "+" } else { "" };
    format!("{sign}{}", percent(change))
}

const MASS_UNITS: [(f64, &str); 6] = [
    (1e6, "t"),
    (1e3, "kg"),
    (1.0, "g"),
    (1e-3, "mg"),
    (1e-6, "µg"),
    (1e-9, "ng"),
];

const ENERGY_UNITS: [(f64, &str); 7] = [
    (1e9, "GJ"),
    (1e6, "MJ"),
    (1e3, "kJ"),
    (1.0, "J"),
    (1e-3, "mJ"),
    (1e-6, "µJ"),
    (1e-9, "nJ"),
];

const DURATION_UNITS: [(f64, &str); 4] = [(1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns")];

/// The unit (factor, name) `v` prints in: the first, largest first, where
/// the rounded value is >= 1; the smallest below it; the base unit for 0.
fn unit_of(v: f64, units: &[(f64, &'static str)]) -> (f64, &'static str) {
    let base = units
        .iter()
        .copied()
        .find(|(f, _)| *f == 1.0)
        .unwrap_or(units[0]);
    if v == 0.0 || !v.is_finite() {
        return base;
    }
    let rounded = round4(v).abs();
    units
        .iter()
        .copied()
        .find(|(factor, _)| rounded >= *factor)
        .unwrap_or(units[units.len() - 1])
}

/// `v` in its unit; below the smallest unit, scientific in it.
fn scaled(v: f64, units: &[(f64, &'static str)]) -> String {
    let (factor, unit) = unit_of(v, units);
    if v != 0.0 && round4(v).abs() < factor {
        return format!("{:.3e} {unit}", v / factor);
    }
    format!("{} {unit}", sig4(v / factor))
}

/// Grams of CO2e: t, kg, g, mg, µg.
pub fn mass_g(v: f64) -> String {
    scaled(v, &MASS_UNITS)
}

/// The mass unit (factor in grams, name) an axis whose top is `max_g` is
/// labelled in, so its tick labels print as plain numbers in that unit.
pub fn mass_unit(max_g: f64) -> (f64, &'static str) {
    unit_of(max_g, &MASS_UNITS)
}

/// Joules: GJ, MJ, kJ, J, mJ, µJ, nJ.
pub fn energy_j(v: f64) -> String {
    scaled(v, &ENERGY_UNITS)
}

/// A duration given in nanoseconds: s, ms, µs, ns.
pub fn duration_ns(v: f64) -> String {
    scaled(v, &DURATION_UNITS)
}

/// What a figure measures, for [`of_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Grams of CO2e.
    MassG,
    EnergyJ,
    DurationNs,
    /// A count or a ratio: 4 significant digits.
    Plain,
}

/// `v` printed as its kind prints.
pub fn of_kind(v: f64, kind: Kind) -> String {
    match kind {
        Kind::MassG => mass_g(v),
        Kind::EnergyJ => energy_j(v),
        Kind::DurationNs => duration_ns(v),
        Kind::Plain => sig4(v),
    }
}

/// `v` as its kind prints, "–" when there is none.
pub fn opt_of_kind(v: Option<f64>, kind: Kind) -> String {
    v.map_or_else(|| "–".to_string(), |v| of_kind(v, kind))
}

/// A figure of a hotspot's evidence (a count, a share, grams, joules: the
/// key names the unit): whole numbers as integers, the rest with 4
/// significant digits.
pub fn evidence_figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        sig4(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_significant_digits_unit_scaled() {
        assert_eq!(sig4(0.2), "0.2000");
        assert_eq!(sig4(114.0 / 700.0), "0.1629");
        assert_eq!(sig4(1234.5678), "1235");
        assert_eq!(sig4(0.000083), "8.300e-5");
        assert_eq!(sig4(7.443), "7.443");
        assert_eq!(mass_g(0.000083), "83.00 µg");
        assert_eq!(mass_g(0.2), "200.0 mg");
        assert_eq!(mass_g(0.0123), "12.30 mg");
        assert_eq!(mass_g(2.5e-9), "2.500 ng");
        assert_eq!(mass_g(5.28e-7), "528.0 ng");
        assert_eq!(mass_g(2.5e-12), "2.500e-3 ng");
        assert_eq!(mass_g(1500.0), "1.500 kg");
        assert_eq!(mass_g(0.0), "0 g");
        assert_eq!(energy_j(3.64), "3.640 J");
        assert_eq!(energy_j(0.254), "254.0 mJ");
        assert_eq!(energy_j(0.0), "0 J");
        assert_eq!(energy_j(2.11e-6), "2.110 µJ");
        assert_eq!(energy_j(5.0e-9), "5.000 nJ");
        assert_eq!(duration_ns(5_123_456.0), "5.123 ms");
        assert_eq!(duration_ns(812.0), "812.0 ns");
        assert_eq!(duration_ns(0.0), "0 ns");
        assert_eq!(of_kind(2.11e-5, Kind::MassG), "21.10 µg");
        assert_eq!(opt_of_kind(None, Kind::MassG), "–");
        assert_eq!(count(24.0), "24");
        assert_eq!(count(1.5), "1.500");
        assert_eq!(evidence_figure(0.000_213_4), "0.0002134");
        assert_eq!(evidence_figure(120.0), "120");
    }

    /// Rounding up to the next power of ten changes the decimals and the
    /// unit: "100.0%", never "100.00%"; "1.000 g", never "1000 mg".
    #[test]
    fn rounding_to_the_next_power_of_ten() {
        assert_eq!(percent(1.0), "100.0%");
        assert_eq!(signed_percent(-0.18), "-18.00%");
        assert_eq!(signed_percent(0.05), "+5.000%");
        assert_eq!(percent(0.999_999), "100.0%");
        assert_eq!(percent(0.099_999_9), "10.00%");
        assert_eq!(sig4(9.99999), "10.00");
        assert_eq!(sig4(0.000_099_999), "0.0001000");
        assert_eq!(sig4(0.000_009_999_9), "1.000e-5");
        assert_eq!(sig4(-99.9999), "-100.0");
        assert_eq!(mass_g(0.999_999), "1.000 g");
        assert_eq!(energy_j(999.9999), "1.000 kJ");
    }

    #[test]
    fn axis_units() {
        assert_eq!(mass_unit(5e-5), (1e-6, "µg"));
        assert_eq!(mass_unit(0.5), (1e-3, "mg"));
        assert_eq!(mass_unit(2.0), (1.0, "g"));
        assert_eq!(mass_unit(0.0), (1.0, "g"));
    }
}
