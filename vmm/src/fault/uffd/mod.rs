//! The `uffd` engine: the VMM serves every guest fault on a pmem region
//! itself, through userfaultfd.
//!
//! The guest sees a memfd mirror of the backing file (the VMM puts
//! [`UffdEngine::host_addr`] in the memslot). The mirror is registered with
//! userfaultfd in MISSING|WP mode (MISSING only for read-only devices), and
//! one servicer thread per device serves the faults:
//! - MISSING at page p: the `populate` block around p is loaded from the
//!   file (holes as zeroes, without allocating host blocks) and inserted
//!   with UFFDIO_COPY, write-protected so the first write is caught. A write
//!   fault reserves p's blocks first and inserts p writable and dirty
//!   (PopulateWrite, vm_insert_mixed_mkwrite in seeds 003).
//! - WP at a clean page: reserve its blocks (page_mkwrite, seeds 004), mark
//!   it dirty and lift the protection, which wakes the writer (Mkwrite).
//!
//! A flush takes the dirty set and write-protects it again under the states
//! lock, then copies those pages from the mirror to the file and fdatasyncs.
//!
//! Invariants, each kept under the [`PageTracker`] states lock together
//! with the ioctl that makes it true in the mirror:
//! - Absent <=> not in the mirror: only the servicer thread inserts pages.
//! - Clean => write-protected: the next write faults.
//! - Dirty => writable, except after a failed writeback re-dirtied a page
//!   that the flush had already protected; its next write then faults and
//!   is served as AlreadyDone (a superset of dirty pages is always safe).
//!
//! The parts: [`policy`] decides (pure, tested without userfaultfd),
//! `mirror` owns the memfd mirror and its ioctls, `servicer` is the thread
//! that carries the decisions out, `load` reads a block from the file, and
//! `writeback` is the flush.

#[cfg(test)]
mod fixture;
mod load;
mod mirror;
pub mod policy;
mod servicer;
mod writeback;

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::virtio::pmem::Writeback;

use load::Block;
use mirror::Mirror;
use policy::Region;
use servicer::Servicer;
pub use writeback::UffdWriteback;

use super::engine::{FaultEngine, Memslot};
use super::{PageTracker, PAGE_SIZE};
use crate::worker::StopEvent;

/// Largest `populate`: one 2 MiB block per fault (checked when `--pmem` is
/// parsed; again here for other callers).
pub use devices::virtio::pmem::MAX_POPULATE;

/// How the fault servicer trades CPU for latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdTuning {
    /// Pages inserted per missing fault (1..=512).
    pub populate: u16,
    /// How long the servicer keeps polling for the next fault after one,
    /// before it sleeps in poll(2). A vCPU whose fault arrives in that
    /// window skips the servicer's wake-up, the larger part of a fault's
    /// cost on a nested host; the servicer's CPU is busy meanwhile.
    pub poll: Duration,
}

impl Default for UffdTuning {
    fn default() -> Self {
        Self {
            populate: devices::virtio::pmem::DEFAULT_POPULATE,
            poll: Duration::ZERO,
        }
    }
}

/// The `uffd` fault engine of one pmem device.
pub struct UffdEngine {
    mirror: Arc<Mirror>,
    tracker: Arc<PageTracker>,
    region: Region,
    /// In the servicer's poll set.
    stop: StopEvent,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UffdEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdEngine")
            .field("name", &self.mirror.name)
            .field("path", &self.mirror.path)
            .field("size", &self.mirror.map.size())
            .field("populate", &self.region.populate)
            .finish()
    }
}

impl UffdEngine {
    /// Creates the memfd mirror of `file` (a dup the engine owns), registers
    /// it with userfaultfd and starts the servicer thread `uffd-<name>`.
    /// `size` is a multiple of the page size (2 MiB for pmem); `tuning`
    /// sets the pages inserted per missing fault and the polling window.
    /// `readonly`: MISSING only, the mirror is mapped read-only.
    /// `discard_writes`: the file is read but never written.
    pub fn start(
        name: &str,
        file: File,
        size: u64,
        readonly: bool,
        discard_writes: bool,
        tuning: UffdTuning,
        tracker: Arc<PageTracker>,
    ) -> io::Result<Arc<UffdEngine>> {
        let UffdTuning { populate, poll } = tuning;
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || usize::try_from(size).is_err() {
            return Err(invalid(format!(
                "{name}: size {size:#x} is not a page multiple"
            )));
        }
        if !(1..=MAX_POPULATE).contains(&populate) {
            return Err(invalid(format!(
                "{name}: populate={populate}: expected 1 to {MAX_POPULATE} pages"
            )));
        }
        let pages = size / PAGE_SIZE;
        if tracker.states().pages() != pages {
            return Err(invalid(format!(
                "{name}: the page states are for {} pages, the region has {pages}",
                tracker.states().pages()
            )));
        }
        let mirror = Arc::new(Mirror::new(name, file, size, readonly)?);
        let stop = StopEvent::new()?;
        let region = Region {
            pages,
            populate: u64::from(populate),
            readonly,
            discard_writes,
        };
        let servicer = Servicer {
            m: mirror.clone(),
            tracker: tracker.clone(),
            region,
            poll,
            stop: stop.try_clone()?,
            block: Block::new()?,
            no_reserve: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("uffd-{name}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::FaultServicer);
                servicer.run()
            })?;
        log::debug!(
            "{name}: uffd engine on {} ({} MiB, populate {populate}, poll {poll:?}{})",
            mirror.path,
            size >> 20,
            if readonly {
                ", read-only"
            } else if discard_writes {
                ", discard_writes"
            } else {
                ""
            }
        );
        Ok(Arc::new(UffdEngine {
            mirror,
            tracker,
            region,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The mirror, for the memslot.
    pub fn host_addr(&self) -> *mut u8 {
        self.mirror.map.base()
    }

    pub fn size(&self) -> u64 {
        self.mirror.map.size()
    }

    /// The flush of this device.
    pub fn writeback(&self) -> Box<dyn Writeback> {
        Box::new(UffdWriteback {
            mirror: self.mirror.clone(),
            tracker: self.tracker.clone(),
            region: self.region,
        })
    }
}

impl FaultEngine for UffdEngine {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
    }

    /// The guest sees the engine's mirror, not the file's mapping.
    fn memslot(&self) -> Memslot {
        // uffd, not KVM's dirty log, catches first writes.
        Memslot::new(self.mirror.map.base() as u64, self.region.readonly, false)
    }

    fn writeback(&self) -> io::Result<Box<dyn Writeback>> {
        Ok(UffdEngine::writeback(self))
    }
}

impl Drop for UffdEngine {
    fn drop(&mut self) {
        if let Err(e) = self.stop.request() {
            log::error!("{}: cannot stop the uffd handler: {e}", self.mirror.name);
            return;
        }
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("{}: the uffd handler panicked", self.mirror.name);
            }
        }
        // The mirror is unmapped when its last Arc (now ours) goes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::uffd::fixture::*;

    #[test]
    fn invalid_arguments_are_refused() {
        let file = File::open("/dev/null").unwrap();
        let shared = PageTracker::new(2 * MIB);
        for (size, populate) in [(2 * MIB, 0), (2 * MIB, 513), (2 * MIB + 1, 1), (4 * MIB, 1)] {
            let err = UffdEngine::start(
                "bad",
                file.try_clone().unwrap(),
                size,
                false,
                false,
                UffdTuning {
                    populate,
                    ..UffdTuning::default()
                },
                shared.clone(),
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{size} {populate}");
        }
    }
}
