//! Interrupt lines into the in-kernel IOAPIC.

use std::sync::Arc;

use devices::Interrupt;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::{kvm_err, VstateError};

/// An interrupt line backed by an irqfd on a GSI of the in-kernel IOAPIC.
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn register(vm: &VmFd, gsi: u32) -> Result<Arc<Self>, VstateError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            VstateError::Io {
                what: "creating an irqfd",
                source,
            }
        })?;
        vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        Ok(Arc::new(Self(evt)))
    }
}

impl Interrupt for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
