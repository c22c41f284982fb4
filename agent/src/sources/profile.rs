//! CPU profile: which functions burn the CPU time (and so the energy) of each
//! process and scenario.
//!
//! `cpu_profile` (agent-ebpf/src/profile.rs) runs on the software `cpu-clock`
//! event of every online CPU at `frequency_hz` (default 19 Hz, a prime, so it
//! does not run in lock-step with periodic work). Each sample counts one hit
//! for (process, marker scenario, user stack id, kernel stack id). Every
//! window [`CpuProfiler::drain`] reads and deletes those counts, reads the
//! stacks they name, and symbolises them on the host with blazesym (ELF
//! symbols, DWARF where present; the kernel through /proc/kallsyms) into
//! folded stacks, root first, kernel frames suffixed `_[k]`.
//!
//! Stack ids are deleted after each drain so the 16384-entry stack map does
//! not fill up. A sample taken between our read of the counts and the
//! deletion of its stack id would then name an id that is gone; the frames
//! of the previous drain's ids are kept for exactly that case (the bucket
//! held that very stack when the sample was taken). A sample landing on a
//! count key between its read and its deletion (a few microseconds) is lost.
//!
//! [`weigh`] turns samples into energy with the window's process figures:
//! `energy_j = samples x sampling period x (process energy_j / process cpu_ns)`.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use agent_common::{ProfileKey, PROFILE_LOSS_SLOTS};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, StackTraceMap};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::PerfEvent;
use aya::{Ebpf, EbpfLoader};
use blazesym::symbolize::source::{Kernel, Process, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use blazesym::{MaybeDefault, Pid};

use crate::error::AgentError;
use crate::sources::sched::ebpf::ProgramStats;
use crate::sources::sched::proc_info::online_cpus;

/// Default sampling frequency per CPU.
pub const DEFAULT_PROFILE_FREQUENCY_HZ: u64 = 19;

/// Frame name of an address that could not be symbolised.
pub const UNKNOWN_FRAME: &str = "[unknown]";

/// `[profile]` section of agent.toml.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Sample CPU stacks (needs eBPF; the window document gains `profile`).
    pub enabled: bool,
    /// Samples per second on each CPU (a prime, so sampling does not lock-step with periodic work).
    pub frequency_hz: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            // Off unless asked: symbolising the stacks of many short-lived
            // processes costs more than the rest of the agent (BENCHMARKS.md).
            enabled: false,
            frequency_hz: DEFAULT_PROFILE_FREQUENCY_HZ,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProfilerOptions {
    /// Samples per second on each CPU.
    pub frequency_hz: u64,
    /// CPUs to sample (default: every online CPU).
    pub cpus: Option<Vec<u32>>,
}

impl Default for ProfilerOptions {
    fn default() -> Self {
        ProfilerOptions {
            frequency_hz: DEFAULT_PROFILE_FREQUENCY_HZ,
            cpus: None,
        }
    }
}

/// One folded stack of one process and scenario slot, as drained from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldedStack {
    pub pid: u32,
    /// Marker scenario slot of the sampled thread (`agent_common::SCENARIO_*`, 0 = none).
    pub scenario_slot: u32,
    /// `frame;frame;frame`, root first; kernel frames end in `_[k]`.
    pub stack: String,
    pub samples: u64,
}

/// What one drain found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowProfile {
    pub frequency_hz: u64,
    /// Sorted by pid, then samples (most first), then stack.
    pub stacks: Vec<FoldedStack>,
    /// Samples drained (all stacks).
    pub samples: u64,
    /// Samples whose key could not be stored (count map full) in this window.
    pub lost_samples: u64,
    /// Stacks that could not be stored (stack map full or bucket taken); the
    /// sample is still counted, its frames show as `[unknown]`.
    pub lost_stacks: u64,
    /// Process names read at drain time (fallback when the report lacks the pid).
    pub comms: BTreeMap<u32, String>,
}

pub struct CpuProfiler {
    /// The object this profiler loaded itself (None when attached in the accounting's).
    _owned: Option<Ebpf>,
    program_id: u32,
    counts: PerCpuHashMap<MapData, ProfileKey, u64>,
    stacks: StackTraceMap<MapData>,
    losses: PerCpuArray<MapData, u64>,
    symbolizer: Symbolizer,
    frequency_hz: u64,
    previous_losses: Vec<u64>,
    /// Raw frames (leaf first) of the stack ids deleted by the previous drain.
    previous_frames: HashMap<u32, Vec<u64>>,
}

impl CpuProfiler {
    /// Loads its own copy of the agent's eBPF object and attaches
    /// `cpu_profile` to `cpu-clock` on each CPU. Needs root (or CAP_BPF +
    /// CAP_PERFMON). This copy has its own THREAD_STATE map, which no
    /// marker uprobe fills: every sample has scenario slot 0. Use
    /// [`CpuProfiler::attach_in`] with the accounting's `Ebpf` to see the
    /// marker scenarios.
    pub fn load(options: &ProfilerOptions) -> Result<Self, AgentError> {
        let object = crate::sources::sched::ebpf::ebpf_object();
        if object.is_empty() {
            return Err(AgentError::Ebpf(
                "this build has no eBPF object (built with AYA_BUILD_SKIP)".into(),
            ));
        }
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .map_err(|e| AgentError::ebpf("loading the object", e))?;
        let mut profiler = Self::attach_in(&mut ebpf, options)?;
        profiler._owned = Some(ebpf);
        Ok(profiler)
    }

    /// Attaches `cpu_profile` of an already loaded agent object (the one whose
    /// marker uprobes fill THREAD_STATE) and takes its profile maps. The
    /// program stays attached as long as `ebpf` lives.
    pub fn attach_in(ebpf: &mut Ebpf, options: &ProfilerOptions) -> Result<Self, AgentError> {
        if options.frequency_hz == 0 {
            return Err(AgentError::Ebpf(
                "profile frequency_hz must be at least 1".into(),
            ));
        }
        let program: &mut PerfEvent = ebpf
            .program_mut("cpu_profile")
            .ok_or_else(|| AgentError::Ebpf("program cpu_profile missing".into()))?
            .try_into()
            .map_err(|e| AgentError::ebpf("cpu_profile", e))?;
        program
            .load()
            .map_err(|e| AgentError::ebpf("verifying cpu_profile", e))?;
        let program_id = program
            .info()
            .map_err(|e| AgentError::ebpf("reading cpu_profile's id", e))?
            .id();
        let cpus = options.cpus.clone().unwrap_or_else(online_cpus);
        for cpu in cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(options.frequency_hz),
                    false,
                )
                .map_err(|e| AgentError::ebpf(&format!("attaching cpu_profile to CPU {cpu}"), e))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| AgentError::Ebpf(format!("map {name} missing")))
        };
        let counts = PerCpuHashMap::try_from(take(ebpf, "PROFILE_COUNTS")?)
            .map_err(|e| AgentError::ebpf("PROFILE_COUNTS", e))?;
        let stacks = StackTraceMap::try_from(take(ebpf, "PROFILE_STACKS")?)
            .map_err(|e| AgentError::ebpf("PROFILE_STACKS", e))?;
        let losses = PerCpuArray::try_from(take(ebpf, "PROFILE_LOSSES")?)
            .map_err(|e| AgentError::ebpf("PROFILE_LOSSES", e))?;
        let symbolizer = Symbolizer::builder()
            .enable_code_info(false)
            .enable_inlined_fns(false)
            .build();
        let profiler = CpuProfiler {
            _owned: None,
            program_id,
            counts,
            stacks,
            losses,
            symbolizer,
            frequency_hz: options.frequency_hz,
            previous_losses: vec![0; PROFILE_LOSS_SLOTS as usize],
            previous_frames: HashMap::new(),
        };
        profiler.load_kernel_symbols();
        Ok(profiler)
    }

    /// Parses /proc/kallsyms now (blazesym keeps it), so the first window
    /// holding a kernel stack does not pay ~25 ms and a few MiB at random.
    fn load_kernel_symbols(&self) {
        use std::io::BufRead;
        let Some(first_ip) = std::fs::File::open("/proc/kallsyms")
            .ok()
            .and_then(|file| {
                std::io::BufReader::new(file)
                    .lines()
                    .map_while(Result::ok)
                    .find_map(|line| u64::from_str_radix(line.split(' ').next()?, 16).ok())
            })
            .filter(|ip| *ip != 0)
        else {
            return;
        };
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            ..Default::default()
        });
        let _ = self.names(&source, &[first_ip], "_[k]");
    }

    pub fn frequency_hz(&self) -> u64 {
        self.frequency_hz
    }

    /// Sampling period in nanoseconds (1 / frequency).
    pub fn period_ns(&self) -> f64 {
        1e9 / self.frequency_hz as f64
    }

    /// Run time and run count of `cpu_profile` (zero unless `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self) -> Option<ProgramStats> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|info| info.id() == self.program_id)?;
        Some(ProgramStats {
            name: "cpu_profile".to_string(),
            run_time_ns: info.run_time().as_nanos() as u64,
            run_count: info.run_count(),
        })
    }

    /// Reads and deletes the samples counted since the last drain and
    /// symbolises their stacks.
    pub fn drain(&mut self) -> Result<WindowProfile, AgentError> {
        let mut entries: Vec<(ProfileKey, u64)> = Vec::new();
        let keys: Vec<ProfileKey> = self
            .counts
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| AgentError::ebpf("listing PROFILE_COUNTS", e))?;
        for key in keys {
            let samples: u64 = match self.counts.get(&key, 0) {
                Ok(values) => values.iter().sum(),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(AgentError::ebpf("reading PROFILE_COUNTS", e)),
            };
            let _ = self.counts.remove(&key);
            if samples > 0 {
                entries.push((key, samples));
            }
        }

        // Raw frames of every stack id named, leaf first.
        let mut frames: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut lost_stacks = 0u64;
        for (key, _) in &entries {
            for id in [key.user_stack_id, key.kernel_stack_id] {
                if id < 0 || frames.contains_key(&(id as u32)) {
                    continue;
                }
                let id = id as u32;
                match self.stacks.get(&id, 0) {
                    Ok(trace) => {
                        frames.insert(id, trace.frames().iter().map(|f| f.ip).collect());
                    }
                    Err(_) => match self.previous_frames.get(&id) {
                        Some(ips) => {
                            frames.insert(id, ips.clone());
                        }
                        None => lost_stacks += 1,
                    },
                }
            }
        }
        for id in frames.keys() {
            let _ = self.stacks.remove(id);
        }

        let kernel_names = self.symbolize_kernel(&entries, &frames);
        let mut folded: BTreeMap<(u32, u32, String), u64> = BTreeMap::new();
        let mut comms = BTreeMap::new();
        let mut by_pid: BTreeMap<u32, Vec<(ProfileKey, u64)>> = BTreeMap::new();
        for (key, samples) in &entries {
            by_pid.entry(key.tgid).or_default().push((*key, *samples));
        }
        for (pid, keys) in by_pid {
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                comms.insert(pid, comm.trim_end().to_string());
            }
            let user_names = self.symbolize_user(pid, &keys, &frames);
            for (key, samples) in keys {
                let mut parts: Vec<&str> = Vec::new();
                if let Some(ips) = stack_frames(key.user_stack_id, &frames) {
                    parts.extend(ips.iter().rev().map(|ip| {
                        user_names
                            .get(ip)
                            .map(String::as_str)
                            .unwrap_or(UNKNOWN_FRAME)
                    }));
                }
                if let Some(ips) = stack_frames(key.kernel_stack_id, &frames) {
                    parts.extend(ips.iter().rev().map(|ip| {
                        kernel_names
                            .get(ip)
                            .map(String::as_str)
                            .unwrap_or("[unknown]_[k]")
                    }));
                }
                if parts.is_empty() {
                    parts.push(UNKNOWN_FRAME);
                }
                *folded
                    .entry((pid, key.scenario, parts.join(";")))
                    .or_insert(0) += samples;
            }
        }

        let mut stacks: Vec<FoldedStack> = folded
            .into_iter()
            .map(|((pid, scenario_slot, stack), samples)| FoldedStack {
                pid,
                scenario_slot,
                stack,
                samples,
            })
            .collect();
        stacks.sort_by(|a, b| {
            (a.pid, std::cmp::Reverse(a.samples), &a.stack).cmp(&(
                b.pid,
                std::cmp::Reverse(b.samples),
                &b.stack,
            ))
        });
        let samples = stacks.iter().map(|s| s.samples).sum();

        let losses_now = self.read_losses()?;
        let delta = |slot: u32| {
            losses_now[slot as usize].saturating_sub(self.previous_losses[slot as usize])
        };
        let lost_samples = delta(agent_common::PROFILE_LOSS_COUNTS_FULL);
        let kernel_lost_stacks = delta(agent_common::PROFILE_LOSS_USER_STACK)
            + delta(agent_common::PROFILE_LOSS_KERNEL_STACK);
        self.previous_losses = losses_now;
        self.previous_frames = frames;

        Ok(WindowProfile {
            frequency_hz: self.frequency_hz,
            stacks,
            samples,
            lost_samples,
            lost_stacks: lost_stacks + kernel_lost_stacks,
            comms,
        })
    }

    fn read_losses(&self) -> Result<Vec<u64>, AgentError> {
        (0..PROFILE_LOSS_SLOTS)
            .map(|slot| {
                self.losses
                    .get(&slot, 0)
                    .map(|values| values.iter().sum())
                    .map_err(|e| AgentError::ebpf("reading PROFILE_LOSSES", e))
            })
            .collect()
    }

    fn symbolize_kernel(
        &self,
        entries: &[(ProfileKey, u64)],
        frames: &HashMap<u32, Vec<u64>>,
    ) -> HashMap<u64, String> {
        let mut ips: Vec<u64> = entries
            .iter()
            .filter_map(|(key, _)| stack_frames(key.kernel_stack_id, frames))
            .flatten()
            .copied()
            .collect();
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return HashMap::new();
        }
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            ..Default::default()
        });
        self.names(&source, &ips, "_[k]")
    }

    fn symbolize_user(
        &self,
        pid: u32,
        keys: &[(ProfileKey, u64)],
        frames: &HashMap<u32, Vec<u64>>,
    ) -> HashMap<u64, String> {
        let mut ips: Vec<u64> = keys
            .iter()
            .filter_map(|(key, _)| stack_frames(key.user_stack_id, frames))
            .flatten()
            .copied()
            .collect();
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() || !Path::new(&format!("/proc/{pid}")).exists() {
            return HashMap::new();
        }
        let source = Source::Process(Process::new(Pid::from(pid)));
        self.names(&source, &ips, "")
    }

    fn names(&self, source: &Source, ips: &[u64], suffix: &str) -> HashMap<u64, String> {
        let Ok(symbols) = self.symbolizer.symbolize(source, Input::AbsAddr(ips)) else {
            return HashMap::new();
        };
        ips.iter()
            .zip(symbols)
            .filter_map(|(ip, symbol)| match symbol {
                // `;` separates frames in the folded format.
                Symbolized::Sym(sym) => {
                    Some((*ip, format!("{}{suffix}", sym.name.replace(';', ":"))))
                }
                Symbolized::Unknown(_) => None,
            })
            .collect()
    }
}

fn stack_frames(id: i32, frames: &HashMap<u32, Vec<u64>>) -> Option<&Vec<u64>> {
    if id < 0 {
        None
    } else {
        frames.get(&(id as u32))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Spins while `run` is set; otherwise says so in `paused` and sleeps, off
    /// the CPU, so the test can drain and read schedstat around an exact
    /// stretch of spinning (a drain symbolises, which takes a while).
    #[inline(never)]
    fn credit_spin(stop: &AtomicBool, run: &AtomicBool, paused: &AtomicBool) -> u64 {
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if !run.load(Ordering::Relaxed) {
                paused.store(true, Ordering::Release);
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            paused.store(false, Ordering::Release);
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        x
    }

    /// Samples of a thread that THREAD_STATE says serves `credit` (as the
    /// marker uprobe would record it) carry slot 1; the thread's spin
    /// function is in those stacks and in no slot-0 stack of this process.
    #[test]
    fn samples_carry_the_thread_scenario_of_the_shared_object() {
        if agent_common::privileged::skip_privileged(
            "samples_carry_the_thread_scenario_of_the_shared_object",
        ) {
            return;
        }
        let mut ebpf = EbpfLoader::new()
            .load(crate::sources::sched::ebpf::ebpf_object())
            .unwrap();
        let mut profiler = CpuProfiler::attach_in(
            &mut ebpf,
            &ProfilerOptions {
                frequency_hz: 99,
                cpus: None,
            },
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let run = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let spinner = {
            let (stop, run, paused) = (stop.clone(), run.clone(), paused.clone());
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
                credit_spin(&stop, &run, &paused)
            })
        };
        let wait_paused = || {
            while !paused.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        };
        let tid = tid_rx.recv().unwrap();
        {
            let mut states: aya::maps::HashMap<_, u32, agent_common::ThreadState> =
                aya::maps::HashMap::try_from(ebpf.map_mut("THREAD_STATE").unwrap()).unwrap();
            let state = agent_common::ThreadState {
                scenario: agent_common::SCENARIO_CREDIT,
                ..Default::default()
            };
            states.insert(tid, state, 0).unwrap();
        }
        wait_paused();
        profiler.drain().unwrap();
        let schedstat_ns = || -> u64 {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let cpu_before_ns = schedstat_ns();
        paused.store(false, Ordering::Release);
        run.store(true, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_secs(2));
        run.store(false, Ordering::Relaxed);
        wait_paused();
        let cpu_ns = schedstat_ns() - cpu_before_ns;
        let profile = profiler.drain().unwrap();
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();

        let pid = std::process::id();
        let credit: Vec<&FoldedStack> = profile
            .stacks
            .iter()
            .filter(|s| s.scenario_slot == agent_common::SCENARIO_CREDIT)
            .collect();
        let samples: u64 = credit.iter().map(|s| s.samples).sum();
        let expected = cpu_ns as f64 / 1e9 * 99.0;
        println!("slot 1: {samples} samples, expected {expected:.0} from {cpu_ns} ns of CPU");
        // Only the spinner's thread was put in `credit`, and all of its time was sampled there.
        assert!(credit.iter().all(|s| s.pid == pid), "{credit:?}");
        assert!(
            (samples as f64 - expected).abs() <= 0.25 * expected,
            "{samples} samples in slot 1 for {cpu_ns} ns of CPU at 99 Hz"
        );
        // Without frame pointers (std is built without them) the user stack may
        // stop short of credit_spin, but its leaf is always in the spinner's code.
        // For a few samples the kernel takes no stack at all (on the AMD EPYC VM
        // of this project, bpf_get_stackid answers -EFAULT for the user stack of
        // some user-mode samples): they stay counted, as `[unknown]`, and must
        // remain a small minority.
        let no_stack: u64 = credit
            .iter()
            .filter(|s| s.stack == UNKNOWN_FRAME)
            .map(|s| s.samples)
            .sum();
        assert!(
            no_stack as f64 <= 0.1 * samples as f64,
            "{no_stack} of {samples} samples without a stack: {credit:?}"
        );
        assert!(
            credit
                .iter()
                .filter(|s| s.stack != UNKNOWN_FRAME)
                .all(|s| s.stack.starts_with("start_thread;") || s.stack.contains("credit_spin")),
            "{credit:?}"
        );
    }
}
