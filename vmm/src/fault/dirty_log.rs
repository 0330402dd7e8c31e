//! KVM dirty logging for the kernel, prefault and mirror engines: KVM
//! populates the pmem memslots on its own faults (from the MAP_SHARED file,
//! or from the mirror engine's memfd), and reports each page's first write
//! since the last harvest.
//!
//! The dirty ring gives exact GFNs per vCPU and costs nothing to harvest when
//! nothing was written. Where KVM has no ring, KVM_GET_DIRTY_LOG (without
//! manual protect) fetches the bitmap and write-protects in one step.
//!
//! Harvest order makes racing writes safe: entries are collected, then
//! KVM_RESET_DIRTY_RINGS write-protects the pages again. A write between the
//! two lands in the page before the writeback reads it; a write after the
//! reset is caught and reported for the next flush.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{Flush, PageStates, PageTracker, PAGE_SIZE};
use crate::abi::kvm::{
    KVM_CLEAR_DIRTY_LOG, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_GET_DIRTY_LOG,
    KVM_RESET_DIRTY_RINGS,
};
use crate::host::HostKind;

/// Entries per vCPU ring: 1 MiB of ring, 256 MiB of first writes between
/// harvests. A full ring forces a harvest, which re-protects every logged
/// page, so a small ring makes warm writes fault again (4096 entries did).
pub const RING_ENTRIES: u32 = 65536;

/// A memslot whose writes are tracked, and the states they go to.
struct TrackedSlot {
    slot: u32,
    size: u64,
    shared: Arc<PageTracker>,
    reads: ReadsLogged,
}

/// Whether KVM's log of a memslot may report pages the guest only read.
/// KVM maps a page writable on a read fault when the host's page table has
/// it writable already, and then logs it as dirty; shmem (tmpfs, a memfd)
/// maps shared pages writable on read faults. Seen on both host kinds for
/// reads the guest makes natively (at CPL3 on a nested shadow-paging host,
/// whose emulated CPL0 reads map nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadsLogged {
    /// Every logged page was written.
    No,
    /// A page's first report may be a read: it is dirty but unverified
    /// ([`PageStates::mark_maybe_written`]), and the flush compares it
    /// with the file.
    ///
    /// [`PageStates::mark_maybe_written`]: super::PageStates::mark_maybe_written
    Maybe,
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    fetch: u32,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `add_vcpu`.
        unsafe {
            libc::munmap(
                self.gfns.cast(),
                self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

enum Mode {
    Ring {
        bytes: u32,
        rings: Vec<Ring>,
    },
    /// `manual`: KVM_GET_DIRTY_LOG only reads, and KVM_CLEAR_DIRTY_LOG
    /// re-protects just the pages found dirty (MANUAL_DIRTY_LOG_PROTECT2),
    /// instead of a whole-slot write-protect walk on every harvest.
    Bitmap {
        manual: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("enabling the KVM dirty ring ({bytes} bytes per vCPU) failed: {source}")]
    EnableRing {
        bytes: u32,
        source: kvm_ioctls::Error,
    },
    #[error("mapping vCPU {vcpu}'s dirty ring failed: {source}")]
    MapRing { vcpu: u8, source: io::Error },
    #[error("duplicating the VM fd failed: {0}")]
    Dup(io::Error),
}

pub struct DirtyLog {
    vm: File,
    slots: RwLock<Vec<TrackedSlot>>,
    mode: Mutex<Mode>,
}

// SAFETY: the ring pointers are only dereferenced under the `mode` mutex, and
// the mappings they point to live as long as the DirtyLog.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; all mutation goes through the mutex.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Picks the ring if KVM has one (and enables it: this must happen
    /// before any vCPU exists), else the bitmap. Nested shadow-paging hosts
    /// get the bitmap: their emulator of guest-kernel code logs one ring
    /// entry per emulated store, overruns the ring past its soft limit, and
    /// the vCPU then spins in ring-full exits with nothing left to harvest
    /// (seen mounting xfs).
    pub fn new(vm: &VmFd) -> Result<Self, DirtyLogError> {
        // SAFETY: dup of a valid fd; the new fd is owned by the File.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(DirtyLogError::Dup(io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(dup) };
        let ring = if HostKind::detect() == HostKind::NestedShadow {
            None
        } else {
            Self::enable_ring(vm)?
        };
        let mode = match ring {
            Some(bytes) => Mode::Ring {
                bytes,
                rings: Vec::new(),
            },
            None => Mode::Bitmap {
                manual: Self::enable_manual_protect(vm),
            },
        };
        Ok(Self {
            vm: file,
            slots: RwLock::new(Vec::new()),
            mode: Mutex::new(mode),
        })
    }

    fn enable_manual_protect(vm: &VmFd) -> bool {
        if vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) <= 0 {
            return false;
        }
        let mut enable = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        enable.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        vm.enable_cap(&enable).is_ok()
    }

    fn enable_ring(vm: &VmFd) -> Result<Option<u32>, DirtyLogError> {
        let entry = std::mem::size_of::<kvm_dirty_gfn>() as u32;
        for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
            let max = vm.check_extension_raw(cap.into());
            if max <= 0 {
                continue;
            }
            let bytes = (RING_ENTRIES * entry).min(max as u32);
            let bytes = if bytes.is_power_of_two() {
                bytes
            } else {
                bytes.next_power_of_two() / 2
            };
            let mut enable = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            enable.args[0] = u64::from(bytes);
            vm.enable_cap(&enable)
                .map_err(|source| DirtyLogError::EnableRing { bytes, source })?;
            return Ok(Some(bytes));
        }
        Ok(None)
    }

    pub fn kind(&self) -> &'static str {
        match *self.lock() {
            Mode::Ring { .. } => "dirty ring",
            Mode::Bitmap { manual: true } => "dirty bitmap (manual protect)",
            Mode::Bitmap { manual: false } => "dirty bitmap",
        }
    }

    /// Per ring: the next index to fetch and the flags found there.
    pub fn ring_positions(&self) -> Vec<(u32, u32)> {
        let mode = self.lock();
        let Mode::Ring { rings, .. } = &*mode else {
            return Vec::new();
        };
        rings
            .iter()
            .map(|r| {
                let i = (r.fetch % r.entries) as usize;
                // SAFETY: i < entries, inside the mapped ring.
                let flags =
                    unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*r.gfns.add(i)).flags)) };
                (r.fetch, flags)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes writes to `slot` (created with KVM_MEM_LOG_DIRTY_PAGES) into
    /// `shared`'s page states.
    pub fn track(&self, slot: u32, size: u64, shared: Arc<PageTracker>, reads: ReadsLogged) {
        self.slots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(TrackedSlot {
                slot,
                size,
                shared,
                reads,
            });
    }

    /// Harvests the log (which re-arms KVM's catch of first writes: every
    /// device's pages land in its own states), then begins a flush of
    /// `tracker`, which takes its dirty pages. The harvest counts as the
    /// flush's re-arming time.
    pub fn begin_flush<'a>(&self, tracker: &'a PageTracker) -> io::Result<Flush<'a>> {
        let started = std::time::Instant::now();
        self.harvest()?;
        let harvested = started.elapsed();
        let mut flush = tracker.begin_flush(|_, _| Ok(()))?;
        flush.add_rearm(harvested);
        Ok(flush)
    }

    fn slots(&self) -> RwLockReadGuard<'_, Vec<TrackedSlot>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps a new vCPU's ring (ring mode only).
    pub fn add_vcpu(&self, id: u8, vcpu: &VcpuFd) -> Result<(), DirtyLogError> {
        let mut mode = self.lock();
        let Mode::Ring { bytes, rings } = &mut *mode else {
            return Ok(());
        };
        // SAFETY: maps the ring KVM exposes at this offset of the vCPU fd;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                *bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size(),
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::MapRing {
                vcpu: id,
                source: io::Error::last_os_error(),
            });
        }
        rings.push(Ring {
            gfns: ptr.cast(),
            entries: *bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            fetch: 0,
        });
        Ok(())
    }

    /// Moves every write KVM logged since the last harvest into the page
    /// states, and re-arms the catch for those pages. Safe to call from any
    /// thread; one harvest runs at a time.
    pub fn harvest(&self) -> io::Result<u64> {
        let mut mode = self.lock();
        match &mut *mode {
            Mode::Ring { rings, .. } => {
                let slots = self.slots();
                let mut found = 0;
                for ring in rings.iter_mut() {
                    found += collect(ring, &slots);
                }
                // Always reset, even when this harvest found nothing: an
                // earlier reset that failed leaves entries marked RESET that
                // no later collect sees, and the ring would stay full.
                reset_rings(&self.vm)?;
                Ok(found)
            }
            Mode::Bitmap { manual } => self.harvest_bitmaps(*manual),
        }
    }
}

fn collect(ring: &mut Ring, slots: &[TrackedSlot]) -> u64 {
    let mut found = 0;
    loop {
        let i = (ring.fetch % ring.entries) as usize;
        // SAFETY: i < entries, inside the mapped ring. `flags` is the
        // first field and u32-aligned, so it can be viewed as atomic.
        let gfn = unsafe { ring.gfns.add(i) };
        // SAFETY: as above.
        let flags = unsafe { &*(std::ptr::addr_of_mut!((*gfn).flags) as *const AtomicU32) };
        if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
            return found;
        }
        // SAFETY: KVM published this entry (DIRTY flag seen with acquire).
        let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
        route(slots, slot & 0xffff, offset);
        flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        ring.fetch = ring.fetch.wrapping_add(1);
        found += 1;
    }
}

fn route(slots: &[TrackedSlot], slot: u32, page: u64) {
    if let Some(t) = slots.iter().find(|t| t.slot == slot) {
        if !t.mark(&mut t.shared.states(), page) {
            log::warn!("dirty log: page {page} is outside memslot {slot}");
        }
    }
}

impl TrackedSlot {
    /// Records that KVM logged `page`; false for a page past the end.
    fn mark(&self, states: &mut PageStates, page: u64) -> bool {
        match self.reads {
            ReadsLogged::No => states.mark_dirty(page),
            ReadsLogged::Maybe => states.mark_maybe_written(page),
        }
    }
}

impl DirtyLog {
    fn harvest_bitmaps(&self, manual: bool) -> io::Result<u64> {
        let mut found = 0;
        for t in self.slots().iter() {
            let mut bitmap = get_dirty_log(&self.vm, t.slot, t.size)?;
            // Re-arm before anyone copies data out: a write after this is
            // logged for the next harvest, one before it is in the page.
            if manual && bitmap.iter().any(|&w| w != 0) {
                clear_dirty_log(&self.vm, t.slot, t.size, &mut bitmap)?;
            }
            let mut states = t.shared.states();
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    t.mark(&mut states, page);
                    bits &= bits - 1;
                    found += 1;
                }
            }
        }
        Ok(found)
    }
}

/// KVM_CLEAR_DIRTY_LOG over the whole slot with the bits just fetched:
/// exactly those pages are write-protected again.
fn clear_dirty_log(vm: &File, slot: u32, size: u64, bitmap: &mut [u64]) -> io::Result<()> {
    let mut clear = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: u32::try_from(size / PAGE_SIZE)
            .map_err(|_| io::Error::other("memslot too large for KVM_CLEAR_DIRTY_LOG"))?,
        first_page: 0,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: the bitmap holds one bit per page of the slot and outlives
    // the call.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// KVM_RESET_DIRTY_RINGS, retried when a signal interrupts it.
fn reset_rings(vm: &File) -> io::Result<()> {
    loop {
        // SAFETY: argument-less VM ioctl on a valid VM fd.
        let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn page_size() -> libc::off_t {
    // SAFETY: sysconf has no memory arguments.
    let s = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if s > 0 {
        s as libc::off_t
    } else {
        PAGE_SIZE as libc::off_t
    }
}

/// KVM_GET_DIRTY_LOG on a dup of the VM fd (VmFd is not shared across
/// threads here).
fn get_dirty_log(vm: &File, slot: u32, size: u64) -> io::Result<Vec<u64>> {
    let pages = size / PAGE_SIZE;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
    let mut log = kvm_bindings::kvm_dirty_log {
        slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `log` points at a bitmap with one bit per page of the slot.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG, &log) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bitmap)
}
