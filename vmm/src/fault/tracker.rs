//! The one owner of a device's page state: what a fault and a flush do to
//! it, and the durable writeback of a dirty set.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::pmem::WritebackReport;

use super::{DirtySet, FaultMetrics, FaultStats, PageStates, Run, PAGE_SIZE};

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
        })
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

/// One durable writeback of `set`: `write_run` for each run (at most
/// [`MAX_RUN_PAGES`]), then fdatasync. On failure the pages are dirty again
/// and the error goes back to the guest. The file is checked for truncation
/// before (so nothing re-extends it) and after (a truncation racing the I/O
/// must not be acknowledged as durable).
pub fn write_back(
    shared: &PageTracker,
    file: &File,
    set: DirtySet,
    mut write_run: impl FnMut(Run) -> io::Result<()>,
) -> io::Result<WritebackReport> {
    let pages = set.len();
    let mut runs = 0;
    if log::log_enabled!(log::Level::Debug) {
        let first: Vec<String> = set
            .runs(MAX_RUN_PAGES)
            .take(8)
            .map(|r| format!("{}+{}", r.first, r.pages))
            .collect();
        log::debug!(
            "writeback: {pages} dirty pages, runs from {}",
            first.join(" ")
        );
    }
    let result = (|| {
        shared.check_backing(file)?;
        for run in set.runs(MAX_RUN_PAGES) {
            write_run(run)?;
            runs += 1;
        }
        file.sync_data()?;
        shared.check_backing(file)
    })();
    match result {
        Ok(()) => {
            shared.metrics.record_flush(pages, runs);
            Ok(WritebackReport {
                pages: Some(pages),
                bytes: Some(pages * PAGE_SIZE),
            })
        }
        Err(e) => {
            shared.states().redirty(&set);
            Err(e)
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
    use crate::fault::{temp_file, PageState};
    use std::io::Write;

    #[test]
    fn write_back_visits_runs_and_counts() {
        let (path, mut f) = temp_file("wb", 64 * PAGE_SIZE);
        f.write_all(b"x").unwrap();
        let shared = PageTracker::new(64 * PAGE_SIZE);
        for p in [1, 2, 3, 10] {
            shared.states().mark_dirty(p);
        }
        let set = shared.states().take_dirty();
        let mut seen = Vec::new();
        let report = write_back(&shared, &f, set, |r| {
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
        let set = shared.states().take_dirty();
        let err = write_back(&shared, &f, set, |_| Ok(())).unwrap_err();
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
        let set = shared.states().take_dirty();
        let err = write_back(&shared, &f, set, |_| {
            Err(io::Error::from_raw_os_error(libc::EIO))
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(shared.states().state(4), Some(PageState::Dirty));
        assert_eq!(shared.stats("kernel").flush.pages, 0);
        std::fs::remove_file(path).unwrap();
    }
}
