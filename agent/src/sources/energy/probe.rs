//! The start-up probe: does a counter move while every CPU is busy?
//!
//! One thread per CPU, pinned to it, spins for the probe's length; the
//! threads' own CPU time (`CLOCK_THREAD_CPUTIME_ID`) is the load the window
//! says it carried. The source is read once at the end (its previous reading
//! is the one taken at discovery, just before): a domain whose counter did
//! not move is disabled with the reason, and a source left with no domain
//! that counts toward the host is refused. A real RAPL counter updates about
//! every millisecond and moves even on an idle package, so one that stays
//! put for the whole probe under load does not measure.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{EnergyError, EnergySource};
use crate::sources::sched::CpuSample;
use crate::window::{CpuSource, LossCounters};

/// The load a probe puts on the host: which CPUs, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLoad {
    pub cpus: Vec<u32>,
    pub duration: Duration,
}

/// What a probe ran: its window and the CPU time the load got per CPU.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// Index = CPU number.
    pub busy_ns_per_cpu: Vec<u64>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

fn pin_to(cpu: u32) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it. A failure
    // (an offline CPU) leaves the thread unpinned, which only weakens the load.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

impl ProbeLoad {
    pub fn new(cpus: Vec<u32>, duration: Duration) -> ProbeLoad {
        ProbeLoad { cpus, duration }
    }

    /// Keep every CPU busy for the probe's length.
    pub fn run(&self) -> ProbeRun {
        let start_unix_ns = unix_ns();
        let deadline = Instant::now() + self.duration;
        let handles: Vec<_> = self
            .cpus
            .iter()
            .map(|&cpu| {
                std::thread::Builder::new()
                    .name(format!("sci-probe-{cpu}"))
                    .spawn(move || {
                        pin_to(cpu);
                        let started = thread_cpu_ns();
                        let mut spins = 0u64;
                        while Instant::now() < deadline {
                            spins = std::hint::black_box(spins.wrapping_add(1));
                        }
                        (cpu, thread_cpu_ns().saturating_sub(started))
                    })
            })
            .collect();
        let width = self.cpus.iter().max().map_or(0, |m| *m as usize + 1);
        let mut busy_ns_per_cpu = vec![0u64; width];
        for handle in handles.into_iter().flatten() {
            if let Ok((cpu, ns)) = handle.join() {
                busy_ns_per_cpu[cpu as usize] += ns;
            }
        }
        ProbeRun {
            start_unix_ns,
            end_unix_ns: unix_ns(),
            busy_ns_per_cpu,
        }
    }
}

impl ProbeRun {
    /// The probe as a CPU sample: the load is busy time no process owns.
    pub fn sample(&self) -> CpuSample {
        let duration_ns = self.end_unix_ns.saturating_sub(self.start_unix_ns);
        CpuSample {
            source: CpuSource::Procfs,
            start_unix_ns: self.start_unix_ns,
            end_unix_ns: self.end_unix_ns,
            cpus: self.busy_ns_per_cpu.len() as u32,
            idle_ns_per_cpu: self
                .busy_ns_per_cpu
                .iter()
                .map(|b| duration_ns.saturating_sub(*b))
                .collect(),
            unowned_busy_ns_per_cpu: self.busy_ns_per_cpu.clone(),
            processes: Vec::new(),
            lost: LossCounters::default(),
        }
    }

    /// Mean busy share of the CPUs during the probe (0..=1).
    pub fn busy_share(&self) -> f64 {
        let duration_ns = self.end_unix_ns.saturating_sub(self.start_unix_ns) as f64;
        let capacity = duration_ns * self.busy_ns_per_cpu.len() as f64;
        if capacity > 0.0 {
            self.busy_ns_per_cpu.iter().sum::<u64>() as f64 / capacity
        } else {
            0.0
        }
    }
}

/// The default probe of a counter source (see the module note). Returns one
/// line per domain disabled, or the reason the source is refused.
pub fn probe_counters(
    source: &mut dyn EnergySource,
    load: &ProbeLoad,
) -> Result<Vec<String>, EnergyError> {
    let run = load.run();
    let name = source.name().to_string();
    let what = format!(
        "a {} ms probe with {} CPU(s) {:.0}% busy",
        load.duration.as_millis(),
        load.cpus.len(),
        100.0 * run.busy_share()
    );
    let energy = source
        .window_energy(&run.sample())
        .map_err(|e| EnergyError::Refused {
            source_name: name.clone(),
            reason: format!("no counted domain could be read during {what}: {e}"),
        })?;
    let moved: Vec<&str> = energy
        .domains
        .iter()
        .filter(|d| d.energy_j > 0.0)
        .map(|d| d.name.as_str())
        .collect();
    let mut lines = Vec::new();
    for domain in source.domain_names() {
        if moved.contains(&domain.as_str()) {
            continue;
        }
        let read = energy.domains.iter().any(|d| d.name == domain);
        let why = if read {
            format!("its counter did not move during {what}")
        } else {
            let said: Vec<&str> = energy
                .warnings
                .iter()
                .filter(|w| w.contains(domain.as_str()))
                .map(String::as_str)
                .collect();
            format!(
                "it could not be read during {what}: {}",
                if said.is_empty() {
                    "no reading".to_string()
                } else {
                    said.join("; ")
                }
            )
        };
        if source.disable_domain(&domain) {
            lines.push(format!("{name}: domain {domain} disabled: {why}"));
        }
    }
    if !energy
        .domains
        .iter()
        .any(|d| d.counts_toward_host && d.energy_j > 0.0)
    {
        return Err(EnergyError::Refused {
            source_name: name,
            reason: format!(
                "no counter that counts toward the host moved during {what}{}",
                if lines.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", lines.join("; "))
                }
            ),
        });
    }
    Ok(lines)
}
