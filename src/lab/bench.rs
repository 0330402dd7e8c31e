//! `pmemvm bench faults` and `pmemvm bench flush`: probe VMs per engine,
//! side by side, and the tables and JSON made from their samples.
//!
//! `bench faults` boots a fresh probe VM with a fresh backing file per
//! engine and repeat (engines interleaved within each repeat). Every op
//! gets its own window of pages, so each "first" access really is the
//! first since the file was made:
//! - read: first read, warm read;
//! - read-write: first read, first write of the same pages (mkwrite);
//! - write: first write, warm write;
//! - write-flush-write: first write, flush, write again (re-dirty), flush.
//!
//! The flushes of write-flush-write write back every page dirty in the VM
//! at that point, other ops' windows included. With the kernel engine a
//! write step of more pages than the KVM dirty ring holds fills the ring;
//! the harvest re-protects the logged pages, so "warm write" then faults
//! again: the footer of the table says how often that happened.
//!
//! `bench flush` runs one probe VM per engine with a warm-up round and
//! then `repeat` rounds of (dirty D pages, flush) per D, and the same
//! rounds on the host against a MAP_SHARED mapping of the same kind of
//! file with fdatasync, fsync and msync(MS_SYNC).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use devices::virtio::pmem::{EngineConfig, FaultEngineKind, FlushPolicy};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::backing::{BackingKind, ScratchDir};
use super::guest::{PageOrder, StepOp, StepSpec};

use super::checks::Check;
use super::vm::{ProbeRun, ProbeVm, ProbeVmConfig, StepResult};
use super::ProbeError;
use vmm::host::HostKind;

/// Which accesses `bench faults` makes, each in its own window of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOp {
    /// First read of each page, then a warm read.
    Read,
    /// First write of each page, then a warm write.
    Write,
    /// First read, then the first write of the same pages (mkwrite).
    ReadWrite,
    /// First write, flush, write the same pages again, flush.
    WriteFlushWrite,
}

impl FaultOp {
    pub const ALL: [FaultOp; 4] = [
        FaultOp::Read,
        FaultOp::ReadWrite,
        FaultOp::Write,
        FaultOp::WriteFlushWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::ReadWrite => "read-write",
            Self::WriteFlushWrite => "write-flush-write",
        }
    }

    /// The steps over one window, each with the event it measures.
    fn steps(self, window: StepSpec) -> Vec<(StepSpec, FaultEvent)> {
        let read = StepSpec {
            op: StepOp::Read,
            ..window
        };
        let write = StepSpec {
            op: StepOp::Write,
            ..window
        };
        let flush = StepSpec {
            op: StepOp::Flush,
            count: 1,
            first_page: 0,
            order: PageOrder::Stride { stride: 1 },
        };
        match self {
            Self::Read => vec![(read, FaultEvent::FirstRead), (read, FaultEvent::WarmRead)],
            Self::Write => vec![
                (write, FaultEvent::FirstWrite),
                (write, FaultEvent::WarmWrite),
            ],
            Self::ReadWrite => vec![(read, FaultEvent::FirstRead), (write, FaultEvent::Mkwrite)],
            Self::WriteFlushWrite => vec![
                (write, FaultEvent::FirstWrite),
                (flush, FaultEvent::Flush),
                (write, FaultEvent::RedirtyAfterFlush),
                (flush, FaultEvent::Flush),
            ],
        }
    }
}

impl FromStr for FaultOp {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "read-write" => Ok(Self::ReadWrite),
            "write-flush-write" => Ok(Self::WriteFlushWrite),
            _ => Err(ProbeError::Config(format!(
                "--op {s}: expected read, write, read-write or write-flush-write"
            ))),
        }
    }
}

/// What one probe VM runs: one of pmemvm's engines, or another VMM's flush
/// policy on the kernel engine's mapping (the fair peer: the same guest
/// mapping and the same dirtied pages, flushed as QEMU or crosvm would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeCase {
    Engine(FaultEngineKind),
    Peer(FlushPolicy),
}

impl ProbeCase {
    pub const ENGINES: [ProbeCase; 4] = [
        Self::Engine(FaultEngineKind::Kernel),
        Self::Engine(FaultEngineKind::Mirror),
        Self::Engine(FaultEngineKind::Uffd),
        Self::Engine(FaultEngineKind::Prefault),
    ];
    pub const PEERS: [ProbeCase; 2] = [
        Self::Peer(FlushPolicy::Fsync),
        Self::Peer(FlushPolicy::Msync),
    ];

    /// `--engine` and the JSON's `engine`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Engine(e) => e.name(),
            Self::Peer(FlushPolicy::Fsync) => "peer-fsync",
            Self::Peer(FlushPolicy::Msync) => "peer-msync",
            Self::Peer(FlushPolicy::DirtySet) => "kernel",
        }
    }

    /// The flush table's case.
    pub fn label(self) -> String {
        match self {
            Self::Engine(e) => format!("probe {}", e.name()),
            Self::Peer(FlushPolicy::Fsync) => "peer fsync (QEMU, CH)".into(),
            Self::Peer(FlushPolicy::Msync) => "peer msync (crosvm, FC)".into(),
            Self::Peer(FlushPolicy::DirtySet) => "probe kernel".into(),
        }
    }

    pub fn is_peer(self) -> bool {
        matches!(self, Self::Peer(_))
    }

    /// Whether its flush writes exactly the dirty set, and says how many
    /// pages that was.
    pub fn counts_written_pages(self) -> bool {
        !self.is_peer()
    }

    pub fn engine_config(self, uffd: UffdOptions) -> EngineConfig {
        match self {
            Self::Engine(kind) => {
                let mut config = EngineConfig::with_defaults(kind);
                if let EngineConfig::Uffd(options) = &mut config {
                    options.populate = uffd.populate.unwrap_or(options.populate);
                    options.poll_us = uffd.poll_us.unwrap_or(options.poll_us);
                }
                config
            }
            Self::Peer(policy) => EngineConfig::Kernel(policy),
        }
    }
}

impl FromStr for ProbeCase {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "peer-fsync" => Ok(Self::Peer(FlushPolicy::Fsync)),
            "peer-msync" => Ok(Self::Peer(FlushPolicy::Msync)),
            _ => s.parse::<FaultEngineKind>().map(Self::Engine).map_err(|_| {
                ProbeError::Config(format!(
                    "--engine {s}: expected kernel, mirror, uffd, prefault, peer-fsync or peer-msync"
                ))
            }),
        }
    }
}

/// The order in which a window's pages are touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePattern {
    Sequential,
    /// Every page once, in LCG order.
    Random,
    /// Every K-th page: the window spans `pages * K` pages.
    Stride(u64),
}

impl PagePattern {
    fn order(self, seed: u64) -> PageOrder {
        match self {
            Self::Sequential => PageOrder::Stride { stride: 1 },
            Self::Stride(k) => PageOrder::Stride { stride: k },
            Self::Random => PageOrder::Random { stride: 1, seed },
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Sequential => "seq".into(),
            Self::Random => "random".into(),
            Self::Stride(k) => format!("stride:{k}"),
        }
    }
}

impl FromStr for PagePattern {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seq" | "sequential" => Ok(Self::Sequential),
            "random" => Ok(Self::Random),
            _ => s
                .strip_prefix("stride:")
                .and_then(|k| k.parse::<u64>().ok())
                .filter(|&k| (1..=1 << 20).contains(&k))
                .map(Self::Stride)
                .ok_or_else(|| {
                    ProbeError::Config(format!(
                        "--pattern {s}: expected seq, random or stride:K with K from 1"
                    ))
                }),
        }
    }
}

/// What a fault-bench sample measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultEvent {
    FirstRead,
    FirstWrite,
    /// The first write to a page that was read before.
    Mkwrite,
    WarmRead,
    WarmWrite,
    /// Writing pages again after a flush wrote them back.
    RedirtyAfterFlush,
    /// The flush request itself (per request, not per page).
    Flush,
}

impl FaultEvent {
    pub const ALL: [FaultEvent; 7] = [
        Self::FirstRead,
        Self::FirstWrite,
        Self::Mkwrite,
        Self::WarmRead,
        Self::WarmWrite,
        Self::RedirtyAfterFlush,
        Self::Flush,
    ];

    /// The name in the JSON (serde's snake_case).
    pub fn key(self) -> &'static str {
        match self {
            Self::FirstRead => "first_read",
            Self::FirstWrite => "first_write",
            Self::Mkwrite => "mkwrite",
            Self::WarmRead => "warm_read",
            Self::WarmWrite => "warm_write",
            Self::RedirtyAfterFlush => "redirty_after_flush",
            Self::Flush => "flush",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.key() == key)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::FirstRead => "first read",
            Self::FirstWrite => "first write",
            Self::Mkwrite => "mkwrite (write after read)",
            Self::WarmRead => "warm read",
            Self::WarmWrite => "warm write",
            Self::RedirtyAfterFlush => "re-dirty after flush",
            Self::Flush => "flush request (all dirty)",
        }
    }
}

/// `pmemvm bench faults` options.
/// `--populate` and `--poll-us`: the uffd engine's settings, where given
/// (the others ignore them).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UffdOptions {
    pub populate: Option<u16>,
    pub poll_us: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct FaultBenchConfig {
    pub engines: Vec<ProbeCase>,
    pub ops: Vec<FaultOp>,
    pub pattern: PagePattern,
    /// Pages per op and run.
    pub pages: u64,
    pub uffd: UffdOptions,
    pub backing: BackingKind,
    /// Where backing files go; a default per backing kind otherwise.
    pub dir: Option<PathBuf>,
    pub repeat: u32,
    pub seed: u64,
    /// One line per engine and repeat on stderr.
    pub progress: bool,
}

impl Default for FaultBenchConfig {
    fn default() -> Self {
        Self {
            engines: ProbeCase::ENGINES.to_vec(),
            ops: FaultOp::ALL.to_vec(),
            pattern: PagePattern::Sequential,
            pages: 4096,
            uffd: UffdOptions::default(),
            backing: BackingKind::Ext4,
            dir: None,
            repeat: 3,
            seed: 1,
            progress: false,
        }
    }
}

/// Latency figures of one row.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: f64,
    pub max_ns: u64,
}

impl LatencySummary {
    // The histogram bounds are constants; they cannot fail at run time.
    #[allow(clippy::expect_used)]
    pub fn from_ns(ns: &[f64]) -> Self {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000_000, 3)
            .expect("constant histogram bounds are valid");
        for &v in ns {
            h.saturating_record((v.round() as u64).max(1));
        }
        let mean_ns = if ns.is_empty() {
            0.0
        } else {
            ns.iter().sum::<f64>() / ns.len() as f64
        };
        if ns.is_empty() {
            return Self {
                samples: 0,
                p50_ns: 0,
                p99_ns: 0,
                mean_ns,
                max_ns: 0,
            };
        }
        Self {
            samples: ns.len() as u64,
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            mean_ns,
            max_ns: h.max(),
        }
    }
}

/// How much a row's p50 moved between repeats (fresh VMs), shown when
/// there are at least [`Spread::MIN_REPEATS`].
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Spread {
    /// The median of the per-repeat p50s.
    pub median_p50_ns: u64,
    pub min_p50_ns: u64,
    pub max_p50_ns: u64,
    /// (max - min) / median, in percent.
    pub percent: f64,
}

impl Spread {
    pub const MIN_REPEATS: usize = 3;
    /// Rows that moved more than this are flagged.
    pub const FLAG_PERCENT: f64 = 10.0;

    pub fn of(p50s: &[u64]) -> Option<Self> {
        if p50s.len() < Self::MIN_REPEATS {
            return None;
        }
        let mut v = p50s.to_vec();
        v.sort_unstable();
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        };
        let (min, max) = (v[0], v[n - 1]);
        Some(Self {
            median_p50_ns: median,
            min_p50_ns: min,
            max_p50_ns: max,
            percent: if median == 0 {
                0.0
            } else {
                (max - min) as f64 * 100.0 / median as f64
            },
        })
    }

    pub fn flagged(&self) -> bool {
        self.percent > Self::FLAG_PERCENT
    }

    /// The table's column: "12.3%", with a "!" when flagged.
    pub fn cell(spread: Option<&Self>) -> String {
        spread.map_or_else(
            || "-".into(),
            |s| format!("{:.1}%{}", s.percent, if s.flagged() { "!" } else { "" }),
        )
    }
}

/// One row of the faults table.
#[derive(Debug, Clone, Serialize)]
pub struct FaultSummaryRow {
    pub engine: &'static str,
    pub event: FaultEvent,
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// 1e9 / mean: how many such accesses one vCPU does per second.
    pub per_second: f64,
    /// KVM statistic deltas divided by the samples (per page, or per
    /// request for flushes), less what a step boundary alone costs.
    pub kvm_per_sample: BTreeMap<String, f64>,
    /// Each repeat's p50.
    pub repeat_p50_ns: Vec<u64>,
    pub spread: Option<Spread>,
}

/// One step of one run, raw.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub event: Option<FaultEvent>,
    /// An empty step: its KVM statistics are the cost of a step boundary.
    pub calibration: bool,
    pub op: StepOp,
    pub count: u64,
    pub first_page: u64,
    pub order: PageOrder,
    pub ticks: Vec<u64>,
    pub wall_us: f64,
    pub kvm_vcpu: BTreeMap<String, i64>,
    pub kvm_vm: BTreeMap<String, i64>,
    /// The fault engine's counters after the step.
    pub engine_after: vmm::fault::FaultStats,
    pub device_after: devices::virtio::pmem::PmemStats,
}

/// One probe VM's run, raw.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub engine: &'static str,
    pub repeat: u32,
    pub region_pages: u64,
    pub tsc_khz: u32,
    pub setup_us: f64,
    pub efault_retries: u64,
    pub dirty_ring_full_exits: u64,
    pub steps: Vec<StepRecord>,
}

impl RunRecord {
    pub(super) fn new(
        case: ProbeCase,
        run: &ProbeRun,
        repeat: u32,
        region_pages: u64,
        events: &[Option<FaultEvent>],
    ) -> Self {
        Self {
            engine: case.name(),
            repeat,
            region_pages,
            tsc_khz: run.tsc_khz,
            setup_us: run.setup.as_secs_f64() * 1e6,
            efault_retries: run.efault_retries,
            dirty_ring_full_exits: run.dirty_ring_full_exits,
            steps: run
                .steps
                .iter()
                .zip(events)
                .map(|(s, &event)| StepRecord::new(s, event))
                .collect(),
        }
    }

    pub(super) fn ns(&self, step: &StepRecord) -> impl Iterator<Item = f64> + '_ {
        let khz = f64::from(self.tsc_khz);
        step.ticks
            .clone()
            .into_iter()
            .map(move |t| t as f64 * 1e6 / khz)
    }
}

impl StepRecord {
    fn new(s: &StepResult, event: Option<FaultEvent>) -> Self {
        Self {
            event,
            calibration: event.is_none() && s.spec.count == 0,
            op: s.spec.op,
            count: s.spec.count,
            first_page: s.spec.first_page,
            order: s.spec.order,
            ticks: s.ticks.clone(),
            wall_us: s.wall.as_secs_f64() * 1e6,
            kvm_vcpu: s.vcpu_stats.clone(),
            kvm_vm: s.vm_stats.clone(),
            engine_after: s.engine.clone(),
            device_after: s.device.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedEngine {
    pub engine: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultBenchConfigRecord {
    pub engines: Vec<&'static str>,
    pub ops: Vec<FaultOp>,
    pub pattern: String,
    pub pages: u64,
    #[serde(flatten)]
    pub uffd: UffdOptions,
    pub backing: BackingKind,
    pub repeat: u32,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    pub kind: &'static str,
    pub kernel: String,
}

impl HostRecord {
    pub(super) fn detect() -> Self {
        Self {
            kind: HostKind::detect().describe(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

/// Everything `bench faults` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FaultBenchReport {
    pub bench: &'static str,
    pub config: FaultBenchConfigRecord,
    pub host: HostRecord,
    pub summary: Vec<FaultSummaryRow>,
    pub checks: Vec<Check>,
    pub skipped_engines: Vec<SkippedEngine>,
    pub runs: Vec<RunRecord>,
}

/// KVM statistics shown in the table when KVM has them.
const VCPU_STATS_SHOWN: [&str; 7] = [
    vmm::kvm_stats::PAGE_FAULT_STAT,
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_spurious",
    "exits",
    "mmio_exits",
];
const VM_STATS_SHOWN: [&str; 3] = ["pages_4k", "pages_2m", "remote_tlb_flush"];

fn probe_timeout(samples: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(samples)
}

/// Builds a probe VM with a fresh backing file (unlinked once mapped);
/// `Ok(Err(reason))` when the engine is not available.
pub(super) fn build_probe(
    scratch: &mut ScratchDir,
    case: ProbeCase,
    uffd: UffdOptions,
    region_pages: u64,
    steps: &[StepSpec],
) -> Result<Result<ProbeVm, String>, ProbeError> {
    let region_pages = region_pages.max(1).div_ceil(512) * 512;
    let backing = scratch.create_file(region_pages * super::paging::PAGE)?;
    let samples = steps.iter().map(|s| s.count).sum();
    let config = ProbeVmConfig {
        engine: case.engine_config(uffd),
        backing: backing.clone(),
        region_pages,
        timeout: probe_timeout(samples),
    };
    let result = ProbeVm::new(&config, steps);
    let _ = std::fs::remove_file(&backing);
    match result {
        Ok(vm) => Ok(Ok(vm)),
        Err(ProbeError::EngineUnavailable(name)) => {
            Ok(Err(format!("engine {name} is not available in this build")))
        }
        Err(e) => Err(e),
    }
}

/// Runs one probe VM with a fresh backing file to its end.
fn run_probe(
    scratch: &mut ScratchDir,
    case: ProbeCase,
    uffd: UffdOptions,
    region_pages: u64,
    steps: &[StepSpec],
) -> Result<Result<ProbeRun, String>, ProbeError> {
    match build_probe(scratch, case, uffd, region_pages, steps)? {
        Ok(vm) => vm.run().map(Ok),
        Err(reason) => Ok(Err(reason)),
    }
}

/// Empty steps at the start of a fault-bench program.
const CALIBRATION_STEPS: usize = 2;

/// The fault-bench program: every op in its own window.
fn fault_program(config: &FaultBenchConfig) -> (Vec<StepSpec>, Vec<Option<FaultEvent>>, u64) {
    // Two empty steps first: the second one's KVM statistics are what a
    // step boundary alone costs, subtracted from every measured step.
    let empty = StepSpec {
        op: StepOp::Read,
        count: 0,
        first_page: 0,
        order: PageOrder::Stride { stride: 1 },
    };
    let mut steps = vec![empty; CALIBRATION_STEPS];
    let mut events = vec![None; CALIBRATION_STEPS];
    let mut next_page = 0;
    for (i, op) in config.ops.iter().enumerate() {
        let order = config.pattern.order(config.seed.wrapping_add(i as u64));
        let window = StepSpec {
            op: StepOp::Read,
            count: config.pages,
            first_page: next_page,
            order,
        };
        next_page += window.window_pages();
        for (step, event) in op.steps(window) {
            steps.push(step);
            events.push(Some(event));
        }
    }
    (steps, events, next_page)
}

/// `pmemvm bench faults`.
pub fn run_faults(config: &FaultBenchConfig) -> Result<FaultBenchReport, ProbeError> {
    if config.pages == 0 || config.repeat == 0 || config.engines.is_empty() || config.ops.is_empty()
    {
        return Err(ProbeError::Config(
            "--pages, --repeat, --engine and --op must not be empty or zero".into(),
        ));
    }
    let (steps, events, region_pages) = fault_program(config);
    let mut scratch = ScratchDir::new(config.backing, config.dir.as_deref())?;
    let mut engines = config.engines.clone();
    let mut skipped = Vec::new();
    let mut runs = Vec::new();
    for repeat in 0..config.repeat {
        let mut i = 0;
        while i < engines.len() {
            let engine = engines[i];
            let started = Instant::now();
            match run_probe(&mut scratch, engine, config.uffd, region_pages, &steps)? {
                Ok(run) => {
                    if config.progress {
                        eprintln!(
                            "bench faults: repeat {}/{} engine {:<8} {} steps, {} samples in {:.2} s",
                            repeat + 1,
                            config.repeat,
                            engine.name(),
                            run.steps.len(),
                            run.steps.iter().map(|s| s.ticks.len()).sum::<usize>(),
                            started.elapsed().as_secs_f64()
                        );
                    }
                    runs.push(RunRecord::new(engine, &run, repeat, region_pages, &events));
                    i += 1;
                }
                Err(reason) => {
                    if config.progress {
                        eprintln!("bench faults: skipping engine {}: {reason}", engine.name());
                    }
                    skipped.push(SkippedEngine {
                        engine: engine.name(),
                        reason,
                    });
                    engines.remove(i);
                }
            }
        }
    }
    let summary = summarize_faults(&engines, &runs);
    // tmpfs maps shared pages writable on a read, and with EPT/NPT KVM
    // then logs the read as a write.
    let reads_dirty =
        config.backing == BackingKind::Tmpfs && HostKind::detect() == HostKind::Hardware;
    let checks = super::checks::fault_checks(&summary, &runs, reads_dirty);
    Ok(FaultBenchReport {
        bench: "faults",
        config: FaultBenchConfigRecord {
            engines: config.engines.iter().map(|e| e.name()).collect(),
            ops: config.ops.clone(),
            pattern: config.pattern.name(),
            pages: config.pages,
            uffd: config.uffd,
            backing: config.backing,
            repeat: config.repeat,
            seed: config.seed,
        },
        host: HostRecord::detect(),
        summary,
        checks,
        skipped_engines: skipped,
        runs,
    })
}

fn summarize_faults(engines: &[ProbeCase], runs: &[RunRecord]) -> Vec<FaultSummaryRow> {
    let mut rows = Vec::new();
    for engine in engines {
        type Samples = (Vec<f64>, BTreeMap<String, i64>, BTreeMap<u32, Vec<f64>>);
        let mut by_event: BTreeMap<FaultEvent, Samples> = BTreeMap::new();
        for run in runs.iter().filter(|r| r.engine == engine.name()) {
            let boundary: BTreeMap<&String, i64> = run
                .steps
                .iter()
                .rfind(|s| s.calibration)
                .map(|s| {
                    s.kvm_vcpu
                        .iter()
                        .chain(&s.kvm_vm)
                        .map(|(k, &v)| (k, v))
                        .collect()
                })
                .unwrap_or_default();
            for step in &run.steps {
                let Some(event) = step.event else { continue };
                let (ns, kvm, per_repeat) = by_event.entry(event).or_default();
                ns.extend(run.ns(step));
                per_repeat
                    .entry(run.repeat)
                    .or_default()
                    .extend(run.ns(step));
                for (k, v) in step.kvm_vcpu.iter().chain(&step.kvm_vm) {
                    *kvm.entry(k.clone()).or_default() += v - boundary.get(k).copied().unwrap_or(0);
                }
            }
        }
        for (event, (ns, kvm, per_repeat)) in by_event {
            let latency = LatencySummary::from_ns(&ns);
            let repeat_p50_ns: Vec<u64> = per_repeat
                .values()
                .map(|ns| LatencySummary::from_ns(ns).p50_ns)
                .collect();
            let n = latency.samples.max(1) as f64;
            rows.push(FaultSummaryRow {
                engine: engine.name(),
                event,
                per_second: if latency.mean_ns > 0.0 {
                    1e9 / latency.mean_ns
                } else {
                    0.0
                },
                latency,
                kvm_per_sample: kvm.into_iter().map(|(k, v)| (k, v as f64 / n)).collect(),
                spread: Spread::of(&repeat_p50_ns),
                repeat_p50_ns,
            });
        }
    }
    rows
}

pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Json {
        path: path.display().to_string(),
        source,
    };
    let mut json = serde_json::to_vec_pretty(value).map_err(|e| err(std::io::Error::other(e)))?;
    json.push(b'\n');
    std::fs::write(path, json).map_err(err)
}

/// The lines of the printed tables, shared by the benches and by
/// `pmemvm report`, which rebuilds them from the JSON.
pub mod table {
    use super::{fmt_ns, fmt_rate, LatencySummary, Spread};

    pub fn fault_header() -> String {
        format!(
            "{:<10} {:<27} {:>8} {:>10} {:>10} {:>10} {:>9} {:>10} {:>7}",
            "engine", "event", "samples", "p50", "p99", "mean", "per s", "med p50", "spread"
        )
    }

    /// `spread`: of the per-repeat p50s, when there are enough repeats.
    pub fn fault_row(
        engine: &str,
        event: &str,
        l: &LatencySummary,
        per_second: f64,
        spread: Option<&Spread>,
    ) -> String {
        format!(
            "{:<10} {:<27} {:>8} {:>10} {:>10} {:>10} {:>9} {:>10} {:>7}",
            engine,
            event,
            l.samples,
            fmt_ns(l.p50_ns as f64),
            fmt_ns(l.p99_ns as f64),
            fmt_ns(l.mean_ns),
            fmt_rate(per_second),
            spread.map_or_else(|| "-".into(), |s| fmt_ns(s.median_p50_ns as f64)),
            Spread::cell(spread),
        )
    }

    pub fn skipped(engine: &str, reason: &str) -> String {
        format!("skipped engine {engine}: {reason}")
    }
}

pub(super) fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000_000.0 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 10_000.0 {
        format!("{:.1} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.1} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

impl FaultBenchReport {
    pub fn write_json(&self, path: &Path) -> Result<(), ProbeError> {
        write_json(path, self)
    }

    /// The latency table, then the KVM statistics per sample.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "bench faults: {} pages per op, pattern {}, backing {}, {} repeat(s); ops {}",
            c.pages,
            c.pattern,
            c.backing.name(),
            c.repeat,
            c.ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(",")
        );
        let _ = writeln!(out, "{}", table::fault_header());
        for r in &self.summary {
            let row = table::fault_row(
                r.engine,
                r.event.label(),
                &r.latency,
                r.per_second,
                r.spread.as_ref(),
            );
            let _ = writeln!(out, "{row}");
        }
        let shown: Vec<&str> = VCPU_STATS_SHOWN
            .iter()
            .chain(&VM_STATS_SHOWN)
            .copied()
            .filter(|k| {
                self.summary
                    .iter()
                    .any(|r| r.kvm_per_sample.contains_key(*k))
            })
            .collect();
        if !shown.is_empty() {
            let _ = writeln!(
                out,
                "\nKVM statistics per sample (page; request for flushes), step boundary subtracted:"
            );
            let _ = write!(out, "{:<10} {:<27}", "engine", "event");
            for k in &shown {
                let _ = write!(out, " {:>16}", k);
            }
            out.push('\n');
            for r in &self.summary {
                let _ = write!(out, "{:<10} {:<27}", r.engine, r.event.label());
                for k in &shown {
                    match r.kvm_per_sample.get(*k) {
                        Some(v) => {
                            let _ = write!(out, " {v:>16.2}");
                        }
                        None => {
                            let _ = write!(out, " {:>16}", "-");
                        }
                    }
                }
                out.push('\n');
            }
        }
        let mut ring_full: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for run in &self.runs {
            let e = ring_full.entry(run.engine).or_default();
            e.0 += run.dirty_ring_full_exits;
            e.1 += 1;
        }
        for (engine, (exits, runs)) in ring_full.into_iter().filter(|(_, (x, _))| *x > 0) {
            let _ = writeln!(
                out,
                "{engine}: {:.1} dirty-ring-full exits per run; each harvest re-protects the logged pages, so their next write faults again",
                exits as f64 / runs as f64
            );
        }
        for s in &self.skipped_engines {
            let _ = writeln!(out, "{}", table::skipped(s.engine, &s.reason));
        }
        out.push_str(&super::checks::table(&self.checks));
        out
    }

    /// The first failed check, if any.
    pub fn failure(&self) -> Option<String> {
        super::checks::first_failure(&self.checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        assert_eq!(
            "seq".parse::<PagePattern>().unwrap(),
            PagePattern::Sequential
        );
        assert_eq!(
            "random".parse::<PagePattern>().unwrap(),
            PagePattern::Random
        );
        assert_eq!(
            "stride:16".parse::<PagePattern>().unwrap(),
            PagePattern::Stride(16)
        );
        assert!("stride:0".parse::<PagePattern>().is_err());
        assert!("stride:x".parse::<PagePattern>().is_err());
        assert_eq!(
            "write-flush-write".parse::<FaultOp>().unwrap(),
            FaultOp::WriteFlushWrite
        );
        assert!("mkwrite".parse::<FaultOp>().is_err());
        assert_eq!(
            "uffd".parse::<ProbeCase>().unwrap(),
            ProbeCase::Engine(FaultEngineKind::Uffd)
        );
        assert!("qemu".parse::<ProbeCase>().is_err());
        assert_eq!(
            "peer-msync".parse::<ProbeCase>().unwrap(),
            ProbeCase::Peer(FlushPolicy::Msync)
        );
    }

    #[test]
    fn fault_program_gives_each_op_its_own_window() {
        let config = FaultBenchConfig {
            pages: 10,
            pattern: PagePattern::Stride(3),
            ..Default::default()
        };
        let (steps, events, region) = fault_program(&config);
        assert_eq!(region, 4 * 30);
        assert_eq!(steps.len(), events.len());
        assert_eq!(steps.len(), CALIBRATION_STEPS + 2 + 2 + 2 + 4);
        assert!(steps[..CALIBRATION_STEPS].iter().all(|s| s.count == 0));
        let (steps, events) = (&steps[CALIBRATION_STEPS..], &events[CALIBRATION_STEPS..]);
        let firsts: Vec<u64> = steps
            .iter()
            .filter(|s| s.op != StepOp::Flush)
            .map(|s| s.first_page)
            .collect();
        assert_eq!(firsts, vec![0, 0, 30, 30, 60, 60, 90, 90]);
        assert_eq!(events[3], Some(FaultEvent::Mkwrite));
        assert_eq!(events[8], Some(FaultEvent::RedirtyAfterFlush));
    }

    #[test]
    fn fault_event_keys_are_the_json_names() {
        for e in FaultEvent::ALL {
            assert_eq!(serde_json::to_value(e).unwrap(), e.key());
            assert_eq!(FaultEvent::from_key(e.key()), Some(e));
        }
        assert_eq!(FaultEvent::from_key("first-read"), None);
    }

    #[test]
    fn latency_summary_percentiles() {
        let ns: Vec<f64> = (1..=100).map(|v| v as f64 * 1000.0).collect();
        let s = LatencySummary::from_ns(&ns);
        assert_eq!(s.samples, 100);
        assert!((49_900..=50_100).contains(&s.p50_ns), "{s:?}");
        assert!((98_900..=99_100).contains(&s.p99_ns), "{s:?}");
        assert!((s.mean_ns - 50_500.0).abs() < 1e-6);
        assert_eq!(LatencySummary::from_ns(&[]).samples, 0);
    }
}
