//! Guest stores to a writable pmem region that KVM could not put in host
//! memory. On nested shadow-paging hosts guest-kernel code is emulated, and
//! when the host cannot back the page (its filesystem is full), the emulated
//! store comes back as an MMIO exit at the pmem address. Dropping it would
//! lose data the guest believes written; instead the vCPU writes it to the
//! file itself, waiting while the filesystem is full, and marks the page
//! dirty for the next flush. An access past the end of a file that another
//! program shrank goes to the [`TruncationGuard`]'s overlay instead: writing
//! the file there would grow it back.
//!
//! The mirror engine uses it on its memfd rather than the file: the guest's
//! data is in the mirror, and a flush copies the dirtied pages on.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::BusDevice;
use devices::ratelimit::LogLimiter;

use super::{Backoff, PageTracker, TruncationGuard, PAGE_SIZE};

pub struct PmemWriteThrough {
    file: File,
    path: String,
    size: u64,
    shared: Arc<PageTracker>,
    guard: Option<Arc<TruncationGuard>>,
    warn: LogLimiter,
}

impl PmemWriteThrough {
    pub fn new(
        file: File,
        path: String,
        size: u64,
        shared: Arc<PageTracker>,
        guard: Option<Arc<TruncationGuard>>,
    ) -> Self {
        Self {
            file,
            path,
            size,
            shared,
            guard,
            warn: LogLimiter::new(4, 10_000),
        }
    }

    fn in_range(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.size)
    }

    /// Retries `op` until it succeeds; ENOSPC (and any other error) waits
    /// with backoff, logged once per episode.
    fn retry(&self, what: &str, offset: u64, mut op: impl FnMut() -> io::Result<()>) {
        let mut backoff = Backoff::new();
        let mut since: Option<Instant> = None;
        loop {
            match op() {
                Ok(()) => break,
                Err(e) => {
                    if since.is_none() {
                        since = Some(Instant::now());
                        self.shared.metrics.stalls.fetch_add(1, Relaxed);
                        log::warn!(
                            "pmem {}: guest {what} at offset {offset:#x} failed: {e}; the vCPU waits and retries",
                            self.path
                        );
                    }
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
        if let Some(t) = since {
            log::warn!(
                "pmem {}: guest {what} at offset {offset:#x} done after waiting {:?}",
                self.path,
                t.elapsed()
            );
        }
    }
}

impl BusDevice for PmemWriteThrough {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.in_range(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        if let Some(guard) = &self.guard {
            match guard.load_past_eof(offset, data) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    if self.warn.allow() {
                        log::warn!("pmem {}: read at {offset:#x}: {e}", self.path);
                    }
                }
            }
        }
        // A short read past the file's end (truncated) reads as zeroes.
        if let Err(e) = self.file.read_exact_at(data, offset) {
            data.fill(0);
            if self.warn.allow() {
                log::warn!("pmem {}: read at {offset:#x}: {e}", self.path);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !self.in_range(offset, data.len()) {
            return;
        }
        let file = &self.file;
        let guard = self.guard.as_deref();
        self.retry("store", offset, || {
            if let Some(g) = guard {
                if g.store_past_eof(offset, data)? {
                    return Ok(());
                }
            }
            file.write_all_at(data, offset)
        });
        let mut states = self.shared.states();
        let last = offset + data.len().max(1) as u64 - 1;
        for page in offset / PAGE_SIZE..=last / PAGE_SIZE {
            states.mark_dirty(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reach_the_file_and_dirty_their_pages() {
        let (path, f) = super::super::temp_file("wt", 4 * PAGE_SIZE);
        let shared = PageTracker::new(4 * PAGE_SIZE);
        let mut region = PmemWriteThrough::new(
            f.try_clone().unwrap(),
            "t".into(),
            4 * PAGE_SIZE,
            shared.clone(),
            None,
        );
        // A store straddling pages 1 and 2.
        region.write(2 * PAGE_SIZE - 4, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut back = [0u8; 8];
        region.read(2 * PAGE_SIZE - 4, &mut back);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut on_disk = [0u8; 8];
        f.read_exact_at(&mut on_disk, 2 * PAGE_SIZE - 4).unwrap();
        assert_eq!(on_disk, back);
        let set = shared.states().take_dirty();
        assert_eq!(
            (0..4).filter(|&p| set.contains(p)).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // Out of range: ignored, never panics.
        region.write(u64::MAX - 2, &[1, 2, 3, 4]);
        let mut far = [0u8; 4];
        region.read(4 * PAGE_SIZE, &mut far);
        assert_eq!(far, [0xff; 4]);
        std::fs::remove_file(path).unwrap();
    }
}
