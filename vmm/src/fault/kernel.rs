//! The `kernel` engine: KVM populates the guest's pages from the
//! MAP_SHARED file itself, and its dirty log reports first writes; a flush
//! harvests that log and writes back the dirty runs of the file.
//! `engine=prefault` is this engine with the region populated before boot.
//! `flush=fsync` and `flush=msync` are other VMMs' policies on the same
//! mapping, for comparison: no dirty log, and the whole file synced.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::BusDevice;
use devices::ratelimit::LogLimiter;
use devices::virtio::pmem::{FlushPolicy, PmemBacking, Writeback, WritebackReport};

use super::dirty_log::{DirtyLog, ReadsLogged};
use super::engine::{FaultEngine, Memslot};
use super::file_io::pwrite_all;
use super::write_through::PmemWriteThrough;
use super::{dirty_log, Flush, PageTracker, Run, TruncationGuard, Written};
use crate::abi::magic::{HUGETLBFS_MAGIC, TMPFS_MAGIC};
use crate::abi::mman::{MADV_POPULATE_READ, MADV_POPULATE_WRITE};
use crate::host::HostKind;

/// Starts writeback of a run of the page cache of a MAP_SHARED file. The
/// fdatasync that follows waits for it and flushes the device cache.
pub fn start_range_writeback(file: &File, run: Run) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            run.offset() as libc::off64_t,
            run.bytes() as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How the kernel and prefault engines get a writeback's runs to the file.
/// Normally `sync_file_range` of the page cache the guest wrote through the
/// MAP_SHARED mapping. After a failed writeback the page cache cannot be
/// trusted: Linux may have marked the pages clean and reported the error
/// once ("fsyncgate"), so a plain retry would write nothing and succeed.
/// The next writeback therefore copies the dirty runs from the mapping with
/// pwrite, which dirties the page cache again.
pub struct MappedRuns {
    file: File,
    /// Start of the file's mapping (the guest's view of the pages); kept as
    /// an integer, only the kernel reads it (pwrite's source).
    host: usize,
    size: u64,
    rewrite: bool,
    /// Test hook: the next writeback's first run fails with EIO.
    #[cfg(test)]
    fail_next: bool,
}

impl MappedRuns {
    /// `host` must be the start of a mapping of `size` bytes (the file's,
    /// except in tests) that outlives `self`.
    pub fn new(file: File, host: *mut u8, size: u64) -> Self {
        Self {
            file,
            host: host as usize,
            size,
            rewrite: false,
            #[cfg(test)]
            fail_next: false,
        }
    }

    /// Copies a run from the mapping to the file.
    fn copy_run(&self, run: Run) -> io::Result<()> {
        if run.offset() + run.bytes() > self.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the run lies inside the mapping, which outlives self. Only
        // the kernel reads it: a page it cannot provide (the file shrank)
        // fails the pwrite with EFAULT instead of raising SIGBUS here.
        unsafe {
            pwrite_all(
                &self.file,
                (self.host as *const u8).add(run.offset() as usize),
                run.bytes() as usize,
                run.offset(),
            )
        }
    }

    pub fn write_back(&mut self, flush: Flush<'_>) -> io::Result<WritebackReport> {
        let rewrite = self.rewrite;
        #[cfg(test)]
        let mut fail = std::mem::take(&mut self.fail_next);
        let this = &*self;
        let tracker = flush.tracker();
        let result = flush.write_back(&this.file, |run| {
            #[cfg(test)]
            if std::mem::take(&mut fail) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if rewrite {
                this.copy_run(run)
            } else {
                start_range_writeback(&this.file, run)
            }
        });
        if result.is_err() && !rewrite && !tracker.truncated() {
            log::warn!("the next flush rewrites the dirty pages from guest memory, since the page cache may have dropped them");
        }
        self.rewrite = result.is_err();
        result
    }
}

/// Flush for the kernel and prefault engines: harvest KVM's dirty log into
/// the page states (which re-arms the catch), then write back just those
/// pages of the file.
pub struct DirtyLogWriteback {
    tracker: Arc<PageTracker>,
    log: Arc<dirty_log::DirtyLog>,
    runs: MappedRuns,
}

impl Writeback for DirtyLogWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        let flush = self.log.begin_flush(&self.tracker)?;
        self.runs.write_back(flush)
    }
}

/// Flush under a peer policy (`flush=fsync` or `flush=msync`): the whole
/// file or mapping is synced, whatever the guest wrote. Writeback's mkclean
/// write-protects the written pages in the host's page tables, and the MMU
/// notifier zaps them from KVM's, which is how these VMMs catch the next
/// write.
pub struct WholeFileSync {
    tracker: Arc<PageTracker>,
    file: File,
    host: usize,
    size: u64,
    policy: FlushPolicy,
}

impl WholeFileSync {
    fn sync(&self) -> io::Result<()> {
        self.tracker.check_backing(&self.file)?;
        if self.policy == FlushPolicy::Msync {
            // SAFETY: the device's own live mapping of `size` bytes; msync
            // only writes its dirty pages back.
            let rc = unsafe {
                libc::msync(
                    self.host as *mut libc::c_void,
                    self.size as usize,
                    libc::MS_SYNC,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        } else {
            self.file.sync_all()?;
        }
        self.tracker.check_backing(&self.file)
    }
}

impl Writeback for WholeFileSync {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        // Takes the pages of emulated stores (the only ones tracked): the
        // sync covers them.
        let mut flush = self.tracker.begin_flush(|_, _| Ok(()))?;
        let started = Instant::now();
        let result = self.sync();
        flush.add_sync(started.elapsed());
        flush.finish(result.map(|()| Written::WholeFile))
    }
}

/// The kernel engine of one device.
pub struct KernelEngine {
    name: &'static str,
    tracker: Arc<PageTracker>,
    guard: Arc<TruncationGuard>,
    /// KVM's dirty log, when the guest's writes can reach the file.
    log: Option<Arc<DirtyLog>>,
    /// A dup of the backing file, for the flush and emulated stores.
    file: File,
    path: String,
    /// The file's mapping (the memslot's host address); owned by the device.
    host: usize,
    size: u64,
    readonly: bool,
    /// The guest's writes reach the file.
    writes_reach_file: bool,
    flush: FlushPolicy,
    /// The file system was full when last looked at.
    full: AtomicBool,
}

static GUARD_FAILED: LogLimiter = LogLimiter::new(4, 100_000);

impl KernelEngine {
    /// The engine on `backing`'s mapping, which must outlive it; `log` is
    /// the VM's dirty log if [`PmemBacking::writes_reach_file`] and the policy is
    /// [`FlushPolicy::DirtySet`], and `slot` the region's memslot.
    /// `prefault` populates the whole region first.
    pub fn start(
        name: &str,
        backing: &PmemBacking,
        slot: u32,
        log: Option<&Arc<DirtyLog>>,
        prefault: bool,
        flush: FlushPolicy,
        tracker: Arc<PageTracker>,
    ) -> io::Result<Self> {
        let path = backing.path().display().to_string();
        if prefault {
            populate(backing)?;
        }
        let writes_reach_file = backing.writes_reach_file();
        let log = log
            .filter(|_| writes_reach_file && flush == FlushPolicy::DirtySet)
            .cloned();
        if let Some(log) = &log {
            warn_reads_logged(name, &path, backing.file());
            log.track(slot, backing.size(), tracker.clone(), ReadsLogged::No);
        }
        let guard = Arc::new(TruncationGuard::new(
            backing.file().try_clone()?,
            path.clone(),
            backing.host_addr(),
            backing.size(),
            backing.readonly(),
            tracker.clone(),
        ));
        Ok(Self {
            name: if prefault { "prefault" } else { "kernel" },
            tracker,
            guard,
            log,
            file: backing.file().try_clone()?,
            path,
            host: backing.host_addr() as usize,
            size: backing.size(),
            readonly: backing.readonly(),
            writes_reach_file,
            flush,
            full: AtomicBool::new(false),
        })
    }
}

impl FaultEngine for KernelEngine {
    fn name(&self) -> &'static str {
        self.name
    }

    fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
    }

    fn memslot(&self) -> Memslot {
        Memslot::new(self.host as u64, self.readonly, self.log.is_some())
    }

    fn writeback(&self) -> io::Result<Box<dyn Writeback>> {
        if !self.writes_reach_file {
            // Read-only, or a private mapping.
            return Ok(Box::new(NothingToWrite));
        }
        Ok(match &self.log {
            Some(log) => Box::new(DirtyLogWriteback {
                tracker: self.tracker.clone(),
                log: log.clone(),
                runs: MappedRuns::new(self.file.try_clone()?, self.host as *mut u8, self.size),
            }),
            None => Box::new(WholeFileSync {
                tracker: self.tracker.clone(),
                file: self.file.try_clone()?,
                host: self.host,
                size: self.size,
                policy: self.flush,
            }),
        })
    }

    fn emulated_access(&self) -> io::Result<Option<Arc<Mutex<dyn BusDevice>>>> {
        if !self.writes_reach_file {
            return Ok(None);
        }
        Ok(Some(Arc::new(Mutex::new(PmemWriteThrough::new(
            self.file.try_clone()?,
            self.path.clone(),
            self.size,
            self.tracker.clone(),
            Some(self.guard.clone()),
        )))))
    }

    /// A file that another program shrank is overlaid with anonymous
    /// memory past its new end, so the vCPU can go on at once.
    fn host_fault(&self) -> bool {
        match self.guard.check() {
            Ok(patched) => patched,
            Err(e) => {
                if GUARD_FAILED.allow() {
                    log::error!("checking a pmem file for truncation failed: {e}");
                }
                false
            }
        }
    }

    /// On hosts with EPT/NPT the vCPU that touches a page past a shrunk
    /// file's end may never return to pmemvm: while the guest has
    /// interrupts on, KVM retries the fault through its async page-fault
    /// worker and halts the vCPU instead of failing KVM_RUN. So the device
    /// thread looks too, and says when the file system fills or frees up.
    fn watch(&self) {
        self.host_fault();
        let now_full = self.guard.file_system_full().unwrap_or(false);
        if now_full != self.full.swap(now_full, Ordering::Relaxed) {
            if now_full {
                log::warn!(
                    "{}: its file system is full; guest writes that need new blocks wait until space returns",
                    self.path
                );
            } else {
                log::info!("{}: its file system has space again", self.path);
            }
        }
    }
}

/// The flush of a device whose writes never reach its file.
struct NothingToWrite;

impl Writeback for NothingToWrite {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        Ok(WritebackReport::default())
    }
}

/// tmpfs and hugetlbfs map shared pages writable on a read fault (they
/// need no write notification). On a host with EPT/NPT, KVM then maps the
/// page writable for the guest's read and its dirty log counts it: the
/// kernel engine writes each page the guest reads back once, unchanged.
fn warn_reads_logged(name: &str, path: &str, file: &File) {
    if HostKind::detect() != HostKind::Hardware {
        return;
    }
    // SAFETY: fstatfs fills the struct we own; the fd is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return;
    }
    let fs = match st.f_type {
        TMPFS_MAGIC => "tmpfs",
        HUGETLBFS_MAGIC => "hugetlbfs",
        _ => return,
    };
    log::warn!(
        "{name}: {path} is on {fs}, which maps pages writable on reads: KVM then logs every page the guest reads as dirty, and the kernel engine writes it back once, unchanged (a file on ext4 or xfs, or engine=uffd, avoids it)"
    );
}

/// `engine=prefault`: populates the whole mapping before boot, then makes
/// it durable so that the guest's first flush does not pay for it.
fn populate(backing: &PmemBacking) -> io::Result<()> {
    // MADV_POPULATE_READ/WRITE: Linux 5.14.
    let advice = if backing.readonly() {
        MADV_POPULATE_READ
    } else {
        MADV_POPULATE_WRITE
    };
    let started = std::time::Instant::now();
    // SAFETY: advice on the backing's own live mapping; no memory is
    // handed over.
    let rc = unsafe { libc::madvise(backing.host_addr().cast(), backing.size() as usize, advice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if !backing.readonly() && !backing.discard_writes() {
        backing.file().sync_data()?;
    }
    log::info!(
        "pmem {}: prefaulted {} MiB in {:?}",
        backing.path().display(),
        backing.size() >> 20,
        started.elapsed()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{temp_file, PAGE_SIZE};
    use std::os::unix::fs::FileExt;

    #[test]
    fn retry_after_a_failed_write_back_copies_from_guest_memory() {
        let (path, f) = temp_file("rewrite", 8 * PAGE_SIZE);
        // Stands in for the mapping: memory the file's page cache does not
        // share, so only a copy gets its bytes into the file.
        let mut mem = vec![0u8; 8 * PAGE_SIZE as usize];
        mem[3 * PAGE_SIZE as usize..][..5].copy_from_slice(b"guest");
        let shared = PageTracker::new(8 * PAGE_SIZE);
        let mut runs = MappedRuns::new(f.try_clone().unwrap(), mem.as_mut_ptr(), 8 * PAGE_SIZE);
        let page3 = |f: &File| {
            let mut b = [0u8; 5];
            f.read_exact_at(&mut b, 3 * PAGE_SIZE).unwrap();
            b
        };

        shared.states().mark_dirty(3);
        runs.fail_next = true;
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        let err = runs.write_back(flush).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(shared.stats("kernel").dirty_pages, 1);

        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        assert_eq!(runs.write_back(flush).unwrap().pages, Some(1));
        assert_eq!(&page3(&f), b"guest", "the retry must rewrite the page");
        assert_eq!(shared.stats("kernel").dirty_pages, 0);

        // After a success, back to the page cache: memory is not copied.
        mem[3 * PAGE_SIZE as usize] = b'X';
        shared.states().mark_dirty(3);
        let flush = shared.begin_flush(|_, _| Ok(())).unwrap();
        runs.write_back(flush).unwrap();
        assert_eq!(&page3(&f), b"guest");
        std::fs::remove_file(path).unwrap();
    }
}
