//! virtio-pmem: a guest-physical region backed by a host file, plus a request
//! queue where the guest asks for its stores to be made durable.
//!
//! Wiring, as the VMM does it (`vmm::pmem::attach`):
//! 1. [`PmemBacking::open`] the file from a [`PmemConfig`] (`--pmem` value).
//! 2. Start the fault engine the config names; it says what goes into the
//!    region's memslot (the backing's mapping or its own) at a 2 MiB
//!    aligned guest-physical start, and provides the device's [`Writeback`].
//! 3. [`PmemDevice::new`]`(backing, start, writeback)`, shared as
//!    `Arc<Mutex<_>>` with the MMIO transport and an
//!    `event_manager::EventManager` thread.

mod backing;
mod device;
mod event_handler;
mod metrics;
mod readonly;

pub use backing::{
    EngineConfig, FaultEngineKind, FlushPolicy, PmemBacking, PmemBackingError, PmemConfig,
    PmemConfigError, UffdConfig, Writeback, WritebackReport, DEFAULT_POPULATE, MAX_POLL_US,
    MAX_POPULATE, PMEM_ALIGN,
};
pub use device::{
    PmemDevice, PmemError, QUEUE_SIZE, VIRTIO_PMEM_REQ_TYPE_FLUSH, VIRTIO_PMEM_RESP_EIO,
    VIRTIO_PMEM_RESP_OK,
};
pub use metrics::{LatencyStats, PmemErrorKind, PmemMetrics, PmemStats};
pub use readonly::ReadonlyRegion;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    use super::device::tests::{device, CountingIrq, Driver, FakeWriteback, AVAIL, DESC, USED};
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::MmioTransport;

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Transport, device and event loop together, driven the way the Linux
    /// virtio-mmio and virtio-pmem drivers do it.
    #[test]
    fn flush_through_transport_and_event_loop() {
        let wb = FakeWriteback::default();
        let dev = Arc::new(Mutex::new(device(wb.clone())));
        let drv = Driver::new();
        let irq = Arc::new(CountingIrq::default());
        let mut t = MmioTransport::new(drv.mem.clone(), dev.clone(), irq.clone()).unwrap();
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(dev.clone());

        assert_eq!(r(&mut t, 0x008), 27);
        w(&mut t, 0x070, 0x1);
        w(&mut t, 0x070, 0x3);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 offered");
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 1);
        w(&mut t, 0x024, 0);
        w(&mut t, 0x020, 0);
        w(&mut t, 0x070, 0xb);
        assert_eq!(r(&mut t, 0x070), 0xb);
        let mut start = [0u8; 8];
        t.read(0x100, &mut start);
        assert_eq!(u64::from_le_bytes(start), 0x1_0000_0000);
        assert_eq!(r(&mut t, 0x108), 2 << 20);
        w(&mut t, 0x030, 0);
        assert_eq!(r(&mut t, 0x034), u32::from(QUEUE_SIZE));
        w(&mut t, 0x038, u32::from(QUEUE_SIZE));
        for (low, addr) in [(0x080, DESC), (0x090, AVAIL), (0x0a0, USED)] {
            w(&mut t, low, addr as u32);
            w(&mut t, low + 4, 0);
        }
        w(&mut t, 0x044, 1);
        w(&mut t, 0x070, 0xf);
        assert_eq!(r(&mut t, 0x070), 0xf);
        assert!(dev.lock().unwrap().is_active());

        drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        // No ioeventfd here: the QueueNotify write goes through the bus.
        w(&mut t, 0x050, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(drv.status(0), VIRTIO_PMEM_RESP_OK);
        assert_eq!(wb.calls.load(Ordering::SeqCst), 1);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, 0x060), 1);
        w(&mut t, 0x064, 1);
        assert_eq!(r(&mut t, 0x060), 0);

        w(&mut t, 0x070, 0);
        assert!(!dev.lock().unwrap().is_active());
        assert_eq!(t.metrics().snapshot(), Default::default());
        let stats = dev.lock().unwrap().metrics().snapshot();
        assert_eq!((stats.flush_requests, stats.writebacks), (1, 1));
        assert!(stats.errors.values().all(|&n| n == 0), "{stats:?}");
    }
}
