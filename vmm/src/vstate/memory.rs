//! Guest RAM and memslots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{kvm_err, VstateError};
use crate::layout;

/// Guest RAM of `size` bytes around the MMIO gap, each range in its own
/// memslot from slot 0.
pub fn create_guest_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VstateError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VstateError::GuestMemory {
        size,
        detail: e.to_string(),
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let host =
            mem.get_host_address(region.start_addr())
                .map_err(|e| VstateError::GuestMemory {
                    size,
                    detail: e.to_string(),
                })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned
        // by `mem`, which the caller keeps for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// Maps `size` bytes at host address `host` into the guest at `gpa`.
///
/// # Safety
/// `host..host+size` must stay mapped for as long as the VM may run.
pub unsafe fn set_memslot(
    vm: &VmFd,
    slot: u32,
    flags: u32,
    gpa: u64,
    host: u64,
    size: u64,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the caller guarantees the mapping outlives the VM's use.
    unsafe { vm.set_user_memory_region(region) }
}
