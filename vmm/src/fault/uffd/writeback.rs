//! The flush of the uffd engine: write-protect the dirty pages again (the
//! catch of the next write), then copy them from the mirror to the file.

use std::io;
use std::sync::Arc;

use devices::virtio::pmem::{Writeback, WritebackReport};

use super::mirror::Mirror;
use super::policy::{protect_spans, Region};
use crate::fault::{PageTracker, Written};

pub struct UffdWriteback {
    pub(super) mirror: Arc<Mirror>,
    pub(super) tracker: Arc<PageTracker>,
    pub(super) region: Region,
}

impl Writeback for UffdWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        let Self {
            mirror: m,
            tracker,
            region,
        } = self;
        if region.readonly {
            // Nothing is ever dirty, and the mirror has no write protection.
            return tracker
                .begin_flush(|_, _| Ok(()))?
                .finish(Ok(Written::Discarded));
        }
        // Taking the set and protecting it under one lock: a mkwrite cannot
        // lift the protection of a page this flush just cleaned.
        let mut flush = tracker.begin_flush(|states, set| {
            for (first, pages) in protect_spans(states, set, region.pages) {
                m.protect(first, pages, true).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{}: write-protecting pages {first}..{} for a flush: {e}",
                            m.name,
                            first + pages
                        ),
                    )
                })?;
            }
            Ok(())
        })?;
        // A write from here on faults and is dirty for the next flush; one
        // before the protection is in the mirror and is copied below, or
        // seen by the comparison of the unverified pages here.
        if let Err(e) = flush.skip_unchanged(|page| m.unchanged(page)) {
            return flush.finish(Err(io::Error::new(
                e.kind(),
                format!(
                    "{}: comparing an unverified page with the file: {e}",
                    m.name
                ),
            )));
        }
        if region.discard_writes {
            return flush.finish(Ok(Written::Discarded));
        }
        flush.write_back(&m.file, |run| m.write_run(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::uffd::fixture::*;
    use crate::fault::{PageState, PAGE_SIZE};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn writeback_writes_exactly_the_dirty_pages_and_rearms() {
        let f = Fixture::new("flush", 2 * MIB, 0..512, 16, false, false);
        let mut wb = f.engine.writeback();
        for p in 0..512 {
            f.read(p, 0);
        }
        let dirty = [1, 2, 3, 200, 511];
        for &p in &dirty {
            f.write(p, 10, 0xee);
        }
        assert_eq!(f.stats().faults.mkwrite, 5);
        let report = wb.writeback().unwrap();
        assert_eq!(report.pages, Some(5));
        let s = f.stats();
        assert_eq!((s.flush.pages, s.flush.runs, s.flush.last_pages), (5, 3, 5));
        for p in 0..512 {
            let mut want = vec![pattern(p); PS];
            if dirty.contains(&p) {
                want[10] = 0xee;
            }
            assert!(f.file_page(p) == want, "page {p}");
        }
        assert_eq!(f.shared.states().counts(), (0, 512, 0));

        assert_eq!(wb.writeback().unwrap().pages, Some(0));
        let s = f.stats();
        assert_eq!((s.flush.pages, s.flush.last_pages), (5, 0));

        // The catch is armed again.
        f.write(2, 11, 0xef);
        assert_eq!(f.stats().faults.mkwrite, 6);
        f.write(2, 12, 0xf0);
        assert_eq!(f.stats().faults.mkwrite, 6);
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        assert_eq!((f.file_page(2)[11], f.file_page(2)[12]), (0xef, 0xf0));
        assert_eq!(f.stats().flush.pages, 6);
    }

    #[test]
    fn concurrent_writes_and_flushes_lose_nothing() {
        let f = Arc::new(Fixture::new("stress", 2 * MIB, 0..512, 16, false, false));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Both writers share pages 0..128.
                        let page = x % 128;
                        n += 1;
                        for (i, b) in n.to_le_bytes().iter().enumerate() {
                            f.write(page, w as usize * 8 + i, *b);
                        }
                    }
                    n
                })
            })
            .collect();
        let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flusher = {
            let (f, stop, flushes) = (f.clone(), stop.clone(), flushes.clone());
            std::thread::spawn(move || {
                let mut wb = f.engine.writeback();
                while !stop.load(Ordering::Relaxed) {
                    wb.writeback().unwrap();
                    flushes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // At least 200 ms and 10 flushes, however loaded the machine is.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(200)
            || (flushes.load(Ordering::Relaxed) < 10 && started.elapsed() < Duration::from_secs(5))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|t| t.join().unwrap()).sum();
        flusher.join().unwrap();
        let flushes = flushes.load(Ordering::Relaxed);
        f.engine.writeback().writeback().unwrap();
        let s = f.stats();
        eprintln!(
            "stress: {writes} writes, {flushes} flushes, {} mkwrites, {} pages flushed",
            s.faults.mkwrite, s.flush.pages
        );
        // 128 pages are written: more first writes than that were caught
        // after flushes re-armed the catch.
        assert!(flushes >= 10, "{flushes} flushes");
        assert!(s.faults.mkwrite + s.faults.populate_write > 128, "{s:?}");
        assert!(f.file_all() == f.mirror(), "a write was lost");
        assert_eq!(f.shared.states().counts().2, 0);
    }

    #[test]
    fn discard_writes_never_touch_the_file() {
        let f = Fixture::new("discard", 2 * MIB, 0..256, 16, false, true);
        let before = f.file_all();
        let blocks = f.blocks();
        let mut wb = f.engine.writeback();
        f.write(1, 0, 0x99);
        f.write(300, 0, 0x98);
        assert_eq!(f.read(2, 0), pattern(2));
        let report = wb.writeback().unwrap();
        assert_eq!(report.pages, Some(0));
        assert_eq!(f.stats().flush.pages, 0);
        // Re-armed: the next write is caught again.
        let mkwrite = f.stats().faults.mkwrite;
        f.write(1, 1, 0x97);
        assert_eq!(f.stats().faults.mkwrite, mkwrite + 1);
        wb.writeback().unwrap();
        assert_eq!(
            (f.read(1, 0), f.read(1, 1), f.read(300, 0)),
            (0x99, 0x97, 0x98)
        );
        assert!(f.file_all() == before);
        assert_eq!(f.blocks(), blocks);
    }

    #[test]
    fn truncated_file_is_never_grown_back_and_flushes_fail() {
        let f = Fixture::new("trunc", 2 * MIB, 0..4, 1, false, false);
        let mut wb = f.engine.writeback();
        f.write(1, 0, 0x11);
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        f.file.set_len(2 * PAGE_SIZE).unwrap();
        // Reads past the end are zeroes; first writes there reserve no
        // length: the file stays short.
        assert_eq!(f.read(300, 0), 0);
        f.write(300, 0, 0x22);
        f.write(1, 1, 0x33);
        assert_eq!(f.file.metadata().unwrap().len(), 2 * PAGE_SIZE);
        let err = wb.writeback().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(
            (f.state(1), f.state(300)),
            (PageState::Dirty, PageState::Dirty)
        );
        assert_eq!(f.file.metadata().unwrap().len(), 2 * PAGE_SIZE);
        // Growing it back does not make the lost pages durable.
        f.file.set_len(2 * MIB).unwrap();
        assert!(wb.writeback().is_err());
        let s = f.stats();
        assert!(s.backing_truncated);
        assert_eq!(s.dirty_pages, 2);
    }
}
