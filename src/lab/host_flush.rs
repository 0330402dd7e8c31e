//! Host-side flush baselines for `bench flush`: the same pages dirtied
//! through a MAP_SHARED mapping of the same kind of file, then made
//! durable the ways other VMMs do it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::paging::PAGE;
use super::ProbeError;

/// How a host baseline makes the dirty pages durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostSyncMethod {
    /// fdatasync(2) of the file.
    Fdatasync,
    /// fsync(2) of the whole file, as QEMU and Cloud Hypervisor serve a
    /// virtio-pmem flush.
    Fsync,
    /// msync(MS_SYNC) of the whole mapping, as crosvm and Firecracker do.
    Msync,
}

impl HostSyncMethod {
    pub const ALL: [HostSyncMethod; 3] = [Self::Fdatasync, Self::Fsync, Self::Msync];

    pub fn label(self) -> &'static str {
        match self {
            Self::Fdatasync => "fdatasync",
            Self::Fsync => "fsync (QEMU, CH)",
            Self::Msync => "msync (crosvm, FC)",
        }
    }
}

/// A backing file mapped MAP_SHARED, as a VMM maps a pmem file.
pub struct HostFlushFile {
    file: File,
    addr: *mut u8,
    len: usize,
    counter: u64,
}

fn baseline_err(what: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |source| ProbeError::HostBaseline { what, source }
}

impl HostFlushFile {
    /// Maps `pages` pages of `path` and reads each of `touched` once, so
    /// later writes there only pay for mkwrite, as in a guest that has
    /// mapped them.
    pub fn open(path: &Path, pages: u64, touched: &[u64]) -> Result<Self, ProbeError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(baseline_err("opening the baseline file"))?;
        let len = (pages * PAGE) as usize;
        // SAFETY: a fresh shared mapping chosen by the kernel; the fd is
        // open and the file is at least `len` bytes (created that size).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(baseline_err("mapping the baseline file")(
                io::Error::last_os_error(),
            ));
        }
        let me = Self {
            file,
            addr: addr.cast(),
            len,
            counter: 0,
        };
        for &page in touched.iter().filter(|&&p| p < pages) {
            // SAFETY: inside the mapping; a volatile read keeps the touch.
            unsafe { std::ptr::read_volatile(me.addr.add((page * PAGE) as usize)) };
        }
        Ok(me)
    }

    /// Dirties `pages` through the mapping, then times `method`.
    pub fn timed_sync(
        &mut self,
        pages: &[u64],
        method: HostSyncMethod,
    ) -> Result<Duration, ProbeError> {
        for &page in pages {
            let offset = (page * PAGE) as usize;
            assert!(offset + 8 <= self.len, "page {page} outside the mapping");
            self.counter += 1;
            // SAFETY: the offset is inside the mapping (checked above) and
            // 8-byte aligned; nothing else in this process uses it.
            unsafe { std::ptr::write_volatile(self.addr.add(offset).cast::<u64>(), self.counter) };
        }
        let started = Instant::now();
        let result = match method {
            HostSyncMethod::Fdatasync => self.file.sync_data(),
            HostSyncMethod::Fsync => self.file.sync_all(),
            HostSyncMethod::Msync => {
                // SAFETY: msync of exactly our own live mapping.
                let rc = unsafe { libc::msync(self.addr.cast(), self.len, libc::MS_SYNC) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
        };
        let took = started.elapsed();
        result.map_err(baseline_err("syncing the baseline file"))?;
        Ok(took)
    }
}

impl Drop for HostFlushFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in open().
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::backing::{BackingKind, ScratchDir};

    #[test]
    fn every_method_syncs_dirty_pages() {
        let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
        let path = dir.create_file(64 * PAGE).unwrap();
        let mut f = HostFlushFile::open(&path, 64, &[1, 5, 63]).unwrap();
        for method in HostSyncMethod::ALL {
            f.timed_sync(&[1, 5, 63], method).unwrap();
        }
        let data = std::fs::read(&path).unwrap();
        let at = |p: usize| u64::from_le_bytes(data[p * 4096..p * 4096 + 8].try_into().unwrap());
        assert_eq!((at(1), at(5), at(63), at(0)), (7, 8, 9, 0));
    }
}
