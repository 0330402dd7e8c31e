//! The fault-cost lab: a built-in probe guest that needs no kernel, for
//! measuring what guest page faults, first writes (mkwrite) and virtio-pmem
//! flushes cost with each fault engine.
//!
//! - [`vm::ProbeVm`]: one vCPU at CPL3 in 64-bit mode, page tables built by
//!   the VMM, one pmem device attached with [`vmm::pmem::attach`] and
//!   activated by the VMM through its virtio-mmio registers.
//! - [`guest`]: the probe routine (global_asm!) and its parameter block.
//! - [`bench`]: `pmemvm bench faults`; [`flush`]: `pmemvm bench flush`.
//! - [`checks`]: each bench's figures checked against KVM's and the
//!   device's counts.
//! - [`crash`]: `pmemvm bench crash`, crash VMs on 1 to 4 vCPUs ended by
//!   SIGKILL or a power cut ([`powercut`]), and the check of what survived.
//! - [`report`]: `pmemvm report`, the summary and SVG of a bench's JSON.
//! - [`powercut`]: a LazyFS-like FUSE file system that drops what no fsync
//!   covered when the power is cut, for crash-consistency tests.
//!
//! The lab uses only the `vmm` crate's public API.

pub mod backing;
pub mod bench;
pub mod checks;
pub mod crash;
pub mod flush;
pub mod guest;
pub mod host_flush;
pub mod paging;
pub mod powercut;
pub mod report;
pub mod vm;

use std::time::Duration;

pub use backing::BackingKind;
pub use bench::{run_faults, FaultBenchConfig, FaultOp, PagePattern, ProbeCase, UffdOptions};
pub use flush::{run_flush, FlushBenchConfig, FlushLayout};

use vmm::kvm_stats::KvmStatsError;
use vmm::VmmError;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("engine {0} is not available in this build")]
    EngineUnavailable(&'static str),
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    #[error(transparent)]
    Backing(#[from] backing::BackingError),
    #[error(transparent)]
    Stats(#[from] KvmStatsError),
    #[error("cannot write the probe's {what} at guest {addr:#x}")]
    GuestMemory { what: &'static str, addr: u64 },
    #[error("the probe code is {0} bytes, more than the space reserved for it")]
    CodeTooLarge(usize),
    #[error("the probe program has {steps} steps; at most {max} fit in the parameter pages")]
    TooManySteps { steps: usize, max: usize },
    #[error("{0} samples do not fit in the probe VM's RAM; use fewer pages or repeats")]
    TooManySamples(u64),
    #[error("a step touches pages {first_page}..+{pages}, outside the {region_pages}-page region")]
    StepOutsideRegion {
        first_page: u64,
        pages: u64,
        region_pages: u64,
    },
    #[error("activating the virtio-pmem device: {0}")]
    Activation(String),
    #[error("the device event loop: {0}")]
    EventLoop(std::io::Error),
    #[error(
        "the probe guest triple-faulted (KVM_EXIT_SHUTDOWN) after {steps_done} steps: {state}"
    )]
    TripleFault { steps_done: usize, state: String },
    #[error(
        "the probe guest took exception {vector} {name} at rip {rip:#x} (probe offset {offset:#x}), error code {error_code:#x}, cr2 {cr2:#x}, after {steps_done} steps"
    )]
    GuestException {
        vector: u64,
        name: &'static str,
        error_code: u64,
        rip: u64,
        offset: u64,
        cr2: u64,
        steps_done: usize,
    },
    #[error(transparent)]
    Cpu(#[from] vmm::cpu::CpuError),
    #[error("the probe guest made an unexpected exit {exit}: {state}")]
    UnexpectedExit { exit: String, state: String },
    #[error("the probe guest broke the protocol: {0}")]
    ProtocolViolation(String),
    #[error("the probe reported failure {code:?} in step {step}")]
    ProbeFailed {
        code: guest::ProbeExitCode,
        step: usize,
    },
    #[error(
        "the probe guest did not finish within {timeout:?} ({steps_done} steps done): {state}"
    )]
    Timeout {
        timeout: Duration,
        steps_done: usize,
        state: String,
    },
    #[error("host baseline: {what}: {source}")]
    HostBaseline {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--json {path}: {source}")]
    Json {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("the figures disagree with KVM's or the device's counts: {0}")]
    ChecksFailed(String),
}

#[cfg(test)]
mod tests;
