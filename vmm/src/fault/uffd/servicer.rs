//! The servicer thread of one device: waits for userfaultfd messages (and
//! the stop eventfd), asks the policy what each fault needs and carries the
//! plan out, waiting out ENOSPC and I/O errors with a backoff.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::Block;
use super::mirror::{errno, Copied, Mirror};
use super::policy::{self, Action, Fault, FaultKind, Plan, Region, Span};
use crate::abi::userfaultfd::{
    UffdMsg, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE,
};
use crate::fault::{Access, Backoff, PageTracker, Transition, PAGE_SIZE};
use crate::worker::StopEvent;

/// Messages read from the uffd per read(2).
const MSG_BATCH: usize = 64;

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

/// The engine is being dropped: the servicer thread ends.
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
    fn record(&self, tracker: &PageTracker) {
        tracker.metrics.record_fault(
            self.transition.unwrap_or(Transition::AlreadyDone),
            self.inserted,
            self.started.elapsed(),
        );
    }
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

/// The servicer thread's state.
pub(super) struct Servicer {
    pub(super) m: Arc<Mirror>,
    pub(super) tracker: Arc<PageTracker>,
    pub(super) region: Region,
    /// How long to keep polling for the next fault after one.
    pub(super) poll: Duration,
    /// eventfd: readable once the engine is dropped.
    pub(super) stop: StopEvent,
    pub(super) block: Block,
    /// fallocate is unsupported by the file system: no reservation.
    pub(super) no_reserve: bool,
}

impl Servicer {
    pub(super) fn run(mut self) {
        let mut msgs = [UffdMsg::default(); MSG_BATCH];
        let mut last_fault: Option<Instant> = None;
        loop {
            // Within the polling window, try the (non-blocking) fd again
            // rather than sleep: the next fault is probably on its way.
            let polling = last_fault.is_some_and(|t| t.elapsed() < self.poll);
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
                    fd: self.stop.as_raw_fd(),
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

    /// The fault a message reports, or `None` (logged) for anything else.
    fn decode(&self, msg: &UffdMsg) -> Option<Fault> {
        let m = &self.m;
        if msg.event != UFFD_EVENT_PAGEFAULT {
            log::warn!("{}: unexpected userfaultfd event {:#x}", m.name, msg.event);
            return None;
        }
        let addr = msg.pf_address;
        let Some(page) = m.page_of(addr) else {
            log::warn!("{}: userfault at {addr:#x}, outside the mirror", m.name);
            return None;
        };
        let kind = if msg.pf_flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
            FaultKind::WriteProtect
        } else {
            FaultKind::Missing
        };
        // A missing page faulted for writing by a thread outside this
        // process may stand for a read: KVM's async page-fault worker
        // always faults for writing.
        let write = msg.pf_flags & UFFD_PAGEFAULT_FLAG_WRITE != 0 && !self.region.readonly;
        let access = match (write, foreign_thread(msg.pf_ptid)) {
            (false, _) => Access::Read,
            (true, false) => Access::Write,
            (true, true) => Access::UnverifiedWrite,
        };
        Some(Fault { page, kind, access })
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
        let Some(fault) = self.decode(msg) else {
            return Ok(());
        };
        let m = self.m.clone();
        let mut backoff = Backoff::new();
        let mut stalled: Option<Instant> = None;
        while let Err(e) = self.attempt(fault, &mut progress) {
            if stalled.is_none() {
                stalled = Some(Instant::now());
                self.tracker.metrics.stalls.fetch_add(1, Relaxed);
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
            if self.stop.wait(backoff.next_delay()) {
                return Err(Stopped);
            }
        }
        if let Some(since) = stalled {
            log::info!(
                "{}: {}: fault at offset {:#x} served after waiting {:?}",
                m.name,
                m.path,
                fault.page * PAGE_SIZE,
                since.elapsed()
            );
        }
        Ok(())
    }

    /// One attempt at a fault: plans under the states lock, then carries
    /// the plan out. Reserving and loading run without the lock (only this
    /// thread inserts pages, so the plan's absent pages stay absent); each
    /// state change runs under it with the ioctl that makes it true in the
    /// mirror.
    fn attempt(&mut self, fault: Fault, progress: &mut Progress) -> Result<(), ServeError> {
        let tracker = self.tracker.clone();
        let states = tracker.states();
        let Plan {
            page,
            access,
            reserve,
            action,
        } = policy::plan(&states, &self.region, fault);
        let spans = match action {
            Action::Wake => {
                // Another fault inserted it; its copy woke us already unless
                // we read both messages at once. Wake to be sure.
                self.wake(page)?;
                progress.transition.get_or_insert(Transition::AlreadyDone);
                progress.record(&tracker);
                return Ok(());
            }
            Action::Unprotect => None,
            Action::Copy(spans) => Some(spans),
        };
        drop(states);
        if reserve {
            self.reserve(page)?;
        }
        match spans {
            None => self.unprotect(page, progress),
            Some(spans) => self.copy(page, access, &spans, progress),
        }
    }

    fn wake(&self, page: u64) -> Result<(), ServeError> {
        self.m.wake(page).map_err(|source| ServeError::Io {
            what: "UFFDIO_WAKE",
            offset: page * PAGE_SIZE,
            source,
        })
    }

    /// Reserves the blocks of `page` in the file before it becomes
    /// writable, so that a later writeback cannot fail for lack of space.
    fn reserve(&mut self, page: u64) -> Result<(), ServeError> {
        let m = &self.m;
        if self.no_reserve {
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

    /// The first write to a present page (mkwrite).
    fn unprotect(&mut self, page: u64, progress: &mut Progress) -> Result<(), ServeError> {
        let tracker = &self.tracker;
        // The state change and the unprotect under one lock: a flush cannot
        // clean (and protect) the page in between.
        let mut states = tracker.states();
        self.m
            .protect(page, 1, false)
            .map_err(|source| ServeError::Io {
                what: "UFFDIO_WRITEPROTECT (clear)",
                offset: page * PAGE_SIZE,
                source,
            })?;
        let t = states.fault(page, Access::Write);
        progress
            .transition
            .get_or_insert(t.unwrap_or(Transition::AlreadyDone));
        progress.record(tracker);
        Ok(())
    }

    /// A missing page: loads the plan's spans and inserts them, the
    /// faulting page with `access`; its thread wakes when the page is in.
    fn copy(
        &mut self,
        page: u64,
        access: Access,
        spans: &[Span],
        progress: &mut Progress,
    ) -> Result<(), ServeError> {
        let m = self.m.clone();
        let tracker = self.tracker.clone();
        self.block
            .load(&m.file, spans)
            .map_err(|e| ServeError::Io {
                what: "pread",
                offset: e.offset,
                source: e.source,
            })?;

        let mut inserted_fault_page = false;
        let mut states = tracker.states();
        for span in spans {
            let mut existed = Vec::new();
            let block = &self.block;
            let result = m.copy(
                span.first,
                span.pages,
                block.source(span.first),
                span.write_protect,
                |p, what| {
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
                            if block.hole(p) {
                                tracker.metrics.zero.fetch_add(1, Relaxed);
                            }
                        }
                        Copied::Existed => existed.push(p),
                    }
                },
            );
            for p in existed {
                // Mapped, yet absent in the states: nothing but this thread
                // inserts pages, so this should not happen. Keep the
                // invariant (present and clean => protected) anyway.
                log::warn!(
                    "{}: page {p} was mapped behind the fault engine's back",
                    m.name
                );
                if !self.region.readonly {
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
                offset: span.first * PAGE_SIZE,
                source,
            })?;
        }
        if !inserted_fault_page {
            self.wake(page)?;
            progress.transition.get_or_insert(Transition::AlreadyDone);
        }
        progress.record(&tracker);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::uffd::fixture::*;
    use crate::fault::uffd::UffdTuning;
    use crate::fault::PageState;
    use std::sync::Barrier;

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
}
