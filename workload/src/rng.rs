//! The workload's random inputs come from rand's `SmallRng`, always seeded,
//! so that one request id always produces the same business inputs
//! (reproducible runs and benchmarks with this crate's locked rand).
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A generator seeded from a text (e.g. a request id) with FNV-1a.
pub fn from_text(text: &str) -> SmallRng {
    SmallRng::seed_from_u64(fnv1a(text.as_bytes()))
}

/// Approximately standard normal (Irwin–Hall of 4 uniforms, rescaled: bounded
/// at +-2 sqrt(3), so a log-normal income drawn from it stays finite).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let s: f64 = (0..4).map(|_| rng.random::<f64>()).sum();
    (s - 2.0) * 3.0f64.sqrt()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
