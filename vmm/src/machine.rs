//! The VM builder shared by pmemvm's run and the lab's probe: KVM, the VM
//! with its irqchip, guest RAM and the pmem devices with their fault
//! engines. What runs in it (a Linux kernel or the probe) is the caller's.

use std::sync::Arc;

use devices::bus::Bus;
use devices::virtio::pmem::PmemConfig;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{kvm_err, VmmError};
use crate::exit::ExitSignal;
use crate::pmem::{self, PmemSet};
use crate::vcpu::VcpuContext;
use crate::vstate::{create_guest_memory, create_vm, VmOptions};

#[derive(Debug, Clone, Copy)]
pub struct MachineConfig<'a> {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// An in-kernel PIT (Linux guests calibrate against it).
    pub pit: bool,
    /// The pmem devices, in guest order.
    pub pmem: &'a [PmemConfig],
}

pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    /// The MMIO bus, with each pmem device's transport and overlays.
    pub mmio: Bus,
    pub pmem: Arc<PmemSet>,
}

impl Machine {
    /// Creates the VM on `kvm` (from [`crate::vstate::open_kvm`]), its RAM
    /// and its pmem devices.
    pub fn build(kvm: Kvm, config: &MachineConfig) -> Result<Self, VmmError> {
        let vm = create_vm(&kvm, VmOptions { pit: config.pit })?;
        let mem = create_guest_memory(&vm, config.memory)?;
        let mut mmio = Bus::new();
        let pmem = pmem::attach(
            &kvm,
            &vm,
            &mem,
            &mut mmio,
            config.memory,
            mem.num_regions() as u32,
            config.pmem,
        )?;
        Ok(Self {
            kvm,
            vm,
            mem,
            mmio,
            pmem: Arc::new(pmem),
        })
    }

    /// A vCPU, with its dirty ring where a fault engine needs one.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmmError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        self.pmem.add_vcpu(id, &fd)?;
        Ok(fd)
    }

    /// What the vCPU threads share; takes the MMIO bus.
    pub fn vcpu_context(&mut self, pio: Bus, exit: Arc<ExitSignal>) -> Arc<VcpuContext> {
        Arc::new(VcpuContext {
            pio,
            mmio: std::mem::take(&mut self.mmio),
            mem: self.mem.clone(),
            exit,
            stop: Default::default(),
            host_faults: self.pmem.clone(),
        })
    }
}
