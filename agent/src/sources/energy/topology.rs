//! CPU to package (socket) map, from `devices/system/cpu/cpuN/topology/physical_package_id`.
use std::path::Path;

/// Which package each CPU belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTopology {
    /// Index = CPU number.
    pub package_of_cpu: Vec<u32>,
}

impl CpuTopology {
    /// Read the topology of CPUs `0..cpus` under `sysfs_root`; a CPU whose file
    /// is absent or unreadable is put on package 0.
    pub fn read(sysfs_root: &Path, cpus: u32) -> CpuTopology {
        let package_of_cpu = (0..cpus)
            .map(|cpu| {
                let path = sysfs_root.join(format!(
                    "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
                ));
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| text.trim().parse::<i64>().ok())
                    .and_then(|id| u32::try_from(id).ok())
                    .unwrap_or(0)
            })
            .collect();
        CpuTopology { package_of_cpu }
    }

    /// Every CPU on package 0.
    pub fn single_package(cpus: u32) -> CpuTopology {
        CpuTopology {
            package_of_cpu: vec![0; cpus as usize],
        }
    }

    pub fn cpus(&self) -> u32 {
        self.package_of_cpu.len() as u32
    }

    pub fn all_cpus(&self) -> Vec<u32> {
        (0..self.cpus()).collect()
    }

    pub fn package_of(&self, cpu: u32) -> u32 {
        self.package_of_cpu.get(cpu as usize).copied().unwrap_or(0)
    }

    /// CPUs of `package`, in order.
    pub fn cpus_of_package(&self, package: u32) -> Vec<u32> {
        (0..self.cpus())
            .filter(|&cpu| self.package_of(cpu) == package)
            .collect()
    }

    /// Package ids present, in order.
    pub fn packages(&self) -> Vec<u32> {
        let mut ids = self.package_of_cpu.clone();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Parse a kernel CPU list (`0-3,8,10-11`).
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,8\n"), Some(vec![0, 1, 2, 8]));
        assert_eq!(parse_cpu_list("0,4"), Some(vec![0, 4]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn absent_topology_is_package_zero() {
        let dir = std::env::temp_dir().join("sci-topology-absent-does-not-exist");
        let t = CpuTopology::read(&dir, 3);
        assert_eq!(t.package_of_cpu, vec![0, 0, 0]);
        assert_eq!(t.packages(), vec![0]);
    }
}
