//! The `kernel` engine's flush: KVM populates the guest's pages from the
//! MAP_SHARED file and its dirty log reports first writes; a flush
//! harvests that log and writes back the dirty runs of the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::virtio::pmem::{Writeback, WritebackReport};

use super::file_io::pwrite_all;
use super::{dirty_log, write_back, Flush, PageTracker, Run, Written};

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
            pwrite_all(
                &self.file,
                (self.host as *const u8).add(run.offset() as usize),
                run.bytes() as usize,
                run.offset(),
            )
        }
    }

    pub fn write_back(
        &mut self,
        shared: &PageTracker,
        flush: Flush<'_>,
    ) -> io::Result<WritebackReport> {
        let rewrite = self.rewrite;
        #[cfg(test)]
        let mut fail = std::mem::take(&mut self.fail_next);
        let this = &*self;
        let result = write_back(shared, &this.file, flush, |run| {
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
    pub shared: Arc<PageTracker>,
    pub log: Arc<dirty_log::DirtyLog>,
    /// `None` for discard_writes: the mapping is private, nothing to write.
    pub runs: Option<MappedRuns>,
}

impl Writeback for DirtyLogWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        // The harvest re-arms KVM's catch; every device's lands in its own
        // states, and the flush takes ours.
        self.log.harvest()?;
        let flush = self.shared.begin_flush(|_, _| Ok(()))?;
        match &mut self.runs {
            Some(runs) => runs.write_back(&self.shared, flush),
            // This engine never reported a count for a discarded flush.
            None => flush
                .finish(Ok(Written::Discarded))
                .map(|_| WritebackReport::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{temp_file, PAGE_SIZE};
    use std::os::unix::fs::FileExt;

    #[test]
    fn retry_after_a_failed_write_back_copies_from_guest_memory() {
        let (path, f) = temp_file("rewrite", 8 * PAGE_SIZE);
        // Stands in for the mapping: memory the file's page cache does not
        // share, so only a copy gets its bytes into the file.
        let mut mem = vec![0u8; 8 * PAGE_SIZE as usize];
        mem[3 * PAGE_SIZE as usize..][..5].copy_from_slice(b"guest");
        let shared = PageTracker::new(8 * PAGE_SIZE);
        let mut runs = MappedRuns::new(f.try_clone().unwrap(), mem.as_mut_ptr(), 8 * PAGE_SIZE);
        let page3 = |f: &File| {
            let mut b = [0u8; 5];
            f.read_exact_at(&mut b, 3 * PAGE_SIZE).unwrap();
            b
        };

        shared.states().mark_dirty(3);
        runs.fail_next = true;
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let err = runs.write_back(&shared, flush).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(shared.stats("kernel").dirty_pages, 1);

        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        assert_eq!(runs.write_back(&shared, flush).unwrap().pages, Some(1));
        assert_eq!(&page3(&f), b"guest", "the retry must rewrite the page");
        assert_eq!(shared.stats("kernel").dirty_pages, 0);

        // After a success, back to the page cache: memory is not copied.
        mem[3 * PAGE_SIZE as usize] = b'X';
        shared.states().mark_dirty(3);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        runs.write_back(&shared, flush).unwrap();
        assert_eq!(&page3(&f), b"guest");
        std::fs::remove_file(path).unwrap();
    }
}
