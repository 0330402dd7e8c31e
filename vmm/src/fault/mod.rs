//! Fault servicing for pmem regions: who populates the guest's pages, how the
//! first write to each page is caught (mkwrite), and how a flush writes back
//! exactly the dirty pages and arms the catch again (mkclean).
//!
//! [`pages`] is the engine-independent core. The engines:
//! - `kernel`: KVM populates from the MAP_SHARED file; KVM dirty logging
//!   ([`dirty_log`]) reports first writes.
//! - `prefault`: the same, with the region populated before boot.
//! - [`mirror`]: KVM populates from a memfd mirror of the file, filled at
//!   start; KVM dirty logging reports first writes, and a flush copies the
//!   dirty pages from the mirror to the file.
//! - [`uffd`]: the VMM serves every fault through userfaultfd on a memfd
//!   mirror.

pub mod dirty_log;
pub mod engine;
pub(crate) mod file_io;
pub mod kernel;
pub(crate) mod memfd;
pub mod metrics;
pub mod mirror;
pub mod pages;
pub mod tracker;
pub mod truncation;
pub mod uffd;
pub mod write_through;

pub use metrics::{FaultMetrics, FaultStats, FlushPhases};
pub use pages::{Access, DirtySet, PageState, PageStates, Run, Transition, PAGE_SIZE};
pub use tracker::{BackingLost, Flush, FlushObserver, PageTracker, Written, MAX_RUN_PAGES};
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

/// A fresh file of `len` bytes in the temp directory, for the engines'
/// unit tests; the caller removes it.
#[cfg(test)]
pub(crate) fn temp_file(name: &str, len: u64) -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("pmemvm-{name}-{}", std::process::id()));
    let f = std::fs::File::options()
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

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..12).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 1);
    }
}
