//! Serving virtio-pmem from an `event_manager` event loop.
//!
//! Flushes can take long (fdatasync), so they run on the event loop thread
//! rather than on a vCPU thread that would stall the guest. Register the
//! device as `Arc<Mutex<PmemDevice>>`; its queue eventfd is watched from the
//! start and notifications before DRIVER_OK are counted and dropped.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::PmemDevice;
use crate::virtio::warn_limited;

const QUEUE_EVENT: u32 = 0;

impl MutEventSubscriber for PmemDevice {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(self.queue_event(), QUEUE_EVENT, EventSet::IN);
        if let Err(e) = ops.add(events) {
            log::error!("virtio-pmem: cannot watch the queue eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != QUEUE_EVENT {
            log::warn!("virtio-pmem: unexpected event {}", events.data());
            return;
        }
        // Drain first: kicks that arrive while we work re-arm the eventfd
        // and lead to another round, so nothing is missed.
        match self.queue_event().read() {
            Ok(_) => self.process_queue(),
            // Spurious wakeup: another round already drained it.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => warn_limited!(self.warn, "virtio-pmem: queue eventfd read failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::virtio::pmem::device::tests::fixture;
    use crate::virtio::pmem::device::VIRTIO_PMEM_REQ_TYPE_FLUSH;
    use crate::virtio::pmem::PmemErrorKind;
    use crate::virtio::VirtioDevice;

    #[test]
    fn queue_notification_is_served_by_the_event_loop() {
        let f = fixture();
        let drv = f.drv.clone();
        let notify = f.dev.queue_events()[0].try_clone().unwrap();
        let dev = Arc::new(Mutex::new(f.dev));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(dev.clone());

        drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        // Two kicks before the loop runs: one round serves both.
        notify.write(1).unwrap();
        notify.write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.status(0), 0);
        assert_eq!(drv.status(2), 0);
        assert_eq!(f.wb.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Nothing pending: the loop times out without dispatching.
        assert_eq!(em.run_with_timeout(10).unwrap(), 0);
    }

    #[test]
    fn notification_before_activation_is_counted() {
        let f = fixture();
        let mut dev = f.dev;
        dev.reset();
        let notify = dev.queue_events()[0].try_clone().unwrap();
        let metrics = dev.metrics();
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(dev)));
        notify.write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(metrics.error_count(PmemErrorKind::QueueNotReady), 1);
    }
}
