//! The one owner of a device's page state: what a fault and a flush do to
//! it, and the durable writeback of a dirty set.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::virtio::pmem::WritebackReport;

use super::{DirtySet, FaultMetrics, FaultStats, FlushPhases, PageStates, Run, PAGE_SIZE};

/// Largest single I/O of a writeback: 2 MiB.
pub const MAX_RUN_PAGES: u64 = 512;

/// What an engine's fault path and its flush share: the page states, under
/// one lock so that a state change and the matching (un)protect happen
/// together, and the counters.
#[derive(Debug)]
pub struct PageTracker {
    states: Mutex<PageStates>,
    pub metrics: FaultMetrics,
    /// The backing file was seen shorter than the device. Sticky: growing
    /// the file back does not bring the lost pages back, so every later
    /// flush fails too.
    truncated: AtomicBool,
    /// Told each successful flush's pages before the guest is: the crash
    /// bench's log of what each flush wrote back.
    observer: ObserverSlot,
}

/// See [`PageTracker::observe_flushes`].
pub type FlushObserver = Box<dyn Fn(&DirtySet) + Send>;

#[derive(Default)]
struct ObserverSlot(Mutex<Option<FlushObserver>>);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObserverSlot")
    }
}

/// Why a flush cannot claim durability: the backing file lost pages.
#[derive(Debug, thiserror::Error)]
pub enum BackingLost {
    #[error("the backing file was truncated to {now} bytes under the guest (device size {size}); every flush of this device fails from now on")]
    Truncated { now: u64, size: u64 },
    #[error(
        "the backing file was truncated under the guest earlier; every flush of this device fails"
    )]
    TruncatedEarlier,
}

impl From<BackingLost> for io::Error {
    fn from(e: BackingLost) -> Self {
        // The guest sees EIO whatever the kind; the kind is for the host.
        io::Error::new(io::ErrorKind::UnexpectedEof, e)
    }
}

impl PageTracker {
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            states: Mutex::new(PageStates::new(size / PAGE_SIZE)),
            metrics: FaultMetrics::default(),
            truncated: AtomicBool::new(false),
            observer: ObserverSlot::default(),
        })
    }

    /// Calls `observer` with the pages of each flush that made its pages
    /// durable (not a whole-file peer sync), before the flush completes.
    pub fn observe_flushes(&self, observer: FlushObserver) {
        *self.observer.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    pub fn states(&self) -> MutexGuard<'_, PageStates> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.states().pages() * PAGE_SIZE
    }

    /// Records that the backing file lost pages (see `truncated`).
    pub fn set_truncated(&self) {
        self.truncated.store(true, Ordering::Release);
    }

    pub fn truncated(&self) -> bool {
        self.truncated.load(Ordering::Acquire)
    }

    /// Fails once the backing file has been seen shorter than the device.
    pub fn check_backing(&self, file: &File) -> Result<(), io::Error> {
        if self.truncated() {
            return Err(BackingLost::TruncatedEarlier.into());
        }
        check_not_truncated(file, self.size()).inspect_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.set_truncated();
            }
        })
    }

    /// The engine's `--stats` record, with the page counts of this moment.
    pub fn stats(&self, engine: &'static str) -> FaultStats {
        let (_, _, dirty) = self.states().counts();
        self.metrics.snapshot(engine, dirty, self.truncated())
    }
}

/// What a flush did with the pages it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written to the file in `runs` I/Os and made durable.
    Durable { runs: u64 },
    /// Made durable by a sync of the whole file (a peer flush policy):
    /// which pages that wrote is not known.
    WholeFile,
    /// Nothing to write (read-only, discard_writes): the pages are clean
    /// and the flush counts 0 pages.
    Discarded,
}

/// The pages one flush took from the dirty set. Finished with
/// [`Flush::finish`]; one dropped unfinished (an early return) leaves its
/// pages dirty, like a failed one.
#[must_use = "a flush must be finished, or its pages are dirty again"]
#[derive(Debug)]
pub struct Flush<'a> {
    tracker: &'a PageTracker,
    set: DirtySet,
    finished: bool,
    phases: FlushPhases,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl PageTracker {
    /// Starts a flush: every dirty page becomes clean and is taken, and
    /// `rearm` (the engine's catch of the next write, e.g. uffd's
    /// write-protect) runs on them under the same lock, so that no fault
    /// makes one of them writable in between. A write after this is dirty
    /// for the next flush. If `rearm` fails, the pages are dirty again.
    pub fn begin_flush(
        &self,
        rearm: impl FnOnce(&PageStates, &DirtySet) -> io::Result<()>,
    ) -> io::Result<Flush<'_>> {
        let started = Instant::now();
        let mut states = self.states();
        let set = states.take_dirty();
        if let Err(e) = rearm(&states, &set) {
            // Some pages may be writable yet clean: dirty them all.
            states.redirty(&set);
            return Err(e);
        }
        Ok(Flush {
            tracker: self,
            set,
            finished: false,
            phases: FlushPhases {
                rearm_ns: ns(started.elapsed()),
                ..FlushPhases::default()
            },
        })
    }
}

impl<'a> Flush<'a> {
    pub fn set(&self) -> &DirtySet {
        &self.set
    }

    /// Drops each unverified page that `unchanged` finds as the file holds
    /// it (it need not be written) and counts them; an error keeps the
    /// page in the set.
    pub fn skip_unchanged(
        &mut self,
        unchanged: impl FnMut(u64) -> io::Result<bool>,
    ) -> io::Result<()> {
        let skipped = self.set.drop_unchanged(unchanged)?;
        self.tracker
            .metrics
            .unchanged_skipped
            .fetch_add(skipped, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the flush. Success counts it (the pages stay clean); failure
    /// makes its pages dirty again, with any written since, and returns
    /// the error for the guest.
    pub fn finish(mut self, result: io::Result<Written>) -> io::Result<WritebackReport> {
        self.finished = true;
        let metrics = &self.tracker.metrics;
        match result {
            Ok(Written::Durable { runs }) => {
                let pages = self.set.len();
                if let Some(observe) = self
                    .tracker
                    .observer
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    observe(&self.set);
                }
                metrics.record_flush(pages, runs, self.phases);
                Ok(WritebackReport {
                    pages: Some(pages),
                    bytes: Some(pages * PAGE_SIZE),
                })
            }
            Ok(Written::WholeFile) => {
                metrics.record_flush(0, 0, self.phases);
                Ok(WritebackReport::default())
            }
            Ok(Written::Discarded) => {
                metrics.record_flush(0, 0, self.phases);
                Ok(WritebackReport {
                    pages: Some(0),
                    bytes: Some(0),
                })
            }
            Err(e) => {
                self.tracker.states().redirty(&self.set);
                Err(e)
            }
        }
    }

    /// Counts `took` (an engine's harvest before [`PageTracker::begin_flush`])
    /// as re-arming time.
    pub fn add_rearm(&mut self, took: Duration) {
        self.phases.rearm_ns += ns(took);
    }

    /// Counts `took` as the sync phase (for a flush finished without
    /// [`Self::write_back`]).
    pub fn add_sync(&mut self, took: Duration) {
        self.phases.sync_ns += ns(took);
    }

    /// The tracker the flush was begun on.
    pub fn tracker(&self) -> &'a PageTracker {
        self.tracker
    }

    /// One durable writeback of the flush's pages: `write_run` for each
    /// run (at most [`MAX_RUN_PAGES`]), then fdatasync of `file`. On
    /// failure the pages are dirty again and the error goes back to the
    /// guest. The file is checked for truncation before (so nothing
    /// re-extends it) and after (a truncation racing the I/O must not be
    /// acknowledged as durable).
    pub fn write_back(
        mut self,
        file: &File,
        mut write_run: impl FnMut(Run) -> io::Result<()>,
    ) -> io::Result<WritebackReport> {
        let tracker = self.tracker;
        let set = &self.set;
        if log::log_enabled!(log::Level::Debug) {
            let first: Vec<String> = set
                .runs(MAX_RUN_PAGES)
                .take(8)
                .map(|r| format!("{}+{}", r.first, r.pages))
                .collect();
            log::debug!(
                "writeback: {} dirty pages, runs from {}",
                set.len(),
                first.join(" ")
            );
        }
        let phases = &mut self.phases;
        let result = (|| {
            tracker.check_backing(file)?;
            let started = Instant::now();
            let mut runs = 0;
            for run in set.runs(MAX_RUN_PAGES) {
                write_run(run)?;
                runs += 1;
            }
            let written = Instant::now();
            phases.write_ns = ns(written - started);
            file.sync_data()?;
            phases.sync_ns = ns(written.elapsed());
            tracker.check_backing(file)?;
            Ok(Written::Durable { runs })
        })();
        self.finish(result)
    }
}

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.tracker.states().redirty(&self.set);
        }
    }
}

/// Another program shrank the backing file under the guest: the pages past
/// its end are gone, so the flush must fail rather than claim durability.
pub fn check_not_truncated(file: &File, size: u64) -> io::Result<()> {
    let now = file.metadata()?.len();
    if now < size {
        return Err(BackingLost::Truncated { now, size }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::kernel::start_range_writeback;
    use crate::fault::{temp_file, Access, PageState};
    use std::io::Write;

    #[test]
    fn write_back_visits_runs_and_counts() {
        let (path, mut f) = temp_file("wb", 64 * PAGE_SIZE);
        f.write_all(b"x").unwrap();
        let shared = PageTracker::new(64 * PAGE_SIZE);
        for p in [1, 2, 3, 10] {
            shared.states().mark_dirty(p);
        }
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let mut seen = Vec::new();
        let report = flush
            .write_back(&f, |r| {
                seen.push((r.first, r.pages));
                start_range_writeback(&f, r)
            })
            .unwrap();
        assert_eq!(seen, vec![(1, 3), (10, 1)]);
        assert_eq!(report.pages, Some(4));
        let s = shared.stats("kernel");
        assert_eq!((s.flush.pages, s.flush.runs, s.flush.last_pages), (4, 2, 4));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn truncated_file_fails_the_flush_and_keeps_pages_dirty() {
        let (path, f) = temp_file("trunc", 8 * PAGE_SIZE);
        let shared = PageTracker::new(8 * PAGE_SIZE);
        shared.states().mark_dirty(2);
        f.set_len(4 * PAGE_SIZE).unwrap();
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let err = flush.write_back(&f, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(shared.states().state(2), Some(PageState::Dirty));
        std::fs::remove_file(path).unwrap();
    }

    /// fsyncgate: after a failed writeback the page cache may hold the
    /// pages clean, so the retry must copy them from the guest's memory

    #[test]
    fn failed_write_back_keeps_pages_dirty() {
        let (path, f) = temp_file("wbfail", 8 * PAGE_SIZE);
        let shared = PageTracker::new(8 * PAGE_SIZE);
        shared.states().mark_dirty(4);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let err = flush
            .write_back(&f, |_| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(shared.states().state(4), Some(PageState::Dirty));
        assert_eq!(shared.stats("kernel").flush.pages, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_observer_sees_each_durable_flush_and_no_failed_one() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = PageTracker::new(8 * PAGE_SIZE);
        let log = seen.clone();
        shared.observe_flushes(Box::new(move |set| {
            let pages: Vec<u64> = set
                .runs(8)
                .flat_map(|r| r.first..r.first + r.pages)
                .collect();
            log.lock().unwrap().push(pages);
        }));
        for p in [2, 3, 6] {
            shared.states().mark_dirty(p);
        }
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        flush.finish(Ok(Written::Durable { runs: 2 })).unwrap();
        shared.states().mark_dirty(1);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        flush
            .finish(Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(*seen.lock().unwrap(), vec![vec![2, 3, 6]]);
    }

    fn dirty(shared: &PageTracker) -> Vec<u64> {
        let states = shared.states();
        (0..states.pages())
            .filter(|&p| states.state(p) == Some(PageState::Dirty))
            .collect()
    }

    #[test]
    fn a_flush_cleans_on_success_and_redirties_on_failure() {
        let shared = PageTracker::new(8 * PAGE_SIZE);
        for p in [1, 5] {
            shared.states().mark_dirty(p);
        }
        let mut rearmed = Vec::new();
        let flush = shared
            .begin_flush(|states, set| {
                // Under the lock, the taken pages are clean already.
                assert_eq!(states.state(1), Some(PageState::Clean));
                rearmed.extend((0..8).filter(|&p| set.contains(p)));
                Ok(())
            })
            .unwrap();
        assert_eq!(rearmed, vec![1, 5]);
        assert_eq!(dirty(&shared), Vec::<u64>::new());
        let report = flush.finish(Ok(Written::Durable { runs: 2 })).unwrap();
        assert_eq!((report.pages, report.bytes), (Some(2), Some(2 * PAGE_SIZE)));
        assert_eq!(dirty(&shared), Vec::<u64>::new());
        let s = shared.stats("t");
        assert_eq!((s.flush.pages, s.flush.runs), (2, 2));

        shared.states().mark_dirty(3);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let err = flush.finish(Err(io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(dirty(&shared), vec![3]);
        assert_eq!(shared.stats("t").flush.pages, 2, "a failure is not counted");
    }

    #[test]
    fn a_write_during_a_flush_stays_dirty_whatever_its_outcome() {
        let shared = PageTracker::new(8 * PAGE_SIZE);
        shared.states().mark_dirty(2);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        shared.states().fault(6, Access::Write);
        flush.finish(Ok(Written::Durable { runs: 1 })).unwrap();
        assert_eq!(dirty(&shared), vec![6]);

        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        shared.states().fault(6, Access::Write);
        shared.states().fault(7, Access::Write);
        flush
            .finish(Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(dirty(&shared), vec![6, 7]);
    }

    #[test]
    fn a_failed_rearm_or_an_unfinished_flush_leaves_the_pages_dirty() {
        let shared = PageTracker::new(8 * PAGE_SIZE);
        shared.states().mark_dirty(4);
        let err = shared
            .begin_flush(|_, _| Err(io::Error::from_raw_os_error(libc::EINVAL)))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(dirty(&shared), vec![4]);
        drop(shared.begin_flush(|_, _| Ok(())).unwrap());
        assert_eq!(dirty(&shared), vec![4]);
    }

    #[test]
    fn a_discarded_flush_cleans_and_counts_nothing_written() {
        let shared = PageTracker::new(8 * PAGE_SIZE);
        shared.states().mark_dirty(1);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let report = flush.finish(Ok(Written::Discarded)).unwrap();
        assert_eq!((report.pages, report.bytes), (Some(0), Some(0)));
        assert_eq!(dirty(&shared), Vec::<u64>::new());
        let s = shared.stats("t");
        assert_eq!((s.flush.pages, s.flush.last_pages), (0, 0));
    }
}
