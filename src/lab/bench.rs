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

use devices::virtio::pmem::{EngineConfig, FaultEngineKind};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::backing::{BackingKind, ScratchDir};
use super::guest::{PageOrder, StepOp, StepSpec};
use super::host_flush::{HostFlushFile, HostSyncMethod};
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
    pub engines: Vec<FaultEngineKind>,
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
            engines: vec![
                FaultEngineKind::Kernel,
                FaultEngineKind::Uffd,
                FaultEngineKind::Prefault,
            ],
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
    fn from_ns(ns: &[f64]) -> Self {
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
    pub tsc_khz: u32,
    pub setup_us: f64,
    pub efault_retries: u64,
    pub dirty_ring_full_exits: u64,
    pub steps: Vec<StepRecord>,
}

impl RunRecord {
    fn new(run: &ProbeRun, repeat: u32, events: &[Option<FaultEvent>]) -> Self {
        Self {
            engine: run.engine.name(),
            repeat,
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

    fn ns(&self, step: &StepRecord) -> impl Iterator<Item = f64> + '_ {
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
    fn detect() -> Self {
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
fn build_probe(
    scratch: &mut ScratchDir,
    engine: FaultEngineKind,
    uffd: UffdOptions,
    region_pages: u64,
    steps: &[StepSpec],
) -> Result<Result<ProbeVm, String>, ProbeError> {
    let region_pages = region_pages.max(1).div_ceil(512) * 512;
    let backing = scratch.create_file(region_pages * super::paging::PAGE)?;
    let samples = steps.iter().map(|s| s.count).sum();
    let mut engine_config = EngineConfig::with_defaults(engine);
    if let EngineConfig::Uffd(options) = &mut engine_config {
        options.populate = uffd.populate.unwrap_or(options.populate);
        options.poll_us = uffd.poll_us.unwrap_or(options.poll_us);
    }
    let config = ProbeVmConfig {
        engine: engine_config,
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
    engine: FaultEngineKind,
    uffd: UffdOptions,
    region_pages: u64,
    steps: &[StepSpec],
) -> Result<Result<ProbeRun, String>, ProbeError> {
    match build_probe(scratch, engine, uffd, region_pages, steps)? {
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
                    runs.push(RunRecord::new(&run, repeat, &events));
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
        skipped_engines: skipped,
        runs,
    })
}

fn summarize_faults(engines: &[FaultEngineKind], runs: &[RunRecord]) -> Vec<FaultSummaryRow> {
    let mut rows = Vec::new();
    for engine in engines {
        let mut by_event: BTreeMap<FaultEvent, (Vec<f64>, BTreeMap<String, i64>)> = BTreeMap::new();
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
                let (ns, kvm) = by_event.entry(event).or_default();
                ns.extend(run.ns(step));
                for (k, v) in step.kvm_vcpu.iter().chain(&step.kvm_vm) {
                    *kvm.entry(k.clone()).or_default() += v - boundary.get(k).copied().unwrap_or(0);
                }
            }
        }
        for (event, (ns, kvm)) in by_event {
            let latency = LatencySummary::from_ns(&ns);
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
            });
        }
    }
    rows
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ProbeError> {
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
    use super::{fmt_ns, fmt_rate, LatencySummary};

    pub fn fault_header() -> String {
        format!(
            "{:<9} {:<27} {:>8} {:>10} {:>10} {:>10} {:>9}",
            "engine", "event", "samples", "p50", "p99", "mean", "per s"
        )
    }

    pub fn fault_row(engine: &str, event: &str, l: &LatencySummary, per_second: f64) -> String {
        format!(
            "{:<9} {:<27} {:>8} {:>10} {:>10} {:>10} {:>9}",
            engine,
            event,
            l.samples,
            fmt_ns(l.p50_ns as f64),
            fmt_ns(l.p99_ns as f64),
            fmt_ns(l.mean_ns),
            fmt_rate(per_second)
        )
    }

    /// The flush table: header and one line per row.
    pub fn flush_rows<'a>(
        rows: impl IntoIterator<Item = (u64, &'a str, &'a LatencySummary, Option<f64>, Option<u64>)>,
    ) -> String {
        let mut out = flush_header();
        for (dirty, case, l, vs, wb) in rows {
            out.push('\n');
            out.push_str(&flush_row(dirty, case, l, vs, wb));
        }
        out
    }

    fn flush_header() -> String {
        format!(
            "{:>6} {:<26} {:>10} {:>10} {:>10} {:>11} {:>9}",
            "dirty", "case", "p50 us", "p99 us", "mean us", "x fdatasync", "wb pages"
        )
    }

    fn flush_row(
        dirty: u64,
        case: &str,
        l: &LatencySummary,
        vs_fdatasync: Option<f64>,
        writeback_pages: Option<u64>,
    ) -> String {
        format!(
            "{:>6} {:<26} {:>10.1} {:>10.1} {:>10.1} {:>11} {:>9}",
            dirty,
            case,
            l.p50_ns as f64 / 1e3,
            l.p99_ns as f64 / 1e3,
            l.mean_ns / 1e3,
            vs_fdatasync.map_or_else(|| "-".to_string(), |x| format!("{x:.2}")),
            writeback_pages.map_or_else(|| "-".to_string(), |p| p.to_string()),
        )
    }

    pub fn skipped(engine: &str, reason: &str) -> String {
        format!("skipped engine {engine}: {reason}")
    }
}

fn fmt_ns(ns: f64) -> String {
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
            let row = table::fault_row(r.engine, r.event.label(), &r.latency, r.per_second);
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
            let _ = write!(out, "{:<9} {:<27}", "engine", "event");
            for k in &shown {
                let _ = write!(out, " {:>16}", k);
            }
            out.push('\n');
            for r in &self.summary {
                let _ = write!(out, "{:<9} {:<27}", r.engine, r.event.label());
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
        out
    }
}

/// Where `bench flush` puts the dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushLayout {
    /// One run of pages from the start of the region.
    Contiguous,
    /// Spread evenly over the region, at least one page apart.
    Scattered,
}

impl FromStr for FlushLayout {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "contiguous" => Ok(Self::Contiguous),
            "scattered" => Ok(Self::Scattered),
            _ => Err(ProbeError::Config(format!(
                "--layout {s}: expected contiguous or scattered"
            ))),
        }
    }
}

impl FlushLayout {
    pub fn name(self) -> &'static str {
        match self {
            Self::Contiguous => "contiguous",
            Self::Scattered => "scattered",
        }
    }

    /// The fewest region pages [`Self::write_step`] can place `max_dirty`
    /// pages in (scattered pages are at least 2 apart).
    pub fn min_region_pages(self, max_dirty: u64) -> u64 {
        match self {
            Self::Contiguous => max_dirty,
            Self::Scattered => 2 * max_dirty,
        }
    }

    /// Region pages for dirty counts up to `max_dirty`.
    pub fn region_pages(self, max_dirty: u64) -> u64 {
        self.min_region_pages(max_dirty).max(4096).div_ceil(512) * 512
    }

    /// The pages `dirty` writes touch, as a probe step.
    pub fn write_step(self, dirty: u64, region_pages: u64) -> StepSpec {
        let stride = match self {
            Self::Contiguous => 1,
            Self::Scattered => (region_pages / dirty.max(1)).max(2),
        };
        StepSpec {
            op: StepOp::Write,
            count: dirty,
            first_page: 0,
            order: PageOrder::Stride { stride },
        }
    }
}

/// `pmemvm bench flush` options.
#[derive(Debug, Clone)]
pub struct FlushBenchConfig {
    pub engines: Vec<FaultEngineKind>,
    pub dirty: Vec<u64>,
    pub layout: FlushLayout,
    /// The pmem region in bytes (a multiple of 2 MiB); by default the
    /// least the dirty counts and layout need, at least 16 MiB.
    pub region: Option<u64>,
    pub uffd: UffdOptions,
    pub backing: BackingKind,
    pub dir: Option<PathBuf>,
    pub repeat: u32,
    pub progress: bool,
}

impl FlushBenchConfig {
    /// The region in pages: `--region` checked against the dirty counts
    /// and layout, or the default made from them.
    fn region_pages(&self) -> Result<u64, ProbeError> {
        let max_dirty = self.dirty.iter().copied().max().unwrap_or(0);
        let Some(bytes) = self.region else {
            return Ok(self.layout.region_pages(max_dirty));
        };
        const HUGE: u64 = 2 << 20;
        if bytes == 0 || !bytes.is_multiple_of(HUGE) {
            return Err(ProbeError::Config(format!(
                "--region {bytes} bytes: must be a non-zero multiple of 2 MiB"
            )));
        }
        let pages = bytes / super::paging::PAGE;
        let need = self.layout.min_region_pages(max_dirty);
        if pages < need {
            return Err(ProbeError::Config(format!(
                "--region {} MiB ({pages} pages) is too small for --dirty {max_dirty} \
                 with layout {}: it needs at least {need} pages",
                bytes >> 20,
                self.layout.name()
            )));
        }
        Ok(pages)
    }
}

/// Checks that the probe VM's page tables can map `region_pages` next to
/// the RAM that `samples` results need.
fn check_region_fits(region_pages: u64, samples: u64) -> Result<(), ProbeError> {
    let ram = super::vm::ram_for_samples(samples).max(super::paging::MIN_RAM);
    let max = super::vm::max_region_pages(ram);
    if region_pages > max {
        return Err(ProbeError::Config(format!(
            "a {} MiB region does not fit in the probe VM: its page tables \
             (3 MiB, 4 KiB pages) map at most {} MiB of pmem next to {} MiB of RAM",
            (region_pages * super::paging::PAGE) >> 20,
            (max * super::paging::PAGE) >> 20,
            ram >> 20
        )));
    }
    Ok(())
}

impl Default for FlushBenchConfig {
    fn default() -> Self {
        Self {
            engines: vec![
                FaultEngineKind::Kernel,
                FaultEngineKind::Uffd,
                FaultEngineKind::Prefault,
            ],
            dirty: vec![0, 1, 64, 4096],
            layout: FlushLayout::Contiguous,
            region: None,
            uffd: UffdOptions::default(),
            backing: BackingKind::Ext4,
            dir: None,
            repeat: 10,
            progress: false,
        }
    }
}

/// One row of the flush table.
#[derive(Debug, Clone, Serialize)]
pub struct FlushSummaryRow {
    /// `probe <engine>` or `host <method>`.
    pub case: String,
    pub dirty: u64,
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// p50 / p50 of host fdatasync at the same dirty count.
    pub p50_vs_fdatasync: Option<f64>,
    /// Pages the device's writeback wrote, per flush (probe rows; median).
    pub writeback_pages: Option<u64>,
}

/// One host-side sync, raw.
#[derive(Debug, Clone, Serialize)]
pub struct HostSyncRecord {
    pub method: HostSyncMethod,
    pub dirty: u64,
    pub round: u32,
    pub warmup: bool,
    pub ns: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlushBenchConfigRecord {
    pub engines: Vec<&'static str>,
    pub dirty: Vec<u64>,
    pub layout: FlushLayout,
    pub region_pages: u64,
    #[serde(flatten)]
    pub uffd: UffdOptions,
    pub backing: BackingKind,
    pub repeat: u32,
}

/// Everything `bench flush` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FlushBenchReport {
    pub bench: &'static str,
    pub config: FlushBenchConfigRecord,
    pub host: HostRecord,
    pub summary: Vec<FlushSummaryRow>,
    pub skipped_engines: Vec<SkippedEngine>,
    /// One probe VM per engine; the first round of steps is a warm-up.
    pub probe_runs: Vec<RunRecord>,
    pub host_syncs: Vec<HostSyncRecord>,
}

/// The flush-bench program: a warm-up round, then `repeat` rounds of
/// (dirty D pages, flush) for every D. Returns the steps and, per step,
/// `(round, dirty)` for flushes.
fn flush_program(
    config: &FlushBenchConfig,
    region_pages: u64,
) -> (Vec<StepSpec>, Vec<Option<(u32, u64)>>) {
    let mut steps = Vec::new();
    let mut tags = Vec::new();
    for round in 0..=config.repeat {
        for &dirty in &config.dirty {
            if dirty > 0 {
                steps.push(config.layout.write_step(dirty, region_pages));
                tags.push(None);
            }
            steps.push(StepSpec {
                op: StepOp::Flush,
                count: 1,
                first_page: 0,
                order: PageOrder::Stride { stride: 1 },
            });
            tags.push(Some((round, dirty)));
        }
    }
    (steps, tags)
}

/// `pmemvm bench flush`.
pub fn run_flush(config: &FlushBenchConfig) -> Result<FlushBenchReport, ProbeError> {
    if config.repeat == 0 || config.dirty.is_empty() || config.engines.is_empty() {
        return Err(ProbeError::Config(
            "--repeat, --dirty and --engine must not be empty or zero".into(),
        ));
    }
    let region_pages = config.region_pages()?;
    let (steps, tags) = flush_program(config, region_pages);
    check_region_fits(region_pages, steps.iter().map(|s| s.count).sum())?;
    let steps_per_round = steps.len() / (config.repeat as usize + 1);
    let mut scratch = ScratchDir::new(config.backing, config.dir.as_deref())?;
    let mut skipped = Vec::new();
    let mut vms = Vec::new();
    for &engine in &config.engines {
        match build_probe(&mut scratch, engine, config.uffd, region_pages, &steps)? {
            Ok(vm) => vms.push((vm, engine)),
            Err(reason) => {
                if config.progress {
                    eprintln!("bench flush: skipping engine {}: {reason}", engine.name());
                }
                skipped.push(SkippedEngine {
                    engine: engine.name(),
                    reason,
                });
            }
        }
    }
    let host_path = scratch.create_file(region_pages * super::paging::PAGE)?;
    let mut host_file = HostFlushFile::open(&host_path, region_pages)?;
    let _ = std::fs::remove_file(&host_path);

    // Round by round, every engine's VM and then the host take turns, so
    // that a slow spell of the host's disk hits all cases alike.
    let started = Instant::now();
    let mut host_syncs = Vec::new();
    for round in 0..=config.repeat {
        for (vm, _) in &mut vms {
            vm.run_steps(steps_per_round)?;
        }
        for &dirty in &config.dirty {
            let pages = if dirty == 0 {
                Vec::new()
            } else {
                config.layout.write_step(dirty, region_pages).pages()
            };
            for method in HostSyncMethod::ALL {
                let took = host_file.timed_sync(&pages, method)?;
                host_syncs.push(HostSyncRecord {
                    method,
                    dirty,
                    round,
                    warmup: round == 0,
                    ns: u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                });
            }
        }
        if config.progress {
            eprintln!(
                "bench flush: round {}/{}{}: {} engine(s) and the host baselines, {:.2} s",
                round + 1,
                config.repeat + 1,
                if round == 0 { " (warm-up)" } else { "" },
                vms.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(host_file);
    let events = vec![None; steps.len()];
    let mut runs = Vec::new();
    for (vm, engine) in vms {
        runs.push((RunRecord::new(&vm.run()?, 0, &events), engine));
    }

    let summary = summarize_flush(config, &runs, &tags, &host_syncs);
    Ok(FlushBenchReport {
        bench: "flush",
        config: FlushBenchConfigRecord {
            engines: config.engines.iter().map(|e| e.name()).collect(),
            dirty: config.dirty.clone(),
            layout: config.layout,
            region_pages,
            uffd: config.uffd,
            backing: config.backing,
            repeat: config.repeat,
        },
        host: HostRecord::detect(),
        summary,
        skipped_engines: skipped,
        probe_runs: runs.into_iter().map(|(r, _)| r).collect(),
        host_syncs,
    })
}

fn summarize_flush(
    config: &FlushBenchConfig,
    runs: &[(RunRecord, FaultEngineKind)],
    tags: &[Option<(u32, u64)>],
    host: &[HostSyncRecord],
) -> Vec<FlushSummaryRow> {
    let mut rows = Vec::new();
    for &dirty in &config.dirty {
        let host_ns = |method: HostSyncMethod| -> Vec<f64> {
            host.iter()
                .filter(|h| h.method == method && h.dirty == dirty && !h.warmup)
                .map(|h| h.ns as f64)
                .collect()
        };
        let baseline = LatencySummary::from_ns(&host_ns(HostSyncMethod::Fdatasync)).p50_ns;
        let ratio = |l: &LatencySummary| (baseline > 0).then(|| l.p50_ns as f64 / baseline as f64);
        for (run, engine) in runs {
            let mut ns = Vec::new();
            let mut written = Vec::new();
            for (step, tag) in run.steps.iter().zip(tags) {
                if let Some((round, d)) = tag {
                    if *d == dirty && *round > 0 {
                        ns.extend(run.ns(step));
                        written.push(step.engine_after.flush.last_pages);
                    }
                }
            }
            written.sort_unstable();
            let latency = LatencySummary::from_ns(&ns);
            rows.push(FlushSummaryRow {
                case: format!("probe {}", engine.name()),
                dirty,
                p50_vs_fdatasync: ratio(&latency),
                writeback_pages: written.get(written.len() / 2).copied(),
                latency,
            });
        }
        for method in HostSyncMethod::ALL {
            let latency = LatencySummary::from_ns(&host_ns(method));
            rows.push(FlushSummaryRow {
                case: format!("host {}", method.label()),
                dirty,
                p50_vs_fdatasync: ratio(&latency),
                writeback_pages: None,
                latency,
            });
        }
    }
    rows
}

impl FlushBenchReport {
    pub fn write_json(&self, path: &Path) -> Result<(), ProbeError> {
        write_json(path, self)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "bench flush: layout {}, region {} pages ({} MiB), backing {}, {} measured round(s) after a warm-up",
            c.layout.name(),
            c.region_pages,
            (c.region_pages * super::paging::PAGE) >> 20,
            c.backing.name(),
            c.repeat
        );
        let rows = self.summary.iter().map(|r| {
            let (vs, wb) = (r.p50_vs_fdatasync, r.writeback_pages);
            (r.dirty, r.case.as_str(), &r.latency, vs, wb)
        });
        let _ = writeln!(out, "{}", table::flush_rows(rows));
        for s in &self.skipped_engines {
            let _ = writeln!(out, "{}", table::skipped(s.engine, &s.reason));
        }
        out
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
            "scattered".parse::<FlushLayout>().unwrap(),
            FlushLayout::Scattered
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
    fn scattered_layout_spreads_pages() {
        let region = FlushLayout::Scattered.region_pages(4096);
        assert_eq!(region, 8192);
        let pages = FlushLayout::Scattered.write_step(64, region).pages();
        assert_eq!(pages.len(), 64);
        assert_eq!(pages[1] - pages[0], 128);
        assert!(pages.iter().all(|&p| p < region));
        let all = FlushLayout::Scattered.write_step(4096, region).pages();
        assert_eq!(all[1] - all[0], 2);
        let c = FlushLayout::Contiguous.write_step(64, 4096).pages();
        assert_eq!(c, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn flush_region_option_is_checked() {
        let gib = |n: u64| n << 30;
        let config = |dirty: Vec<u64>, layout, region| FlushBenchConfig {
            dirty,
            layout,
            region,
            ..Default::default()
        };
        // The default is unchanged: made from the dirty counts.
        let c = config(vec![0, 1, 64, 4096], FlushLayout::Contiguous, None);
        assert_eq!(c.region_pages().unwrap(), 4096);
        let c = config(vec![8192], FlushLayout::Scattered, None);
        assert_eq!(c.region_pages().unwrap(), 16384);
        // 1 dirty page in 1 GiB.
        let c = config(vec![1], FlushLayout::Contiguous, Some(gib(1)));
        assert_eq!(c.region_pages().unwrap(), 262_144);
        let c = config(vec![512], FlushLayout::Scattered, Some(4 << 20));
        assert_eq!(c.region_pages().unwrap(), 1024);
        // Not a multiple of 2 MiB, zero, too small for the dirty pages.
        for (dirty, layout, region) in [
            (1, FlushLayout::Contiguous, (2 << 20) + 4096),
            (1, FlushLayout::Contiguous, 1 << 20),
            (1, FlushLayout::Contiguous, 0),
            (513, FlushLayout::Contiguous, 2 << 20),
            (513, FlushLayout::Scattered, 4 << 20),
        ] {
            let err = config(vec![0, dirty], layout, Some(region))
                .region_pages()
                .unwrap_err();
            assert!(matches!(err, ProbeError::Config(_)), "{err}");
        }
        // The probe's page tables: 1 GiB fits, 2 GiB does not.
        let program = |c: &FlushBenchConfig| {
            let pages = c.region_pages().unwrap();
            let (steps, _) = flush_program(c, pages);
            (pages, steps.iter().map(|s| s.count).sum::<u64>())
        };
        let (pages, samples) = program(&config(vec![1], FlushLayout::Contiguous, Some(gib(1))));
        check_region_fits(pages, samples).unwrap();
        let (pages, samples) = program(&config(vec![1], FlushLayout::Contiguous, Some(gib(2))));
        let err = check_region_fits(pages, samples).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let (pages, samples) = program(&FlushBenchConfig::default());
        check_region_fits(pages, samples).unwrap();
    }

    #[test]
    fn probe_page_tables_are_counted() {
        use super::super::paging::MIN_RAM;
        use super::super::vm::{max_region_pages, table_pages_needed, TABLE_PAGES_MAX};
        // 32 MiB RAM: PML4, one PDPT (all below 512 GiB), PDs for GiB 0,
        // 3 (MMIO) and 4 (pmem), 15 PTs for RAM (the 2 MiB of page tables
        // are not mapped), 2 for the MMIO and control pages, 8 for 16 MiB
        // of pmem.
        assert_eq!(table_pages_needed(MIN_RAM, 4096), 1 + 1 + 3 + 15 + 2 + 8);
        let max = max_region_pages(MIN_RAM);
        assert!(table_pages_needed(MIN_RAM, max) <= TABLE_PAGES_MAX);
        assert!(table_pages_needed(MIN_RAM, max + 512) > TABLE_PAGES_MAX);
        assert!(max >= 262_144, "{max}");
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
