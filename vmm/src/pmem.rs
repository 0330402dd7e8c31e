//! Attaching virtio-pmem devices to the VM: the host file goes into its own
//! memslot above RAM, the device sits behind a virtio-mmio transport whose
//! queue notifications arrive by ioeventfd and whose interrupt leaves by
//! irqfd, and flushes are served on a device event-loop thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::virtio::mmio::{MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::pmem::{
    PmemBacking, PmemBackingError, PmemConfig, PmemDevice, PmemError, PmemMetrics, PmemStats,
    ReadonlyRegion,
};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::cmdline::MmioDeviceSpec;
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
    spec: MmioDeviceSpec,
}

impl AttachedPmem {
    pub fn spec(&self) -> MmioDeviceSpec {
        self.spec
    }

    pub fn stats(&self) -> PmemStats {
        self.metrics.snapshot()
    }
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
) -> Result<Vec<AttachedPmem>, AttachError> {
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

    let mut attached = Vec::with_capacity(backings.len());
    for (i, (backing, start)) in backings.into_iter().zip(starts).enumerate() {
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
        let region = kvm_userspace_memory_region {
            slot: first_slot + i as u32,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: start,
            memory_size: backing.size(),
            userspace_addr: backing.host_addr() as u64,
        };
        let device = Arc::new(Mutex::new(PmemDevice::new(backing, GuestAddress(start))?));
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
        if readonly {
            let sink = ReadonlyRegion::new(device.clone());
            mmio.insert(start, sink.size(), Arc::new(Mutex::new(sink)))
                .map_err(|e| wiring("MMIO bus", e.to_string()))?;
        }
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        log::info!(
            "pmem{i}: {path} ({} MiB{}) at guest {start:#x}, virtio-mmio {base:#x} irq {irq}",
            region.memory_size >> 20,
            if readonly { ", read-only" } else { "" }
        );
        attached.push(AttachedPmem {
            device,
            metrics,
            spec: MmioDeviceSpec {
                base,
                size: MMIO_SIZE,
                irq,
            },
        });
    }
    Ok(attached)
}

/// The thread that serves device queues, so a slow fdatasync never stalls a
/// vCPU.
pub struct DeviceEventLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl DeviceEventLoop {
    pub fn start(devices: &[AttachedPmem]) -> std::io::Result<Option<Self>> {
        if devices.is_empty() {
            return Ok(None);
        }
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
                    // The timeout only bounds how long a stop request waits.
                    while !stop.load(Ordering::Acquire) {
                        if let Err(e) = em.run_with_timeout(100) {
                            log::error!("device event loop failed: {e:?}");
                            return;
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
