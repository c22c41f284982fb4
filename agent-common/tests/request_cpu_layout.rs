//! The request-CPU bucket layout pinned by hand (issue 24): 16 linear
//! sub-buckets per power of two (HDR-style), values below 16 ns exact. Each
//! expected value below was worked out on paper from the definition
//! (bucket = (e - 4) x 16 + (t >> (e - 4)) for t >= 16, e = floor(log2 t)),
//! not by calling the function under test.
#![allow(clippy::unwrap_used)]

use agent_common::{request_cpu_bucket, REQUEST_CPU_BUCKETS};

#[test]
fn buckets_by_hand() {
    let cases: &[(u64, usize)] = &[
        (0, 0),
        (1, 1),
        (15, 15),
        (16, 16),
        (31, 31),
        (32, 32),
        (33, 32),
        (34, 33),
        (63, 47),
        (64, 48),
        (1_000, 111),
        (1_000_000, 270),
        (4_980_735, 306),
        (4_980_736, 307),
        (5_000_000, 307),
        (5_242_879, 307),
        (5_242_880, 308),
        (1 << 63, 960),
        (u64::MAX, 975),
    ];
    for &(cpu_ns, bucket) in cases {
        assert_eq!(request_cpu_bucket(cpu_ns), bucket, "{cpu_ns} ns");
    }
    assert_eq!(REQUEST_CPU_BUCKETS, 976);
}
