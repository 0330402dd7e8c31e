//! The `uffd` engine: the VMM serves every guest fault on a pmem region
//! itself, through userfaultfd.
//!
//! The guest sees a memfd mirror of the backing file (the VMM puts
//! [`UffdEngine::host_addr`] in the memslot). The mirror is registered with
//! userfaultfd in MISSING|WP mode (MISSING only for read-only devices), and
//! one handler thread per device serves the faults:
//! - MISSING at page p: the `populate` block around p is loaded from the
//!   file (holes as zeroes, without allocating host blocks) and inserted
//!   with UFFDIO_COPY, write-protected so the first write is caught. A write
//!   fault reserves p's blocks first and inserts p writable and dirty
//!   (PopulateWrite, vm_insert_mixed_mkwrite in seeds 003).
//! - WP at a clean page: reserve its blocks (page_mkwrite, seeds 004), mark
//!   it dirty and lift the protection, which wakes the writer (Mkwrite).
//!
//! A flush takes the dirty set and write-protects it again under the states
//! lock, then copies those pages from the mirror to the file and fdatasyncs.
//!
//! Invariants, each kept under the [`PageTracker`] states lock together
//! with the ioctl that makes it true in the mirror:
//! - Absent <=> not in the mirror: only the handler thread inserts pages.
//! - Clean => write-protected: the next write faults.
//! - Dirty => writable, except after a failed writeback re-dirtied a page
//!   that the flush had already protected; its next write then faults and
//!   is served as AlreadyDone (a superset of dirty pages is always safe).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::pmem::{Writeback, WritebackReport};

use super::file_io::{pread_full, pwrite_all};
use super::{
    write_back, Access, Backoff, DirtySet, PageState, PageStates, PageTracker, Run, Transition,
    Written, PAGE_SIZE,
};

/// Largest `populate`: one 2 MiB block per fault.
pub const MAX_POPULATE: u16 = 512;
/// Messages read from the uffd per read(2).
const MSG_BATCH: usize = 64;

use crate::abi::userfaultfd as sys;
use sys::UffdMsg;

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn errno() -> Option<i32> {
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

/// Whether thread `tid` is outside this process (0: the kernel did not
/// say). KVM's async page-fault worker is a kernel thread.
fn foreign_thread(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that `tid` is a thread of our group.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid as libc::pid_t, 0) };
    rc != 0 && errno() == Some(libc::ESRCH)
}

/// How the fault servicer trades CPU for latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdTuning {
    /// Pages inserted per missing fault (1..=512).
    pub populate: u16,
    /// How long the servicer keeps polling for the next fault after one,
    /// before it sleeps in poll(2). A vCPU whose fault arrives in that
    /// window skips the servicer's wake-up, the larger part of a fault's
    /// cost on a nested host; the servicer's CPU is busy meanwhile.
    pub poll: Duration,
}

impl Default for UffdTuning {
    fn default() -> Self {
        Self {
            populate: devices::virtio::pmem::DEFAULT_POPULATE,
            poll: Duration::ZERO,
        }
    }
}

/// The mirror, its userfaultfd and the file: what the handler thread and
/// the flush share. Unmapped on drop.
struct Mirror {
    name: String,
    /// The backing file's path, for messages.
    path: String,
    base: *mut u8,
    size: u64,
    pages: u64,
    readonly: bool,
    discard_writes: bool,
    populate: u64,
    poll: Duration,
    file: File,
    uffd: OwnedFd,
    /// eventfd: readable once the engine is dropped.
    stop: OwnedFd,
    shared: Arc<PageTracker>,
    /// Test hook: the next N reservations fail with ENOSPC.
    #[cfg(test)]
    inject_enospc: std::sync::atomic::AtomicU32,
}

// SAFETY: `base` points to a MAP_SHARED mapping that lives as long as the
// Mirror; it is only handed to the kernel (ioctls, pwrite) or read and
// written through raw pointers, never as Rust references, so sharing it
// between threads is sound.
unsafe impl Send for Mirror {}
// SAFETY: as for Send; every other field is Sync.
unsafe impl Sync for Mirror {}

impl Drop for Mirror {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `UffdEngine::start`;
        // the handler thread, its only other user, has exited.
        if unsafe { libc::munmap(self.base.cast(), self.size as usize) } != 0 {
            log::error!(
                "{}: munmap of the uffd mirror failed: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }
}

/// What `copy` did to one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    Inserted,
    /// EEXIST: the page was already mapped.
    Existed,
}

impl Mirror {
    fn addr(&self, page: u64) -> u64 {
        self.base as u64 + page * PAGE_SIZE
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
    fn copy(
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
    fn protect(&self, first: u64, pages: u64, wp: bool) -> io::Result<()> {
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
    fn wake(&self, page: u64) -> io::Result<()> {
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

    /// Waits up to `timeout` for the stop request; true if it came.
    fn wait_stop(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, which poll only writes `revents` of.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Whether mirror page `page` still holds what the file holds (zeroes
    /// past its end), that is, the data it was populated with: this engine
    /// is the file's only writer.
    fn unchanged(&self, page: u64) -> io::Result<bool> {
        let mut file = [0u8; PAGE_SIZE as usize];
        // SAFETY: `file` is PAGE_SIZE bytes.
        let got =
            unsafe { pread_full(&self.file, file.as_mut_ptr(), file.len(), page * PAGE_SIZE) }?;
        file[got..].fill(0);
        let mut mirror = [0u8; PAGE_SIZE as usize];
        // SAFETY: the page lies in the mirror and is present (it is dirty);
        // the copy reads it through a raw pointer, as the writeback does.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add((page * PAGE_SIZE) as usize),
                mirror.as_mut_ptr(),
                mirror.len(),
            )
        };
        Ok(file == mirror)
    }

    /// Copies a run of the mirror to the file.
    fn write_run(&self, run: Run) -> io::Result<()> {
        // SAFETY: the run lies inside the mirror (dirty pages are present, so
        // reading them raises no fault); the kernel reads it, no reference
        // to the concurrently written memory is formed.
        unsafe {
            pwrite_all(
                &self.file,
                self.base.add(run.offset() as usize),
                run.bytes() as usize,
                run.offset(),
            )
        }
    }
}

/// Why serving a fault must wait and try again.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("no space to reserve the page at offset {offset:#x}")]
    NoSpace { offset: u64 },
    #[error("{what} at offset {offset:#x} failed: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
}

/// The engine is being dropped: the handler thread ends.
struct Stopped;

/// What serving one fault did so far (it may take several attempts).
struct Progress {
    started: Instant,
    transition: Option<Transition>,
    inserted: u64,
}

impl Progress {
    /// Counts the fault. Called with the states lock held, so whoever takes
    /// the lock after the faulting thread resumed sees the fault counted.
    fn record(&self, shared: &PageTracker) {
        shared.metrics.record_fault(
            self.transition.unwrap_or(Transition::AlreadyDone),
            self.inserted,
            self.started.elapsed(),
        );
    }
}

/// A page-aligned buffer of `MAX_POPULATE` pages: UFFDIO_COPY wants a
/// page-aligned source.
struct Bounce {
    ptr: *mut u8,
    len: usize,
}

impl Bounce {
    fn new() -> io::Result<Self> {
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
            return Err(last_err("mmap of the uffd bounce buffer"));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn page(&self, i: u64) -> *mut u8 {
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

/// The handler thread's state.
struct Handler {
    m: Arc<Mirror>,
    bounce: Bounce,
    /// Per page of the block being populated: absent before the fault /
    /// in a hole of the file.
    absent: Vec<bool>,
    hole: Vec<bool>,
    /// fallocate is unsupported by the file system: no reservation.
    no_reserve: bool,
}

// SAFETY: the bounce buffer is private to the handler; it moves to the
// handler thread once and is used there only.
unsafe impl Send for Handler {}

impl Handler {
    fn run(mut self) {
        let mut msgs = [UffdMsg::default(); MSG_BATCH];
        let mut last_fault: Option<Instant> = None;
        loop {
            // Within the polling window, try the (non-blocking) fd again
            // rather than sleep: the next fault is probably on its way.
            let polling = last_fault.is_some_and(|t| t.elapsed() < self.m.poll);
            if polling {
                match self.read_msgs(&mut msgs) {
                    Ok(0) => {
                        std::hint::spin_loop();
                        continue;
                    }
                    Ok(count) => {
                        if self.serve_all(&msgs[..count]).is_err() {
                            return;
                        }
                        last_fault = Some(Instant::now());
                        continue;
                    }
                    Err(()) => return,
                }
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.m.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.m.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds, of which poll writes only `revents`.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if errno() == Some(libc::EINTR) {
                    continue;
                }
                log::error!(
                    "{}: uffd poll failed: {}",
                    self.m.name,
                    io::Error::last_os_error()
                );
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                log::error!(
                    "{}: userfaultfd reports an error; fault handler stops",
                    self.m.name
                );
                return;
            }
            match self.read_msgs(&mut msgs) {
                Ok(0) => continue,
                Ok(count) => {
                    if self.serve_all(&msgs[..count]).is_err() {
                        return;
                    }
                    last_fault = Some(Instant::now());
                }
                Err(()) => return,
            }
        }
    }

    /// Reads the pending messages; 0 when there are none (the fd is
    /// non-blocking, or a signal came), `Err` when the fd failed, which
    /// stops the servicer (logged here).
    fn read_msgs(&self, msgs: &mut [UffdMsg; MSG_BATCH]) -> Result<usize, ()> {
        // SAFETY: reads whole messages into our array of plain structs.
        let n = unsafe {
            libc::read(
                self.m.uffd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(msgs),
            )
        };
        if n >= 0 {
            return Ok(n as usize / std::mem::size_of::<UffdMsg>());
        }
        match errno() {
            // Nothing pending (another wake-up took the message), or a signal.
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
            _ => {
                log::error!(
                    "{}: uffd read failed: {}",
                    self.m.name,
                    io::Error::last_os_error()
                );
                Err(())
            }
        }
    }

    fn serve_all(&mut self, msgs: &[UffdMsg]) -> Result<(), Stopped> {
        for msg in msgs {
            self.serve(msg)?;
        }
        Ok(())
    }

    /// Serves one fault message, waiting out ENOSPC and I/O errors.
    ///
    /// While one fault waits, this thread serves no other: faults on other
    /// pages of this device wait too. That is acceptable: a file system
    /// without space stalls every writer anyway, and reads that would be
    /// served meanwhile gain little; nothing is lost either way.
    fn serve(&mut self, msg: &UffdMsg) -> Result<(), Stopped> {
        let mut progress = Progress {
            started: Instant::now(),
            transition: None,
            inserted: 0,
        };
        let m = self.m.clone();
        if msg.event != sys::UFFD_EVENT_PAGEFAULT {
            log::warn!("{}: unexpected userfaultfd event {:#x}", m.name, msg.event);
            return Ok(());
        }
        let base = m.base as u64;
        let addr = msg.pf_address;
        if addr < base || addr >= base + m.size {
            log::warn!("{}: userfault at {addr:#x}, outside the mirror", m.name);
            return Ok(());
        }
        let page = (addr - base) / PAGE_SIZE;
        let wp = msg.pf_flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0;
        let write = msg.pf_flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0 && !m.readonly;
        // A write protect fault is a write whoever raises it (a read of a
        // protected page does not fault). A missing page faulted for
        // writing by a thread outside this process may stand for a read:
        // KVM's async page-fault worker always faults for writing.
        let access = match (write, foreign_thread(msg.pf_ptid)) {
            (false, _) => Access::Read,
            (true, false) => Access::Write,
            (true, true) => Access::UnverifiedWrite,
        };

        let mut backoff = Backoff::new();
        let mut stalled: Option<Instant> = None;
        loop {
            let result = if wp {
                self.mkwrite(page, &mut progress)
            } else {
                self.populate(page, access, &mut progress)
            };
            let Err(e) = result else { break };
            if stalled.is_none() {
                stalled = Some(Instant::now());
                m.shared.metrics.stalls.fetch_add(1, Relaxed);
                match e {
                    ServeError::NoSpace { .. } => log::warn!(
                        "{}: {}: {e}; the faulting vCPU waits until space returns",
                        m.name,
                        m.path
                    ),
                    ServeError::Io { .. } => log::error!(
                        "{}: {}: {e}; the faulting vCPU waits, retrying",
                        m.name,
                        m.path
                    ),
                }
            }
            if m.wait_stop(backoff.next_delay()) {
                return Err(Stopped);
            }
        }
        if let Some(since) = stalled {
            log::info!(
                "{}: {}: fault at offset {:#x} served after waiting {:?}",
                m.name,
                m.path,
                page * PAGE_SIZE,
                since.elapsed()
            );
        }
        Ok(())
    }

    /// Reserves the blocks of `page` in the file before it becomes
    /// writable, so that a later writeback cannot fail for lack of space.
    fn reserve(&mut self, page: u64) -> Result<(), ServeError> {
        let m = &self.m;
        if m.readonly || m.discard_writes || self.no_reserve {
            return Ok(());
        }
        let offset = page * PAGE_SIZE;
        #[cfg(test)]
        if m.inject_enospc
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ServeError::NoSpace { offset });
        }
        loop {
            // SAFETY: plain syscall on our fd; no memory is passed.
            // KEEP_SIZE: a file another program shrank is not grown back
            // (its flushes fail; see PageTracker::check_backing).
            let rc = unsafe {
                libc::fallocate64(
                    m.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off64_t,
                    PAGE_SIZE as libc::off64_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            match errno() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                    return Err(ServeError::NoSpace { offset })
                }
                Some(libc::EOPNOTSUPP) => {
                    log::warn!(
                        "{}: {}: the file system cannot reserve blocks (fallocate unsupported); \
                         a full disk will fail flushes instead of stalling writes",
                        m.name,
                        m.path
                    );
                    self.no_reserve = true;
                    return Ok(());
                }
                _ => {
                    return Err(ServeError::Io {
                        what: "fallocate",
                        offset,
                        source: io::Error::last_os_error(),
                    })
                }
            }
        }
    }

    /// A write-protect fault: the first write to a clean page.
    fn mkwrite(&mut self, page: u64, progress: &mut Progress) -> Result<(), ServeError> {
        let m = self.m.clone();
        if m.shared.states().state(page) == Some(PageState::Absent) {
            // Not expected (absent pages are never protected); populate.
            return self.populate(page, Access::Write, progress);
        }
        self.reserve(page)?;
        // The state change and the unprotect under one lock: a flush cannot
        // clean (and protect) the page in between.
        let mut states = m.shared.states();
        m.protect(page, 1, false).map_err(|source| ServeError::Io {
            what: "UFFDIO_WRITEPROTECT (clear)",
            offset: page * PAGE_SIZE,
            source,
        })?;
        let t = states.fault(page, Access::Write);
        progress
            .transition
            .get_or_insert(t.unwrap_or(Transition::AlreadyDone));
        progress.record(&m.shared);
        Ok(())
    }

    /// A missing page: insert the `populate` block around it; the faulting
    /// page writable unless `access` is a read.
    fn populate(
        &mut self,
        page: u64,
        access: Access,
        progress: &mut Progress,
    ) -> Result<(), ServeError> {
        let write = access != Access::Read;
        let m = self.m.clone();
        let first = page - page % m.populate;
        let n = (first + m.populate).min(m.pages) - first;
        {
            let states = m.shared.states();
            if states.state(page) != Some(PageState::Absent) {
                // Another fault inserted it; its copy woke us already unless
                // we read both messages at once. Wake to be sure.
                m.wake(page).map_err(|source| ServeError::Io {
                    what: "UFFDIO_WAKE",
                    offset: page * PAGE_SIZE,
                    source,
                })?;
                progress.transition.get_or_insert(Transition::AlreadyDone);
                progress.record(&m.shared);
                return Ok(());
            }
            // Only this thread inserts pages, so what is absent now is
            // still absent when the lock is taken again below.
            for i in 0..n {
                self.absent[i as usize] = states.state(first + i) == Some(PageState::Absent);
            }
        }
        if write {
            self.reserve(page)?;
        }
        self.load(first, n)?;

        let wp_of = |p: u64| !(m.readonly || (write && p == page));
        let mut inserted_fault_page = false;
        let mut states = m.shared.states();
        let mut i = 0;
        while i < n {
            if !self.absent[i as usize] {
                i += 1;
                continue;
            }
            let wp = wp_of(first + i);
            let mut j = i + 1;
            while j < n && self.absent[j as usize] && wp_of(first + j) == wp {
                j += 1;
            }
            let mut existed = Vec::new();
            let hole = &self.hole;
            let result = m.copy(first + i, j - i, self.bounce.page(i), wp, |p, what| {
                if p == page {
                    inserted_fault_page = what == Copied::Inserted;
                }
                match what {
                    Copied::Inserted => {
                        let t = states.fault(p, if p == page { access } else { Access::Read });
                        if p == page {
                            progress.transition = t;
                        }
                        progress.inserted += 1;
                        if hole[(p - first) as usize] {
                            m.shared.metrics.zero.fetch_add(1, Relaxed);
                        }
                    }
                    Copied::Existed => existed.push(p),
                }
            });
            for p in existed {
                // Mapped, yet absent in the states: nothing but this thread
                // inserts pages, so this should not happen. Keep the
                // invariant (present and clean => protected) anyway.
                log::warn!(
                    "{}: page {p} was mapped behind the fault engine's back",
                    m.name
                );
                if !m.readonly {
                    if let Err(e) = m.protect(p, 1, true) {
                        log::error!("{}: write-protecting page {p} failed: {e}", m.name);
                        states.mark_dirty(p);
                        continue;
                    }
                }
                states.fault(p, Access::Read);
            }
            result.map_err(|source| ServeError::Io {
                what: "UFFDIO_COPY",
                offset: (first + i) * PAGE_SIZE,
                source,
            })?;
            i = j;
        }
        if !inserted_fault_page {
            m.wake(page).map_err(|source| ServeError::Io {
                what: "UFFDIO_WAKE",
                offset: page * PAGE_SIZE,
                source,
            })?;
            progress.transition.get_or_insert(Transition::AlreadyDone);
        }
        progress.record(&m.shared);
        Ok(())
    }

    /// Fills the bounce buffer with the absent pages of the block: file data
    /// where the file has some, zeroes over its holes (nothing is read or
    /// allocated there).
    fn load(&mut self, first: u64, n: u64) -> Result<(), ServeError> {
        let m = &self.m;
        let fd = m.file.as_raw_fd();
        let begin = first * PAGE_SIZE;
        let end = (first + n) * PAGE_SIZE;
        let hole = &mut self.hole[..n as usize];
        hole.fill(true);
        // SEEK_DATA/SEEK_HOLE move the offset of the file description,
        // which this dup shares; every user of the file uses positioned I/O
        // or the mapping, never the offset.
        let mut off = begin;
        while off < end {
            // SAFETY: plain syscall on our fd.
            let data = unsafe { libc::lseek64(fd, off as libc::off64_t, libc::SEEK_DATA) };
            if data < 0 {
                if errno() != Some(libc::ENXIO) {
                    // No hole support: everything is data.
                    hole.fill(false);
                }
                break;
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: plain syscall on our fd.
            let next = unsafe { libc::lseek64(fd, data as libc::off64_t, libc::SEEK_HOLE) };
            let next = if next < 0 {
                end
            } else {
                (next as u64).clamp(data + 1, end)
            };
            for p in data / PAGE_SIZE..next.div_ceil(PAGE_SIZE) {
                hole[(p - first) as usize] = false;
            }
            off = next;
        }

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
            // SAFETY: pages i..j of the bounce buffer, j <= MAX_POPULATE.
            let got = unsafe { pread_full(&m.file, dst, len, (first + i) * PAGE_SIZE) }.map_err(
                |source| ServeError::Io {
                    what: "pread",
                    offset: (first + i) * PAGE_SIZE,
                    source,
                },
            )?;
            // Past the end of the file: zeroes.
            // SAFETY: the rest of the same pages.
            unsafe { std::ptr::write_bytes(dst.add(got), 0, len - got) };
            i = j;
        }
        Ok(())
    }
}

/// The `uffd` fault engine of one pmem device.
pub struct UffdEngine {
    mirror: Arc<Mirror>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UffdEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdEngine")
            .field("name", &self.mirror.name)
            .field("path", &self.mirror.path)
            .field("size", &self.mirror.size)
            .field("populate", &self.mirror.populate)
            .finish()
    }
}

impl UffdEngine {
    /// Creates the memfd mirror of `file` (a dup the engine owns), registers
    /// it with userfaultfd and starts the handler thread `uffd-<name>`.
    /// `size` is a multiple of the page size (2 MiB for pmem); `tuning`
    /// sets the pages inserted per missing fault and the polling window.
    /// `readonly`: MISSING only, the mirror is mapped read-only.
    /// `discard_writes`: the file is read but never written.
    pub fn start(
        name: &str,
        file: File,
        size: u64,
        readonly: bool,
        discard_writes: bool,
        tuning: UffdTuning,
        shared: Arc<PageTracker>,
    ) -> io::Result<Arc<UffdEngine>> {
        let UffdTuning { populate, poll } = tuning;
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || usize::try_from(size).is_err() {
            return Err(invalid(format!(
                "{name}: size {size:#x} is not a page multiple"
            )));
        }
        if !(1..=MAX_POPULATE).contains(&populate) {
            return Err(invalid(format!(
                "{name}: populate={populate}: expected 1 to {MAX_POPULATE} pages"
            )));
        }
        let pages = size / PAGE_SIZE;
        if shared.states().pages() != pages {
            return Err(invalid(format!(
                "{name}: the page states are for {} pages, the region has {pages}",
                shared.states().pages()
            )));
        }
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

        // SAFETY: eventfd takes only flags and returns a new fd or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(last_err("eventfd"));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };

        let memfd_name = CString::new(format!("pmemvm-{name}"))
            .map_err(|_| invalid(format!("{name}: NUL in the device name")))?;
        // SAFETY: a valid C string; returns a new fd or -1.
        let memfd = unsafe { libc::memfd_create(memfd_name.as_ptr(), libc::MFD_CLOEXEC) };
        if memfd < 0 {
            return Err(last_err("memfd_create"));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
        // SAFETY: plain syscall on our fd.
        if unsafe { libc::ftruncate64(memfd.as_raw_fd(), size as libc::off64_t) } != 0 {
            return Err(last_err("ftruncate of the memfd mirror"));
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
                size as usize,
                prot,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_err("mmap of the memfd mirror"));
        }
        // The mapping keeps the memfd's pages; the fd is no longer needed.
        drop(memfd);
        let mirror = Arc::new(Mirror {
            name: name.to_string(),
            path,
            base: base.cast(),
            size,
            pages,
            readonly,
            discard_writes,
            populate: u64::from(populate),
            poll,
            file,
            uffd,
            stop,
            shared,
            #[cfg(test)]
            inject_enospc: Default::default(),
        });
        // A child process must not inherit the guest's memory.
        // SAFETY: advice on our own mapping.
        if unsafe { libc::madvise(base, size as usize, libc::MADV_DONTFORK) } != 0 {
            log::warn!(
                "{name}: MADV_DONTFORK on the mirror: {}",
                io::Error::last_os_error()
            );
        }

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

        let handler = Handler {
            m: mirror.clone(),
            bounce: Bounce::new()?,
            absent: vec![false; usize::from(MAX_POPULATE)],
            hole: vec![false; usize::from(MAX_POPULATE)],
            no_reserve: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("uffd-{name}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::FaultServicer);
                handler.run()
            })?;
        log::debug!(
            "{name}: uffd engine on {} ({} MiB, populate {populate}, poll {poll:?}{})",
            mirror.path,
            size >> 20,
            if readonly {
                ", read-only"
            } else if discard_writes {
                ", discard_writes"
            } else {
                ""
            }
        );
        Ok(Arc::new(UffdEngine {
            mirror,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The mirror, for the memslot.
    pub fn host_addr(&self) -> *mut u8 {
        self.mirror.base
    }

    pub fn size(&self) -> u64 {
        self.mirror.size
    }

    /// The flush of this device.
    pub fn writeback(self: &Arc<Self>) -> Box<dyn Writeback> {
        Box::new(UffdWriteback {
            engine: self.clone(),
        })
    }
}

impl Drop for UffdEngine {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        let rc = unsafe {
            libc::write(
                self.mirror.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            log::error!(
                "{}: cannot stop the uffd handler: {}",
                self.mirror.name,
                io::Error::last_os_error()
            );
            return;
        }
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("{}: the uffd handler panicked", self.mirror.name);
            }
        }
        // The mirror is unmapped when its last Arc (now ours) goes.
    }
}

/// The ranges to write-protect for a flush of `set`: its runs, merged across
/// gaps of clean pages, which are protected already. One ioctl per span
/// instead of one per run keeps a scattered flush from paying per page.
fn protect_spans(states: &PageStates, set: &DirtySet, pages: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for run in set.runs(pages) {
        if let Some((first, len)) = spans.last_mut() {
            let end = *first + *len;
            if (end..run.first).all(|p| states.state(p) == Some(PageState::Clean)) {
                *len = run.first + run.pages - *first;
                continue;
            }
        }
        spans.push((run.first, run.pages));
    }
    spans
}

/// The flush of the uffd engine: re-arm the catch on the dirty pages, then
/// copy them from the mirror to the file.
pub struct UffdWriteback {
    engine: Arc<UffdEngine>,
}

impl Writeback for UffdWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        let m = &self.engine.mirror;
        let tracker = &m.shared;
        if m.readonly {
            // Nothing is ever dirty, and the mirror has no write protection.
            return tracker
                .begin_flush(|_, _| Ok(()))?
                .finish(Ok(Written::Discarded));
        }
        // Taking the set and protecting it under one lock: a mkwrite cannot
        // lift the protection of a page this flush just cleaned.
        let mut flush = tracker.begin_flush(|states, set| {
            for (first, pages) in protect_spans(states, set, m.pages) {
                m.protect(first, pages, true).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{}: write-protecting pages {first}..{} for a flush: {e}",
                            m.name,
                            first + pages
                        ),
                    )
                })?;
            }
            Ok(())
        })?;
        // A write from here on faults and is dirty for the next flush; one
        // before the protection is in the mirror and is copied below, or
        // seen by the comparison of the unverified pages here.
        match flush.set_mut().drop_unchanged(|page| m.unchanged(page)) {
            Ok(skipped) => {
                tracker
                    .metrics
                    .unchanged_skipped
                    .fetch_add(skipped, Relaxed);
            }
            Err(e) => {
                return flush.finish(Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{}: comparing an unverified page with the file: {e}",
                        m.name
                    ),
                )));
            }
        }
        if m.discard_writes {
            return flush.finish(Ok(Written::Discarded));
        }
        write_back(tracker, &m.file, flush, |run| m.write_run(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protect_spans_merge_across_clean_gaps_only() {
        let mut states = PageStates::new(16);
        for p in 0..8 {
            states.fault(p, Access::Read);
        }
        for p in [1, 3, 5, 10, 12] {
            states.fault(p, Access::Write);
        }
        let set = states.take_dirty();
        // 1..6 merge over clean 2 and 4; 10 and 12 stay apart (11 absent).
        assert_eq!(
            protect_spans(&states, &set, 512),
            vec![(1, 5), (10, 1), (12, 1)]
        );
    }
    use crate::fault::FaultStats;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;

    const MIB: u64 = 1 << 20;
    const PS: usize = PAGE_SIZE as usize;

    /// A temporary file, removed on drop.
    struct Temp(PathBuf);

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The byte every page `page` of a patterned file is filled with.
    fn pattern(page: u64) -> u8 {
        (page.wrapping_mul(7) % 251 + 1) as u8
    }

    struct Fixture {
        engine: Arc<UffdEngine>,
        shared: Arc<PageTracker>,
        /// The test's own handle on the file.
        file: File,
        _temp: Temp,
    }

    impl Fixture {
        /// A `size`-byte sparse file; `data` pages get the pattern.
        fn new(
            name: &str,
            size: u64,
            data: impl IntoIterator<Item = u64>,
            populate: u16,
            readonly: bool,
            discard_writes: bool,
        ) -> Self {
            let tuning = UffdTuning {
                populate,
                ..UffdTuning::default()
            };
            Self::tuned(name, size, data, tuning, readonly, discard_writes)
        }

        fn tuned(
            name: &str,
            size: u64,
            data: impl IntoIterator<Item = u64>,
            tuning: UffdTuning,
            readonly: bool,
            discard_writes: bool,
        ) -> Self {
            let (path, file) = super::super::temp_file(&format!("uffd-{name}"), size);
            let temp = Temp(path.clone());
            for p in data {
                file.write_all_at(&[pattern(p); PS], p * PAGE_SIZE).unwrap();
            }
            file.sync_all().unwrap();
            let engine_file = if readonly || discard_writes {
                File::open(&path).unwrap()
            } else {
                file.try_clone().unwrap()
            };
            let shared = PageTracker::new(size);
            let engine = UffdEngine::start(
                name,
                engine_file,
                size,
                readonly,
                discard_writes,
                tuning,
                shared.clone(),
            )
            .expect("userfaultfd must work on this machine (see PLATFORM.md)");
            Self {
                engine,
                shared,
                file,
                _temp: temp,
            }
        }

        fn ptr(&self, page: u64, offset: usize) -> *mut u8 {
            assert!(page < self.engine.size() / PAGE_SIZE && offset < PS);
            // SAFETY: inside the mirror.
            unsafe { self.engine.host_addr().add(page as usize * PS + offset) }
        }

        fn read(&self, page: u64, offset: usize) -> u8 {
            // SAFETY: inside the live mirror; a raw volatile read.
            unsafe { self.ptr(page, offset).read_volatile() }
        }

        fn write(&self, page: u64, offset: usize, value: u8) {
            // SAFETY: inside the live, writable mirror; a raw volatile write.
            unsafe { self.ptr(page, offset).write_volatile(value) }
        }

        /// The counters, once the handler has finished the last fault: it
        /// counts faults before it releases the states lock.
        fn stats(&self) -> FaultStats {
            drop(self.shared.states());
            self.shared.stats("uffd")
        }

        fn state(&self, page: u64) -> PageState {
            self.shared.states().state(page).unwrap()
        }

        fn blocks(&self) -> u64 {
            self.file.metadata().unwrap().blocks()
        }

        fn file_page(&self, page: u64) -> Vec<u8> {
            let mut buf = vec![0; PS];
            self.file.read_exact_at(&mut buf, page * PAGE_SIZE).unwrap();
            buf
        }

        fn mirror(&self) -> Vec<u8> {
            let size = self.engine.size() as usize;
            let mut buf = vec![0; size];
            // SAFETY: the whole mirror; no thread writes it any more.
            unsafe {
                std::ptr::copy_nonoverlapping(self.engine.host_addr(), buf.as_mut_ptr(), size)
            };
            buf
        }

        fn file_all(&self) -> Vec<u8> {
            let mut buf = vec![0; self.engine.size() as usize];
            self.file.read_exact_at(&mut buf, 0).unwrap();
            buf
        }
    }

    #[test]
    fn read_fault_populates_a_block_from_the_file() {
        let f = Fixture::new("read", 2 * MIB, 0..512, 16, false, false);
        assert_eq!(f.read(20, 100), pattern(20));
        assert_eq!(f.shared.states().counts(), (512 - 16, 16, 0));
        for p in 16..32 {
            assert_eq!(f.state(p), PageState::Clean);
            assert_eq!(f.read(p, 4095), pattern(p), "page {p}");
        }
        let s = f.stats();
        assert_eq!((s.faults.populate_read, s.faults.zero), (1, 0));
        assert_eq!(s.populate_batch.mean, 16.0);
        assert_eq!(f.read(40, 0), pattern(40));
        assert_eq!(f.stats().faults.populate_read, 2);
        assert_eq!(f.state(47), PageState::Clean);
        assert_eq!(f.state(48), PageState::Absent);
    }

    #[test]
    fn populate_block_is_clipped_and_skips_present_pages() {
        let f = Fixture::new("clip", 2 * MIB, 0..512, 3, false, false);
        // Block 510..513 clipped to the region's 512 pages.
        assert_eq!(f.read(511, 0), pattern(511));
        assert_eq!(f.stats().populate_batch.mean, 2.0);
        assert_eq!(f.state(510), PageState::Clean);
        // 4 is present; the block 3..6 inserts only 3 and 5.
        assert_eq!(f.read(4, 0), pattern(4));
        assert_eq!(f.read(3, 0), pattern(3));
        let s = f.stats();
        assert_eq!(s.faults.populate_read, 2);
        assert_eq!(s.populate_batch.mean, (2.0 + 3.0) / 2.0);
    }

    #[test]
    fn hole_reads_are_zero_and_allocate_nothing() {
        let data = [0, 1, 2, 3, 100];
        let f = Fixture::new("hole", 2 * MIB, data, 16, false, false);
        let blocks = f.blocks();
        for p in 0..512 {
            let want = if data.contains(&p) { pattern(p) } else { 0 };
            assert_eq!(f.read(p, 7), want, "page {p}");
        }
        let s = f.stats();
        assert_eq!(s.faults.zero, 512 - data.len() as u64);
        assert_eq!(s.faults.populate_read, 512 / 16);
        assert_eq!(f.blocks(), blocks, "reading holes allocated blocks");
    }

    #[test]
    fn first_write_is_populate_write_or_mkwrite_and_reserves_blocks() {
        let f = Fixture::new("write1", 2 * MIB, [], 1, false, false);
        let blocks = f.blocks();
        f.write(3, 0, 0xab);
        let s = f.stats();
        assert_eq!((s.faults.populate_write, s.faults.mkwrite), (1, 0));
        assert_eq!(f.state(3), PageState::Dirty);
        let reserved = f.blocks();
        assert!(reserved >= blocks + 8, "{blocks} -> {reserved} blocks");
        f.write(3, 1, 0xac);
        assert_eq!(f.stats().faults.populate_write, 1, "the page is writable");

        assert_eq!(f.read(5, 0), 0);
        assert_eq!(f.state(5), PageState::Clean);
        assert_eq!(f.blocks(), reserved);
        f.write(5, 0, 0xcd);
        let s = f.stats();
        assert_eq!((s.faults.populate_read, s.faults.mkwrite), (1, 1));
        assert_eq!(f.state(5), PageState::Dirty);
        assert!(f.blocks() >= reserved + 8);
        assert_eq!(
            (f.read(3, 0), f.read(3, 1), f.read(5, 0)),
            (0xab, 0xac, 0xcd)
        );
        // Nothing reaches the file before a flush.
        assert_eq!(f.file_page(3), vec![0; PS]);

        let g = Fixture::new("write16", 2 * MIB, 0..512, 16, false, false);
        g.write(5, 9, 0x11);
        assert_eq!(g.stats().faults.populate_write, 1);
        assert_eq!(g.state(5), PageState::Dirty);
        assert_eq!(g.shared.states().counts(), (512 - 16, 15, 1));
        assert_eq!((g.read(5, 8), g.read(5, 9)), (pattern(5), 0x11));
        g.write(6, 0, 0x22);
        let s = g.stats();
        assert_eq!((s.faults.populate_write, s.faults.mkwrite), (1, 1));
        assert_eq!(g.state(6), PageState::Dirty);
    }

    #[test]
    fn writeback_writes_exactly_the_dirty_pages_and_rearms() {
        let f = Fixture::new("flush", 2 * MIB, 0..512, 16, false, false);
        let mut wb = f.engine.writeback();
        for p in 0..512 {
            f.read(p, 0);
        }
        let dirty = [1, 2, 3, 200, 511];
        for &p in &dirty {
            f.write(p, 10, 0xee);
        }
        assert_eq!(f.stats().faults.mkwrite, 5);
        let report = wb.writeback().unwrap();
        assert_eq!(report.pages, Some(5));
        let s = f.stats();
        assert_eq!((s.flush.pages, s.flush.runs, s.flush.last_pages), (5, 3, 5));
        for p in 0..512 {
            let mut want = vec![pattern(p); PS];
            if dirty.contains(&p) {
                want[10] = 0xee;
            }
            assert!(f.file_page(p) == want, "page {p}");
        }
        assert_eq!(f.shared.states().counts(), (0, 512, 0));

        assert_eq!(wb.writeback().unwrap().pages, Some(0));
        let s = f.stats();
        assert_eq!((s.flush.pages, s.flush.last_pages), (5, 0));

        // The catch is armed again.
        f.write(2, 11, 0xef);
        assert_eq!(f.stats().faults.mkwrite, 6);
        f.write(2, 12, 0xf0);
        assert_eq!(f.stats().faults.mkwrite, 6);
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        assert_eq!((f.file_page(2)[11], f.file_page(2)[12]), (0xef, 0xf0));
        assert_eq!(f.stats().flush.pages, 6);
    }

    /// Writes `bytes` into page `page` of the mirror from a child process,
    /// as KVM's async page-fault worker touches it: a fault by a task
    /// outside this process, for writing.
    fn foreign_write(f: &Fixture, page: u64, bytes: &[u8]) {
        let parent = std::process::id() as libc::pid_t;
        let local = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let remote = libc::iovec {
            iov_base: f.ptr(page, 0).cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: the child only calls process_vm_writev and _exit, both
        // async-signal-safe; the iovecs point at live memory of ours.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", io::Error::last_os_error());
        if child == 0 {
            // SAFETY: as above.
            let n = unsafe { libc::process_vm_writev(parent, &local, 1, &remote, 1, 0) };
            // SAFETY: ends the child without running the parent's atexit.
            unsafe { libc::_exit(if n == bytes.len() as isize { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "process_vm_writev from the child failed ({status:#x})"
        );
    }

    /// A missing page faulted for writing by another task (KVM's async
    /// page-fault worker does this for guest reads) is dirty but
    /// unverified: the flush writes it only if its data changed.
    #[test]
    fn foreign_write_faults_are_verified_at_flush() {
        let f = Fixture::new("foreign", 2 * MIB, [40], 16, false, false);
        let mut wb = f.engine.writeback();
        // Same data as the file: a hole stays zero, page 40 keeps its
        // pattern.
        foreign_write(&f, 3, &[0]);
        foreign_write(&f, 40, &[pattern(40)]);
        // Changed data.
        foreign_write(&f, 100, &[0x5a]);
        let s = f.stats();
        assert_eq!(
            (s.faults.populate_unverified, s.faults.populate_write),
            (3, 0)
        );
        for p in [3, 40, 100] {
            assert_eq!(f.state(p), PageState::Dirty, "page {p}");
        }
        let blocks = f.blocks();
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        let s = f.stats();
        assert_eq!((s.flush.pages, s.flush.unchanged_skipped), (1, 2));
        assert_eq!(f.file_page(100)[0], 0x5a);
        assert_eq!(f.file_page(3), vec![0; PS]);
        for p in [3, 40, 100] {
            assert_eq!(f.state(p), PageState::Clean, "page {p}");
        }
        // Clean and protected again: the next write, from here, is a
        // mkwrite and is written back.
        f.write(3, 0, 7);
        assert_eq!(f.stats().faults.mkwrite, 1);
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        assert_eq!(f.file_page(3)[0], 7);
        // Its block was reserved at the unverified fault: a write may follow.
        assert_eq!(f.blocks(), blocks);
    }

    /// With a polling window the servicer serves faults that arrive while
    /// it polls, as it does after a sleep, and still stops at once when
    /// the engine goes.
    #[test]
    fn a_polling_servicer_serves_every_fault_and_stops() {
        let tuning = UffdTuning {
            populate: 1,
            poll: Duration::from_millis(1),
        };
        let f = Fixture::tuned("poll", 2 * MIB, 0..512, tuning, false, false);
        let mut wb = f.engine.writeback();
        for p in 0..64 {
            assert_eq!(f.read(p, 0), pattern(p), "page {p}");
            f.write(p, 7, 0xaa);
        }
        let s = f.stats();
        assert_eq!((s.faults.populate_read, s.faults.mkwrite), (64, 64));
        assert_eq!(wb.writeback().unwrap().pages, Some(64));
        assert_eq!(f.file_page(63)[7], 0xaa);
        let Fixture { engine, .. } = f;
        let started = Instant::now();
        drop(wb);
        drop(engine);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn concurrent_faults_on_one_page_populate_it_once() {
        let f = Arc::new(Fixture::new("race", 2 * MIB, 0..512, 1, false, false));
        let rounds = 32;
        for p in 0..rounds {
            let barrier = Arc::new(Barrier::new(2));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (f, barrier) = (f.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        f.read(p, 0)
                    })
                })
                .collect();
            for t in threads {
                assert_eq!(t.join().unwrap(), pattern(p));
            }
        }
        let s = f.stats();
        assert_eq!(s.faults.populate_read, rounds);
        assert!(s.faults.already_done <= rounds);
        assert_eq!(s.stalls, 0);
        assert_eq!(f.shared.states().counts(), (512 - rounds, rounds, 0));
    }

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

    #[test]
    fn concurrent_writes_and_flushes_lose_nothing() {
        let f = Arc::new(Fixture::new("stress", 2 * MIB, 0..512, 16, false, false));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Both writers share pages 0..128.
                        let page = x % 128;
                        n += 1;
                        for (i, b) in n.to_le_bytes().iter().enumerate() {
                            f.write(page, w as usize * 8 + i, *b);
                        }
                    }
                    n
                })
            })
            .collect();
        let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flusher = {
            let (f, stop, flushes) = (f.clone(), stop.clone(), flushes.clone());
            std::thread::spawn(move || {
                let mut wb = f.engine.writeback();
                while !stop.load(Ordering::Relaxed) {
                    wb.writeback().unwrap();
                    flushes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // At least 200 ms and 10 flushes, however loaded the machine is.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(200)
            || (flushes.load(Ordering::Relaxed) < 10 && started.elapsed() < Duration::from_secs(5))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|t| t.join().unwrap()).sum();
        flusher.join().unwrap();
        let flushes = flushes.load(Ordering::Relaxed);
        f.engine.writeback().writeback().unwrap();
        let s = f.stats();
        eprintln!(
            "stress: {writes} writes, {flushes} flushes, {} mkwrites, {} pages flushed",
            s.faults.mkwrite, s.flush.pages
        );
        // 128 pages are written: more first writes than that were caught
        // after flushes re-armed the catch.
        assert!(flushes >= 10, "{flushes} flushes");
        assert!(s.faults.mkwrite + s.faults.populate_write > 128, "{s:?}");
        assert!(f.file_all() == f.mirror(), "a write was lost");
        assert_eq!(f.shared.states().counts().2, 0);
    }

    #[test]
    fn discard_writes_never_touch_the_file() {
        let f = Fixture::new("discard", 2 * MIB, 0..256, 16, false, true);
        let before = f.file_all();
        let blocks = f.blocks();
        let mut wb = f.engine.writeback();
        f.write(1, 0, 0x99);
        f.write(300, 0, 0x98);
        assert_eq!(f.read(2, 0), pattern(2));
        let report = wb.writeback().unwrap();
        assert_eq!(report.pages, Some(0));
        assert_eq!(f.stats().flush.pages, 0);
        // Re-armed: the next write is caught again.
        let mkwrite = f.stats().faults.mkwrite;
        f.write(1, 1, 0x97);
        assert_eq!(f.stats().faults.mkwrite, mkwrite + 1);
        wb.writeback().unwrap();
        assert_eq!(
            (f.read(1, 0), f.read(1, 1), f.read(300, 0)),
            (0x99, 0x97, 0x98)
        );
        assert!(f.file_all() == before);
        assert_eq!(f.blocks(), blocks);
    }

    #[test]
    fn readonly_serves_reads_only() {
        let f = Fixture::new("ro", 2 * MIB, 0..512, 16, true, false);
        for p in (0..512).step_by(7) {
            assert_eq!(f.read(p, 1), pattern(p));
        }
        assert_eq!(f.engine.writeback().writeback().unwrap().pages, Some(0));
        let s = f.stats();
        assert_eq!(
            (s.faults.populate_read, s.faults.mkwrite, s.flush.pages),
            (32, 0, 0)
        );
        assert_eq!(f.shared.states().counts().2, 0);
    }

    #[test]
    fn enospc_stalls_the_writer_until_space_returns() {
        let f = Arc::new(Fixture::new("enospc", 2 * MIB, 0..512, 1, false, false));
        assert_eq!(f.read(7, 0), pattern(7));
        f.engine.mirror.inject_enospc.store(3, Relaxed);
        let started = Instant::now();
        let writer = {
            let f = f.clone();
            std::thread::spawn(move || f.write(7, 0, 0x42))
        };
        writer.join().unwrap();
        // 1 + 2 + 4 ms of back-off.
        assert!(started.elapsed() >= Duration::from_millis(7));
        let s = f.stats();
        assert_eq!((s.stalls, s.faults.mkwrite), (1, 1));
        assert_eq!(f.state(7), PageState::Dirty);
        f.write(8, 0, 0x43);
        let s = f.stats();
        assert_eq!((s.stalls, s.faults.populate_write), (1, 1));
        assert_eq!(f.engine.writeback().writeback().unwrap().pages, Some(2));
        assert_eq!((f.file_page(7)[0], f.file_page(8)[0]), (0x42, 0x43));
    }

    #[test]
    fn truncated_file_is_never_grown_back_and_flushes_fail() {
        let f = Fixture::new("trunc", 2 * MIB, 0..4, 1, false, false);
        let mut wb = f.engine.writeback();
        f.write(1, 0, 0x11);
        assert_eq!(wb.writeback().unwrap().pages, Some(1));
        f.file.set_len(2 * PAGE_SIZE).unwrap();
        // Reads past the end are zeroes; first writes there reserve no
        // length: the file stays short.
        assert_eq!(f.read(300, 0), 0);
        f.write(300, 0, 0x22);
        f.write(1, 1, 0x33);
        assert_eq!(f.file.metadata().unwrap().len(), 2 * PAGE_SIZE);
        let err = wb.writeback().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(
            (f.state(1), f.state(300)),
            (PageState::Dirty, PageState::Dirty)
        );
        assert_eq!(f.file.metadata().unwrap().len(), 2 * PAGE_SIZE);
        // Growing it back does not make the lost pages durable.
        f.file.set_len(2 * MIB).unwrap();
        assert!(wb.writeback().is_err());
        let s = f.stats();
        assert!(s.backing_truncated);
        assert_eq!(s.dirty_pages, 2);
    }

    #[test]
    fn invalid_arguments_are_refused() {
        let file = File::open("/dev/null").unwrap();
        let shared = PageTracker::new(2 * MIB);
        for (size, populate) in [(2 * MIB, 0), (2 * MIB, 513), (2 * MIB + 1, 1), (4 * MIB, 1)] {
            let err = UffdEngine::start(
                "bad",
                file.try_clone().unwrap(),
                size,
                false,
                false,
                UffdTuning {
                    populate,
                    ..UffdTuning::default()
                },
                shared.clone(),
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{size} {populate}");
        }
    }
}
