//! The uffd engine's test fixture: a patterned sparse file and an engine
//! on it, with raw accessors to the mirror.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;

use super::{UffdEngine, UffdTuning};
use crate::fault::{FaultStats, PageState, PageTracker, PAGE_SIZE};

pub(super) const MIB: u64 = 1 << 20;
pub(super) const PS: usize = PAGE_SIZE as usize;

/// A temporary file, removed on drop.
pub(super) struct Temp(pub(super) PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The byte every page `page` of a patterned file is filled with.
pub(super) fn pattern(page: u64) -> u8 {
    (page.wrapping_mul(7) % 251 + 1) as u8
}

pub(super) struct Fixture {
    pub(super) engine: Arc<UffdEngine>,
    pub(super) shared: Arc<PageTracker>,
    /// The test's own handle on the file.
    pub(super) file: File,
    _temp: Temp,
}

impl Fixture {
    /// A `size`-byte sparse file; `data` pages get the pattern.
    pub(super) fn new(
        name: &str,
        size: u64,
        data: impl IntoIterator<Item = u64>,
        populate: u16,
        readonly: bool,
        discard_writes: bool,
    ) -> Self {
        let tuning = UffdTuning {
            populate,
            ..UffdTuning::default()
        };
        Self::tuned(name, size, data, tuning, readonly, discard_writes)
    }

    pub(super) fn tuned(
        name: &str,
        size: u64,
        data: impl IntoIterator<Item = u64>,
        tuning: UffdTuning,
        readonly: bool,
        discard_writes: bool,
    ) -> Self {
        let (path, file) = crate::fault::temp_file(&format!("uffd-{name}"), size);
        let temp = Temp(path.clone());
        for p in data {
            file.write_all_at(&[pattern(p); PS], p * PAGE_SIZE).unwrap();
        }
        file.sync_all().unwrap();
        let engine_file = if readonly || discard_writes {
            File::open(&path).unwrap()
        } else {
            file.try_clone().unwrap()
        };
        let shared = PageTracker::new(size);
        let engine = UffdEngine::start(
            name,
            engine_file,
            size,
            readonly,
            discard_writes,
            tuning,
            shared.clone(),
        )
        .expect("userfaultfd must work on this machine (see PLATFORM.md)");
        Self {
            engine,
            shared,
            file,
            _temp: temp,
        }
    }

    pub(super) fn ptr(&self, page: u64, offset: usize) -> *mut u8 {
        assert!(page < self.engine.size() / PAGE_SIZE && offset < PS);
        // SAFETY: inside the mirror.
        unsafe { self.engine.host_addr().add(page as usize * PS + offset) }
    }

    pub(super) fn read(&self, page: u64, offset: usize) -> u8 {
        // SAFETY: inside the live mirror; a raw volatile read.
        unsafe { self.ptr(page, offset).read_volatile() }
    }

    pub(super) fn write(&self, page: u64, offset: usize, value: u8) {
        // SAFETY: inside the live, writable mirror; a raw volatile write.
        unsafe { self.ptr(page, offset).write_volatile(value) }
    }

    /// The counters, once the handler has finished the last fault: it
    /// counts faults before it releases the states lock.
    pub(super) fn stats(&self) -> FaultStats {
        drop(self.shared.states());
        self.shared.stats("uffd")
    }

    pub(super) fn state(&self, page: u64) -> PageState {
        self.shared.states().state(page).unwrap()
    }

    pub(super) fn blocks(&self) -> u64 {
        self.file.metadata().unwrap().blocks()
    }

    pub(super) fn file_page(&self, page: u64) -> Vec<u8> {
        let mut buf = vec![0; PS];
        self.file.read_exact_at(&mut buf, page * PAGE_SIZE).unwrap();
        buf
    }

    pub(super) fn mirror(&self) -> Vec<u8> {
        let size = self.engine.size() as usize;
        let mut buf = vec![0; size];
        // SAFETY: the whole mirror; no thread writes it any more.
        unsafe { std::ptr::copy_nonoverlapping(self.engine.host_addr(), buf.as_mut_ptr(), size) };
        buf
    }

    pub(super) fn file_all(&self) -> Vec<u8> {
        let mut buf = vec![0; self.engine.size() as usize];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }
}
