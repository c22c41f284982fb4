//! The one bucket layout of per-request CPU histograms, used by the eBPF
//! program (`agent-ebpf`, which counts) and by the aggregator (which merges
//! the counts and reads percentiles from them).
//!
//! Log-linear, as HDR histograms are: below 2^b ns each value has a bucket of
//! its own; from there each power of two [2^e, 2^(e+1)) is cut into 2^b
//! sub-buckets of equal width 2^(e-b). With b = `sub_bits`:
//!
//! ```text
//! bucket(t) = t                                for t < 2^b
//!           = (e - b) x 2^b + (t >> (e - b))   for t >= 2^b, e = floor(log2 t)
//! ```
//!
//! b = 0 is the log2 layout agents sent before (bucket i: t with i
//! significant bits). Agents now send b = [`REQUEST_CPU_SUB_BUCKET_BITS`] =
//! 4: a bucket is at most 1/16 of its lower bound wide, and a percentile
//! interpolated linearly inside it is within 1% of the exact one for smooth
//! distributions (issue 24: log2 bins put a log-normal's p99 31% high).
//! A coarser layout's bucket is a whole number of finer buckets of equal
//! width ([`finer_buckets`]), so old histograms convert without changing
//! any percentile read from them.

/// Sub-buckets per power of two: 2^4 = 16.
pub const REQUEST_CPU_SUB_BUCKET_BITS: u32 = 4;

/// Buckets of the layout with `sub_bits` (the whole u64 range).
pub const fn request_cpu_buckets_of(sub_bits: u32) -> usize {
    ((65 - sub_bits as usize) << sub_bits) - if sub_bits == 0 { 1 } else { 0 }
}

/// Buckets of the layout agents send: 61 x 16 = 976.
pub const REQUEST_CPU_BUCKETS: usize = request_cpu_buckets_of(REQUEST_CPU_SUB_BUCKET_BITS);

/// The bucket of `cpu_ns` in the layout with `sub_bits` sub-bucket bits.
/// With `sub_bits` = 0, t >= 2^63 goes to the last bucket (63), as before.
#[inline(always)]
pub fn log_linear_bucket(cpu_ns: u64, sub_bits: u32) -> usize {
    if cpu_ns < (1u64 << sub_bits) {
        return cpu_ns as usize;
    }
    let e = 63 - cpu_ns.leading_zeros();
    let shift = e - sub_bits;
    let bucket = ((shift as usize) << sub_bits) + (cpu_ns >> shift) as usize;
    let last = request_cpu_buckets_of(sub_bits) - 1;
    if bucket > last {
        last
    } else {
        bucket
    }
}

/// The bucket of a request that took `cpu_ns`, in the layout agents send.
#[inline(always)]
pub fn request_cpu_bucket(cpu_ns: u64) -> usize {
    log_linear_bucket(cpu_ns, REQUEST_CPU_SUB_BUCKET_BITS)
}

/// Bounds [lower, upper) in ns of `bucket` in the layout with `sub_bits`
/// (the last log2 bucket, which also holds 2^63 and up, ends at 2^64).
/// Userspace only (the eBPF program counts, it never reads bounds).
#[cfg(not(target_arch = "bpf"))]
pub fn log_linear_bounds(bucket: usize, sub_bits: u32) -> (u128, u128) {
    let sub = 1usize << sub_bits;
    if bucket < sub {
        return (bucket as u128, bucket as u128 + 1);
    }
    let shift = (bucket >> sub_bits) - 1;
    let mantissa = (sub + (bucket & (sub - 1))) as u128;
    if sub_bits == 0 && bucket == 63 {
        return (1 << 62, 1 << 64);
    }
    (mantissa << shift, (mantissa + 1) << shift)
}

/// The buckets of the layout with `fine_bits` that together make `bucket`
/// of the layout with `coarse_bits` (`coarse_bits <= fine_bits`): a range
/// of buckets of equal width, so spreading a coarse count evenly over them
/// keeps the piecewise-linear distribution read from it (all but the last
/// log2 bucket, [2^62, 2^64), which is two octaves).
#[cfg(not(target_arch = "bpf"))]
pub fn finer_buckets(bucket: usize, coarse_bits: u32, fine_bits: u32) -> core::ops::Range<usize> {
    let (lower, upper) = log_linear_bounds(bucket, coarse_bits);
    let first = log_linear_bucket(lower as u64, fine_bits);
    let last = log_linear_bucket((upper - 1) as u64, fine_bits);
    first..last + 1
}

/// Per-(process, scenario) distribution of the CPU time of requests
/// bracketed by the marker library (`REQUEST_CPU`, per-CPU values), in the
/// layout above.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestCpuBuckets {
    pub counts: [u64; REQUEST_CPU_BUCKETS],
    /// Exact sum of the requests' CPU time.
    pub sum_cpu_ns: u64,
}

impl Default for RequestCpuBuckets {
    fn default() -> Self {
        RequestCpuBuckets {
            counts: [0; REQUEST_CPU_BUCKETS],
            sum_cpu_ns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worked out on paper from the definition in the module note.
    #[test]
    fn bounds_and_legacy_layout_by_hand() {
        assert_eq!(log_linear_bounds(0, 4), (0, 1));
        assert_eq!(log_linear_bounds(15, 4), (15, 16));
        assert_eq!(log_linear_bounds(16, 4), (16, 17));
        assert_eq!(log_linear_bounds(32, 4), (32, 34));
        assert_eq!(log_linear_bounds(111, 4), (992, 1024));
        assert_eq!(log_linear_bounds(307, 4), (4_980_736, 5_242_880));
        assert_eq!(log_linear_bounds(975, 4), (31 << 59, 1 << 64));
        // The log2 layout (b = 0): bucket i holds 2^(i-1) <= t < 2^i.
        assert_eq!(request_cpu_buckets_of(0), 64);
        for (t, bucket) in [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5_000_000, 23)] {
            assert_eq!(log_linear_bucket(t, 0), bucket, "{t}");
        }
        assert_eq!(log_linear_bucket(1 << 62, 0), 63);
        assert_eq!(log_linear_bucket(u64::MAX, 0), 63);
        assert_eq!(log_linear_bounds(0, 0), (0, 1));
        assert_eq!(log_linear_bounds(23, 0), (1 << 22, 1 << 23));
        assert_eq!(log_linear_bounds(63, 0), (1 << 62, 1 << 64));
        // A log2 bucket is whole log-linear buckets: 16 from 2^4 on, fewer below.
        assert_eq!(finer_buckets(0, 0, 4), 0..1);
        assert_eq!(finer_buckets(3, 0, 4), 4..8);
        assert_eq!(finer_buckets(5, 0, 4), 16..32);
        assert_eq!(finer_buckets(23, 0, 4), 304..320);
        assert_eq!(finer_buckets(63, 0, 4), 944..976);
    }
}
