//! Positioned file I/O to and from raw memory (guest pages, a bounce
//! buffer) that Rust references must not cover: the kernel reads or writes
//! it, retrying short transfers and EINTR.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Calls `step(done)` (one transfer of the rest, from byte `done`) until
/// `len` bytes are done or a step moves none; returns the bytes done.
fn repeat(len: usize, mut step: impl FnMut(usize) -> isize) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        match step(done) {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// pread(2) until `len` bytes or end of file; returns the bytes read.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub unsafe fn pread_full(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    repeat(len, |done| {
        // SAFETY: the caller guarantees dst..dst+len is writable.
        unsafe {
            libc::pread64(
                file.as_raw_fd(),
                dst.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off64_t,
            )
        }
    })
}

/// pwrite(2) all of `len` bytes.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes.
pub unsafe fn pwrite_all(file: &File, src: *const u8, len: usize, offset: u64) -> io::Result<()> {
    let done = repeat(len, |done| {
        // SAFETY: the caller guarantees src..src+len is readable.
        unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                src.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off64_t,
            )
        }
    })?;
    if done < len {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// The data extents of `file` from byte `begin` to `end`, in order, as
/// SEEK_DATA/SEEK_HOLE report them: the rest is holes (or past the end of
/// the file) and reads as zeroes. Where the file system cannot tell
/// (an lseek error other than ENXIO), the rest of the range counts as data.
///
/// SEEK_DATA and SEEK_HOLE move the offset of the file description, which
/// every dup of `file` shares; every user of a pmem file uses positioned
/// I/O or a mapping, never the offset.
pub fn data_extents(file: &File, begin: u64, end: u64) -> DataExtents<'_> {
    DataExtents {
        file,
        next: begin,
        end,
    }
}

/// See [`data_extents`].
pub struct DataExtents<'a> {
    file: &'a File,
    next: u64,
    end: u64,
}

impl Iterator for DataExtents<'_> {
    type Item = std::ops::Range<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let fd = self.file.as_raw_fd();
        let off = self.next;
        // SAFETY: plain syscall on a valid fd; no memory is passed.
        let data = unsafe { libc::lseek64(fd, off as libc::off64_t, libc::SEEK_DATA) };
        if data < 0 {
            self.next = self.end;
            // ENXIO: no data from here to the end of the file.
            return (io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO))
                .then_some(off..self.end);
        }
        let data = (data as u64).max(off);
        if data >= self.end {
            self.next = self.end;
            return None;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek64(fd, data as libc::off64_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            self.end
        } else {
            (hole as u64).clamp(data + 1, self.end)
        };
        self.next = hole;
        Some(data..hole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_extents_skip_holes_and_stop_at_the_end() {
        const MIB: u64 = 1 << 20;
        let (path, f) = crate::fault::temp_file("extents", 8 * MIB);
        // SAFETY: 5 readable bytes.
        unsafe { pwrite_all(&f, b"first".as_ptr(), 5, MIB) }.unwrap();
        // SAFETY: as above.
        unsafe { pwrite_all(&f, b"later".as_ptr(), 5, 5 * MIB + 3) }.unwrap();
        let all: Vec<_> = data_extents(&f, 0, 8 * MIB).collect();
        // File systems allocate whole blocks (tmpfs pages, ext4 blocks):
        // each extent covers its write and lies in one block group.
        assert_eq!(all.len(), 2, "{all:x?}");
        assert!(all[0].start <= MIB && all[0].end >= MIB + 5 && all[0].end <= 2 * MIB);
        assert!(all[1].start <= 5 * MIB + 3 && all[1].end >= 5 * MIB + 8);
        // A window starting inside an extent begins at the window.
        let from = data_extents(&f, MIB + 1, 5 * MIB).collect::<Vec<_>>();
        assert_eq!(from, vec![MIB + 1..all[0].end]);
        assert_eq!(data_extents(&f, 2 * MIB, 5 * MIB - 4096).count(), 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn whole_transfers_and_the_end_of_the_file() {
        let (path, f) = crate::fault::temp_file("file-io", 0);
        let data = *b"0123456789";
        // SAFETY: `data` is 10 readable bytes.
        unsafe { pwrite_all(&f, data.as_ptr(), data.len(), 3) }.unwrap();
        let mut back = [0xffu8; 16];
        // SAFETY: `back` is 16 writable bytes.
        let got = unsafe { pread_full(&f, back.as_mut_ptr(), back.len(), 0) }.unwrap();
        assert_eq!(got, 13, "stops at the end of the file");
        assert_eq!((&back[..3], &back[3..13]), (&[0u8; 3][..], &data[..]));
        std::fs::remove_file(path).unwrap();
    }
}
