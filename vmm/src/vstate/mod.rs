//! The VM's KVM state at the bottom of the module graph: the KVM handle,
//! the VM with its in-kernel irqchip, guest memory and interrupt lines.
//! Nothing here knows about devices or fault engines.

pub mod irq;
pub mod kvm;
pub mod memory;

pub use irq::IrqLine;
pub use kvm::{create_vm, open_kvm, VmOptions};
pub use memory::{create_guest_memory, set_memslot};

use crate::layout::MIB;

#[derive(Debug, thiserror::Error)]
pub enum VstateError {
    #[error("/dev/kvm does not exist: pmemvm needs KVM. Load kvm_intel or kvm_amd (modprobe), or enable virtualization in the firmware or nested virtualization on the host")]
    NoKvm,
    #[error("no permission to open /dev/kvm: run as root or add your user to the 'kvm' group (then log in again)")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApi(i32),
    #[error("this KVM lacks {0}, which pmemvm needs")]
    KvmCap(&'static str),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} MiB of guest memory: {detail}", size = .size / MIB)]
    GuestMemory { size: u64, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VstateError {
    move |source| VstateError::Kvm { what, source }
}
