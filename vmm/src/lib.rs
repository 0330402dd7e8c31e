//! The pmemvm virtual machine monitor: KVM set-up, guest memory, boot,
//! vCPU threads and the run loop.

// Guest-controlled values must never panic the VMM: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod abi;
pub mod acpi;
pub mod boot;
pub mod cmdline;
pub mod cpu;
pub mod exit;
pub mod fault;
pub mod host;
pub mod kvm_stats;
pub mod layout;
pub mod mptable;
pub mod pmem;
pub mod probe;
pub mod seccomp;
pub mod stats;
mod vcpu;
mod vm;

pub use cmdline::HostQuirks;
pub use devices::legacy::EXIT_PORT;
pub use devices::virtio::pmem::PmemConfig;
pub use vm::{run, VmConfig, VmmError};
