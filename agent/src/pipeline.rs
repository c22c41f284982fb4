//! One window through every stage: CPU sample -> energy attribution ->
//! carbon -> scenarios -> [`WindowReport`].
use std::path::PathBuf;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::prefetch::{prefetch_description, prefetch_description_strings, PROCESSES_AHEAD};
use crate::sources::energy::{select_energy_source, EnergySource};
use crate::sources::ingest::IngestCounters;
use crate::sources::profile::{CpuProfiler, ProfilerOptions};
use crate::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use crate::sources::sched::proc_info::hostname;
use crate::sources::sched::procfs::ProcfsSampler;
use crate::sources::sched::{CpuSample, CpuSampler};
use crate::transforms::attribution::Attributor;
use crate::transforms::carbon::CarbonTransform;
use crate::transforms::profile_energy::weigh;
use crate::transforms::scenario::{ScenarioStage, TransactionCounts};
use crate::window::{new_agent_instance, ProcessRecord, ThreadRecord, WindowReport};

/// How the pipeline's CPU source is chosen.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Use procfs polling even where eBPF would load.
    pub force_procfs: bool,
    /// Libraries (libsci_marker.so, or binaries linking it) to follow with uprobes.
    pub marker_libraries: Vec<PathBuf>,
}

pub struct Pipeline {
    /// Declared before the sampler: dropped first, while its eBPF object lives.
    profiler: Option<CpuProfiler>,
    sampler: Box<dyn CpuSampler>,
    energy: Box<dyn EnergySource>,
    attributor: Attributor,
    carbon: CarbonTransform,
    scenarios: ScenarioStage,
    /// Transaction counts reported by services (the ingest endpoint), drained per window.
    ingest: Option<std::sync::Arc<IngestCounters>>,
    /// Energy warnings already logged (each distinct one is logged once).
    logged_warnings: std::collections::HashSet<String>,
    /// Energy warnings of the last window (for `sci_energy_warnings_total`).
    last_energy_warnings: usize,
    /// Windows in a row the energy source failed in (0 while it reads).
    energy_failing_windows: u64,
    /// Host role: publishes each VM's energy to its guest (`[vms]`).
    vm_publisher: Option<crate::sources::energy::hypervisor::VmPublisher>,
    /// The VMs' parts of the last window.
    last_vm_shares: Vec<crate::sources::energy::hypervisor::VmShare>,
    host: String,
    datacenter: Option<String>,
    /// What this host is (read once at start), with the static labels.
    supply: crate::window::ResourceSupply,
    /// The node's labels from the Kubernetes API server, refreshed.
    node_labels: Option<crate::sources::node_labels::NodeLabels>,
    agent_instance: String,
    next_seq: u64,
}

/// The CPU source, the profiler that shares its eBPF object (when enabled),
/// and why eBPF is not used (when it is not).
type OpenedSampler = (Box<dyn CpuSampler>, Option<CpuProfiler>, Option<String>);

/// Loads eBPF, or says once why it cannot and falls back to procfs polling.
pub fn open_sampler(
    config: &AgentConfig,
    options: &PipelineOptions,
) -> Result<OpenedSampler, AgentError> {
    if config
        .scenarios
        .rules
        .iter()
        .any(|rule| rule.reads_environment())
    {
        crate::sources::sched::proc_info::say_if_environs_unreadable();
    }
    if options.force_procfs {
        let sampler = ProcfsSampler::new("/proc")?;
        return Ok((
            Box::new(sampler),
            None,
            Some("procfs polling requested".into()),
        ));
    }
    let ebpf_options = EbpfOptions {
        track_threads: config.agent.per_thread,
        proc_root: None,
    };
    match EbpfSampler::load(&ebpf_options) {
        Ok(mut sampler) => {
            sampler.set_read_environ(
                config
                    .scenarios
                    .rules
                    .iter()
                    .any(|rule| rule.reads_environment()),
            )?;
            sampler.set_read_titles(config.scenarios.rules.iter().any(|r| r.reads_cmdline()))?;
            for library in &options.marker_libraries {
                sampler.attach_markers(library).map_err(|e| {
                    let text = e.to_string();
                    let no_sys_admin =
                        !crate::config::missing_capabilities(&[("CAP_SYS_ADMIN", 21)]).is_empty();
                    let hint = if no_sys_admin {
                        Some("permission: attaching the marker uprobes needs CAP_SYS_ADMIN on this kernel, which deploy/ does not grant (see README, Security)".to_string())
                    } else {
                        crate::config::permission_hint(&text)
                    };
                    match hint {
                        Some(hint) => AgentError::Ebpf(format!(
                            "markers in {}: {text}; {hint}",
                            library.display()
                        )),
                        None => e,
                    }
                })?;
            }
            let profiler = if config.profile.enabled {
                let profile_options = ProfilerOptions {
                    frequency_hz: config.profile.frequency_hz,
                    cpus: None,
                };
                match CpuProfiler::attach_in(sampler.ebpf_mut(), &profile_options) {
                    Ok(profiler) => Some(profiler),
                    Err(e) => {
                        tracing::warn!("CPU profile off: {e}");
                        None
                    }
                }
            } else {
                None
            };
            Ok((Box::new(sampler), profiler, None))
        }
        Err(e) => {
            let text = e.to_string();
            let hint = crate::config::permission_hint(&text)
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            let reason = format!(
                "eBPF unavailable ({text}{hint}); falling back to procfs polling: processes living less than one interval are missed (cpu_source=procfs)"
            );
            Ok((Box::new(ProcfsSampler::new("/proc")?), None, Some(reason)))
        }
    }
}

impl Pipeline {
    /// Returns the pipeline and, if eBPF could not be used, the reason (to log once).
    /// Bad `[energy]` or `[carbon]` settings are refused here, naming the key.
    pub fn open(
        config: &AgentConfig,
        options: &PipelineOptions,
    ) -> Result<(Self, Option<String>), AgentError> {
        config.energy.validate()?;
        let vm_publisher = crate::sources::energy::hypervisor::VmPublisher::new(&config.vms)?;
        let carbon = CarbonTransform::from_config(&config.carbon)?;
        let scenarios = ScenarioStage::new(&config.scenarios)?;
        let (sampler, profiler, fallback) = open_sampler(config, options)?;
        let cpus = crate::sources::sched::proc_info::online_cpus().len() as u32;
        let (energy, energy_warnings) = select_energy_source(&config.energy, cpus);
        crate::config::require_forced_energy_source(
            &config.energy,
            energy.name(),
            &energy_warnings,
        )?;
        for warning in energy_warnings {
            tracing::info!("energy source: {warning}");
        }
        tracing::info!("energy source: {}", energy.name());
        let supply = crate::sources::host::describe(
            std::path::Path::new("/proc"),
            cpus,
            &config.host,
            &config.carbon,
        )?;
        let node_labels = if config.host.kubernetes.enabled {
            Some(crate::sources::node_labels::NodeLabels::start(
                &config.host.kubernetes,
            )?)
        } else {
            None
        };
        Ok((
            Pipeline {
                sampler,
                profiler,
                energy,
                attributor: Attributor::new(&config.energy),
                carbon,
                scenarios,
                ingest: None,
                logged_warnings: Default::default(),
                last_energy_warnings: 0,
                energy_failing_windows: 0,
                vm_publisher,
                last_vm_shares: Vec::new(),
                host: config
                    .agent
                    .host
                    .clone()
                    .or_else(|| std::env::var("SCI_AGENT_HOST").ok())
                    .unwrap_or_else(hostname),
                datacenter: config.agent.datacenter.clone(),
                supply,
                node_labels,
                agent_instance: new_agent_instance(),
                next_seq: 0,
            },
            fallback,
        ))
    }

    /// Counts from services that report their transactions (the ingest
    /// endpoint) join each window's business figures.
    pub fn set_ingest(&mut self, counters: std::sync::Arc<IngestCounters>) {
        self.ingest = Some(counters);
    }

    /// Continue an earlier run's numbering (from the spool) instead of starting at 0.
    pub fn resume(&mut self, agent_instance: String, next_seq: u64) {
        self.agent_instance = agent_instance;
        self.next_seq = next_seq;
    }

    pub fn agent_instance(&self) -> &str {
        &self.agent_instance
    }

    /// Closes the current window and runs it through every stage. A stage
    /// that fails on this window's input (an unreadable energy counter, an
    /// intensity series that does not cover the window) is logged and the
    /// window keeps everything the other stages measured.
    pub fn next_window(&mut self) -> Result<WindowReport, AgentError> {
        let sample = self.sampler.sample()?;
        self.last_energy_warnings = 0;
        let mut report = self.cpu_report(&sample);
        report.seq = self.next_seq;
        self.next_seq += 1;
        let mut host_factors = None;
        match self.energy.window_energy(&sample) {
            Ok(energy) => {
                host_factors = energy.host_factors.clone();
                if self.energy_failing_windows > 0 {
                    tracing::info!(
                        "energy reads again after {} window(s) without energy",
                        self.energy_failing_windows
                    );
                    self.energy_failing_windows = 0;
                }
                self.last_energy_warnings = energy.warnings.len();
                for warning in &energy.warnings {
                    if self.logged_warnings.insert(warning.clone()) {
                        tracing::warn!("energy: {warning}");
                    }
                }
                self.attributor.attribute(&sample, &energy, &mut report);
                report.energy_faults = energy.faults.clone();
                report.energy_sample_interval_ns = energy.sample_interval_ns;
                if report.estimated {
                    report.energy_model = self
                        .energy
                        .model_description()
                        .unwrap_or_else(|| report.energy_source.clone());
                }
            }
            Err(e) => {
                // Reported once per outage, counted every window.
                if self.energy_failing_windows == 0 {
                    tracing::warn!(
                        "energy of window {} and of the windows after it until it reads again: {e}",
                        report.seq
                    );
                }
                self.energy_failing_windows += 1;
                let name = self.energy.name().to_string();
                for fault in ["failed", crate::sources::energy::fault_name(&e)] {
                    *report
                        .energy_faults
                        .entry(format!("{name}/{fault}"))
                        .or_default() += 1;
                }
            }
        }
        if let Err(e) = self
            .carbon
            .apply_with_host(&mut report, host_factors.as_ref())
        {
            tracing::warn!("carbon of window {}: {e}", report.seq);
        }
        if let Some(publisher) = self.vm_publisher.as_mut() {
            for (fault, n) in publisher.take_faults() {
                *report.energy_faults.entry(fault).or_default() += n;
            }
            match publisher.publish(&report) {
                Ok(shares) => self.last_vm_shares = shares,
                Err(e) => {
                    self.last_vm_shares.clear();
                    tracing::warn!("VM energy of window {} not published: {e}", report.seq);
                    *report
                        .energy_faults
                        .entry("vms/unpublished".to_string())
                        .or_default() += 1;
                }
            }
        }
        let reported = match &self.ingest {
            Some(counters) => {
                let window = counters.take_window();
                report.ingest_refused = window
                    .refused
                    .iter()
                    .map(|(reason, n)| (reason.as_str().to_string(), *n))
                    .collect();
                window.transactions
            }
            None => TransactionCounts::default(),
        };
        self.scenarios.apply(&sample, &mut report, &reported)?;
        report.request_cpu = crate::transforms::request_cpu::histograms(&sample, &report);
        if let Some(profiler) = self.profiler.as_mut() {
            match profiler.drain() {
                Ok(profile) => {
                    report.lost.profile_samples_lost += profile.lost_samples;
                    report.lost.profile_stacks_lost += profile.lost_stacks;
                    report.profile = weigh(&profile, &report);
                }
                Err(e) => tracing::warn!("CPU profile of window {}: {e}", report.seq),
            }
        }
        self.sampler.recycle(sample);
        Ok(report)
    }

    /// How many warnings (domains left out, unreadable counters) the energy
    /// source gave for the last window; each distinct one is logged once.
    pub fn last_energy_warnings(&self) -> usize {
        self.last_energy_warnings
    }

    /// The VMs' parts of the last window (host role, `[vms]`).
    pub fn last_vm_shares(&self) -> &[crate::sources::energy::hypervisor::VmShare] {
        &self.last_vm_shares
    }

    /// What the node labels poller has read (`[host.kubernetes]`).
    pub fn node_labels_status(&self) -> Option<crate::sources::node_labels::NodeLabelsStatus> {
        self.node_labels.as_ref().map(|n| n.status())
    }

    /// Name of the energy source in use.
    pub fn energy_source(&self) -> &str {
        self.energy.name()
    }

    fn cpu_report(&self, sample: &CpuSample) -> WindowReport {
        let mut report = WindowReport::new(
            self.host.clone(),
            self.agent_instance.clone(),
            sample.start_unix_ns,
            sample.end_unix_ns,
            sample.source,
            sample.cpus,
        );
        report.datacenter = self.datacenter.clone();
        report.supply = self.supply.clone();
        if let Some(node) = &self.node_labels {
            report.supply.labels = node.merged(&self.supply.labels);
        }
        report.idle_cpu_ns = sample.idle_cpu_ns();
        report.busy_cpu_ns = sample.busy_cpu_ns();
        report.unattributed_cpu_ns = sample.unowned_busy_ns_per_cpu.iter().sum();
        report.steal_cpu_ns = self.sampler.steal_cpu_ns();
        report.lost = sample.lost.clone();
        let processes = &sample.processes;
        report.processes = processes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ahead = |n: usize| processes.get(i + n).map(|q| &q.info);
                if let Some(info) = ahead(PROCESSES_AHEAD) {
                    prefetch_description(info);
                }
                if let Some(info) = ahead(PROCESSES_AHEAD / 2) {
                    prefetch_description_strings(info);
                }
                p
            })
            .map(|p| ProcessRecord {
                pid: p.pid,
                ppid: p.info.ppid,
                comm: p.info.comm.clone(),
                exe: p.info.exe.clone(),
                cmdline: p.info.cmdline.clone(),
                cgroup: p.info.cgroup.clone(),
                container_id: p.info.container_id.clone(),
                cpu_ns: p.cpu_ns,
                exited: p.exited,
                threads: p
                    .threads
                    .iter()
                    .map(|(tid, cpu_ns)| ThreadRecord {
                        tid: *tid,
                        cpu_ns: *cpu_ns,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        report
    }
}
