//! The benches check their own figures: what the probe did (the pages each
//! step touched, the samples it took) against what KVM's statistics and
//! the device's counters say happened, with the expectation taken from
//! each engine's design. A bench whose checks fail exits non-zero.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::bench::{FaultEvent, FaultSummaryRow, RunRecord, StepRecord};
use super::guest::{StepOp, StepSpec};

/// One expectation and what was observed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// Whose figure: an engine and event, or a flush case.
    pub subject: String,
    pub what: String,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

impl Check {
    /// `observed` (one value, or the least and greatest of several) must
    /// lie in `lo..=hi`.
    fn range(subject: &str, what: &str, lo: f64, hi: f64, observed: (f64, f64)) -> Self {
        let (min, max) = observed;
        let fmt = |v: f64| {
            // -0 (a negated zero delta) prints as 0.
            let v = v + 0.0;
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        Self {
            subject: subject.to_string(),
            what: what.to_string(),
            expected: if lo == hi {
                fmt(lo)
            } else {
                format!("{}..{}", fmt(lo), fmt(hi))
            },
            observed: if min == max {
                fmt(min)
            } else {
                format!("{}..{}", fmt(min), fmt(max))
            },
            ok: lo <= min && max <= hi,
        }
    }
}

/// The `checks` section of a bench's output.
pub fn table(checks: &[Check]) -> String {
    let failed = checks.iter().filter(|c| !c.ok).count();
    let mut out = format!("\nchecks: {} ok, {failed} FAILED\n", checks.len() - failed);
    for c in checks {
        let _ = writeln!(
            out,
            "  {:<6} {:<34} {:<44} expected {:<12} observed {}",
            if c.ok { "ok" } else { "FAILED" },
            c.subject,
            c.what,
            c.expected,
            c.observed
        );
    }
    out
}

/// The first failed check, as one line for an error message.
pub fn first_failure(checks: &[Check]) -> Option<String> {
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    let c = failed.first()?;
    Some(format!(
        "{} check(s) FAILED, first: {}: {}: expected {}, observed {}",
        failed.len(),
        c.subject,
        c.what,
        c.expected,
        c.observed
    ))
}

/// A fault costs one KVM page fault (allowing for the odd extra one: a
/// guest page-table page, a timer tick).
const ONE: (f64, f64) = (0.97, 1.05);
const NONE: (f64, f64) = (-0.02, 0.02);
/// uffd's first write is two faults: the one that finds the page missing
/// or write-protected and waits for the servicer, and KVM's retry. A page
/// the servicer unprotected before KVM looked again takes one.
const UFFD_WRITE: (f64, f64) = (1.85, 2.05);

/// Faults a step may take beyond its pages' own.
const STEP_SLACK: f64 = 2.0;

/// Without a dirty log on the slot (the peers), shadow paging's PTE
/// prefetch maps up to 8 writable neighbours per first-write fault.
const PREFETCHED_WRITE: (f64, f64) = (0.12, 1.05);

/// What KVM counts per sample of `event` for an engine, by its design.
fn fault_expectations(engine: &str, event: FaultEvent) -> Vec<(&'static str, (f64, f64))> {
    let uffd = engine == "uffd";
    let write_faults = if uffd { UFFD_WRITE } else { ONE };
    let first_write = if engine.starts_with("peer") {
        PREFETCHED_WRITE
    } else {
        write_faults
    };
    let mut e = match event {
        FaultEvent::FirstRead => vec![("pf_taken", ONE), ("pf_fixed", ONE), ("pages_4k", ONE)],
        FaultEvent::FirstWrite => vec![
            ("pf_taken", first_write),
            ("pf_fixed", if uffd { ONE } else { first_write }),
            ("pages_4k", ONE),
        ],
        FaultEvent::RedirtyAfterFlush => vec![
            ("pf_taken", write_faults),
            ("pf_fixed", ONE),
            ("pages_4k", if zaps_on_flush(engine) { ONE } else { NONE }),
        ],
        // The mirror's memfd is mapped writable on the read (KVM logs
        // it, the flush compares it), so the write costs nothing.
        FaultEvent::Mkwrite if engine == "mirror" => vec![("pf_taken", NONE), ("pages_4k", NONE)],
        // The page is mapped already: the write makes it writable.
        FaultEvent::Mkwrite => vec![
            ("pf_taken", write_faults),
            ("pf_fixed", ONE),
            ("pages_4k", NONE),
        ],
        FaultEvent::WarmRead | FaultEvent::WarmWrite => {
            vec![("pf_taken", NONE), ("pages_4k", NONE)]
        }
        FaultEvent::Flush => Vec::new(),
    };
    if event != FaultEvent::Flush {
        // 4 KiB pages only, so far.
        e.push(("pages_2m", NONE));
    }
    e
}

/// Whether the engine's flush drops the guest's mappings of the pages it
/// cleans (mkclean of a guest-mapped page, or uffd's write-protect), or
/// only write-protects them in KVM's map (the mirror's dirty log).
fn zaps_on_flush(engine: &str) -> bool {
    engine != "mirror"
}

/// Pages one step reads or writes.
fn step_pages(step: &StepRecord) -> Vec<u64> {
    StepSpec {
        op: step.op,
        count: step.count,
        first_page: step.first_page,
        order: step.order,
    }
    .pages()
}

/// `bench faults`: each summary row's KVM counts per sample against the
/// engine's design; each flush's written pages against the pages written
/// since the flush before. `reads_dirty`: the host logs reads as writes
/// (tmpfs on an EPT/NPT host), which the kernel engines cannot tell apart,
/// so their mkwrite and written-page counts are not checked.
pub fn fault_checks(rows: &[FaultSummaryRow], runs: &[RunRecord], reads_dirty: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    for row in rows {
        let uffd = row.engine == "uffd";
        if reads_dirty && !uffd && row.event == FaultEvent::Mkwrite {
            continue;
        }
        let subject = format!("{} {}", row.engine, row.event.label());
        let mut expectations = fault_expectations(row.engine, row.event);
        // The tracepoint counts the same faults as pf_taken, where the
        // host has it (EPT/NPT violations on hardware).
        if let Some(&(_, range)) = expectations.iter().find(|(k, _)| *k == "pf_taken") {
            expectations.push((vmm::kvm_stats::PAGE_FAULT_STAT, range));
        }
        // Each step may take a fault or two of its own beyond the step
        // boundary the figures already subtract: on EPT/NPT hosts the
        // first write of each new results page in guest RAM. Allowed for
        // per step, it matters only when steps are short.
        let steps = runs
            .iter()
            .filter(|r| r.engine == row.engine)
            .flat_map(|r| &r.steps)
            .filter(|s| s.event == Some(row.event))
            .count();
        let slack = STEP_SLACK * steps as f64 / row.latency.samples.max(1) as f64;
        for (stat, (lo, hi)) in expectations {
            if let Some(&v) = row.kvm_per_sample.get(stat) {
                checks.push(Check::range(
                    &subject,
                    &format!("{stat} per page"),
                    lo - slack,
                    hi + slack,
                    (v, v),
                ));
            }
        }
        // The engine's own count of first writes caught: mkwrite, or a
        // write fault that populated the page writable.
        if uffd
            && matches!(
                row.event,
                FaultEvent::FirstWrite | FaultEvent::Mkwrite | FaultEvent::RedirtyAfterFlush
            )
        {
            let (mut caught, mut samples) = (0u64, 0u64);
            for run in runs.iter().filter(|r| r.engine == row.engine) {
                let mut before = 0;
                for step in &run.steps {
                    let f = &step.engine_after.faults;
                    let after = f.mkwrite + f.populate_write + f.populate_unverified;
                    if step.event == Some(row.event) {
                        caught += after - before;
                        samples += step.count;
                    }
                    before = after;
                }
            }
            let per_page = caught as f64 / samples.max(1) as f64;
            checks.push(Check::range(
                &subject,
                "first writes caught per page (engine)",
                1.0,
                1.0,
                (per_page, per_page),
            ));
        }
    }
    for engine in rows.iter().map(|r| r.engine).collect::<BTreeSet<_>>() {
        if (reads_dirty && engine != "uffd") || engine.starts_with("peer") {
            continue;
        }
        let mut observed: Option<(f64, f64)> = None;
        let mut mismatch = 0u64;
        for run in runs.iter().filter(|r| r.engine == engine) {
            let mut written: BTreeSet<u64> = BTreeSet::new();
            for step in &run.steps {
                match step.op {
                    StepOp::Write => written.extend(step_pages(step)),
                    StepOp::Flush => {
                        let got = step.engine_after.flush.last_pages;
                        let want = written.len() as u64;
                        if got != want {
                            mismatch += 1;
                        }
                        let diff = got as f64 - want as f64;
                        observed = Some(
                            observed.map_or((diff, diff), |(a, b)| (a.min(diff), b.max(diff))),
                        );
                        written.clear();
                    }
                    StepOp::Read => {}
                }
            }
        }
        if let Some(o) = observed {
            let mut c = Check::range(
                &format!("{engine} flush request"),
                "pages written back less pages the probe wrote",
                0.0,
                0.0,
                o,
            );
            c.ok = mismatch == 0;
            checks.push(c);
        }
    }
    checks
}

/// What a flush-bench step is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTag {
    /// Dirtying the pages that the flush after it writes back.
    Write {
        round: u32,
        dirty: u64,
    },
    Flush {
        round: u32,
        dirty: u64,
    },
}

/// Slack for what a step boundary costs on its own (the exit that ends the
/// step, the one that starts it).
const BOUNDARY: f64 = 3.0;

/// `bench flush`, one case's runs in one region: every flush wrote exactly
/// the pages dirtied before it (engines that count them), every flush
/// cleaned them (KVM's 4 KiB mappings fall by that many: mkclean or the
/// re-protect zapped them; the mirror's only write-protects), and the
/// writes after a flush fault once per page it cleaned (twice for uffd).
pub fn flush_checks(
    subject: &str,
    engine: &str,
    counts_written: bool,
    runs: &[&RunRecord],
    tags: &[FlushTag],
) -> Vec<Check> {
    let mut checks = Vec::new();
    let dirty_counts: BTreeSet<u64> = tags
        .iter()
        .map(|t| match t {
            FlushTag::Write { dirty, .. } | FlushTag::Flush { dirty, .. } => *dirty,
        })
        .collect();
    let write_faults = if engine == "uffd" { UFFD_WRITE } else { ONE };
    for dirty in dirty_counts {
        let d = dirty as f64;
        let mut written = Vec::new();
        let mut cleaned = Vec::new();
        let mut refaults = Vec::new();
        for run in runs {
            for (step, tag) in run.steps.iter().zip(tags) {
                let stat = |k: &str| {
                    step.kvm_vcpu
                        .get(k)
                        .or_else(|| step.kvm_vm.get(k))
                        .copied()
                        .unwrap_or(0) as f64
                };
                match *tag {
                    FlushTag::Flush { round, dirty: x } if x == dirty => {
                        written.push(step.engine_after.flush.last_pages as f64);
                        // The warm-up round's first steps map the probe's
                        // own pages too.
                        if round > 0 {
                            cleaned.push(-stat("pages_4k"));
                        }
                    }
                    FlushTag::Write { round, dirty: x } if x == dirty && round > 0 => {
                        refaults.push(stat("pf_taken"));
                    }
                    _ => {}
                }
            }
        }
        let span = |v: &[f64]| {
            v.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                })
        };
        let subject = format!("{subject}, {dirty} dirty");
        if counts_written && !written.is_empty() {
            checks.push(Check::range(
                &subject,
                "pages written back per flush",
                d,
                d,
                span(&written),
            ));
        }
        if !cleaned.is_empty() {
            let dropped = if zaps_on_flush(engine) { d } else { 0.0 };
            checks.push(Check::range(
                &subject,
                "4 KiB mappings dropped per flush",
                dropped - BOUNDARY,
                dropped + BOUNDARY,
                span(&cleaned),
            ));
        }
        if !refaults.is_empty() && dirty > 0 {
            checks.push(Check::range(
                &subject,
                "faults of the writes after a flush",
                (d * write_faults.0).floor(),
                (d * write_faults.1).ceil() + BOUNDARY,
                span(&refaults),
            ));
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::bench::LatencySummary;
    use crate::lab::guest::PageOrder;
    use std::collections::BTreeMap;

    fn row(engine: &'static str, event: FaultEvent, stats: &[(&str, f64)]) -> FaultSummaryRow {
        FaultSummaryRow {
            engine,
            event,
            latency: LatencySummary::from_ns(&[100.0]),
            per_second: 0.0,
            kvm_per_sample: stats.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            repeat_p50_ns: Vec::new(),
            spread: None,
        }
    }

    fn step(op: StepOp, count: u64, event: Option<FaultEvent>, last_pages: u64) -> StepRecord {
        let mut engine_after = vmm::fault::FaultStats::default();
        engine_after.flush.last_pages = last_pages;
        StepRecord {
            event,
            calibration: false,
            op,
            count,
            first_page: 0,
            order: PageOrder::Stride { stride: 1 },
            ticks: Vec::new(),
            wall_us: 0.0,
            kvm_vcpu: BTreeMap::new(),
            kvm_vm: BTreeMap::new(),
            engine_after,
            device_after: Default::default(),
        }
    }

    fn run(engine: &'static str, steps: Vec<StepRecord>) -> RunRecord {
        RunRecord {
            engine,
            repeat: 0,
            region_pages: 512,
            tsc_khz: 1,
            setup_us: 0.0,
            efault_retries: 0,
            dirty_ring_full_exits: 0,
            steps,
        }
    }

    #[test]
    fn agreeing_figures_pass() {
        let rows = [
            row(
                "kernel",
                FaultEvent::FirstWrite,
                &[
                    ("pf_taken", 1.0),
                    ("pf_fixed", 1.0),
                    ("pages_4k", 1.01),
                    ("pages_2m", 0.0),
                ],
            ),
            row("kernel", FaultEvent::WarmWrite, &[("pf_taken", 0.0)]),
        ];
        let runs = [run(
            "kernel",
            vec![
                step(StepOp::Write, 16, Some(FaultEvent::FirstWrite), 0),
                step(StepOp::Flush, 1, Some(FaultEvent::Flush), 16),
            ],
        )];
        let checks = fault_checks(&rows, &runs, false);
        assert_eq!(checks.len(), 6, "{checks:#?}");
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert_eq!(first_failure(&checks), None);
    }

    #[test]
    fn a_planted_disagreement_fails() {
        // Half the first writes fixed: a fault the engine did not serve.
        let rows = [row(
            "kernel",
            FaultEvent::FirstWrite,
            &[("pf_taken", 1.0), ("pf_fixed", 0.5)],
        )];
        let checks = fault_checks(&rows, &[], false);
        let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].what, "pf_fixed per page");
        assert_eq!(failed[0].observed, "0.50");
        assert!(first_failure(&checks)
            .unwrap()
            .contains("kernel first write"));
        assert!(table(&checks).contains("FAILED"));

        // A flush that wrote one page fewer than the probe dirtied.
        let runs = [run(
            "uffd",
            vec![
                step(StepOp::Write, 16, Some(FaultEvent::FirstWrite), 0),
                step(StepOp::Flush, 1, Some(FaultEvent::Flush), 15),
            ],
        )];
        let rows = [row("uffd", FaultEvent::Flush, &[])];
        let checks = fault_checks(&rows, &runs, false);
        assert!(
            checks.iter().any(|c| !c.ok && c.observed == "-1"),
            "{checks:#?}"
        );
    }

    #[test]
    fn short_steps_may_take_a_fault_or_two_more() {
        // 16 first reads in one step: 2 faults of the step's own pass, a
        // third per 16 pages is too many.
        let runs = [run(
            "kernel",
            vec![step(StepOp::Read, 16, Some(FaultEvent::FirstRead), 0)],
        )];
        let mut r = row(
            "kernel",
            FaultEvent::FirstRead,
            &[("pf_taken", 18.0 / 16.0)],
        );
        r.latency = LatencySummary::from_ns(&[100.0; 16]);
        assert!(fault_checks(std::slice::from_ref(&r), &runs, false)
            .iter()
            .all(|c| c.ok));
        r.kvm_per_sample.insert("pf_taken".into(), 20.0 / 16.0);
        assert!(fault_checks(&[r], &runs, false).iter().any(|c| !c.ok));
    }

    #[test]
    fn uffd_expects_two_faults_per_first_write() {
        let rows = [row("uffd", FaultEvent::FirstWrite, &[("pf_taken", 1.0)])];
        let checks = fault_checks(&rows, &[], false);
        assert!(checks
            .iter()
            .any(|c| !c.ok && c.what == "pf_taken per page"));
        let rows = [row("uffd", FaultEvent::FirstWrite, &[("pf_taken", 1.94)])];
        assert!(fault_checks(&rows, &[], false)
            .iter()
            .filter(|c| c.what == "pf_taken per page")
            .all(|c| c.ok));
    }

    #[test]
    fn flush_checks_catch_an_unwritten_page_and_a_missing_refault() {
        let tags = [
            FlushTag::Write { round: 0, dirty: 8 },
            FlushTag::Flush { round: 0, dirty: 8 },
            FlushTag::Write { round: 1, dirty: 8 },
            FlushTag::Flush { round: 1, dirty: 8 },
        ];
        let mut steps = vec![
            step(StepOp::Write, 8, None, 0),
            step(StepOp::Flush, 1, None, 8),
            step(StepOp::Write, 8, None, 8),
            step(StepOp::Flush, 1, None, 8),
        ];
        steps[2].kvm_vcpu.insert("pf_taken".into(), 9);
        steps[3].kvm_vm.insert("pages_4k".into(), -8);
        let good = run("kernel", steps.clone());
        let checks = flush_checks("probe kernel", "kernel", true, &[&good], &tags);
        assert_eq!(checks.len(), 3, "{checks:#?}");
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");

        steps[3].engine_after.flush.last_pages = 7;
        steps[2].kvm_vcpu.insert("pf_taken".into(), 2);
        let bad = run("kernel", steps);
        let checks = flush_checks("probe kernel", "kernel", true, &[&bad], &tags);
        let failed: Vec<&str> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "pages written back per flush",
                "faults of the writes after a flush"
            ]
        );
    }
}
