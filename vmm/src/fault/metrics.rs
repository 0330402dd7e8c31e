//! Counters of one device's fault engine, for `--stats`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use devices::virtio::pmem::LatencyStats;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::pages::Transition;

#[derive(Debug)]
pub struct FaultMetrics {
    pub populate_read: AtomicU64,
    pub populate_write: AtomicU64,
    /// Populated writable for a thread outside the VMM (KVM's async
    /// page-fault worker), which may have been reading.
    pub populate_unverified: AtomicU64,
    /// Unverified dirty pages a flush found unchanged and skipped.
    pub unchanged_skipped: AtomicU64,
    /// Pages served as zeroes because the file has a hole there.
    pub zero: AtomicU64,
    pub mkwrite: AtomicU64,
    /// Faults another vCPU had already served.
    pub already_done: AtomicU64,
    /// Pages inserted by populating faults, and how many such faults.
    populated_pages: AtomicU64,
    populate_faults: AtomicU64,
    pub flush_pages: AtomicU64,
    pub flush_runs: AtomicU64,
    pub last_flush_pages: AtomicU64,
    /// Time in each phase of the last flush, and in all of them.
    flush_phases: Mutex<(FlushPhases, FlushPhases)>,
    /// Episodes of waiting for host space (ENOSPC) or KVM EFAULT retries.
    pub stalls: AtomicU64,
    service_ns: Mutex<Histogram<u64>>,
}

impl Default for FaultMetrics {
    // The histogram bounds are constants; they cannot fail at run time.
    #[allow(clippy::expect_used)]
    fn default() -> Self {
        Self {
            populate_read: AtomicU64::new(0),
            populate_write: AtomicU64::new(0),
            populate_unverified: AtomicU64::new(0),
            unchanged_skipped: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            mkwrite: AtomicU64::new(0),
            already_done: AtomicU64::new(0),
            populated_pages: AtomicU64::new(0),
            populate_faults: AtomicU64::new(0),
            flush_pages: AtomicU64::new(0),
            flush_runs: AtomicU64::new(0),
            last_flush_pages: AtomicU64::new(0),
            flush_phases: Mutex::new(Default::default()),
            stalls: AtomicU64::new(0),
            // 10 ns .. 100 s at 3 significant digits.
            service_ns: Mutex::new(
                Histogram::new_with_bounds(10, 100_000_000_000, 3)
                    .expect("constant histogram bounds are valid"),
            ),
        }
    }
}

impl FaultMetrics {
    /// Counts one served fault: what it did, how many pages it inserted,
    /// and how long serving it took.
    pub fn record_fault(&self, transition: Transition, pages: u64, took: Duration) {
        let counter = match transition {
            Transition::PopulateRead => &self.populate_read,
            Transition::PopulateWrite => &self.populate_write,
            Transition::PopulateUnverified => &self.populate_unverified,
            Transition::Mkwrite => &self.mkwrite,
            Transition::AlreadyDone => &self.already_done,
        };
        counter.fetch_add(1, Relaxed);
        if matches!(
            transition,
            Transition::PopulateRead | Transition::PopulateWrite | Transition::PopulateUnverified
        ) {
            self.populate_faults.fetch_add(1, Relaxed);
            self.populated_pages.fetch_add(pages, Relaxed);
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.service_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(ns.max(10));
    }

    pub fn record_flush(&self, pages: u64, runs: u64, phases: FlushPhases) {
        self.flush_pages.fetch_add(pages, Relaxed);
        self.flush_runs.fetch_add(runs, Relaxed);
        self.last_flush_pages.store(pages, Relaxed);
        let mut p = self.flush_phases.lock().unwrap_or_else(|p| p.into_inner());
        p.0 = phases;
        p.1.rearm_ns += phases.rearm_ns;
        p.1.write_ns += phases.write_ns;
        p.1.sync_ns += phases.sync_ns;
    }

    /// `dirty_pages` and `backing_truncated` come from the page states,
    /// which this does not see (see `PageTracker::stats`).
    pub fn snapshot(
        &self,
        engine: &'static str,
        dirty_pages: u64,
        backing_truncated: bool,
    ) -> FaultStats {
        let h = self.service_ns.lock().unwrap_or_else(|p| p.into_inner());
        let fault_service_ns = if h.is_empty() {
            LatencyStats::default()
        } else {
            LatencyStats {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            }
        };
        let faults = self.populate_faults.load(Relaxed);
        let (last_phases, phases) = *self.flush_phases.lock().unwrap_or_else(|p| p.into_inner());
        FaultStats {
            engine,
            faults: FaultCounts {
                populate_read: self.populate_read.load(Relaxed),
                populate_write: self.populate_write.load(Relaxed),
                populate_unverified: self.populate_unverified.load(Relaxed),
                zero: self.zero.load(Relaxed),
                mkwrite: self.mkwrite.load(Relaxed),
                already_done: self.already_done.load(Relaxed),
            },
            fault_service_ns,
            populate_batch: PopulateBatch {
                mean: if faults == 0 {
                    0.0
                } else {
                    self.populated_pages.load(Relaxed) as f64 / faults as f64
                },
            },
            flush: FlushCounts {
                pages: self.flush_pages.load(Relaxed),
                runs: self.flush_runs.load(Relaxed),
                last_pages: self.last_flush_pages.load(Relaxed),
                unchanged_skipped: self.unchanged_skipped.load(Relaxed),
                last_phases,
                phases,
            },
            stalls: self.stalls.load(Relaxed),
            dirty_pages,
            backing_truncated,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FaultCounts {
    pub populate_read: u64,
    pub populate_write: u64,
    pub populate_unverified: u64,
    pub zero: u64,
    pub mkwrite: u64,
    pub already_done: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PopulateBatch {
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FlushCounts {
    pub pages: u64,
    pub runs: u64,
    pub last_pages: u64,
    /// Unverified dirty pages found unchanged and not written.
    pub unchanged_skipped: u64,
    /// Where the last successful flush's time went, and all of theirs.
    pub last_phases: FlushPhases,
    pub phases: FlushPhases,
}

/// The phases of one flush, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct FlushPhases {
    /// Taking the dirty set and arming the catch of the next write: the
    /// dirty-log harvest and re-protect, or uffd's write-protect.
    pub rearm_ns: u64,
    /// Getting the pages to the file: sync_file_range, or pwrite from the
    /// mirror.
    pub write_ns: u64,
    /// fdatasync (or the peer policy's whole-file fsync or msync).
    pub sync_ns: u64,
}

/// The fault-engine part of a device's `--stats` record.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FaultStats {
    pub engine: &'static str,
    pub faults: FaultCounts,
    pub fault_service_ns: LatencyStats,
    pub populate_batch: PopulateBatch,
    pub flush: FlushCounts,
    pub stalls: u64,
    /// Pages written since their last successful flush (a failed flush
    /// leaves its pages here).
    pub dirty_pages: u64,
    /// The backing file was seen shorter than the device; flushes fail.
    pub backing_truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counts_faults_batches_and_flushes() {
        let m = FaultMetrics::default();
        m.record_fault(Transition::PopulateRead, 16, Duration::from_micros(5));
        m.record_fault(Transition::PopulateWrite, 8, Duration::from_micros(7));
        m.record_fault(Transition::Mkwrite, 1, Duration::from_micros(50));
        m.record_fault(Transition::AlreadyDone, 0, Duration::from_nanos(1));
        let phases = FlushPhases {
            rearm_ns: 1,
            write_ns: 2,
            sync_ns: 3,
        };
        m.record_flush(10, 3, phases);
        m.record_flush(0, 0, phases);
        let s = m.snapshot("uffd", 0, false);
        assert_eq!(s.engine, "uffd");
        assert_eq!(
            (
                s.faults.populate_read,
                s.faults.populate_write,
                s.faults.mkwrite
            ),
            (1, 1, 1)
        );
        assert_eq!(s.faults.already_done, 1);
        assert_eq!(s.populate_batch.mean, 12.0);
        assert_eq!(
            s.flush,
            FlushCounts {
                pages: 10,
                runs: 3,
                last_pages: 0,
                unchanged_skipped: 0,
                last_phases: phases,
                phases: FlushPhases {
                    rearm_ns: 2,
                    write_ns: 4,
                    sync_ns: 6,
                },
            }
        );
        assert!(s.fault_service_ns.max >= 49_000, "{:?}", s.fault_service_ns);
    }
}
