//! How the VMM stops a worker thread: an eventfd the worker waits on next
//! to its work (in its poll or epoll set), so a stop request wakes it at
//! once, wherever it sleeps. vCPU threads are the exception: KVM_RUN
//! returns early only for a signal (see `vcpu::kick`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// The stop request of one worker: the eventfd wakes it, the flag (which
/// costs the worker no system call, so no seccomp rule) says why.
#[derive(Debug)]
pub struct StopEvent {
    evt: EventFd,
    requested: Arc<AtomicBool>,
}

impl StopEvent {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            requested: Arc::default(),
        })
    }

    pub fn request(&self) -> std::io::Result<()> {
        self.requested.store(true, Ordering::Release);
        self.evt.write(1)
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Sleeps until a stop is requested or `timeout` passes (a worker's
    /// backoff or timer); true if it was requested.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.requested() {
            return true;
        }
        let mut fd = libc::pollfd {
            fd: self.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, of which poll writes only `revents`.
        unsafe { libc::poll(&mut fd, 1, ms) };
        self.requested()
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
            requested: self.requested.clone(),
        })
    }

    /// The same request as an event-manager subscriber, for workers built
    /// on an `EventManager`.
    pub fn subscriber(&self) -> std::io::Result<Arc<Mutex<StopSubscriber>>> {
        Ok(Arc::new(Mutex::new(StopSubscriber {
            evt: self.try_clone()?,
        })))
    }
}

impl AsRawFd for StopEvent {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

/// Wakes an `EventManager` loop when a stop is requested; the loop then
/// asks [`StopEvent::requested`]. The event is left readable.
pub struct StopSubscriber {
    evt: StopEvent,
}

impl MutEventSubscriber for StopSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch a worker's stop eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        // Level-triggered and never read: stop watching, or the loop spins
        // until it sees the request.
        let _ = ops.remove(Events::new(&self.evt, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_seen_by_every_clone_and_stays() {
        let stop = StopEvent::new().unwrap();
        let other = stop.try_clone().unwrap();
        assert!(!other.requested());
        stop.request().unwrap();
        assert!(other.requested());
        assert!(other.requested(), "seeing the request does not consume it");
    }

    #[test]
    fn wait_ends_at_the_request_or_the_timeout() {
        let stop = StopEvent::new().unwrap();
        let t = std::time::Instant::now();
        assert!(!stop.wait(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        let other = stop.try_clone().unwrap();
        let waiter = std::thread::spawn(move || other.wait(Duration::from_secs(60)));
        stop.request().unwrap();
        assert!(waiter.join().unwrap(), "a request wakes the waiter");
    }
}
