//! Attaching virtio-pmem devices to the VM: the host file goes into its own
//! memslot above RAM, the device sits behind a virtio-mmio transport whose
//! queue notifications arrive by ioeventfd and whose interrupt leaves by
//! irqfd, and flushes are served on a device event-loop thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use devices::virtio::mmio::{MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::pmem::{
    FaultEngineKind, FileWriteback, PmemBacking, PmemBackingError, PmemConfig, PmemDevice,
    PmemError, PmemMetrics, PmemStats, ReadonlyRegion, Writeback,
};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::cmdline::MmioDeviceSpec;
use crate::fault::dirty_log::{DirtyLog, DirtyLogError};
use crate::fault::uffd::{UffdEngine, UffdTuning};
use crate::fault::write_through::PmemWriteThrough;
use crate::fault::{DirtyLogWriteback, FaultStats, MappedRuns, PageTracker, TruncationGuard};
use crate::layout::{self, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};
use crate::vm::IrqLine;

/// IRQs 5..=20 of the 24-pin IOAPIC, one per device.
pub const MAX_PMEM_DEVICES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0} --pmem devices given; pmemvm supports at most {MAX_PMEM_DEVICES}")]
    TooMany(usize),
    #[error(transparent)]
    Backing(#[from] PmemBackingError),
    #[error(transparent)]
    Device(#[from] PmemError),
    #[error("--pmem file={path},readonly=on: this KVM has no read-only memslots (KVM_CAP_READONLY_MEM); drop readonly=on or use discard_writes=on")]
    NoReadonlySlots { path: String },
    #[error("--pmem file={path}: {what} failed: {source}")]
    Kvm {
        path: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM dirty logging for the kernel engine: {0}")]
    DirtyLog(#[from] DirtyLogError),
    #[error("--pmem file={path},engine={engine}: {source}")]
    Engine {
        path: String,
        engine: &'static str,
        source: std::io::Error,
    },
    #[error("--pmem file={path}: {what}: {detail}")]
    Wiring {
        path: String,
        what: &'static str,
        detail: String,
    },
}

/// A pmem device wired into the VM.
pub struct AttachedPmem {
    device: Arc<Mutex<PmemDevice>>,
    metrics: Arc<PmemMetrics>,
    engine: FaultEngineKind,
    shared: Arc<PageTracker>,
    spec: MmioDeviceSpec,
}

/// One device's `--stats` record.
#[derive(Serialize)]
pub struct DeviceStats {
    #[serde(flatten)]
    pub device: PmemStats,
    #[serde(flatten)]
    pub fault: FaultStats,
    /// VM-wide KVM statistic deltas, the same in every device's record.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kvm: std::collections::BTreeMap<String, i64>,
}

impl AttachedPmem {
    pub fn spec(&self) -> MmioDeviceSpec {
        self.spec
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            device: self.metrics.snapshot(),
            fault: self.shared.stats(self.engine.name()),
            kvm: Default::default(),
        }
    }
}

/// The VM's pmem devices and the dirty log their kernel engines share.
pub struct PmemSet {
    pub devices: Vec<AttachedPmem>,
    /// Present when a device tracks writes through KVM; every vCPU's ring
    /// must be added to it.
    pub dirty_log: Option<Arc<DirtyLog>>,
    /// One per device whose memslot maps the file itself (kernel and
    /// prefault engines): what a vCPU consults when KVM cannot provide a
    /// page.
    pub guards: Vec<Arc<TruncationGuard>>,
}

/// tmpfs and hugetlbfs map shared pages writable on a read fault (they
/// need no write notification). On a host with EPT/NPT, KVM then maps the
/// page writable for the guest's read and its dirty log counts it: the
/// kernel engine writes each page the guest reads back once, unchanged.
fn warn_reads_logged(index: usize, path: &str, file: &std::fs::File) {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    if crate::host::HostKind::detect() != crate::host::HostKind::Hardware {
        return;
    }
    // SAFETY: fstatfs fills the struct we own; the fd is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut st) } != 0 {
        return;
    }
    let fs = match st.f_type {
        TMPFS_MAGIC => "tmpfs",
        HUGETLBFS_MAGIC => "hugetlbfs",
        _ => return,
    };
    log::warn!(
        "pmem{index}: {path} is on {fs}, which maps pages writable on reads: KVM then logs every page the guest reads as dirty, and the kernel engine writes it back once, unchanged (a file on ext4 or xfs, or engine=uffd, avoids it)"
    );
}

/// Populates the whole mapping before boot, then makes it durable so that
/// the guest's first flush does not pay for it.
fn prefault(backing: &PmemBacking) -> std::io::Result<()> {
    // MADV_POPULATE_READ/WRITE (Linux 5.14), from include/uapi/asm-generic/mman-common.h.
    const MADV_POPULATE_READ: libc::c_int = 22;
    const MADV_POPULATE_WRITE: libc::c_int = 23;
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
        return Err(std::io::Error::last_os_error());
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

/// Opens every `--pmem` backing, maps each into its own memslot (numbered
/// from `first_slot`), and puts its transport on `mmio`. All files are
/// opened and locked before anything is mapped, so a bad one fails fast.
pub fn attach(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    memory: u64,
    first_slot: u32,
    configs: &[PmemConfig],
) -> Result<PmemSet, AttachError> {
    if configs.len() > MAX_PMEM_DEVICES {
        return Err(AttachError::TooMany(configs.len()));
    }
    let backings = configs
        .iter()
        .map(PmemBacking::open)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(b) = backings.iter().find(|b| b.readonly()) {
        if !kvm.check_extension(Cap::ReadonlyMem) {
            return Err(AttachError::NoReadonlySlots {
                path: b.path().display().to_string(),
            });
        }
    }
    let sizes: Vec<u64> = backings.iter().map(PmemBacking::size).collect();
    let starts = layout::pmem_regions(memory, &sizes);
    // Writes are tracked where they can reach the file.
    let tracked = |b: &PmemBacking, engine| {
        engine != FaultEngineKind::Uffd && !b.readonly() && !b.discard_writes()
    };
    let dirty_log = if backings
        .iter()
        .zip(configs)
        .any(|(b, c)| tracked(b, c.engine))
    {
        Some(Arc::new(DirtyLog::new(vm)?))
    } else {
        None
    };

    let mut attached = Vec::with_capacity(backings.len());
    let mut guards = Vec::new();
    for (i, ((backing, start), config)) in backings.into_iter().zip(starts).zip(configs).enumerate()
    {
        let path = backing.path().display().to_string();
        let engine = config.engine;
        let engine_err = |source| AttachError::Engine {
            path: path.clone(),
            engine: engine.name(),
            source,
        };
        let kvm_err = |what| {
            let path = path.clone();
            move |source| AttachError::Kvm { path, what, source }
        };
        let wiring = |what, detail: String| AttachError::Wiring {
            path: path.clone(),
            what,
            detail,
        };
        let readonly = backing.readonly();
        let slot = first_slot + i as u32;
        let shared = PageTracker::new(backing.size());
        let is_tracked = tracked(&backing, engine);
        let mut flags = if readonly { KVM_MEM_READONLY } else { 0 };
        let mut host = backing.host_addr() as u64;
        let mut guard = None;
        let writeback: Box<dyn Writeback> = match engine {
            FaultEngineKind::Kernel | FaultEngineKind::Prefault => {
                if engine == FaultEngineKind::Prefault {
                    prefault(&backing).map_err(engine_err)?;
                }
                let g = Arc::new(TruncationGuard::new(
                    backing.file().try_clone().map_err(engine_err)?,
                    path.clone(),
                    backing.host_addr(),
                    backing.size(),
                    readonly,
                    shared.clone(),
                ));
                guards.push(g.clone());
                guard = Some(g);
                match dirty_log.as_ref().filter(|_| is_tracked) {
                    Some(log) => {
                        warn_reads_logged(i, &path, backing.file());
                        flags |= KVM_MEM_LOG_DIRTY_PAGES;
                        log.track(slot, backing.size(), shared.clone());
                        Box::new(DirtyLogWriteback {
                            shared: shared.clone(),
                            log: log.clone(),
                            runs: Some(MappedRuns::new(
                                backing.file().try_clone().map_err(engine_err)?,
                                backing.host_addr(),
                                backing.size(),
                            )),
                        })
                    }
                    None => Box::new(FileWriteback::new(&backing).map_err(engine_err)?),
                }
            }
            FaultEngineKind::Uffd => {
                let file = backing.file().try_clone().map_err(engine_err)?;
                let uffd = UffdEngine::start(
                    &format!("pmem{i}"),
                    file,
                    backing.size(),
                    readonly,
                    backing.discard_writes(),
                    UffdTuning {
                        populate: config.populate,
                        poll: Duration::from_micros(config.poll_us.into()),
                    },
                    shared.clone(),
                )
                .map_err(engine_err)?;
                // The guest sees the engine's mirror, not the file mapping.
                host = uffd.host_addr() as u64;
                uffd.writeback()
            }
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: start,
            memory_size: backing.size(),
            userspace_addr: host,
        };
        let device = Arc::new(Mutex::new(PmemDevice::with_writeback(
            backing,
            GuestAddress(start),
            writeback,
        )?));
        // SAFETY: the mapping belongs to the backing inside `device`, which
        // the returned AttachedPmem keeps alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let line = IrqLine::register(vm, irq).map_err(|e| wiring("irqfd", e.to_string()))?;
        let transport = MmioTransport::new(
            mem.clone(),
            device.clone() as Arc<Mutex<dyn VirtioDevice>>,
            line,
        )
        .map_err(|e| wiring("virtio-mmio transport", e.to_string()))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        mmio.insert(base, MMIO_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|e| wiring("MMIO bus", e.to_string()))?;
        if is_tracked {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            let file = dev.backing().file().try_clone().map_err(engine_err)?;
            let through = PmemWriteThrough::new(
                file,
                path.clone(),
                region.memory_size,
                shared.clone(),
                guard.clone(),
            );
            drop(dev);
            mmio.insert(start, region.memory_size, Arc::new(Mutex::new(through)))
                .map_err(|e| wiring("MMIO bus", e.to_string()))?;
        }
        if readonly {
            let sink = ReadonlyRegion::new(&device.lock().unwrap_or_else(|p| p.into_inner()))
                .map_err(|e| wiring("read-only region", e.to_string()))?;
            mmio.insert(start, sink.size(), Arc::new(Mutex::new(sink)))
                .map_err(|e| wiring("MMIO bus", e.to_string()))?;
        }
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        log::info!(
            "pmem{i}: {path} ({} MiB{}, engine {}) at guest {start:#x}, virtio-mmio {base:#x} irq {irq}",
            region.memory_size >> 20,
            if readonly { ", read-only" } else { "" },
            engine.name()
        );
        attached.push(AttachedPmem {
            device,
            metrics,
            engine,
            shared,
            spec: MmioDeviceSpec {
                base,
                size: MMIO_SIZE,
                irq,
            },
        });
    }
    if let Some(log) = &dirty_log {
        log::info!(
            "kernel engine: first writes tracked with the KVM {}",
            log.kind()
        );
    }
    Ok(PmemSet {
        devices: attached,
        dirty_log,
        guards,
    })
}

/// The thread that serves device queues, so a slow fdatasync never stalls a
/// vCPU.
static GUARD_FAILED: devices::ratelimit::LogLimiter =
    devices::ratelimit::LogLimiter::new(4, 100_000);

pub struct DeviceEventLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl DeviceEventLoop {
    /// Serves the devices' queues, and between events checks every backing
    /// file the guest maps for a shrink. On hosts with EPT/NPT the vCPU
    /// that touches a page past the new end may never return to pmemvm:
    /// while the guest has interrupts on, KVM retries the fault through its
    /// async page-fault worker and halts the vCPU, instead of failing
    /// KVM_RUN with EFAULT. The check here does not depend on that.
    pub fn start(set: &PmemSet) -> std::io::Result<Option<Self>> {
        let devices = &set.devices;
        if devices.is_empty() {
            return Ok(None);
        }
        let guards = set.guards.clone();
        // Per guard: whether its file system was last seen full.
        let mut full = vec![false; guards.len()];
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for d in devices {
            em.add_subscriber(d.device.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pmem-events".into())
                .spawn(move || {
                    crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::DeviceEvents);
                    // The timeout bounds how long a stop request waits, and
                    // how late a truncated backing file is seen.
                    while !stop.load(Ordering::Acquire) {
                        if let Err(e) = em.run_with_timeout(100) {
                            log::error!("device event loop failed: {e:?}");
                            return;
                        }
                        for (guard, was_full) in guards.iter().zip(&mut full) {
                            if let Err(e) = guard.check() {
                                if GUARD_FAILED.allow() {
                                    log::error!("checking a pmem file for truncation failed: {e}");
                                }
                            }
                            let now_full = guard.file_system_full().unwrap_or(false);
                            if now_full != *was_full {
                                if now_full {
                                    log::warn!(
                                        "{}: its file system is full; guest writes that need new blocks wait until space returns",
                                        guard.path()
                                    );
                                } else {
                                    log::info!("{}: its file system has space again", guard.path());
                                }
                                *was_full = now_full;
                            }
                        }
                    }
                })?
        };
        Ok(Some(Self { stop, thread }))
    }

    /// Waits for the round in progress (a writeback finishes first).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}
