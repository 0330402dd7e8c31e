//! The memfd mirror the guest sees, its userfaultfd, and the ioctls that
//! change it: copy pages in, (un)protect, wake. Also the reads of the mirror
//! a flush makes. No decisions here: the policy makes them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::abi::userfaultfd as sys;
use crate::fault::memfd::{last_err, MemfdMap};
use crate::fault::{Run, PAGE_SIZE};

pub(super) fn errno() -> Option<i32> {
    io::Error::last_os_error().raw_os_error()
}

/// A new userfaultfd, from the syscall or else from /dev/userfaultfd (which
/// needs no capability when vm.unprivileged_userfaultfd is 0). Not
/// UFFD_USER_MODE_ONLY: KVM touches the mirror from kernel mode.
fn open_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let sys_err = io::Error::last_os_error();
    let dev = File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "userfaultfd(2) failed ({sys_err}) and /dev/userfaultfd cannot be opened \
                     ({e}); run with CAP_SYS_PTRACE, set vm.unprivileged_userfaultfd=1 or \
                     grant access to /dev/userfaultfd"
                ),
            )
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new
    // fd or -1; no memory is passed.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(last_err(&format!(
            "userfaultfd(2) failed ({sys_err}); USERFAULTFD_IOC_NEW on /dev/userfaultfd"
        )));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The mirror, its userfaultfd and the file: what the servicer thread and
/// the flush share. The mirror is unmapped on drop, once the servicer
/// thread, its only other user, has exited.
pub(super) struct Mirror {
    pub name: String,
    /// The backing file's path, for messages.
    pub path: String,
    pub map: MemfdMap,
    pub file: File,
    pub uffd: OwnedFd,
    /// Test hook: the next N reservations fail with ENOSPC.
    #[cfg(test)]
    pub inject_enospc: std::sync::atomic::AtomicU32,
}

/// What `copy` did to one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copied {
    Inserted,
    /// EEXIST: the page was already mapped.
    Existed,
}

impl Mirror {
    /// Creates the memfd mirror of `file` (`size` bytes, a page multiple)
    /// and registers it with a new userfaultfd: MISSING|WP, or MISSING
    /// only and mapped read-only for a `readonly` device.
    pub(super) fn new(name: &str, file: File, size: u64, readonly: bool) -> io::Result<Self> {
        let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| name.to_string());

        let uffd = open_uffd()?;
        // The write-protect features are needed unless the device is read-only.
        let want = sys::UFFD_FEATURE_MISSING_SHMEM
            | sys::UFFD_FEATURE_THREAD_ID
            | if readonly {
                0
            } else {
                sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            };
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_API, &mut api) } != 0 {
            return Err(last_err(&format!(
                "UFFDIO_API with features {want:#x} (MISSING on shmem{})",
                if readonly {
                    ""
                } else {
                    ", write-protect on shmem: Linux 5.19+"
                }
            )));
        }

        let map = MemfdMap::new(name, size, readonly)?;
        let base = map.base();
        let mirror = Mirror {
            name: name.to_string(),
            path,
            map,
            file,
            uffd,
            #[cfg(test)]
            inject_enospc: Default::default(),
        };

        let mode = sys::UFFDIO_REGISTER_MODE_MISSING
            | if readonly {
                0
            } else {
                sys::UFFDIO_REGISTER_MODE_WP
            };
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange {
                start: base as u64,
                len: size,
            },
            mode,
            ioctls: 0,
        };
        if mirror.ioctl(sys::UFFDIO_REGISTER, &mut reg) != 0 {
            return Err(last_err(&format!(
                "UFFDIO_REGISTER of the memfd mirror, mode {mode:#x}"
            )));
        }
        let mut need = 1 << sys::_UFFDIO_COPY | 1 << sys::_UFFDIO_WAKE;
        if !readonly {
            need |= 1 << sys::_UFFDIO_WRITEPROTECT;
        }
        if reg.ioctls & need != need {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "UFFDIO_REGISTER offers ioctls {:#x} on the mirror, {need:#x} needed",
                    reg.ioctls
                ),
            ));
        }
        Ok(mirror)
    }

    /// The mirror page at `addr`, or `None` outside the mirror.
    pub(super) fn page_of(&self, addr: u64) -> Option<u64> {
        let offset = addr.checked_sub(self.map.base() as u64)?;
        (offset < self.map.size()).then_some(offset / PAGE_SIZE)
    }

    fn addr(&self, page: u64) -> u64 {
        self.map.base() as u64 + page * PAGE_SIZE
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> libc::c_int {
        // SAFETY: every caller passes the argument struct that `request`
        // encodes (the sizes are in the request numbers); the kernel reads and
        // writes only that struct, and the ranges in it lie in our mirror.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), request, arg as *mut T) }
    }

    /// UFFDIO_COPY of `pages` pages from `src` to the mirror at `first`,
    /// write-protected if `wp`. Pages already mapped (EEXIST, served by an
    /// earlier fault) are skipped and reported as `Existed`, never as an
    /// error: the EBUSY lesson of vm_insert_mixed (seeds 000). A copy that
    /// stops part way (EAGAIN with a byte count) continues from there.
    /// `each` sees every page in order, so the caller's states follow the
    /// mirror even when an error ends the copy.
    pub(super) fn copy(
        &self,
        first: u64,
        pages: u64,
        src: *const u8,
        wp: bool,
        mut each: impl FnMut(u64, Copied),
    ) -> io::Result<()> {
        let mut done = 0;
        while done < pages {
            let mut arg = sys::UffdioCopy {
                dst: self.addr(first + done),
                src: src as u64 + done * PAGE_SIZE,
                len: (pages - done) * PAGE_SIZE,
                mode: if wp { sys::UFFDIO_COPY_MODE_WP } else { 0 },
                copy: 0,
            };
            let rc = self.ioctl(sys::UFFDIO_COPY, &mut arg);
            let err = errno();
            let copied = if rc == 0 {
                pages - done
            } else if arg.copy > 0 {
                arg.copy as u64 / PAGE_SIZE
            } else {
                0
            };
            for p in first + done..first + done + copied {
                each(p, Copied::Inserted);
            }
            done += copied;
            if rc == 0 || copied > 0 {
                continue;
            }
            match err {
                Some(libc::EEXIST) => {
                    each(first + done, Copied::Existed);
                    done += 1;
                }
                // The mm is changing (an event in flight): try again.
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => return Err(io::Error::from_raw_os_error(err.unwrap_or(libc::EINVAL))),
            }
        }
        Ok(())
    }

    /// UFFDIO_WRITEPROTECT: protect (`wp`) or unprotect a run of pages.
    /// Unprotecting wakes the threads waiting on them.
    pub(super) fn protect(&self, first: u64, pages: u64, wp: bool) -> io::Result<()> {
        loop {
            let mut arg = sys::UffdioWriteprotect {
                range: sys::UffdioRange {
                    start: self.addr(first),
                    len: pages * PAGE_SIZE,
                },
                mode: if wp {
                    sys::UFFDIO_WRITEPROTECT_MODE_WP
                } else {
                    0
                },
            };
            if self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg) == 0 {
                return Ok(());
            }
            match errno() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }

    /// UFFDIO_WAKE: for a fault whose page another fault already inserted.
    pub(super) fn wake(&self, page: u64) -> io::Result<()> {
        let mut arg = sys::UffdioRange {
            start: self.addr(page),
            len: PAGE_SIZE,
        };
        if self.ioctl(sys::UFFDIO_WAKE, &mut arg) == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether mirror page `page` still holds what the file holds (zeroes
    /// past its end), that is, the data it was populated with: this engine
    /// is the file's only writer.
    pub(super) fn unchanged(&self, page: u64) -> io::Result<bool> {
        self.map.unchanged(&self.file, page)
    }

    /// Copies a run of the mirror to the file.
    pub(super) fn write_run(&self, run: Run) -> io::Result<()> {
        self.map.write_run(&self.file, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::uffd::fixture::*;
    use crate::fault::uffd::load::Bounce;

    #[test]
    fn copy_over_a_present_page_counts_existed_not_an_error() {
        let f = Fixture::new("eexist", 2 * MIB, 0..512, 1, false, false);
        assert_eq!(f.read(0, 0), pattern(0));
        let bounce = Bounce::new().unwrap();
        // SAFETY: two pages of the bounce buffer.
        unsafe { std::ptr::write_bytes(bounce.page(0), 0x5a, 2 * PS) };
        let mut seen = Vec::new();
        f.engine
            .mirror
            .copy(0, 2, bounce.page(0), true, |p, what| seen.push((p, what)))
            .unwrap();
        assert_eq!(seen, vec![(0, Copied::Existed), (1, Copied::Inserted)]);
        assert_eq!((f.read(0, 0), f.read(1, 0)), (pattern(0), 0x5a));
    }
}
