//! Positioned file I/O to and from raw memory (guest pages, a bounce
//! buffer) that Rust references must not cover: the kernel reads or writes
//! it, retrying short transfers and EINTR.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn interrupted() -> bool {
    io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
}

/// pread(2) until `len` bytes or end of file; returns the bytes read.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub unsafe fn pread_full(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees dst..dst+len is writable.
        let n = unsafe {
            libc::pread64(
                file.as_raw_fd(),
                dst.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off64_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ if interrupted() => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(done)
}

/// pwrite(2) all of `len` bytes.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes.
pub unsafe fn pwrite_all(file: &File, src: *const u8, len: usize, offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller guarantees src..src+len is readable.
        let n = unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                src.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off64_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ if interrupted() => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}
