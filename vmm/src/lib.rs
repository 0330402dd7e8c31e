//! The pmemvm virtual machine monitor: KVM set-up, guest memory, boot,
//! vCPU threads and the run loop.
//!
//! The modules depend on each other in one direction, from the leaves up:
//! `vstate` (KVM, guest memory, irq lines), `fault` (the engines and the
//! page tracker), `vcpu` (the exit handler), `pmem` (the devices and their
//! engines), `stats`, then `machine` (the VM builder) and `vm` (the run).

// Guest-controlled values must never panic the VMM: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod abi;
pub mod acpi;
pub mod boot;
pub mod cmdline;
pub mod cpu;
pub mod error;
pub mod exit;
pub mod fault;
pub mod host;
pub mod kvm_stats;
pub mod layout;
pub mod machine;
pub mod mptable;
pub mod pmem;
pub mod seccomp;
pub mod stats;
pub mod vcpu;
mod vm;
pub mod vstate;
pub mod worker;

pub use cmdline::HostQuirks;
pub use devices::legacy::EXIT_PORT;
pub use devices::virtio::pmem::PmemConfig;
pub use error::VmmError;
pub use vm::{run, VmConfig};
