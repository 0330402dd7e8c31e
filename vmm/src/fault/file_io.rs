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

#[cfg(test)]
mod tests {
    use super::*;

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
