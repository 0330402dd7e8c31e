//! Fault servicing for pmem regions: who populates the guest's pages, how the
//! first write to each page is caught (mkwrite), and how a flush writes back
//! exactly the dirty pages and arms the catch again (mkclean).
//!
//! [`pages`] is the engine-independent core. The engines:
//! - `kernel`: KVM populates from the MAP_SHARED file; KVM dirty logging
//!   ([`dirty_log`]) reports first writes.
//! - `prefault`: the same, with the region populated before boot.
//! - [`uffd`]: the VMM serves every fault through userfaultfd.

pub mod dirty_log;
pub mod metrics;
pub mod pages;
pub mod truncation;
pub mod uffd;
pub mod write_through;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::pmem::{Writeback, WritebackReport};

pub use metrics::{FaultMetrics, FaultStats};
pub use pages::{Access, DirtySet, PageState, PageStates, Run, Transition, PAGE_SIZE};
pub use truncation::TruncationGuard;

/// Waits between retries of something the host may give back (disk space,
/// a page): 1 ms doubling to 1 s. Shared by every stall in the VMM.
#[derive(Debug)]
pub struct Backoff {
    next: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(1);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay to wait now; the one after is twice as long, up to 1 s.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Largest single I/O of a writeback: 2 MiB.
pub const MAX_RUN_PAGES: u64 = 512;

/// What an engine's fault path and its flush share: the page states, under
/// one lock so that a state change and the matching (un)protect happen
/// together, and the counters.
#[derive(Debug)]
pub struct EngineShared {
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

impl EngineShared {
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
    shared: &EngineShared,
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

/// Starts writeback of a run of the page cache of a MAP_SHARED file. The
/// fdatasync that follows waits for it and flushes the device cache.
pub fn start_range_writeback(file: &File, run: Run) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            run.offset() as libc::off64_t,
            run.bytes() as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How the kernel and prefault engines get a writeback's runs to the file.
/// Normally `sync_file_range` of the page cache the guest wrote through the
/// MAP_SHARED mapping. After a failed writeback the page cache cannot be
/// trusted: Linux may have marked the pages clean and reported the error
/// once ("fsyncgate"), so a plain retry would write nothing and succeed.
/// The next writeback therefore copies the dirty runs from the mapping with
/// pwrite, which dirties the page cache again.
pub struct MappedRuns {
    file: File,
    /// Start of the file's mapping (the guest's view of the pages); kept as
    /// an integer, only the kernel reads it (pwrite's source).
    host: usize,
    size: u64,
    rewrite: bool,
    /// Test hook: the next writeback's first run fails with EIO.
    #[cfg(test)]
    fail_next: bool,
}

impl MappedRuns {
    /// `host` must be the start of a mapping of `size` bytes (the file's,
    /// except in tests) that outlives `self`.
    pub fn new(file: File, host: *mut u8, size: u64) -> Self {
        Self {
            file,
            host: host as usize,
            size,
            rewrite: false,
            #[cfg(test)]
            fail_next: false,
        }
    }

    /// Copies a run from the mapping to the file.
    fn copy_run(&self, run: Run) -> io::Result<()> {
        if run.offset() + run.bytes() > self.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the run lies inside the mapping, which outlives self. Only
        // the kernel reads it: a page it cannot provide (the file shrank)
        // fails the pwrite with EFAULT instead of raising SIGBUS here.
        unsafe {
            uffd::pwrite_all(
                &self.file,
                (self.host as *const u8).add(run.offset() as usize),
                run.bytes() as usize,
                run.offset(),
            )
        }
    }

    pub fn write_back(
        &mut self,
        shared: &EngineShared,
        set: DirtySet,
    ) -> io::Result<WritebackReport> {
        let rewrite = self.rewrite;
        #[cfg(test)]
        let mut fail = std::mem::take(&mut self.fail_next);
        let this = &*self;
        let result = write_back(shared, &this.file, set, |run| {
            #[cfg(test)]
            if std::mem::take(&mut fail) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if rewrite {
                this.copy_run(run)
            } else {
                start_range_writeback(&this.file, run)
            }
        });
        if result.is_err() && !rewrite && !shared.truncated() {
            log::warn!("the next flush rewrites the dirty pages from guest memory, since the page cache may have dropped them");
        }
        self.rewrite = result.is_err();
        result
    }
}

/// Flush for the kernel and prefault engines: harvest KVM's dirty log into
/// the page states (which re-arms the catch), then write back just those
/// pages of the file.
pub struct DirtyLogWriteback {
    pub shared: Arc<EngineShared>,
    pub log: Arc<dirty_log::DirtyLog>,
    /// `None` for discard_writes: the mapping is private, nothing to write.
    pub runs: Option<MappedRuns>,
}

impl Writeback for DirtyLogWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        self.log.harvest()?;
        let set = {
            // Every device's harvest lands in its own states; take ours.
            self.shared.states().take_dirty()
        };
        match &mut self.runs {
            Some(runs) => runs.write_back(&self.shared, set),
            None => {
                self.shared.metrics.record_flush(0, 0);
                Ok(WritebackReport::default())
            }
        }
    }
}

/// A fresh file of `len` bytes in the temp directory, for the engines'
/// unit tests; the caller removes it.
#[cfg(test)]
pub(crate) fn temp_file(name: &str, len: u64) -> (std::path::PathBuf, File) {
    let path = std::env::temp_dir().join(format!("pmemvm-{name}-{}", std::process::id()));
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(len).unwrap();
    (path, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..12).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 1);
    }

    #[test]
    fn write_back_visits_runs_and_counts() {
        let (path, mut f) = temp_file("wb", 64 * PAGE_SIZE);
        f.write_all(b"x").unwrap();
        let shared = EngineShared::new(64 * PAGE_SIZE);
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
        let shared = EngineShared::new(8 * PAGE_SIZE);
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
    /// rather than trust sync_file_range to find them dirty.
    #[test]
    fn retry_after_a_failed_write_back_copies_from_guest_memory() {
        let (path, f) = temp_file("rewrite", 8 * PAGE_SIZE);
        // Stands in for the mapping: memory the file's page cache does not
        // share, so only a copy gets its bytes into the file.
        let mut mem = vec![0u8; 8 * PAGE_SIZE as usize];
        mem[3 * PAGE_SIZE as usize..][..5].copy_from_slice(b"guest");
        let shared = EngineShared::new(8 * PAGE_SIZE);
        let mut runs = MappedRuns::new(f.try_clone().unwrap(), mem.as_mut_ptr(), 8 * PAGE_SIZE);
        let page3 = |f: &File| {
            let mut b = [0u8; 5];
            f.read_exact_at(&mut b, 3 * PAGE_SIZE).unwrap();
            b
        };

        shared.states().mark_dirty(3);
        runs.fail_next = true;
        let set = shared.states().take_dirty();
        let err = runs.write_back(&shared, set).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(shared.stats("kernel").dirty_pages, 1);

        let set = shared.states().take_dirty();
        assert_eq!(runs.write_back(&shared, set).unwrap().pages, Some(1));
        assert_eq!(&page3(&f), b"guest", "the retry must rewrite the page");
        assert_eq!(shared.stats("kernel").dirty_pages, 0);

        // After a success, back to the page cache: memory is not copied.
        mem[3 * PAGE_SIZE as usize] = b'X';
        shared.states().mark_dirty(3);
        let set = shared.states().take_dirty();
        runs.write_back(&shared, set).unwrap();
        assert_eq!(&page3(&f), b"guest");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn failed_write_back_keeps_pages_dirty() {
        let (path, f) = temp_file("wbfail", 8 * PAGE_SIZE);
        let shared = EngineShared::new(8 * PAGE_SIZE);
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
