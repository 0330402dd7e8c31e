//! Guest-visible devices of pmemvm: legacy PC pieces, the virtio-mmio
//! transport and virtio-pmem. Nothing here depends on KVM: the VMM wires
//! devices to the guest through [`bus::BusDevice`] and [`Interrupt`].

// Guest-controlled values must never panic the VMM: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod size;
pub mod virtio;

/// A way for a device to raise its interrupt line (an irqfd in the VMM).
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}
