//! The source of a missing fault's pages: its spans read from the file into
//! a page-aligned buffer, zeroes over the file's holes. Plain file I/O, kept
//! apart from the userfaultfd side that copies the buffer in.

use std::fs::File;
use std::io;

use super::policy::Span;
use super::MAX_POPULATE;
use crate::fault::file_io::{data_extents, pread_full};
use crate::fault::PAGE_SIZE;

/// A page-aligned buffer of `MAX_POPULATE` pages: UFFDIO_COPY wants a
/// page-aligned source.
pub(super) struct Bounce {
    ptr: *mut u8,
    len: usize,
}

impl Bounce {
    pub(super) fn new() -> io::Result<Self> {
        let len = usize::from(MAX_POPULATE) * PAGE_SIZE as usize;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mmap of the uffd bounce buffer: {e}"),
            ));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(super) fn page(&self, i: u64) -> *mut u8 {
        debug_assert!(((i + 1) * PAGE_SIZE) as usize <= self.len);
        // SAFETY: callers pass i < MAX_POPULATE, inside the mapping.
        unsafe { self.ptr.add((i * PAGE_SIZE) as usize) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Reading the file failed at `offset`.
#[derive(Debug)]
pub(super) struct ReadError {
    pub offset: u64,
    pub source: io::Error,
}

/// The pages of one missing fault's spans, loaded.
pub(super) struct Block {
    bounce: Bounce,
    /// The page at the start of the buffer.
    first: u64,
    /// Per page of the buffer: to be inserted / in a hole of the file.
    absent: Vec<bool>,
    hole: Vec<bool>,
}

// SAFETY: the bounce buffer is private to the block; it moves to the
// servicer thread once and is used there only.
unsafe impl Send for Block {}

impl Block {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            bounce: Bounce::new()?,
            first: 0,
            absent: vec![false; usize::from(MAX_POPULATE)],
            hole: vec![false; usize::from(MAX_POPULATE)],
        })
    }

    /// The loaded data of page `page` and those after it in its span.
    pub(super) fn source(&self, page: u64) -> *const u8 {
        self.bounce.page(page - self.first)
    }

    /// Whether `page` was served from a hole of the file (as zeroes).
    pub(super) fn hole(&self, page: u64) -> bool {
        self.hole[(page - self.first) as usize]
    }

    /// Fills the buffer with the pages of `spans` (in page order, within
    /// `MAX_POPULATE` pages): file data where the file has some, zeroes
    /// over its holes and past its end (nothing is read or allocated
    /// there).
    pub(super) fn load(&mut self, file: &File, spans: &[Span]) -> Result<(), ReadError> {
        let (Some(head), Some(tail)) = (spans.first(), spans.last()) else {
            return Ok(());
        };
        let first = head.first;
        let n = tail.first + tail.pages - first;
        if n > u64::from(MAX_POPULATE) {
            return Err(ReadError {
                offset: first * PAGE_SIZE,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        self.first = first;
        let absent = &mut self.absent[..n as usize];
        absent.fill(false);
        for s in spans {
            absent[(s.first - first) as usize..][..s.pages as usize].fill(true);
        }
        self.find_holes(file, n);

        let mut i = 0;
        while i < n {
            let idx = i as usize;
            if !self.absent[idx] {
                i += 1;
                continue;
            }
            if self.hole[idx] {
                // SAFETY: page i of the bounce buffer, i < MAX_POPULATE.
                unsafe { std::ptr::write_bytes(self.bounce.page(i), 0, PAGE_SIZE as usize) };
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && self.absent[j as usize] && !self.hole[j as usize] {
                j += 1;
            }
            let len = ((j - i) * PAGE_SIZE) as usize;
            let dst = self.bounce.page(i);
            let offset = (first + i) * PAGE_SIZE;
            // SAFETY: pages i..j of the bounce buffer, j <= MAX_POPULATE.
            let got = unsafe { pread_full(file, dst, len, offset) }
                .map_err(|source| ReadError { offset, source })?;
            // Past the end of the file: zeroes.
            // SAFETY: the rest of the same pages.
            unsafe { std::ptr::write_bytes(dst.add(got), 0, len - got) };
            i = j;
        }
        Ok(())
    }

    /// Marks which of the `n` pages from `first` lie in holes of the file.
    fn find_holes(&mut self, file: &File, n: u64) {
        let first = self.first;
        let hole = &mut self.hole[..n as usize];
        hole.fill(true);
        for data in data_extents(file, first * PAGE_SIZE, (first + n) * PAGE_SIZE) {
            for p in data.start / PAGE_SIZE..data.end.div_ceil(PAGE_SIZE) {
                hole[(p - first) as usize] = false;
            }
        }
    }
}
