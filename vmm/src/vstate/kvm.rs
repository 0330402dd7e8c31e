//! Opening /dev/kvm and creating the VM with what every pmemvm VM has.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::{kvm_err, VstateError};

/// Where KVM puts the three pages of its real-mode TSS: just below the BIOS.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Opens /dev/kvm and checks for the capabilities every VM needs.
pub fn open_kvm() -> Result<Kvm, VstateError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VstateError::NoKvm,
        libc::EACCES | libc::EPERM => VstateError::KvmPermission,
        _ => VstateError::KvmOpen(e),
    })?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(VstateError::KvmApi(api));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VstateError::KvmCap(name));
        }
    }
    Ok(kvm)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct VmOptions {
    /// An in-kernel PIT: Linux calibrates its timers against it. The probe
    /// guest has no use for one.
    pub pit: bool,
}

/// A VM with its TSS pages and in-kernel irqchip (and PIT if asked).
pub fn create_vm(kvm: &Kvm, options: VmOptions) -> Result<VmFd, VstateError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    if options.pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }
    Ok(vm)
}
