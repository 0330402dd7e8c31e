//! A memfd mapping that the guest sees instead of the backing file: the
//! `uffd` engine serves its pages through userfaultfd, the `mirror` engine
//! fills it from the file at start and lets KVM serve them. Both copy dirty
//! pages from it to the file at a flush, and compare pages with the file.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use super::file_io::{data_extents, pread_full, pwrite_all};
use super::{Run, PAGE_SIZE};

/// The last OS error, prefixed with what failed.
pub(crate) fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A memfd of a fixed size, mapped MAP_SHARED, unmapped on drop. Its size
/// is sealed: nobody (not even through /proc/PID/fd) can shrink it under
/// the guest. A child process does not inherit the mapping.
pub(crate) struct MemfdMap {
    memfd: File,
    base: *mut u8,
    size: u64,
}

// SAFETY: `base` points to a MAP_SHARED mapping that lives as long as the
// MemfdMap; it is only handed to the kernel (ioctls, pread, pwrite) or to
// KVM, never turned into Rust references, so sharing it between threads is
// sound.
unsafe impl Send for MemfdMap {}
// SAFETY: as for Send; the File is Sync.
unsafe impl Sync for MemfdMap {}

impl Drop for MemfdMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the owners of
        // the map (an engine, its servicer thread) are done with it.
        if unsafe { libc::munmap(self.base.cast(), self.size as usize) } != 0 {
            log::error!(
                "munmap of a memfd mirror failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl MemfdMap {
    /// A new memfd `pmemvm-<name>` of `size` bytes (a page multiple), all
    /// holes, mapped MAP_SHARED: read-only if `readonly`.
    pub(crate) fn new(name: &str, size: u64, readonly: bool) -> io::Result<Self> {
        let len = usize::try_from(size)
            .ok()
            .filter(|_| size > 0 && size.is_multiple_of(PAGE_SIZE))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name}: mirror size {size:#x} is not a page multiple"),
                )
            })?;
        let memfd_name = CString::new(format!("pmemvm-{name}")).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: NUL in the device name"),
            )
        })?;
        // SAFETY: a valid C string; returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                memfd_name.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(last_err("memfd_create"));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| io::Error::new(e.kind(), format!("ftruncate of the memfd mirror: {e}")))?;
        // SAFETY: fcntl on our own fd with an integer argument.
        let rc = unsafe {
            libc::fcntl(
                memfd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(last_err("sealing the size of the memfd mirror"));
        }
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a new shared mapping of our memfd at an address the
        // kernel picks; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_err("mmap of the memfd mirror"));
        }
        let map = Self {
            memfd,
            base: base.cast(),
            size,
        };
        // A child process must not inherit the guest's memory.
        // SAFETY: advice on our own mapping.
        if unsafe { libc::madvise(base, len, libc::MADV_DONTFORK) } != 0 {
            log::warn!(
                "{name}: MADV_DONTFORK on the mirror: {}",
                io::Error::last_os_error()
            );
        }
        Ok(map)
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The memfd itself: positioned I/O on it reaches the mirror's pages
    /// without touching the mapping.
    pub(crate) fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Makes the mapping read-only (after [`Self::fill_from`], for a
    /// read-only device).
    pub(crate) fn protect_read_only(&self) -> io::Result<()> {
        // SAFETY: changes the protection of our own mapping only; nothing
        // writes it through Rust references.
        let rc = unsafe { libc::mprotect(self.base.cast(), self.size as usize, libc::PROT_READ) };
        if rc != 0 {
            return Err(last_err("mprotect of the memfd mirror"));
        }
        Ok(())
    }

    /// Copies `file`'s data into the mirror (which must be writable and
    /// still all holes), page by page where the file has data
    /// (SEEK_DATA/SEEK_HOLE): the file's holes, and anything past its end,
    /// stay holes of the memfd, which read as zeroes and use no memory.
    /// Returns the bytes copied.
    pub(crate) fn fill_from(&self, file: &File) -> io::Result<u64> {
        let mut copied = 0;
        let mut done = 0; // pages below this are copied already
        for data in data_extents(file, 0, self.size) {
            // Whole pages: an extent of a file system with blocks smaller
            // than a page may share a page with the one before.
            let first = (data.start / PAGE_SIZE * PAGE_SIZE).max(done);
            let end = data.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            let end = end.min(self.size);
            if first >= end {
                continue;
            }
            let len = (end - first) as usize;
            // SAFETY: first..end lies inside the mapping, which is writable
            // and which nothing else uses yet (the guest does not run).
            let got = unsafe { pread_full(file, self.base.add(first as usize), len, first) }
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("reading the backing file at {first:#x} into the mirror: {e}"),
                    )
                })?;
            copied += got as u64;
            done = end;
            if got < len {
                // The file ends here (it shrank meanwhile): the rest reads
                // as zeroes.
                break;
            }
        }
        Ok(copied)
    }

    /// Whether mirror page `page` holds what `file` holds (zeroes past its
    /// end). Both are read with pread: no Rust reference covers the guest's
    /// memory, and a page the mirror lacks reads as zeroes.
    pub(crate) fn unchanged(&self, file: &File, page: u64) -> io::Result<bool> {
        let offset = page * PAGE_SIZE;
        if offset >= self.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut on_file = [0u8; PAGE_SIZE as usize];
        // SAFETY: `on_file` is PAGE_SIZE writable bytes.
        let got = unsafe { pread_full(file, on_file.as_mut_ptr(), on_file.len(), offset) }?;
        on_file[got..].fill(0);
        let mut mirror = [0u8; PAGE_SIZE as usize];
        // SAFETY: `mirror` is PAGE_SIZE writable bytes.
        let got = unsafe { pread_full(&self.memfd, mirror.as_mut_ptr(), mirror.len(), offset) }?;
        mirror[got..].fill(0);
        Ok(on_file == mirror)
    }

    /// Copies a run of the mirror to `file`.
    pub(crate) fn write_run(&self, file: &File, run: Run) -> io::Result<()> {
        if run.offset() + run.bytes() > self.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the run lies inside the mapping, which outlives the call;
        // only the kernel reads it (a page it cannot provide fails the
        // pwrite with EFAULT), no reference to the concurrently written
        // memory is formed.
        unsafe {
            pwrite_all(
                file,
                self.base.add(run.offset() as usize),
                run.bytes() as usize,
                run.offset(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    const MIB: u64 = 1 << 20;

    #[test]
    fn fill_copies_data_and_leaves_holes_unallocated() {
        let (path, f) = crate::fault::temp_file("memfd-fill", 8 * MIB);
        f.write_all_at(&[0x11; 3 * PAGE_SIZE as usize], 16 * PAGE_SIZE)
            .unwrap();
        f.write_all_at(b"tail", 8 * MIB - 4).unwrap();
        let map = MemfdMap::new("fill", 8 * MIB, false).unwrap();
        let copied = map.fill_from(&f).unwrap();
        // Whole data blocks are copied; at most a few pages each.
        assert!(
            (3 * PAGE_SIZE + 4..=MIB).contains(&copied),
            "{copied} bytes copied"
        );
        let mut back = vec![0u8; 8 * MIB as usize];
        map.memfd().read_exact_at(&mut back, 0).unwrap();
        let mut want = vec![0u8; 8 * MIB as usize];
        want[16 * PAGE_SIZE as usize..19 * PAGE_SIZE as usize].fill(0x11);
        want[8 * MIB as usize - 4..].copy_from_slice(b"tail");
        assert!(back == want, "the mirror differs from the file");
        // The holes stay holes of the memfd: few pages are allocated, and
        // SEEK_DATA on the memfd finds the data only.
        let blocks = map.memfd().metadata().unwrap().blocks() * 512;
        assert!(
            blocks <= copied.next_multiple_of(PAGE_SIZE),
            "{blocks} bytes allocated"
        );
        let extents: Vec<_> = data_extents(map.memfd(), 0, 8 * MIB).collect();
        assert_eq!(extents.first().map(|e| e.start), Some(16 * PAGE_SIZE));
        assert_eq!(extents.last().map(|e| e.end), Some(8 * MIB));
        assert!(data_extents(map.memfd(), 0, 16 * PAGE_SIZE)
            .next()
            .is_none());
        assert!(data_extents(map.memfd(), MIB, 7 * MIB).next().is_none());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_mirror_size_is_sealed() {
        let map = MemfdMap::new("seal", 2 * MIB, false).unwrap();
        assert!(map.memfd().set_len(MIB).is_err());
        assert!(map.memfd().set_len(4 * MIB).is_err());
        assert!(MemfdMap::new("odd", 4097, false).is_err());
    }

    #[test]
    fn pages_compare_with_the_file_and_runs_copy_to_it() {
        let (path, f) = crate::fault::temp_file("memfd-cmp", 2 * MIB);
        f.write_all_at(&[7; PAGE_SIZE as usize], PAGE_SIZE).unwrap();
        let map = MemfdMap::new("cmp", 2 * MIB, false).unwrap();
        map.fill_from(&f).unwrap();
        assert!(map.unchanged(&f, 0).unwrap(), "a hole equals a hole");
        assert!(map.unchanged(&f, 1).unwrap());
        map.memfd().write_all_at(b"new", PAGE_SIZE).unwrap();
        assert!(!map.unchanged(&f, 1).unwrap());
        map.write_run(&f, Run { first: 1, pages: 1 }).unwrap();
        assert!(map.unchanged(&f, 1).unwrap());
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, PAGE_SIZE).unwrap();
        assert_eq!(&b, b"new\x07");
        // Out of range: an error, never a panic.
        assert!(map.unchanged(&f, 512).is_err());
        assert!(map
            .write_run(
                &f,
                Run {
                    first: 511,
                    pages: 2
                }
            )
            .is_err());
        std::fs::remove_file(path).unwrap();
    }
}
