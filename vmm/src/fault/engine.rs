//! What the VMM needs of a fault engine, for one pmem device. [`attach`]
//! starts the engine the `--pmem` option names, puts [`FaultEngine::memslot`]
//! into KVM and the device's flush is [`FaultEngine::writeback`]; the vCPUs
//! and the device thread call back into it when the host, not the guest,
//! is what went wrong.
//!
//! [`attach`]: crate::pmem::attach

use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::pmem::Writeback;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

use super::{FaultStats, PageTracker};

/// The region's memslot: the host mapping KVM resolves guest pages in, and
/// its KVM_MEM_* flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    pub host: u64,
    pub flags: u32,
}

impl Memslot {
    /// The slot at `host`, read-only for the guest if `readonly`, with
    /// KVM's dirty log if `logged`.
    pub fn new(host: u64, readonly: bool, logged: bool) -> Self {
        let mut flags = 0;
        if readonly {
            flags |= KVM_MEM_READONLY;
        }
        if logged {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        Self { host, flags }
    }
}

pub trait FaultEngine: Send + Sync {
    /// `engine=` as the user wrote it, and the `engine` field of `--stats`.
    fn name(&self) -> &'static str;

    /// The page states and counters of the device.
    fn tracker(&self) -> &Arc<PageTracker>;

    fn memslot(&self) -> Memslot;

    /// The device's flush: writes back exactly the dirty pages, durably,
    /// and arms the catch of first writes again.
    fn writeback(&self) -> io::Result<Box<dyn Writeback>>;

    /// Guest accesses to the region that reach the VMM as MMIO exits (KVM
    /// emulated the instruction and found no host page), if the engine
    /// serves them; they go on the MMIO bus over the region.
    fn emulated_access(&self) -> io::Result<Option<Arc<Mutex<dyn BusDevice>>>> {
        Ok(None)
    }

    /// KVM_RUN could not get a page of the region from the host. Returns
    /// whether the engine repaired the cause, so the vCPU retries at once.
    fn host_fault(&self) -> bool {
        false
    }

    /// Called by the device thread between events, at least every 100 ms:
    /// notice what other programs did to the backing file.
    fn watch(&self) {}

    fn stats(&self) -> FaultStats {
        self.tracker().stats(self.name())
    }
}
