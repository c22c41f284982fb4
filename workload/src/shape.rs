//! The daily traffic shape of a consumer-finance platform, compressed in time.
//!
//! Core-business servers show a pronounced peak/trough pattern (the
//! standard's introduction): a night trough, a morning ramp, a lunch peak, an
//! afternoon plateau and the day's evening peak. The shape is piecewise linear
//! through [`DAILY_SHAPE_KNOTS`] (hour of day, fraction of peak); one
//! simulated day lasts `day_seconds` of wall time.

/// (hour of day, fraction of the peak rate); the curve is linear between
/// knots and wraps at 24 h (the 24:00 knot equals 0:00).
pub const DAILY_SHAPE_KNOTS: [(f64, f64); 11] = [
    (0.0, 0.20),
    (3.0, 0.10),  // night trough starts
    (6.0, 0.10),  // night trough ends
    (9.0, 0.70),  // morning ramp
    (10.5, 0.80), // late morning
    (12.5, 1.00), // lunch peak
    (14.0, 0.75), // afternoon lull
    (17.0, 0.70), // after work
    (20.5, 1.00), // evening peak
    (22.0, 0.80),
    (24.0, 0.20),
];

/// Fraction of the peak rate at `hour` (any real number; taken modulo 24).
pub fn daily_load_fraction(hour: f64) -> f64 {
    let h = hour.rem_euclid(24.0);
    for pair in DAILY_SHAPE_KNOTS.windows(2) {
        let ((h0, f0), (h1, f1)) = (pair[0], pair[1]);
        if h >= h0 && h <= h1 {
            return f0 + (f1 - f0) * (h - h0) / (h1 - h0);
        }
    }
    DAILY_SHAPE_KNOTS[0].1
}

/// Mean of [`daily_load_fraction`] over a whole day (exact, trapezoids).
pub fn daily_mean_fraction() -> f64 {
    DAILY_SHAPE_KNOTS
        .windows(2)
        .map(|p| (p[1].0 - p[0].0) * (p[0].1 + p[1].1) / 2.0)
        .sum::<f64>()
        / 24.0
}

/// Simulated hour of day `elapsed_s` seconds into a run that starts at
/// `start_hour`, with one day every `day_seconds`.
pub fn simulated_hour(start_hour: f64, elapsed_s: f64, day_seconds: f64) -> f64 {
    (start_hour + 24.0 * elapsed_s / day_seconds).rem_euclid(24.0)
}

/// Integrates the request rate `peak_rps * shape` in steps: each call to
/// [`RateAccumulator::advance`] returns how many whole requests are due.
/// The fractional remainder carries over, so over a run the number issued is
/// the integral of the rate, rounded down.
#[derive(Debug, Clone)]
pub struct RateAccumulator {
    pub peak_rps: f64,
    pub day_seconds: f64,
    pub start_hour: f64,
    due: f64,
    last_s: f64,
}

impl RateAccumulator {
    pub fn new(peak_rps: f64, day_seconds: f64, start_hour: f64) -> Self {
        RateAccumulator {
            peak_rps,
            day_seconds,
            start_hour,
            due: 0.0,
            last_s: 0.0,
        }
    }

    /// Rate at `elapsed_s` seconds into the run.
    pub fn rate_at(&self, elapsed_s: f64) -> f64 {
        self.peak_rps
            * daily_load_fraction(simulated_hour(self.start_hour, elapsed_s, self.day_seconds))
    }

    /// Advances to `elapsed_s` (trapezoid over the step) and returns the
    /// number of requests now due.
    pub fn advance(&mut self, elapsed_s: f64) -> u64 {
        if elapsed_s > self.last_s {
            let dt = elapsed_s - self.last_s;
            self.due += dt * (self.rate_at(self.last_s) + self.rate_at(elapsed_s)) / 2.0;
            self.last_s = elapsed_s;
        }
        let whole = self.due.floor();
        self.due -= whole;
        whole as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn trough_and_peaks_have_their_documented_values() {
        // Night trough: 10 % of the peak from 3:00 to 6:00.
        assert!(close(daily_load_fraction(3.0), 0.10));
        assert!(close(daily_load_fraction(4.5), 0.10));
        assert!(close(daily_load_fraction(6.0), 0.10));
        // Lunch and evening peaks at 100 %.
        assert!(close(daily_load_fraction(12.5), 1.0));
        assert!(close(daily_load_fraction(20.5), 1.0));
        // Morning ramp half way between 6:00 (0.10) and 9:00 (0.70).
        assert!(close(daily_load_fraction(7.5), 0.40));
        // 23:00, half way between 22:00 (0.80) and 24:00 (0.20).
        assert!(close(daily_load_fraction(23.0), 0.50));
        // Wraps: 27 h is 3:00, -1 h is 23:00.
        assert!(close(daily_load_fraction(27.0), 0.10));
        assert!(close(daily_load_fraction(-1.0), 0.50));
        // Nowhere below the trough or above the peak.
        for i in 0..2400 {
            let f = daily_load_fraction(f64::from(i) / 100.0);
            assert!((0.10 - 1e-12..=1.0 + 1e-12).contains(&f), "{i}: {f}");
        }
    }

    #[test]
    fn daily_mean_matches_the_hand_computed_trapezoids() {
        // 0.45+0.30+1.20+1.125+1.80+1.3125+2.175+2.975+1.35+1.00 = 13.6875 h
        assert!(close(daily_mean_fraction(), 13.6875 / 24.0));
    }

    #[test]
    fn accumulator_issues_the_integral_of_the_rate() {
        // One whole day at 40 rps peak over 60 s: 40 * 60 * 13.6875/24 = 1368.75.
        let mut acc = RateAccumulator::new(40.0, 60.0, 0.0);
        let mut issued = 0;
        for step in 1..=60_000 {
            issued += acc.advance(f64::from(step) / 1000.0);
        }
        assert!((1367..=1369).contains(&issued), "{issued}");
        // Three simulated hours of night trough (3:00-6:00, 3 s of a 24 s day):
        // 100 rps * 10 % * 3 s = 30 requests.
        let mut night = RateAccumulator::new(100.0, 24.0, 3.0);
        let n: u64 = (1..=300).map(|i| night.advance(f64::from(i) / 100.0)).sum();
        assert!((29..=30).contains(&n), "{n}");
    }
}
