//! `pmemvm bench flush`: virtio-pmem flush requests timed end to end in
//! the probe guest (request to completion), per case, beside the host
//! baselines.
//!
//! The cases, each its own probe VM, all dirtying the same pages:
//! - pmemvm's engines (`probe kernel`, `probe uffd`, `probe prefault`);
//! - the fair peers: the kernel engine's mapping, with no dirty log,
//!   flushed as other VMMs do (`peer fsync (QEMU, CH)`, `peer msync
//!   (crosvm, FC)`), so that their writeback's mkclean zaps the guest's
//!   mappings as it does under those VMMs;
//! - the host rows, the device floor: the same pages dirtied through a
//!   mapping no guest uses, then fdatasync, fsync or msync.
//!
//! Per region size and repeat, every case gets fresh VMs and a fresh
//! backing file; round by round the VMs and the host take turns, so that
//! a slow spell of the disk hits all cases alike.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::backing::{BackingKind, ScratchDir};
use super::bench::{
    build_probe, fmt_ns, write_json, HostRecord, LatencySummary, ProbeCase, RunRecord,
    SkippedEngine, Spread, UffdOptions,
};
use super::checks::{self, Check, FlushTag};
use super::guest::{PageOrder, StepOp, StepSpec};
use super::host_flush::{HostFlushFile, HostSyncMethod};
use super::paging::PAGE;
use super::ProbeError;

/// Where `bench flush` puts the dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// An ext4 backing file is written in full when made: beyond this, the
/// bench asks for a sparse one.
const MAX_WRITTEN_BACKING: u64 = 1 << 30;

/// `pmemvm bench flush` options.
#[derive(Debug, Clone)]
pub struct FlushBenchConfig {
    /// pmemvm's engines and the peer policies.
    pub cases: Vec<ProbeCase>,
    pub dirty: Vec<u64>,
    pub layout: FlushLayout,
    /// Region sizes in bytes (multiples of 2 MiB), each run in turn; empty
    /// for the least the dirty counts and layout need, at least 16 MiB.
    pub regions: Vec<u64>,
    pub uffd: UffdOptions,
    pub backing: BackingKind,
    pub dir: Option<PathBuf>,
    /// Measured flushes per dirty count in each VM (after a warm-up).
    pub rounds: u32,
    /// Fresh VMs and files per case, for the spread between them.
    pub repeat: u32,
    pub progress: bool,
}

impl Default for FlushBenchConfig {
    fn default() -> Self {
        Self {
            cases: ProbeCase::ENGINES
                .into_iter()
                .chain(ProbeCase::PEERS)
                .collect(),
            dirty: vec![0, 1, 64, 4096],
            layout: FlushLayout::Contiguous,
            regions: Vec::new(),
            uffd: UffdOptions::default(),
            backing: BackingKind::Ext4,
            dir: None,
            rounds: 10,
            repeat: 1,
            progress: false,
        }
    }
}

impl FlushBenchConfig {
    /// The regions in pages: each `--region` checked against the dirty
    /// counts, layout and backing, or the default made from them.
    fn region_pages(&self) -> Result<Vec<u64>, ProbeError> {
        let max_dirty = self.dirty.iter().copied().max().unwrap_or(0);
        if self.regions.is_empty() {
            return Ok(vec![self.layout.region_pages(max_dirty)]);
        }
        let mut out = Vec::new();
        for &bytes in &self.regions {
            const HUGE: u64 = 2 << 20;
            if bytes == 0 || !bytes.is_multiple_of(HUGE) {
                return Err(ProbeError::Config(format!(
                    "--region {bytes} bytes: must be a non-zero multiple of 2 MiB"
                )));
            }
            let pages = bytes / PAGE;
            let need = self.layout.min_region_pages(max_dirty);
            if pages < need {
                return Err(ProbeError::Config(format!(
                    "--region {} MiB ({pages} pages) is too small for --dirty {max_dirty} \
                     with layout {}: it needs at least {need} pages",
                    bytes >> 20,
                    self.layout.name()
                )));
            }
            if self.backing == BackingKind::Ext4 && bytes > MAX_WRITTEN_BACKING {
                return Err(ProbeError::Config(format!(
                    "--region {} MiB with --backing ext4: each case's file would be written \
                     in full; use --backing sparse for regions over {} MiB",
                    bytes >> 20,
                    MAX_WRITTEN_BACKING >> 20
                )));
            }
            if !out.contains(&pages) {
                out.push(pages);
            }
        }
        Ok(out)
    }
}

/// Checks that the probe VM can map the pages the program touches and
/// hold its samples.
fn check_fits(region_pages: u64, steps: &[StepSpec]) -> Result<(), ProbeError> {
    use super::paging::MIN_RAM;
    use super::vm::{ram_for_samples, table_pages_needed, touched_blocks, TABLE_PAGES_MAX};
    let ram = ram_for_samples(steps.iter().map(|s| s.count).sum()).max(MIN_RAM);
    let blocks = touched_blocks(steps);
    if table_pages_needed(ram, region_pages, &blocks) > TABLE_PAGES_MAX {
        return Err(ProbeError::Config(format!(
            "the dirty pages fall in {} 2 MiB blocks of the region: more than the probe's page \
             tables (3 MiB, 4 KiB pages) map next to {} MiB of RAM; use fewer or contiguous pages",
            blocks.len(),
            ram >> 20
        )));
    }
    Ok(())
}

/// The flush-bench program of one VM: a warm-up round, then `rounds`
/// rounds of (dirty D pages, flush) for every D; a tag per step.
fn flush_program(config: &FlushBenchConfig, region_pages: u64) -> (Vec<StepSpec>, Vec<FlushTag>) {
    let mut steps = Vec::new();
    let mut tags = Vec::new();
    for round in 0..=config.rounds {
        for &dirty in &config.dirty {
            if dirty > 0 {
                steps.push(config.layout.write_step(dirty, region_pages));
                tags.push(FlushTag::Write { round, dirty });
            }
            steps.push(StepSpec {
                op: StepOp::Flush,
                count: 1,
                first_page: 0,
                order: PageOrder::Stride { stride: 1 },
            });
            tags.push(FlushTag::Flush { round, dirty });
        }
    }
    (steps, tags)
}

/// Where a flush's time went (medians over the measured rounds, µs).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Breakdown {
    /// Taking the dirty set and arming the next catch: the dirty-log
    /// harvest and its re-protect, or uffd's write-protect.
    pub rearm_us: f64,
    /// sync_file_range, or pwrite from the mirror (mirror, uffd engines).
    pub write_us: f64,
    /// fdatasync, or the peer's fsync or msync.
    pub sync_us: f64,
    /// The rest of the guest's wait: the virtio round trip and the
    /// vCPU exits the flush caused.
    pub other_us: f64,
    /// The guest's writes of the same pages after the flush, all of them:
    /// the re-dirty faults a flush's re-arm costs.
    pub refault_us: f64,
}

/// One row of the flush table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlushSummaryRow {
    /// `probe <engine>`, `peer <policy> (VMMs)` or `host <method>`.
    pub case: String,
    pub region_pages: u64,
    pub dirty: u64,
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// p50 / p50 of host fdatasync (the device floor), same region and
    /// dirty count.
    pub p50_vs_fdatasync: Option<f64>,
    /// p50 / the better peer's p50.
    #[serde(default)]
    pub p50_vs_best_peer: Option<f64>,
    /// Pages the device's writeback wrote, per flush (median).
    pub writeback_pages: Option<u64>,
    #[serde(default)]
    pub repeat_p50_ns: Vec<u64>,
    #[serde(default)]
    pub spread: Option<Spread>,
    #[serde(default)]
    pub breakdown: Option<Breakdown>,
}

/// One host-side sync, raw.
#[derive(Debug, Clone, Serialize)]
pub struct HostSyncRecord {
    pub method: HostSyncMethod,
    pub region_pages: u64,
    pub dirty: u64,
    pub repeat: u32,
    pub round: u32,
    pub warmup: bool,
    pub ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlushBenchConfigRecord {
    pub engines: Vec<String>,
    pub dirty: Vec<u64>,
    pub layout: FlushLayout,
    pub region_pages: Vec<u64>,
    #[serde(default)]
    pub populate: Option<u16>,
    #[serde(default)]
    pub poll_us: Option<u16>,
    pub backing: String,
    pub rounds: u32,
    pub repeat: u32,
}

/// Everything `bench flush` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FlushBenchReport {
    pub bench: &'static str,
    pub config: FlushBenchConfigRecord,
    pub host: HostRecord,
    pub summary: Vec<FlushSummaryRow>,
    pub checks: Vec<Check>,
    pub skipped_engines: Vec<SkippedEngine>,
    /// One probe VM per case, region and repeat; each program's first
    /// round is a warm-up.
    pub probe_runs: Vec<RunRecord>,
    pub host_syncs: Vec<HostSyncRecord>,
}

/// `pmemvm bench flush`.
pub fn run_flush(config: &FlushBenchConfig) -> Result<FlushBenchReport, ProbeError> {
    if config.rounds == 0
        || config.repeat == 0
        || config.dirty.is_empty()
        || config.cases.is_empty()
    {
        return Err(ProbeError::Config(
            "--rounds, --repeat, --dirty and --engine must not be empty or zero".into(),
        ));
    }
    let regions = config.region_pages()?;
    let programs: Vec<(Vec<StepSpec>, Vec<FlushTag>)> = regions
        .iter()
        .map(|&pages| flush_program(config, pages))
        .collect();
    for (&pages, (steps, _)) in regions.iter().zip(&programs) {
        check_fits(pages, steps)?;
    }
    let mut scratch = ScratchDir::new(config.backing, config.dir.as_deref())?;
    let mut cases = config.cases.clone();
    let mut skipped = Vec::new();
    let mut runs: Vec<(RunRecord, ProbeCase)> = Vec::new();
    let mut host_syncs = Vec::new();
    let started = Instant::now();
    for repeat in 0..config.repeat {
        for (&region_pages, (steps, _)) in regions.iter().zip(&programs) {
            let steps_per_round = steps.len() / (config.rounds as usize + 1);
            let mut vms = Vec::new();
            let mut i = 0;
            while i < cases.len() {
                let case = cases[i];
                match build_probe(&mut scratch, case, config.uffd, region_pages, steps)? {
                    Ok(vm) => {
                        vms.push((vm, case));
                        i += 1;
                    }
                    Err(reason) => {
                        if config.progress {
                            eprintln!("bench flush: skipping engine {}: {reason}", case.name());
                        }
                        skipped.push(SkippedEngine {
                            engine: case.name(),
                            reason,
                        });
                        cases.remove(i);
                    }
                }
            }
            let write_pages = |dirty: u64| {
                if dirty == 0 {
                    Vec::new()
                } else {
                    config.layout.write_step(dirty, region_pages).pages()
                }
            };
            let touched: BTreeSet<u64> =
                config.dirty.iter().flat_map(|&d| write_pages(d)).collect();
            let host_path = scratch.create_file(region_pages * PAGE)?;
            let touched: Vec<u64> = touched.into_iter().collect();
            let mut host_file = HostFlushFile::open(&host_path, region_pages, &touched)?;
            let _ = std::fs::remove_file(&host_path);
            for round in 0..=config.rounds {
                for (vm, _) in &mut vms {
                    vm.run_steps(steps_per_round)?;
                }
                for &dirty in &config.dirty {
                    let pages = write_pages(dirty);
                    for method in HostSyncMethod::ALL {
                        let took = host_file.timed_sync(&pages, method)?;
                        host_syncs.push(HostSyncRecord {
                            method,
                            region_pages,
                            dirty,
                            repeat,
                            round,
                            warmup: round == 0,
                            ns: u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                        });
                    }
                }
            }
            drop(host_file);
            let events = vec![None; steps.len()];
            for (vm, case) in vms {
                let run = vm.run()?;
                runs.push((
                    RunRecord::new(case, &run, repeat, region_pages, &events),
                    case,
                ));
            }
            if config.progress {
                eprintln!(
                    "bench flush: repeat {}/{}, region {} MiB: {} case(s) and the host baselines, {} rounds, {:.2} s",
                    repeat + 1,
                    config.repeat,
                    (region_pages * PAGE) >> 20,
                    cases.len(),
                    config.rounds + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }

    let mut summary = Vec::new();
    let mut checks = Vec::new();
    for (&region_pages, (_, tags)) in regions.iter().zip(&programs) {
        summary.extend(summarize(
            config,
            &cases,
            region_pages,
            &runs,
            tags,
            &host_syncs,
        ));
        for &case in &cases {
            let case_runs: Vec<&RunRecord> = runs
                .iter()
                .filter(|(r, c)| *c == case && r.region_pages == region_pages)
                .map(|(r, _)| r)
                .collect();
            let subject = if regions.len() > 1 {
                format!("{}, {} MiB", case.label(), (region_pages * PAGE) >> 20)
            } else {
                case.label()
            };
            checks.extend(checks::flush_checks(
                &subject,
                case.name(),
                case.counts_written_pages(),
                &case_runs,
                tags,
            ));
        }
    }
    Ok(FlushBenchReport {
        bench: "flush",
        config: FlushBenchConfigRecord {
            engines: config.cases.iter().map(|e| e.name().to_string()).collect(),
            dirty: config.dirty.clone(),
            layout: config.layout,
            region_pages: regions,
            populate: config.uffd.populate,
            poll_us: config.uffd.poll_us,
            backing: config.backing.name().to_string(),
            rounds: config.rounds,
            repeat: config.repeat,
        },
        host: HostRecord::detect(),
        summary,
        checks,
        skipped_engines: skipped,
        probe_runs: runs.into_iter().map(|(r, _)| r).collect(),
        host_syncs,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rows of one region: per dirty count, the engines, the peers, then
/// the host baselines.
fn summarize(
    config: &FlushBenchConfig,
    cases: &[ProbeCase],
    region_pages: u64,
    runs: &[(RunRecord, ProbeCase)],
    tags: &[FlushTag],
    host: &[HostSyncRecord],
) -> Vec<FlushSummaryRow> {
    let mut rows = Vec::new();
    for &dirty in &config.dirty {
        let mut block = Vec::new();
        for &case in cases {
            let mut ns = Vec::new();
            let mut per_repeat: Vec<Vec<f64>> = vec![Vec::new(); config.repeat as usize];
            let mut written = Vec::new();
            let (mut rearm, mut write, mut sync, mut refault) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (run, _) in runs
                .iter()
                .filter(|(r, c)| *c == case && r.region_pages == region_pages)
            {
                for (step, tag) in run.steps.iter().zip(tags) {
                    match *tag {
                        FlushTag::Flush { round, dirty: d } if d == dirty && round > 0 => {
                            let samples: Vec<f64> = run.ns(step).collect();
                            ns.extend(&samples);
                            if let Some(v) = per_repeat.get_mut(run.repeat as usize) {
                                v.extend(samples);
                            }
                            written.push(step.engine_after.flush.last_pages);
                            let p = step.engine_after.flush.last_phases;
                            rearm.push(p.rearm_ns as f64 / 1e3);
                            write.push(p.write_ns as f64 / 1e3);
                            sync.push(p.sync_ns as f64 / 1e3);
                        }
                        FlushTag::Write { round, dirty: d } if d == dirty && round > 0 => {
                            refault.push(run.ns(step).sum::<f64>() / 1e3);
                        }
                        _ => {}
                    }
                }
            }
            written.sort_unstable();
            let latency = LatencySummary::from_ns(&ns);
            let repeat_p50_ns: Vec<u64> = per_repeat
                .iter()
                .filter(|v| !v.is_empty())
                .map(|v| LatencySummary::from_ns(v).p50_ns)
                .collect();
            let breakdown = (dirty > 0 && !ns.is_empty()).then(|| {
                let (rearm, write, sync) = (median(rearm), median(write), median(sync));
                Breakdown {
                    rearm_us: rearm,
                    write_us: write,
                    sync_us: sync,
                    other_us: latency.p50_ns as f64 / 1e3 - rearm - write - sync,
                    refault_us: median(refault),
                }
            });
            block.push((
                case.is_peer(),
                FlushSummaryRow {
                    case: case.label(),
                    region_pages,
                    dirty,
                    p50_vs_fdatasync: None,
                    p50_vs_best_peer: None,
                    writeback_pages: case
                        .counts_written_pages()
                        .then(|| written.get(written.len() / 2).copied())
                        .flatten(),
                    spread: Spread::of(&repeat_p50_ns),
                    repeat_p50_ns,
                    breakdown,
                    latency,
                },
            ));
        }
        for method in HostSyncMethod::ALL {
            let pick = |h: &&HostSyncRecord| {
                h.method == method
                    && h.dirty == dirty
                    && h.region_pages == region_pages
                    && !h.warmup
            };
            let ns: Vec<f64> = host.iter().filter(pick).map(|h| h.ns as f64).collect();
            let repeat_p50_ns: Vec<u64> = (0..config.repeat)
                .map(|r| {
                    let ns: Vec<f64> = host
                        .iter()
                        .filter(pick)
                        .filter(|h| h.repeat == r)
                        .map(|h| h.ns as f64)
                        .collect();
                    LatencySummary::from_ns(&ns).p50_ns
                })
                .collect();
            block.push((
                false,
                FlushSummaryRow {
                    case: format!("host {}", method.label()),
                    region_pages,
                    dirty,
                    latency: LatencySummary::from_ns(&ns),
                    p50_vs_fdatasync: None,
                    p50_vs_best_peer: None,
                    writeback_pages: None,
                    spread: Spread::of(&repeat_p50_ns),
                    repeat_p50_ns,
                    breakdown: None,
                },
            ));
        }
        let floor = block
            .iter()
            .find(|(_, r)| r.case == format!("host {}", HostSyncMethod::Fdatasync.label()))
            .map_or(0, |(_, r)| r.latency.p50_ns);
        let best_peer = block
            .iter()
            .filter(|(peer, r)| *peer && r.latency.samples > 0)
            .map(|(_, r)| r.latency.p50_ns)
            .min()
            .unwrap_or(0);
        for (_, row) in &mut block {
            let p50 = row.latency.p50_ns as f64;
            row.p50_vs_fdatasync = (floor > 0).then(|| p50 / floor as f64);
            row.p50_vs_best_peer = (best_peer > 0).then(|| p50 / best_peer as f64);
        }
        rows.extend(block.into_iter().map(|(_, r)| r));
    }
    rows
}

fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
}

/// The flush tables, from the summary rows (shared with `pmemvm report`):
/// latency and ratios per region, then where the time went.
pub fn table(rows: &[FlushSummaryRow]) -> String {
    let mut out = String::new();
    let regions: Vec<u64> = rows
        .iter()
        .map(|r| r.region_pages)
        .fold(Vec::new(), |mut v, p| {
            if !v.contains(&p) {
                v.push(p);
            }
            v
        });
    let spread = rows.iter().any(|r| r.spread.is_some());
    for &region in &regions {
        let _ = writeln!(
            out,
            "region {} MiB ({region} pages):",
            (region * PAGE) >> 20
        );
        let _ = write!(
            out,
            "{:>6} {:<26} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8}",
            "dirty", "case", "p50 us", "p99 us", "mean us", "x floor", "x peer", "wb pages"
        );
        if spread {
            let _ = write!(out, " {:>10} {:>7}", "med p50", "spread");
        }
        out.push('\n');
        for r in rows.iter().filter(|r| r.region_pages == region) {
            let l = &r.latency;
            let _ = write!(
                out,
                "{:>6} {:<26} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>9} {:>8}",
                r.dirty,
                r.case,
                l.p50_ns as f64 / 1e3,
                l.p99_ns as f64 / 1e3,
                l.mean_ns / 1e3,
                ratio(r.p50_vs_fdatasync),
                ratio(r.p50_vs_best_peer),
                r.writeback_pages
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
            );
            if spread {
                let _ = write!(
                    out,
                    " {:>10} {:>7}",
                    r.spread
                        .map_or_else(|| "-".into(), |s| fmt_ns(s.median_p50_ns as f64)),
                    Spread::cell(r.spread.as_ref())
                );
            }
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "x floor: p50 over host fdatasync's (a file no guest maps); x peer: over the better peer's"
    );
    if spread && rows.iter().any(|r| r.spread.is_some_and(|s| s.flagged())) {
        let _ = writeln!(
            out,
            "!: the p50 moved more than {}% between repeats",
            Spread::FLAG_PERCENT
        );
    }
    if rows.iter().any(|r| r.breakdown.is_some()) {
        let _ = writeln!(
            out,
            "\nwhere a flush's time goes (medians, us): re-arm = dirty-log harvest and re-protect \
             (uffd: write-protect); write = sync_file_range (mirror, uffd: pwrite from the mirror); \
             sync = fdatasync (peers: fsync/msync); other = the rest of the guest's wait; re-faults = the guest's next writes of the pages"
        );
        let _ = writeln!(
            out,
            "{:>9} {:>6} {:<26} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "region", "dirty", "case", "p50", "re-arm", "write", "sync", "other", "re-faults"
        );
        for r in rows.iter() {
            let Some(b) = r.breakdown else { continue };
            let _ = writeln!(
                out,
                "{:>5} MiB {:>6} {:<26} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
                (r.region_pages * PAGE) >> 20,
                r.dirty,
                r.case,
                r.latency.p50_ns as f64 / 1e3,
                b.rearm_us,
                b.write_us,
                b.sync_us,
                b.other_us,
                b.refault_us
            );
        }
    }
    out
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
            "bench flush: layout {}, backing {}, {} measured round(s) after a warm-up, {} repeat(s)",
            c.layout.name(),
            c.backing,
            c.rounds,
            c.repeat
        );
        out.push_str(&table(&self.summary));
        for s in &self.skipped_engines {
            let _ = writeln!(out, "{}", super::bench::table::skipped(s.engine, &s.reason));
        }
        out.push_str(&checks::table(&self.checks));
        out
    }

    /// The first failed check, if any.
    pub fn failure(&self) -> Option<String> {
        checks::first_failure(&self.checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn region_option_is_checked() {
        let gib = |n: u64| n << 30;
        let config = |dirty: Vec<u64>, layout, regions: Vec<u64>, backing| FlushBenchConfig {
            dirty,
            layout,
            regions,
            backing,
            ..Default::default()
        };
        let ext4 = BackingKind::Ext4;
        // The default: made from the dirty counts.
        let c = config(vec![0, 1, 64, 4096], FlushLayout::Contiguous, vec![], ext4);
        assert_eq!(c.region_pages().unwrap(), [4096]);
        let c = config(vec![8192], FlushLayout::Scattered, vec![], ext4);
        assert_eq!(c.region_pages().unwrap(), [16384]);
        // The sweep, sparse; a repeated size once.
        let c = config(
            vec![1, 64],
            FlushLayout::Contiguous,
            vec![16 << 20, 256 << 20, gib(1), gib(4), gib(4)],
            BackingKind::Sparse,
        );
        assert_eq!(c.region_pages().unwrap(), [4096, 65536, 262_144, 1_048_576]);
        // Every region size of the sweep fits the probe's page tables.
        for pages in c.region_pages().unwrap() {
            let (steps, _) = flush_program(&c, pages);
            check_fits(pages, &steps).unwrap();
        }
        // Not a multiple of 2 MiB, zero, too small, too big for ext4.
        for (dirty, layout, region) in [
            (1, FlushLayout::Contiguous, (2 << 20) + 4096),
            (1, FlushLayout::Contiguous, 1 << 20),
            (1, FlushLayout::Contiguous, 0),
            (513, FlushLayout::Contiguous, 2 << 20),
            (513, FlushLayout::Scattered, 4 << 20),
            (1, FlushLayout::Contiguous, gib(2)),
        ] {
            let err = config(vec![0, dirty], layout, vec![region], ext4)
                .region_pages()
                .unwrap_err();
            assert!(matches!(err, ProbeError::Config(_)), "{err}");
        }
        // Scattered pages over 4 GiB touch a block each: 4096 blocks do
        // not fit the page tables, 64 do.
        let c = config(
            vec![4096],
            FlushLayout::Scattered,
            vec![gib(4)],
            BackingKind::Sparse,
        );
        let (steps, _) = flush_program(&c, c.region_pages().unwrap()[0]);
        let err = check_fits(1_048_576, &steps).unwrap_err().to_string();
        assert!(err.contains("2 MiB blocks"), "{err}");
        let c = config(
            vec![64],
            FlushLayout::Scattered,
            vec![gib(4)],
            BackingKind::Sparse,
        );
        let (steps, _) = flush_program(&c, 1_048_576);
        check_fits(1_048_576, &steps).unwrap();
    }

    #[test]
    fn probe_page_tables_are_counted() {
        use super::super::paging::MIN_RAM;
        use super::super::vm::table_pages_needed;
        // 32 MiB RAM: PML4, one PDPT (all below 512 GiB), PDs for GiB 0,
        // 3 (MMIO) and 4 (pmem), 15 PTs for RAM (the 2 MiB of page tables
        // are not mapped), 2 for the MMIO and control pages, one per
        // touched 2 MiB block of pmem.
        let blocks: BTreeSet<u64> = (0..8).collect();
        assert_eq!(
            table_pages_needed(MIN_RAM, 4096, &blocks),
            1 + 1 + 3 + 15 + 2 + 8
        );
        let one: BTreeSet<u64> = [0].into();
        assert_eq!(
            table_pages_needed(MIN_RAM, 4096, &one),
            1 + 1 + 3 + 15 + 2 + 1
        );
    }

    #[test]
    fn program_tags_each_step() {
        let c = FlushBenchConfig {
            dirty: vec![0, 4],
            rounds: 2,
            ..Default::default()
        };
        let (steps, tags) = flush_program(&c, 4096);
        assert_eq!(steps.len(), 9);
        assert_eq!(tags[0], FlushTag::Flush { round: 0, dirty: 0 });
        assert_eq!(tags[1], FlushTag::Write { round: 0, dirty: 4 });
        assert_eq!(tags[8], FlushTag::Flush { round: 2, dirty: 4 });
        assert_eq!(steps[7].count, 4);
    }
}
