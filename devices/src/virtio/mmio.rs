//! virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2,
//! 4.2.2).
//!
//! Every value here comes from the guest: anything malformed or out of order
//! is ignored with a rate-limited warning and counted in [`MmioMetrics`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::features::VIRTIO_F_VERSION_1;
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{guest_warn_limiter, warn_limited, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::ratelimit::LogLimiter;
use crate::Interrupt;

/// Size of the MMIO window of one device (registers + config space).
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM binds the queue ioeventfds
/// (datamatch = queue index, 4 bytes).
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4d50; // "PMVM"

/// The register offsets (virtio 1.2, 4.2.2), for drivers of the transport
/// outside this crate too (the probe guest's VMM-side set-up, the fuzzer).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Counters of guest accesses the transport refused.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Register access that is not 4 bytes wide and 4-byte aligned, or a
    /// config access of a width other than 1, 2, 4 or 8.
    pub bad_access: AtomicU64,
    /// Offset with no register, or a write to a read-only register.
    pub bad_offset: AtomicU64,
    /// Queue register access or notification for a queue that does not exist.
    pub bad_queue_select: AtomicU64,
    /// QueueNum that is zero, not a power of two or above QueueNumMax.
    pub bad_queue_size: AtomicU64,
    /// Queue address that is misaligned, or QueueReady other than 0/1.
    pub bad_queue_value: AtomicU64,
    /// Write the spec forbids in the current device status.
    pub bad_state_write: AtomicU64,
    /// Status write that skips a step or clears bits without a reset.
    pub bad_status: AtomicU64,
    /// FEATURES_OK refused: VERSION_1 missing or features not offered.
    pub bad_features: AtomicU64,
    /// DRIVER_OK where the device refused to start.
    pub activate_failures: AtomicU64,
    /// Failed eventfd writes or interrupt triggers.
    pub io_errors: AtomicU64,
}

/// A point-in-time copy of [`MmioMetrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MmioStats {
    pub bad_access: u64,
    pub bad_offset: u64,
    pub bad_queue_select: u64,
    pub bad_queue_size: u64,
    pub bad_queue_value: u64,
    pub bad_state_write: u64,
    pub bad_status: u64,
    pub bad_features: u64,
    pub activate_failures: u64,
    pub io_errors: u64,
}

impl MmioMetrics {
    pub fn snapshot(&self) -> MmioStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MmioStats {
            bad_access: get(&self.bad_access),
            bad_offset: get(&self.bad_offset),
            bad_queue_select: get(&self.bad_queue_select),
            bad_queue_size: get(&self.bad_queue_size),
            bad_queue_value: get(&self.bad_queue_value),
            bad_state_write: get(&self.bad_state_write),
            bad_status: get(&self.bad_status),
            bad_features: get(&self.bad_features),
            activate_failures: get(&self.activate_failures),
            io_errors: get(&self.io_errors),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The driver's view of one queue, kept apart from [`Queue`] so the registers
/// read back consistently while the device owns the live queue.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds the live queue; fails on sizes or alignments the spec forbids.
    fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        q.try_set_size(self.size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))?;
        q.set_ready(self.ready);
        Ok(q)
    }
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot duplicate queue {index} notification eventfd: {source}")]
    QueueEvent { index: usize, source: io::Error },
    #[error("device reports {events} queue eventfds for {queues} queues")]
    QueueEventCount { queues: usize, events: usize },
}

/// virtio-mmio transport for one device; register it on the MMIO bus with a
/// window of [`MMIO_SIZE`] bytes.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    queue_events: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    queues: Vec<QueueRegs>,

    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver accepted bits in a page beyond the 64 we know.
    driver_features_unoffered: bool,
    queue_sel: u32,
    shm_sel: u32,

    metrics: Arc<MmioMetrics>,
    warn: LogLimiter,
}

/// A poisoned lock means a panic elsewhere; the device state is still the
/// best there is, so keep serving the guest.
fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl MmioTransport {
    /// Wraps `device`. `mem` is the guest memory handed to the device on
    /// DRIVER_OK; `interrupt` is the device's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, queues, queue_events) = {
            let dev = lock(&device);
            let queues: Vec<QueueRegs> = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueRegs::new(max))
                .collect();
            if dev.queue_events().len() != queues.len() {
                return Err(MmioError::QueueEventCount {
                    queues: queues.len(),
                    events: dev.queue_events().len(),
                });
            }
            // Duplicates share the eventfd: a signal through either is seen by
            // the device's event loop.
            let events = dev
                .queue_events()
                .iter()
                .enumerate()
                .map(|(index, e)| {
                    e.try_clone()
                        .map_err(|source| MmioError::QueueEvent { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let features = dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
            (dev.device_type(), features, queues, events)
        };
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt)),
            queue_events,
            device_type,
            device_features,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_unoffered: false,
            queue_sel: 0,
            shm_sel: 0,
            metrics: Arc::new(MmioMetrics::default()),
            warn: guest_warn_limiter(),
        })
    }

    /// Queue notification eventfds, indexed by queue. Register each as a KVM
    /// ioeventfd at base + [`NOTIFY_OFFSET`], 4 bytes, datamatch = index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Counters of refused guest accesses; can be read from any thread.
    pub fn metrics(&self) -> Arc<MmioMetrics> {
        self.metrics.clone()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        let index = self.queue_sel as usize;
        self.queues.get_mut(index)
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let queue = self.queues.get(self.queue_sel as usize).copied();
        let value = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            // A queue that does not exist reads as QueueNumMax 0: that is
            // how drivers discover the number of queues.
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length -1 means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            // Config space never changes behind the driver's back.
            reg::CONFIG_GENERATION => 0,
            _ => return None,
        };
        Some(value)
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => self.shm_sel = value,
            _ => {
                bump(&self.metrics.bad_offset);
                warn_limited!(
                    self.warn,
                    "virtio-mmio: write {value:#x} to read-only or unknown offset {offset:#x} ignored"
                );
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            bump(&self.metrics.bad_state_write);
            warn_limited!(
                self.warn,
                "virtio-mmio: DriverFeatures written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Nothing is offered above bit 63; accepting such bits is a
            // driver bug that must keep FEATURES_OK from being set.
            sel if value != 0 => {
                bump(&self.metrics.bad_features);
                warn_limited!(
                    self.warn,
                    "virtio-mmio: driver accepted unoffered features {value:#x} in page {sel}"
                );
                self.driver_features_unoffered = true;
            }
            _ => {}
        }
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK
    /// (virtio 1.2, 3.1.1 step 7).
    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            bump(&self.metrics.bad_state_write);
            warn_limited!(
                self.warn,
                "virtio-mmio: queue register {offset:#x} written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            bump(&self.metrics.bad_queue_select);
            warn_limited!(
                self.warn,
                "virtio-mmio: queue register {offset:#x} written for missing queue {sel}"
            );
            return;
        };
        let set_low = |addr: &mut u64| *addr = (*addr & !0xffff_ffff) | u64::from(value);
        let set_high = |addr: &mut u64| *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            reg::QUEUE_NUM => {
                let max = q.max_size;
                match u16::try_from(value) {
                    Ok(size) if size != 0 && size.is_power_of_two() && size <= max => q.size = size,
                    _ => {
                        bump(&self.metrics.bad_queue_size);
                        warn_limited!(
                            self.warn,
                            "virtio-mmio: queue {sel} size {value} invalid (max {max}), ignored"
                        );
                    }
                }
            }
            reg::QUEUE_READY => match value {
                0 | 1 => q.ready = value == 1,
                _ => {
                    bump(&self.metrics.bad_queue_value);
                    warn_limited!(self.warn, "virtio-mmio: QueueReady {value} ignored");
                }
            },
            reg::QUEUE_DESC_LOW => set_low(&mut q.desc),
            reg::QUEUE_DESC_HIGH => set_high(&mut q.desc),
            reg::QUEUE_DRIVER_LOW => set_low(&mut q.driver),
            reg::QUEUE_DRIVER_HIGH => set_high(&mut q.driver),
            reg::QUEUE_DEVICE_LOW => set_low(&mut q.device),
            reg::QUEUE_DEVICE_HIGH => set_high(&mut q.device),
            _ => {}
        }
    }

    /// Fallback for hosts without ioeventfd: the write reaches us instead of
    /// KVM, so forward it to the same eventfd.
    fn notify(&mut self, value: u32) {
        match self.queue_events.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    bump(&self.metrics.io_errors);
                    warn_limited!(self.warn, "virtio-mmio: queue {value} notify failed: {e}");
                }
            }
            None => {
                bump(&self.metrics.bad_queue_select);
                warn_limited!(self.warn, "virtio-mmio: notify for missing queue {value}");
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device: ignore it in both values.
        let old = self.status & !DEVICE_NEEDS_RESET;
        let new = value & !DEVICE_NEEDS_RESET;
        if new & old != old {
            bump(&self.metrics.bad_status);
            warn_limited!(
                self.warn,
                "virtio-mmio: status {value:#x} clears bits of {:#x} without reset, ignored",
                self.status
            );
            return;
        }
        let mut added = new & !old;
        if added & FAILED != 0 {
            // The driver gave up; it will reset the device.
            self.status |= FAILED;
            added &= !FAILED;
        }
        match (old, added) {
            (_, 0) => {}
            (0, ACKNOWLEDGE) => self.status |= ACKNOWLEDGE,
            (s, DRIVER) if s == ACKNOWLEDGE => self.status |= DRIVER,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => self.features_ok(),
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(),
            _ => {
                bump(&self.metrics.bad_status);
                warn_limited!(
                    self.warn,
                    "virtio-mmio: status transition {:#x} -> {value:#x} not allowed, ignored",
                    self.status
                );
            }
        }
    }

    /// Leaves FEATURES_OK clear when the driver's choice is unacceptable; the
    /// driver reads Status back and gives up (virtio 1.2, 3.1.1 step 6).
    fn features_ok(&mut self) {
        let unoffered = self.driver_features & !self.device_features;
        let modern = self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0;
        if unoffered != 0 || self.driver_features_unoffered || !modern {
            bump(&self.metrics.bad_features);
            warn_limited!(
                self.warn,
                "virtio-mmio: features {:#x} refused (offered {:#x}, VERSION_1 required)",
                self.driver_features,
                self.device_features
            );
            return;
        }
        lock(&self.device).set_acked_features(self.driver_features);
        self.status |= FEATURES_OK;
    }

    fn activate(&mut self) {
        let queues: Result<Vec<Queue>, _> = self.queues.iter().map(|q| q.to_queue()).collect();
        let result = match queues {
            Ok(queues) => lock(&self.device)
                .activate(self.mem.clone(), queues, self.interrupt.clone())
                .map_err(|e| e.to_string()),
            Err(e) => {
                bump(&self.metrics.bad_queue_value);
                Err(format!("queue configuration: {e}"))
            }
        };
        self.status |= DRIVER_OK;
        if let Err(e) = result {
            bump(&self.metrics.activate_failures);
            warn_limited!(self.warn, "virtio-mmio: device activation failed: {e}");
            // virtio 1.2, 2.1.2: with DRIVER_OK set, report NEEDS_RESET
            // through a config change notification.
            self.status |= DEVICE_NEEDS_RESET;
            if let Err(e) = self.interrupt.signal_config_change() {
                bump(&self.metrics.io_errors);
                warn_limited!(self.warn, "virtio-mmio: interrupt failed: {e}");
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_unoffered = false;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.clear();
    }

    fn config_access_ok(&mut self, offset: u64, len: usize) -> bool {
        if matches!(len, 1 | 2 | 4 | 8) {
            return true;
        }
        bump(&self.metrics.bad_access);
        warn_limited!(
            self.warn,
            "virtio-mmio: {len}-byte config access at {offset:#x} ignored"
        );
        false
    }

    fn register_access_ok(&mut self, offset: u64, len: usize) -> bool {
        if len == 4 && offset.is_multiple_of(4) {
            return true;
        }
        bump(&self.metrics.bad_access);
        warn_limited!(
            self.warn,
            "virtio-mmio: {len}-byte register access at {offset:#x} ignored"
        );
        false
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            if self.config_access_ok(offset, data.len()) {
                lock(&self.device).read_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if !self.register_access_ok(offset, data.len()) {
            return;
        }
        match self.read_register(offset) {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                bump(&self.metrics.bad_offset);
                warn_limited!(
                    self.warn,
                    "virtio-mmio: read of write-only or unknown offset {offset:#x}"
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.config_access_ok(offset, data.len()) {
                // The driver must not write config before DRIVER (3.1.1).
                if self.status & DRIVER == 0 {
                    bump(&self.metrics.bad_state_write);
                    warn_limited!(self.warn, "virtio-mmio: config write before DRIVER ignored");
                    return;
                }
                lock(&self.device).write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if !self.register_access_ok(offset, data.len()) {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, INTERRUPT_CONFIG_CHANGE};
    use std::sync::atomic::AtomicUsize;
    use virtio_queue::QueueT;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl Interrupt for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// (size, ready, desc, driver, device) of each activated queue.
    type QueueSummary = (u16, bool, u64, u64, u64);

    /// Records what the transport asks of it.
    struct FakeDevice {
        max_sizes: Vec<u16>,
        events: Vec<EventFd>,
        features: u64,
        acked: Option<u64>,
        config: Vec<u8>,
        written_config: Vec<(u64, Vec<u8>)>,
        activated: Option<Vec<QueueSummary>>,
        resets: usize,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                max_sizes: vec![256, 16],
                events: (0..2)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                features: 1 << 3,
                acked: None,
                config: (0u8..16).collect(),
                written_config: Vec::new(),
                activated: None,
                resets: 0,
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            27
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.written_config.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if let Some(index) = queues.iter().position(|q| !q.ready()) {
                return Err(ActivateError::QueueNotReady { index });
            }
            self.activated = Some(
                queues
                    .iter()
                    .map(|q| {
                        (
                            q.size(),
                            q.ready(),
                            q.desc_table(),
                            q.avail_ring(),
                            q.used_ring(),
                        )
                    })
                    .collect(),
            );
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
    }

    struct Fixture {
        t: MmioTransport,
        dev: Arc<Mutex<FakeDevice>>,
        irq: Arc<CountingIrq>,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(FakeDevice::new()));
        let irq = Arc::new(CountingIrq::default());
        let t = MmioTransport::new(mem, dev.clone(), irq.clone()).unwrap();
        Fixture { t, dev, irq }
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Drives the transport like the Linux driver up to (not including)
    /// DRIVER_OK, configuring both queues.
    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::STATUS, ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1 << 3);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(t, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (sel, base) in [(0u32, 0x1000u32), (1, 0x8000)] {
            w(t, reg::QUEUE_SEL, sel);
            assert_eq!(r(t, reg::QUEUE_READY), 0);
            w(t, reg::QUEUE_NUM, 16);
            w(t, reg::QUEUE_DESC_LOW, base);
            w(t, reg::QUEUE_DESC_HIGH, 0);
            w(t, reg::QUEUE_DRIVER_LOW, base + 0x100);
            w(t, reg::QUEUE_DRIVER_HIGH, 0);
            w(t, reg::QUEUE_DEVICE_LOW, base + 0x200);
            w(t, reg::QUEUE_DEVICE_HIGH, 0);
            w(t, reg::QUEUE_READY, 1);
        }
    }

    #[test]
    fn identification_registers() {
        let Fixture { mut t, .. } = fixture();
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 27);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        // VIRTIO_F_VERSION_1 is bit 32, i.e. bit 0 of page 1.
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
        assert_eq!(t.queue_events().len(), 2);
    }

    #[test]
    fn full_negotiation_activates_device_with_driver_queues() {
        let Fixture { mut t, dev, .. } = fixture();
        negotiate(&mut t);
        assert!(dev.lock().unwrap().activated.is_none());
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        let d = dev.lock().unwrap();
        assert_eq!(d.acked, Some((1 << 32) | (1 << 3)));
        assert_eq!(
            d.activated.as_deref(),
            Some(
                &[
                    (16, true, 0x1000, 0x1100, 0x1200),
                    (16, true, 0x8000, 0x8100, 0x8200)
                ][..]
            )
        );
        assert_eq!(t.metrics().snapshot(), MmioStats::default());
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let Fixture { mut t, dev, .. } = fixture();
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        assert_eq!(dev.lock().unwrap().acked, None);
        assert_eq!(t.metrics().snapshot().bad_features, 1);
    }

    #[test]
    fn unoffered_features_are_refused() {
        let Fixture { mut t, .. } = fixture();
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, (1 << 3) | (1 << 5));
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
        // Features in pages beyond 1 are never offered either.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 2);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
        assert_eq!(t.metrics().snapshot().bad_features, 3);
    }

    #[test]
    fn status_must_follow_the_init_sequence() {
        let Fixture { mut t, dev, .. } = fixture();
        // Skipping ACKNOWLEDGE.
        w(&mut t, reg::STATUS, DRIVER);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        // Jumping straight to DRIVER_OK.
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS), ACKNOWLEDGE);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        // Clearing a bit without a reset.
        w(&mut t, reg::STATUS, DRIVER);
        assert_eq!(r(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // Rewriting the same value is harmless.
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(t.metrics().snapshot().bad_status, 3);
        // FAILED may be set at any time.
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(r(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER | FAILED);
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn bad_queue_values_are_ignored() {
        let Fixture { mut t, .. } = fixture();
        // Queue registers before FEATURES_OK.
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.metrics().snapshot().bad_state_write, 1);
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 1);
        for bad in [0, 3, 32, 0x10000 + 8] {
            w(&mut t, reg::QUEUE_NUM, bad);
        }
        assert_eq!(t.queues[1].size, 16);
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.queues[1].size, 8);
        w(&mut t, reg::QUEUE_READY, 7);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::QUEUE_SEL, 9);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_NOTIFY, 9);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        let m = t.metrics().snapshot();
        assert_eq!(m.bad_queue_size, 4);
        assert_eq!(m.bad_queue_value, 1);
        assert_eq!(m.bad_queue_select, 2);
    }

    #[test]
    fn misaligned_queue_fails_activation_with_needs_reset() {
        let Fixture { mut t, dev, irq } = fixture();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(r(&mut t, reg::STATUS), 0xf | DEVICE_NEEDS_RESET);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(t.metrics().snapshot().activate_failures, 1);
    }

    #[test]
    fn queue_not_ready_fails_activation() {
        let Fixture { mut t, dev, .. } = fixture();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_READY, 0);
        w(&mut t, reg::STATUS, 0xf);
        assert_ne!(r(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
        // The driver acknowledges by resetting; the device can start again.
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        assert!(dev.lock().unwrap().activated.is_some());
    }

    #[test]
    fn writes_after_driver_ok_are_ignored() {
        let Fixture { mut t, dev, .. } = fixture();
        negotiate(&mut t);
        w(&mut t, reg::STATUS, 0xf);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_READY, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
        w(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.queues[0].size, 16);
        assert_eq!(t.queues[0].desc, 0x1000);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(t.metrics().snapshot().bad_state_write, 4);
        assert_eq!(dev.lock().unwrap().acked, Some((1 << 32) | (1 << 3)));
    }

    #[test]
    fn reset_clears_everything_and_resets_device() {
        let Fixture { mut t, dev, irq } = fixture();
        negotiate(&mut t);
        w(&mut t, reg::STATUS, 0xf);
        t.interrupt.signal_used_queue().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.queues[0].size, 256);
        assert_eq!(t.queues[0].desc, 0);
        assert_eq!(t.driver_features, 0);
        let d = dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert!(d.activated.is_none());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let Fixture { mut t, irq, .. } = fixture();
        t.interrupt.signal_used_queue().unwrap();
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 2);
        w(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn queue_notify_signals_the_eventfd() {
        let Fixture { mut t, dev, .. } = fixture();
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        let d = dev.lock().unwrap();
        assert_eq!(d.events[1].read().unwrap(), 2);
        assert!(d.events[0].read().is_err(), "queue 0 must not be signalled");
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let Fixture { mut t, .. } = fixture();
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        t.read(reg::MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        let mut eight = [0u8; 8];
        t.read(reg::STATUS, &mut eight);
        assert_eq!(t.metrics().snapshot().bad_access, 4);
        // Unknown / write-only offsets.
        assert_eq!(r(&mut t, 0x0f0), 0);
        assert_eq!(r(&mut t, reg::QUEUE_NOTIFY), 0);
        w(&mut t, reg::MAGIC_VALUE, 0);
        w(&mut t, 0x0f0, 0);
        assert_eq!(t.metrics().snapshot().bad_offset, 4);
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
    }

    #[test]
    fn config_space_access() {
        let Fixture { mut t, dev, .. } = fixture();
        let mut b = [0u8; 8];
        t.read(reg::CONFIG + 8, &mut b);
        assert_eq!(b, [8, 9, 10, 11, 12, 13, 14, 15]);
        let mut b = [0xffu8; 4];
        t.read(reg::CONFIG + 14, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 3];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [0; 3]);
        assert_eq!(t.metrics().snapshot().bad_access, 1);
        // Config writes before DRIVER are refused; after it they reach the device.
        t.write(reg::CONFIG, &[1]);
        w(&mut t, reg::STATUS, ACKNOWLEDGE);
        w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        t.write(reg::CONFIG + 4, &[1, 2]);
        assert_eq!(dev.lock().unwrap().written_config, vec![(4, vec![1u8, 2])]);
    }
}
