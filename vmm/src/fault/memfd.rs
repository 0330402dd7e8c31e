//! A memfd mapping that the guest sees instead of the backing file (the
//! `uffd` engine serves its pages through userfaultfd): its dirty pages are
//! copied to the file at a flush, and compared with the file.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use super::file_io::{pread_full, pwrite_all};
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
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_mirror_size_is_sealed() {
        let map = MemfdMap::new("seal", 2 * MIB, false).unwrap();
        assert!(map.memfd.set_len(MIB).is_err());
        assert!(map.memfd.set_len(4 * MIB).is_err());
        assert!(MemfdMap::new("odd", 4097, false).is_err());
    }

    #[test]
    fn pages_compare_with_the_file_and_runs_copy_to_it() {
        let (path, f) = crate::fault::temp_file("memfd-cmp", 2 * MIB);
        f.write_all_at(&[7; PAGE_SIZE as usize], PAGE_SIZE).unwrap();
        let map = MemfdMap::new("cmp", 2 * MIB, false).unwrap();
        map.memfd
            .write_all_at(&[7; PAGE_SIZE as usize], PAGE_SIZE)
            .unwrap();
        assert!(map.unchanged(&f, 0).unwrap(), "a hole equals a hole");
        assert!(map.unchanged(&f, 1).unwrap());
        map.memfd.write_all_at(b"new", PAGE_SIZE).unwrap();
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
