//! Why pmemvm could not build or run the VM.

use crate::acpi::AcpiError;
use crate::boot::BootError;
use crate::cmdline::CmdlineError;
use crate::cpu::CpuError;
use crate::layout::{MAX_MEMORY, MIB, MIN_MEMORY};
use crate::mptable::MpTableError;
use crate::pmem::AttachError;
use crate::stats::StatsError;
use crate::vstate::VstateError;
use devices::bus::BusError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vstate(#[from] VstateError),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("--memory {got} MiB is too little: a Linux guest needs at least {min} MiB", got = .0 / MIB, min = MIN_MEMORY / MIB)]
    TooLittleMemory(u64),
    #[error("--memory {got} MiB is more than pmemvm supports ({max} MiB)", got = .0 / MIB, max = MAX_MEMORY / MIB)]
    TooMuchMemory(u64),
    #[error("--memory must be a multiple of 4 KiB")]
    UnalignedMemory,
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pmem(#[from] AttachError),
    #[error(transparent)]
    Stats(#[from] StatsError),
    #[error("the guest stopped: {0}")]
    GuestFault(String),
}

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(crate) fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}
