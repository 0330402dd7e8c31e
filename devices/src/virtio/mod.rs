//! virtio transport and devices.
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] exposes it
//! to the guest through the virtio-mmio (version 2) register layout and hands
//! it guest memory, its queues and a [`VirtioInterrupt`] once the driver sets
//! DRIVER_OK. Queue processing happens on the VMM's event loop thread (see
//! [`pmem`]), never on a vCPU thread.

pub mod mmio;
pub mod pmem;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::ratelimit::LogLimiter;
use crate::Interrupt;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Feature bit numbers shared by all devices (virtio 1.2, 6).
pub mod features {
    /// Modern (non-legacy) device; mandatory for virtio-mmio version 2.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

/// Interrupt status bits (virtio-mmio InterruptStatus register).
pub const INTERRUPT_USED_RING: u32 = 0x1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// virtio device ids used here (virtio 1.2, 5).
pub const DEVICE_ID_PMEM: u32 = 27;

/// Why a device refused activation. The transport then sets
/// DEVICE_NEEDS_RESET instead of DRIVER_OK taking effect.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the transport provided {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index} is not ready")]
    QueueNotReady { index: usize },
    #[error("queue {index} rings do not fit in guest memory or are misaligned")]
    QueueInvalid { index: usize },
    #[error("device is already active")]
    AlreadyActive,
}

/// The interrupt of one virtio device: the InterruptStatus bits the guest
/// reads and acknowledges through the transport, plus the line to raise.
///
/// Devices set a bit and then trigger the line, so the guest's handler always
/// finds the reason once the interrupt arrives.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Arc<dyn Interrupt>,
}

impl VirtioInterrupt {
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver that buffers were added to a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INTERRUPT_USED_RING)
    }

    /// Tells the driver that the config space or the device status changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// A virtio device as seen by a transport.
///
/// The transport owns the register state (features, queue configuration,
/// status); the device owns what happens after DRIVER_OK.
pub trait VirtioDevice: Send {
    /// virtio device id (e.g. [`DEVICE_ID_PMEM`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One notification EventFd per queue, in queue order. The device watches
    /// them; the transport signals them (or the VMM binds them as ioeventfds).
    fn queue_events(&self) -> &[EventFd];

    /// Feature bits the device offers. The transport adds VIRTIO_F_VERSION_1.
    fn avail_features(&self) -> u64;

    /// Feature bits the driver accepted (a subset of what was offered),
    /// reported when the driver sets FEATURES_OK.
    fn set_acked_features(&mut self, _features: u64) {}

    /// Reads device-specific config space at `offset` (relative to 0x100).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device-specific config space at `offset` (relative to 0x100).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device after DRIVER_OK. `queues` are built from the
    /// driver's queue registers, one per entry of [`Self::queue_max_sizes`].
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;

    /// Stops the device (driver wrote 0 to Status); it may be activated again.
    fn reset(&mut self);
}

/// Copies `data.len()` bytes of a device's config space starting at `offset`.
/// Returns false, leaving zeros, when the access does not fit.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) -> bool {
    data.fill(0);
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..start.checked_add(data.len())?));
    match src {
        Some(src) => {
            data.copy_from_slice(src);
            true
        }
        None => false,
    }
}

/// How often guest-caused warnings reach the log: the first few, then a
/// sample, so a misbehaving driver cannot flood the host log.
pub(crate) fn guest_warn_limiter() -> LogLimiter {
    LogLimiter::new(10, 1000)
}

/// `log::warn!` through a [`LogLimiter`].
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounds_checked() {
        let config = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 2];
        assert!(read_config_bytes(&config, 2, &mut d));
        assert_eq!(d, [3, 4]);
        let mut d = [0xffu8; 2];
        assert!(!read_config_bytes(&config, 3, &mut d));
        assert_eq!(d, [0, 0]);
        assert!(!read_config_bytes(&config, u64::MAX, &mut d));
    }
}
