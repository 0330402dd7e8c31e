//! The `mirror` engine: the kernel engine's design on a memfd mirror of the
//! file. At start the mirror is filled with the file's data (its holes stay
//! holes); the memslot maps the mirror, so KVM populates the guest's pages
//! from it itself and its dirty log catches first writes; a flush harvests
//! that log and copies exactly the dirty pages from the mirror to the file
//! with pwrite, then fdatasync.
//!
//! Why not the file's own mapping, as the kernel engine does: writeback
//! cleans each written page of a mapped file (folio_mkclean), which fires
//! KVM's MMU notifier for it; KVM zaps that page's mapping and kicks the
//! running vCPU, one page at a time, so a flush of N pages costs the guest
//! about N exits. Here writeback only ever sees the file's page cache,
//! which no guest maps; the dirty log re-arms its catch with one harvest.
//!
//! The price is memory: the device's data is held twice, once in the
//! mirror (shmem, which only swap can take back) and once in the file's
//! page cache (clean after a flush, so the host can reclaim it). Blocks of
//! the file are allocated when a flush writes them, not when the guest
//! first writes a page (the mirror needs none): on a full file system the
//! guest's writes go on, and its flushes fail (the guest sees EIO) with
//! their pages kept dirty until space returns.
//!
//! KVM's log of a shmem mapping also reports the guest's first read of a
//! page (KVM maps the page writable, as shmem has it writable in the host's
//! page table, and logs it): the first report of each page is compared
//! with the file at the flush and skipped when it is unchanged, so reads
//! are not written back and holes the guest only read stay holes.
//!
//! Emulated accesses (a store the CPL0 emulator of a nested host could not
//! complete in host memory comes back as an MMIO exit) read and write the
//! mirror, never the file: the guest must read back what it wrote.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::BusDevice;
use devices::virtio::pmem::{PmemBacking, Writeback, WritebackReport};

use super::dirty_log::{DirtyLog, ReadsLogged};
use super::engine::{FaultEngine, Memslot};
use super::memfd::MemfdMap;
use super::write_through::PmemWriteThrough;
use super::{Flush, PageTracker, Written};

/// The mirror engine of one device.
pub struct MirrorEngine {
    tracker: Arc<PageTracker>,
    map: Arc<MemfdMap>,
    /// KVM's dirty log, when the guest's writes reach the file.
    log: Option<Arc<DirtyLog>>,
    /// A dup of the backing file, for the flush.
    file: File,
    path: String,
    readonly: bool,
}

impl MirrorEngine {
    /// Creates the mirror of `backing` and fills it from the file; `log` is
    /// the VM's dirty log (required if [`PmemBacking::writes_reach_file`]), and `slot`
    /// the region's memslot.
    pub fn start(
        name: &str,
        backing: &PmemBacking,
        slot: u32,
        log: Option<&Arc<DirtyLog>>,
        tracker: Arc<PageTracker>,
    ) -> io::Result<Self> {
        let path = backing.path().display().to_string();
        let size = backing.size();
        let log = if backing.writes_reach_file() {
            Some(log.cloned().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name}: the mirror engine needs KVM's dirty log"),
                )
            })?)
        } else {
            None
        };
        let map = MemfdMap::new(name, size, false)?;
        let started = Instant::now();
        let copied = map.fill_from(backing.file())?;
        log::info!(
            "{name}: mirror of {path} filled in {:.1} ms: {:.1} MiB of data copied, holes left unallocated ({} MiB device)",
            started.elapsed().as_secs_f64() * 1e3,
            copied as f64 / (1 << 20) as f64,
            size >> 20
        );
        if backing.readonly() {
            map.protect_read_only()?;
        }
        // KVM maps a shmem page writable for a guest read, and logs it.
        if let Some(log) = &log {
            log.track(slot, size, tracker.clone(), ReadsLogged::Maybe);
        }
        Ok(Self {
            tracker,
            map: Arc::new(map),
            log,
            file: backing.file().try_clone()?,
            path,
            readonly: backing.readonly(),
        })
    }
}

impl FaultEngine for MirrorEngine {
    fn name(&self) -> &'static str {
        "mirror"
    }

    fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
    }

    /// The guest sees the mirror, not the file's mapping.
    fn memslot(&self) -> Memslot {
        Memslot::new(self.map.base() as u64, self.readonly, self.log.is_some())
    }

    fn writeback(&self) -> io::Result<Box<dyn Writeback>> {
        Ok(match &self.log {
            Some(log) => Box::new(MirrorWriteback {
                tracker: self.tracker.clone(),
                log: log.clone(),
                runs: MirrorRuns::new(self.map.clone(), self.file.try_clone()?),
            }),
            None => Box::new(DiscardWriteback {
                tracker: self.tracker.clone(),
            }),
        })
    }

    /// Emulated loads and stores go to the mirror, where the guest's data
    /// is; a store dirties its pages (with discard_writes, for a flush that
    /// drops them).
    fn emulated_access(&self) -> io::Result<Option<Arc<Mutex<dyn BusDevice>>>> {
        if self.readonly {
            // The read-only region on the bus serves these.
            return Ok(None);
        }
        Ok(Some(Arc::new(Mutex::new(PmemWriteThrough::new(
            self.map.memfd().try_clone()?,
            format!("{} (mirror)", self.path),
            self.map.size(),
            self.tracker.clone(),
            None,
        )))))
    }
}

/// The flush of a mirror engine whose writes reach the file: harvest KVM's
/// dirty log into the page states (which re-arms the catch), then copy
/// those pages from the mirror to the file.
pub struct MirrorWriteback {
    tracker: Arc<PageTracker>,
    log: Arc<DirtyLog>,
    runs: MirrorRuns,
}

impl Writeback for MirrorWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        let flush = self.log.begin_flush(&self.tracker)?;
        self.runs.write_back(flush)
    }
}

/// How a flush's pages get from the mirror to the file.
struct MirrorRuns {
    map: Arc<MemfdMap>,
    file: File,
    /// The last writeback failed.
    failed: bool,
    /// Test hook: the next writeback's first run fails with EIO.
    #[cfg(test)]
    fail_next: bool,
}

impl MirrorRuns {
    fn new(map: Arc<MemfdMap>, file: File) -> Self {
        Self {
            map,
            file,
            failed: false,
            #[cfg(test)]
            fail_next: false,
        }
    }

    fn write_back(&mut self, flush: Flush<'_>) -> io::Result<WritebackReport> {
        let result = self.copy(flush);
        self.failed = result.is_err();
        result
    }

    fn copy(&mut self, mut flush: Flush<'_>) -> io::Result<WritebackReport> {
        let (map, file) = (&self.map, &self.file);
        // A page whose first report may have been the guest's read of it
        // is unverified: if it equals the file's page, it needs no writing
        // (and a read of a hole allocates no blocks). With one exception:
        // after a failed writeback the file's page cache may hold pages
        // clean that never reached the disk (Linux marks them clean when it
        // reports the error, "fsyncgate"), and they would compare equal, so
        // the flush after a failure compares nothing. Beyond that no
        // rewrite mode is needed, unlike the kernel engine's: the source of
        // every copy is the mirror, not the page cache, so a retry of the
        // redirtied pages copies them again and dirties the page cache anew.
        if !self.failed {
            if let Err(e) = flush.skip_unchanged(|page| map.unchanged(file, page)) {
                return flush.finish(Err(io::Error::new(
                    e.kind(),
                    format!("comparing a logged page with the file: {e}"),
                )));
            }
        }
        #[cfg(test)]
        let mut fail = std::mem::take(&mut self.fail_next);
        flush.write_back(file, |run| {
            #[cfg(test)]
            if std::mem::take(&mut fail) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            map.write_run(file, run)
        })
    }
}

/// The flush of a read-only or discard_writes device: takes the pages of
/// emulated stores (discard_writes) and writes nothing.
struct DiscardWriteback {
    tracker: Arc<PageTracker>,
}

impl Writeback for DiscardWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        self.tracker
            .begin_flush(|_, _| Ok(()))?
            .finish(Ok(Written::Discarded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{temp_file, PageState, PAGE_SIZE};
    use std::os::unix::fs::FileExt;

    const PS: usize = PAGE_SIZE as usize;
    const PAGES: u64 = 512;

    /// A 2 MiB file whose pages 0..16 hold `old`, its filled mirror, and
    /// the tracker and runs of a mirror engine on it.
    struct Fixture {
        path: std::path::PathBuf,
        file: File,
        map: Arc<MemfdMap>,
        tracker: Arc<PageTracker>,
        runs: MirrorRuns,
    }

    fn old(page: u64) -> [u8; PS] {
        [page as u8 + 1; PS]
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let (path, file) = temp_file(&format!("mirror-{name}"), PAGES * PAGE_SIZE);
            for p in 0..16 {
                file.write_all_at(&old(p), p * PAGE_SIZE).unwrap();
            }
            let map = Arc::new(MemfdMap::new(name, PAGES * PAGE_SIZE, false).unwrap());
            map.fill_from(&file).unwrap();
            let runs = MirrorRuns::new(map.clone(), file.try_clone().unwrap());
            Self {
                path,
                file,
                map,
                tracker: PageTracker::new(PAGES * PAGE_SIZE),
                runs,
            }
        }

        /// A guest write to the mirror, which KVM's log reports.
        fn guest_write(&self, page: u64, byte: u8, reads_logged: bool) {
            self.map
                .memfd()
                .write_all_at(&[byte; 8], page * PAGE_SIZE)
                .unwrap();
            self.log(page, reads_logged);
        }

        fn log(&self, page: u64, reads_logged: bool) {
            let mut states = self.tracker.states();
            if reads_logged {
                states.mark_maybe_written(page);
            } else {
                states.mark_dirty(page);
            }
        }

        fn flush(&mut self) -> io::Result<WritebackReport> {
            let flush = self.tracker.begin_flush(|_, _| Ok(())).unwrap();
            self.runs.write_back(flush)
        }

        fn file_page(&self, page: u64) -> Vec<u8> {
            let mut b = vec![0u8; PS];
            self.file.read_exact_at(&mut b, page * PAGE_SIZE).unwrap();
            b
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn writeback_copies_exactly_the_dirty_pages_from_the_mirror() {
        let mut f = Fixture::new("exact");
        // Another program's bytes in the file (this engine is the only
        // writer, but the flush must not copy from the file anyway): the
        // flush puts the mirror's page over them.
        f.file.write_all_at(b"stale", 3 * PAGE_SIZE).unwrap();
        for (page, byte) in [(3, 0xa3), (4, 0xa4), (300, 0xb0)] {
            f.guest_write(page, byte, false);
        }
        // Written to the mirror but not logged: not this flush's business.
        f.map
            .memfd()
            .write_all_at(&[0xcc; 8], 5 * PAGE_SIZE)
            .unwrap();
        let report = f.flush().unwrap();
        assert_eq!(report.pages, Some(3));
        let s = f.tracker.stats("mirror");
        assert_eq!((s.flush.pages, s.flush.runs, s.dirty_pages), (3, 2, 0));
        for page in 0..PAGES {
            let mut want = if page < 16 {
                old(page).to_vec()
            } else {
                vec![0; PS]
            };
            match page {
                3 => want[..8].fill(0xa3),
                4 => want[..8].fill(0xa4),
                300 => want[..8].fill(0xb0),
                _ => {}
            }
            assert!(f.file_page(page) == want, "page {page}");
        }
        // Nothing dirty: nothing written, and the file keeps its holes.
        assert_eq!(f.flush().unwrap().pages, Some(0));
        let holes = data_extents_pages(&f.file);
        assert!(holes.iter().all(|&p| p < 16 || p == 300), "{holes:?}");
    }

    fn data_extents_pages(file: &File) -> Vec<u64> {
        crate::fault::file_io::data_extents(file, 0, PAGES * PAGE_SIZE)
            .flat_map(|r| r.start / PAGE_SIZE..r.end.div_ceil(PAGE_SIZE))
            .collect()
    }

    #[test]
    fn a_failed_write_leaves_the_pages_dirty_and_the_retry_copies_them() {
        let mut f = Fixture::new("fail");
        f.guest_write(2, 0x22, false);
        f.guest_write(9, 0x99, false);
        f.runs.fail_next = true;
        let err = f.flush().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(f.tracker.states().state(2), Some(PageState::Dirty));
        assert_eq!(f.tracker.states().state(9), Some(PageState::Dirty));
        let s = f.tracker.stats("mirror");
        assert_eq!((s.flush.pages, s.dirty_pages), (0, 2));
        assert_eq!(f.file_page(2), old(2).to_vec());
        // The retry copies from the mirror again.
        assert_eq!(f.flush().unwrap().pages, Some(2));
        assert_eq!(
            (&f.file_page(2)[..8], f.file_page(2)[8]),
            (&[0x22; 8][..], 3)
        );
        assert_eq!(f.file_page(9)[0], 0x99);
        assert_eq!(f.tracker.stats("mirror").dirty_pages, 0);
    }

    #[test]
    fn logged_reads_are_compared_and_skipped_except_after_a_failure() {
        let mut f = Fixture::new("compare");
        f.guest_write(1, 0x11, true);
        f.log(6, true); // only read
        f.log(200, true); // only read, a hole of the file
        assert_eq!(f.flush().unwrap().pages, Some(1));
        let s = f.tracker.stats("mirror");
        assert_eq!((s.flush.pages, s.flush.unchanged_skipped), (1, 2));
        assert_eq!(f.file_page(1)[0], 0x11);
        assert!(
            !data_extents_pages(&f.file).contains(&200),
            "a read allocated blocks"
        );

        // A failed flush: the page cache may now hold page 7 clean without
        // the disk having it (fsyncgate). Here the copy fails before
        // writing, so put the page there as that failure would have.
        f.guest_write(7, 0x77, true);
        f.runs.fail_next = true;
        f.flush().unwrap_err();
        let mut page7 = vec![0u8; PS];
        f.map
            .memfd()
            .read_exact_at(&mut page7, 7 * PAGE_SIZE)
            .unwrap();
        f.file.write_all_at(&page7, 7 * PAGE_SIZE).unwrap();
        // The next flush compares nothing: page 7 is written again.
        assert_eq!(f.flush().unwrap().pages, Some(1));
        let s = f.tracker.stats("mirror");
        assert_eq!((s.flush.pages, s.flush.unchanged_skipped), (2, 2));
        // After that success, comparing is back.
        f.log(8, true);
        assert_eq!(f.flush().unwrap().pages, Some(0));
        assert_eq!(f.tracker.stats("mirror").flush.unchanged_skipped, 3);
    }

    fn backing(name: &str, options: &str) -> (std::path::PathBuf, PmemBacking) {
        let (path, file) = temp_file(&format!("mirror-{name}"), 2 << 20);
        file.write_all_at(b"on file", 5 * PAGE_SIZE).unwrap();
        let config = format!("file={},engine=mirror{options}", path.display())
            .parse()
            .unwrap();
        (path, PmemBacking::open(&config).unwrap())
    }

    #[test]
    fn emulated_stores_go_to_the_mirror_and_discard_writes_never_reaches_the_file() {
        let (path, b) = backing("discard", ",discard_writes=on");
        let engine =
            MirrorEngine::start("discard", &b, 3, None, PageTracker::new(b.size())).unwrap();
        let slot = engine.memslot();
        assert_eq!(slot.flags, 0, "no dirty log, writable");
        assert_eq!(slot.host, engine.map.base() as u64);
        let region = engine.emulated_access().unwrap().unwrap();
        let mut region = region.lock().unwrap();
        let mut got = [0u8; 7];
        region.read(5 * PAGE_SIZE, &mut got);
        assert_eq!(&got, b"on file", "the mirror was filled");
        region.write(5 * PAGE_SIZE, b"guest");
        region.read(5 * PAGE_SIZE, &mut got);
        assert_eq!(&got, b"guestle", "read back from the mirror");
        assert_eq!(engine.tracker().states().state(5), Some(PageState::Dirty));
        // Guest-controlled offsets out of range: ignored, no panic.
        region.write(u64::MAX - 1, b"xx");
        region.read(2 << 20, &mut got);
        drop(region);
        let report = engine.writeback().unwrap().writeback().unwrap();
        assert_eq!(report.pages, Some(0));
        assert_eq!(engine.tracker().stats("mirror").dirty_pages, 0);
        let mut on_file = [0u8; 7];
        b.file().read_exact_at(&mut on_file, 5 * PAGE_SIZE).unwrap();
        assert_eq!(&on_file, b"on file");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_read_only_device_maps_a_read_only_mirror() {
        let (path, b) = backing("ro", ",readonly=on");
        let engine = MirrorEngine::start("ro", &b, 3, None, PageTracker::new(b.size())).unwrap();
        assert_eq!(engine.memslot().flags, kvm_bindings::KVM_MEM_READONLY);
        assert!(engine.emulated_access().unwrap().is_none());
        let mut got = [0u8; 7];
        engine
            .map
            .memfd()
            .read_exact_at(&mut got, 5 * PAGE_SIZE)
            .unwrap();
        assert_eq!(&got, b"on file");
        assert_eq!(
            engine.writeback().unwrap().writeback().unwrap().pages,
            Some(0)
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_writable_device_without_a_dirty_log_is_refused() {
        let (path, b) = backing("nolog", "");
        let err = MirrorEngine::start("nolog", &b, 3, None, PageTracker::new(b.size()))
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        std::fs::remove_file(path).unwrap();
    }
}
