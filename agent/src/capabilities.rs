//! The process's own capabilities, read from `/proc/self/status`.

/// Which of `wanted` this process does not have in its effective set
/// (/proc/self/status CapEff); empty when it cannot tell.
pub fn missing_capabilities(wanted: &[(&'static str, u32)]) -> Vec<&'static str> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let Some(effective) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Vec::new();
    };
    wanted
        .iter()
        .filter(|(_, bit)| effective & (1u64 << bit) == 0)
        .map(|(name, _)| *name)
        .collect()
}
