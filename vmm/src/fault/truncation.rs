//! Another program shrinking a backing file under a running guest.
//!
//! The kernel and prefault engines put the file's MAP_SHARED mapping in the
//! memslot. Pages past the new end of file cannot be provided any more:
//! KVM_RUN fails with EFAULT on them (or, where guest code is emulated, the
//! access comes back as an MMIO exit), and a VMM access there would raise
//! SIGBUS. The guard notices the shrink, says so once, and maps anonymous
//! memory over the lost part of the region, so the guest keeps running on
//! memory that no longer reaches the file; every flush of the device fails
//! from then on ([`PageTracker::check_backing`]).
//!
//! The memslot needs no change: KVM resolves the host address again on the
//! next fault, and replacing the mapping invalidates what it had mapped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::{PageTracker, PAGE_SIZE};

#[derive(Debug)]
pub struct TruncationGuard {
    file: File,
    path: String,
    /// Start of the file's mapping: an integer, as only the kernel and the
    /// overlay code below touch it.
    host: usize,
    size: u64,
    prot: libc::c_int,
    /// From this offset to the end the region is anonymous memory. `size`
    /// until a shrink is seen; it only ever goes down.
    cut: Mutex<u64>,
    shared: Arc<PageTracker>,
}

impl TruncationGuard {
    /// `host..host+size` must be a mapping of `file` (read-only if
    /// `readonly`) that lives as long as the guard; the guard may replace
    /// parts of it.
    pub fn new(
        file: File,
        path: String,
        host: *mut u8,
        size: u64,
        readonly: bool,
        shared: Arc<PageTracker>,
    ) -> Self {
        Self {
            file,
            path,
            host: host as usize,
            size,
            prot: if readonly {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            },
            cut: Mutex::new(size),
            shared,
        }
    }

    /// Where the anonymous overlay begins (`size` when there is none).
    pub fn cut(&self) -> u64 {
        *self.cut.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the file's length; if it shrank below the device, overlays
    /// the pages past its end. Returns whether this call mapped anything
    /// new (the caller may retry what failed at once).
    pub fn check(&self) -> io::Result<bool> {
        self.overlay_past(self.file.metadata()?.len())
    }

    /// Whether the file's file system has no space left for unprivileged
    /// writers. A guest store to a page without blocks then waits: on the
    /// nested host as a write-through that retries, on hosts with EPT/NPT
    /// inside KVM, which retries the fault without telling pmemvm.
    pub fn file_system_full(&self) -> io::Result<bool> {
        // SAFETY: fstatfs fills the struct we own; the fd is ours.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&self.file), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // A file system that reports no blocks at all (a FUSE one without
        // statfs) says nothing about its space.
        Ok(st.f_blocks > 0 && st.f_bavail == 0)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// `check` for a file length the caller has just read.
    fn overlay_past(&self, len: u64) -> io::Result<bool> {
        if len >= self.size {
            return Ok(false);
        }
        self.shared.set_truncated();
        // The page holding the end of file is still the file's: its bytes
        // past the end read as zeroes and never raise SIGBUS.
        let new_cut = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        if new_cut >= *cut {
            return Ok(false);
        }
        let first = *cut == self.size;
        // SAFETY: replaces pages new_cut..cut of the mapping this guard was
        // given, which lives as long as the guard. No Rust reference points
        // into it: the guest (through KVM) and the kernel are its only users.
        let addr = unsafe {
            libc::mmap(
                (self.host + new_cut as usize) as *mut libc::c_void,
                (*cut - new_cut) as usize,
                self.prot,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        *cut = new_cut;
        if first {
            log::error!(
                "pmem {}: the backing file was truncated to {len} bytes under the running guest (device size {}); \
                 the guest keeps running on anonymous memory past the new end, its data there is lost, \
                 and every flush of this device fails from now on",
                self.path,
                self.size
            );
        } else {
            log::error!(
                "pmem {}: the backing file shrank again, to {len} bytes",
                self.path
            );
        }
        Ok(true)
    }

    /// Whether the guard serves an emulated access of `len` bytes at
    /// `offset`: one inside the device that reaches past the file's end,
    /// or any once the file was truncated. If so, overlays what shrank and
    /// returns the file's length (read once) and the cut.
    fn takes(&self, offset: u64, len: usize) -> io::Result<Option<(u64, u64)>> {
        let end = offset.saturating_add(len as u64);
        if end > self.size {
            return Ok(None);
        }
        let file_len = self.file.metadata()?.len();
        if end <= file_len && !self.shared.truncated() {
            return Ok(None);
        }
        self.overlay_past(file_len)?;
        Ok(Some((file_len, self.cut())))
    }

    /// Serves an emulated guest store at `offset` that the host could not
    /// map, if it lies past the end of the file: the overlay takes it, and
    /// the file is never written (that would grow it back). Returns false
    /// when the store is inside the file and should be written there.
    pub fn store_past_eof(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let Some((len, cut)) = self.takes(offset, data.len())? else {
            return Ok(false);
        };
        if offset >= cut {
            // SAFETY: offset..end lies in the overlay (cut..size), anonymous
            // memory that is never unmapped while the guard lives, so the
            // copy cannot fault. It races only with the guest's own stores.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (self.host + offset as usize) as *mut u8,
                    data.len(),
                )
            };
            return Ok(true);
        }
        // Inside the file's last pages: write what the file still holds,
        // drop the part past its end, as the kernel does for the mapping.
        if offset < len {
            let end = offset + data.len() as u64;
            let keep = (len.min(end) - offset) as usize;
            self.file.write_all_at(&data[..keep], offset)?;
        }
        Ok(true)
    }

    /// Serves an emulated guest load that the host could not map: from the
    /// overlay past the cut, from the file before it (zeroes past its end).
    /// Returns false when the load is inside the file.
    pub fn load_past_eof(&self, offset: u64, data: &mut [u8]) -> io::Result<bool> {
        let Some((_, cut)) = self.takes(offset, data.len())? else {
            return Ok(false);
        };
        if offset >= cut {
            // SAFETY: as in store_past_eof, the range is in the overlay.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (self.host + offset as usize) as *const u8,
                    data.as_mut_ptr(),
                    data.len(),
                )
            };
            return Ok(true);
        }
        let mut done = 0;
        while done < data.len() {
            match self.file.read_at(&mut data[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        data[done..].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mapped {
        path: std::path::PathBuf,
        file: File,
        addr: *mut u8,
        size: usize,
    }

    impl Mapped {
        fn new(name: &str, pages: u64) -> Self {
            let size = (pages * PAGE_SIZE) as usize;
            let (path, file) = super::super::temp_file(&format!("trunc-{name}"), size as u64);
            // SAFETY: a fresh shared mapping of the file.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Self {
                path,
                file,
                addr: addr.cast(),
                size,
            }
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.addr.cast(), self.size) };
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Reads a byte the way KVM would: through the kernel, so that a page
    /// the host cannot provide is an error, not a SIGBUS in the test.
    fn kernel_read(addr: *const u8) -> io::Result<u8> {
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: write reads one byte at addr; a bad address gives EFAULT.
        let n = unsafe { libc::write(pipe[1], addr.cast(), 1) };
        let result = if n == 1 {
            let mut b = 0u8;
            // SAFETY: reads one byte into b.
            unsafe { libc::read(pipe[0], (&mut b as *mut u8).cast(), 1) };
            Ok(b)
        } else {
            Err(io::Error::last_os_error())
        };
        // SAFETY: closing our own pipe.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        result
    }

    impl Mapped {
        /// A writable guard over the whole mapping, and its engine state.
        fn guard(&self) -> (Arc<PageTracker>, TruncationGuard) {
            let shared = PageTracker::new(self.size as u64);
            let guard = TruncationGuard::new(
                self.file.try_clone().unwrap(),
                "t".into(),
                self.addr,
                self.size as u64,
                false,
                shared.clone(),
            );
            (shared, guard)
        }
    }

    #[test]
    fn shrink_is_overlaid_and_flushes_fail_for_good() {
        let m = Mapped::new("overlay", 8);
        let (shared, guard) = m.guard();
        assert!(!guard.check().unwrap(), "nothing to do at full size");
        // SAFETY: inside the live mapping.
        unsafe { *m.addr.add(PAGE_SIZE as usize * 5) = 9 };
        m.file.set_len(2 * PAGE_SIZE + 100).unwrap();
        let past = m.addr.wrapping_add(5 * PAGE_SIZE as usize);
        assert!(kernel_read(past).is_err(), "past the end is gone");
        assert!(guard.check().unwrap());
        assert_eq!(guard.cut(), 3 * PAGE_SIZE, "the end-of-file page stays");
        assert_eq!(kernel_read(past).unwrap(), 0, "the overlay reads zeroes");
        assert!(!guard.check().unwrap(), "nothing new");

        // Emulated stores and loads past the end go to the overlay and
        // never grow the file.
        assert!(guard.store_past_eof(5 * PAGE_SIZE, b"abc").unwrap());
        let mut back = [0u8; 3];
        assert!(guard.load_past_eof(5 * PAGE_SIZE, &mut back).unwrap());
        assert_eq!(&back, b"abc");
        assert!(guard.store_past_eof(2 * PAGE_SIZE + 98, b"wxyz").unwrap());
        assert_eq!(m.file.metadata().unwrap().len(), 2 * PAGE_SIZE + 100);
        let mut tail = [0u8; 4];
        assert!(guard.load_past_eof(2 * PAGE_SIZE + 98, &mut tail).unwrap());
        assert_eq!(&tail, b"wx\0\0");
        // Once truncated, a store inside what is left still goes to the file.
        assert!(guard.store_past_eof(0, b"x").unwrap());
        let mut first = [0u8; 1];
        m.file.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(&first, b"x");

        // Growing the file back does not make flushes succeed again.
        m.file.set_len(8 * PAGE_SIZE).unwrap();
        assert!(shared.truncated());
        let err = shared.check_backing(&m.file).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(shared.stats("kernel").backing_truncated);
    }

    #[test]
    fn stores_inside_the_file_are_not_taken() {
        let m = Mapped::new("inside", 4);
        let (shared, guard) = m.guard();
        assert!(!guard.store_past_eof(PAGE_SIZE, b"abc").unwrap());
        let mut b = [0u8; 3];
        assert!(!guard.load_past_eof(PAGE_SIZE, &mut b).unwrap());
        assert!(!shared.truncated());
        assert_eq!(guard.cut(), 4 * PAGE_SIZE);
    }
}
