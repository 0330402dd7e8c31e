//! Attaching virtio-pmem devices to the VM: the host file goes into its own
//! memslot above RAM, the device sits behind a virtio-mmio transport whose
//! queue notifications arrive by ioeventfd and whose interrupt leaves by
//! irqfd, and flushes are served on a device event-loop thread.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use devices::ratelimit::LogLimiter;
use devices::virtio::mmio::{MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::pmem::{
    EngineConfig, PmemBacking, PmemBackingError, PmemConfig, PmemDevice, PmemError, PmemMetrics,
    PmemStats, ReadonlyRegion,
};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::cmdline::MmioDeviceSpec;
use crate::fault::dirty_log::{DirtyLog, DirtyLogError};
use crate::fault::engine::FaultEngine;
use crate::fault::kernel::KernelEngine;
use crate::fault::mirror::MirrorEngine;
use crate::fault::uffd::{UffdEngine, UffdTuning};
use crate::fault::{FaultStats, PageTracker};
use crate::layout::{self, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};
use crate::vcpu::HostFaultHandler;
use crate::vstate::{set_memslot, IrqLine};
use crate::worker::StopEvent;

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
    #[error("KVM dirty logging for the kernel and mirror engines: {0}")]
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
    engine: Arc<dyn FaultEngine>,
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
    /// The page tracker of the device's fault engine.
    pub fn tracker(&self) -> &Arc<crate::fault::PageTracker> {
        self.engine.tracker()
    }

    pub fn spec(&self) -> MmioDeviceSpec {
        self.spec
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            device: self.metrics.snapshot(),
            fault: self.engine.stats(),
            kvm: Default::default(),
        }
    }
}

/// The VM's pmem devices and the dirty log their kernel and mirror engines
/// share.
pub struct PmemSet {
    pub devices: Vec<AttachedPmem>,
    /// Present when a device tracks writes through KVM; every vCPU's ring
    /// must be added to it ([`PmemSet::add_vcpu`]).
    dirty_log: Option<Arc<DirtyLog>>,
}

impl PmemSet {
    /// Gives a new vCPU its dirty ring, where the kernel engine needs one.
    pub fn add_vcpu(&self, id: u8, vcpu: &VcpuFd) -> Result<(), AttachError> {
        if let Some(log) = &self.dirty_log {
            log.add_vcpu(id, vcpu)?;
        }
        Ok(())
    }

    /// "ring" or "bitmap": how KVM reports first writes, if it does.
    pub fn dirty_log_kind(&self) -> Option<&'static str> {
        self.dirty_log.as_ref().map(|l| l.kind())
    }
}

static EMPTY_RING_FULL: LogLimiter = LogLimiter::new(4, 100_000);

impl HostFaultHandler for PmemSet {
    fn memory_fault(&self) -> bool {
        // Every engine looks: KVM does not always say where.
        self.devices
            .iter()
            .fold(false, |repaired, d| d.engine.host_fault() | repaired)
    }

    fn dirty_ring_full(&self, vcpu: u8) -> Result<(), String> {
        let Some(log) = &self.dirty_log else {
            return Err("dirty ring full, but pmemvm enabled no ring".into());
        };
        match log.harvest() {
            Ok(0) => {
                if EMPTY_RING_FULL.allow() {
                    log::warn!(
                        "vCPU {vcpu}: dirty ring full but nothing to harvest: {:?}",
                        log.ring_positions()
                    );
                }
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("draining the full dirty ring failed: {e}")),
        }
    }
}

/// Starts the engine `config` names on `backing`, whose region goes into
/// memslot `slot`. The one place that knows every engine.
fn start_engine(
    name: &str,
    backing: &PmemBacking,
    config: &PmemConfig,
    slot: u32,
    dirty_log: Option<&Arc<DirtyLog>>,
) -> std::io::Result<Arc<dyn FaultEngine>> {
    let tracker = PageTracker::new(backing.size());
    Ok(match config.engine {
        EngineConfig::Kernel(flush) | EngineConfig::Prefault(flush) => {
            Arc::new(KernelEngine::start(
                name,
                backing,
                slot,
                dirty_log,
                matches!(config.engine, EngineConfig::Prefault(_)),
                flush,
                tracker,
            )?)
        }
        EngineConfig::Mirror => Arc::new(MirrorEngine::start(
            name, backing, slot, dirty_log, tracker,
        )?),
        EngineConfig::Uffd(uffd) => UffdEngine::start(
            name,
            backing.file().try_clone()?,
            backing.size(),
            backing.readonly(),
            backing.discard_writes(),
            UffdTuning {
                populate: uffd.populate,
                poll: Duration::from_micros(uffd.poll_us.into()),
            },
            tracker,
        )?,
    })
}

/// Whether `config`'s engine on `backing` tracks the guest's writes in
/// KVM's dirty log, which then must exist before any vCPU.
fn needs_dirty_log(backing: &PmemBacking, config: &PmemConfig) -> bool {
    config.engine.logs_dirty() && backing.writes_reach_file()
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
    let dirty_log = if backings
        .iter()
        .zip(configs)
        .any(|(b, c)| needs_dirty_log(b, c))
    {
        Some(Arc::new(DirtyLog::new(vm)?))
    } else {
        None
    };

    let mut attached = Vec::with_capacity(backings.len());
    for (i, ((backing, start), config)) in backings.into_iter().zip(starts).zip(configs).enumerate()
    {
        let path = backing.path().display().to_string();
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
        let size = backing.size();
        let slot = first_slot + i as u32;
        let engine = start_engine(
            &format!("pmem{i}"),
            &backing,
            config,
            slot,
            dirty_log.as_ref(),
        )
        .map_err(|source| AttachError::Engine {
            path: path.clone(),
            engine: config.engine.name(),
            source,
        })?;
        let engine_err = |source| AttachError::Engine {
            path: path.clone(),
            engine: engine.name(),
            source,
        };
        let memslot = engine.memslot();
        let overlay = engine.emulated_access().map_err(engine_err)?;
        let writeback = engine.writeback().map_err(engine_err)?;
        let device = Arc::new(Mutex::new(PmemDevice::new(
            backing,
            GuestAddress(start),
            writeback,
        )?));
        // SAFETY: the memslot maps the backing inside `device` or the
        // engine's mirror; the returned AttachedPmem keeps both alive for
        // as long as the VM runs.
        unsafe { set_memslot(vm, slot, memslot.flags, start, memslot.host, size) }
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
        if let Some(overlay) = overlay {
            mmio.insert(start, size, overlay)
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
            size >> 20,
            if readonly { ", read-only" } else { "" },
            engine.name()
        );
        attached.push(AttachedPmem {
            device,
            metrics,
            engine,
            spec: MmioDeviceSpec {
                base,
                size: MMIO_SIZE,
                irq,
            },
        });
    }
    if let Some(log) = &dirty_log {
        log::info!("pmem: first writes tracked with the KVM {}", log.kind());
    }
    Ok(PmemSet {
        devices: attached,
        dirty_log,
    })
}

/// The thread that serves device queues, so a slow fdatasync never stalls
/// a vCPU, and lets each engine watch its backing file between events.
pub struct DeviceEventLoop {
    stop: StopEvent,
    thread: JoinHandle<()>,
}

impl DeviceEventLoop {
    pub fn start(set: &PmemSet) -> std::io::Result<Option<Self>> {
        let devices = &set.devices;
        if devices.is_empty() {
            return Ok(None);
        }
        let engines: Vec<Arc<dyn FaultEngine>> = devices.iter().map(|d| d.engine.clone()).collect();
        let stop = StopEvent::new()?;
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for d in devices {
            em.add_subscriber(d.device.clone());
        }
        em.add_subscriber(stop.subscriber()?);
        let thread = {
            let stop = stop.try_clone()?;
            std::thread::Builder::new()
                .name("pmem-events".into())
                .spawn(move || {
                    crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::DeviceEvents);
                    // The timeout bounds how late an engine notices a
                    // change to its backing file.
                    while !stop.requested() {
                        if let Err(e) = em.run_with_timeout(100) {
                            log::error!("device event loop failed: {e:?}");
                            return;
                        }
                        for engine in &engines {
                            engine.watch();
                        }
                    }
                })?
        };
        Ok(Some(Self { stop, thread }))
    }

    /// Waits for the round in progress (a writeback finishes first).
    pub fn stop(self) {
        if let Err(e) = self.stop.request() {
            log::error!("cannot stop the device event loop: {e}");
            return;
        }
        let _ = self.thread.join();
    }
}
