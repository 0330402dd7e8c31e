//! The probe VM: a small KVM guest with one vCPU, no kernel, and one
//! virtio-pmem device attached with [`vmm::pmem::attach`]. The VMM lays
//! out page tables, the probe code, its parameters and a virtqueue, drives
//! the device's virtio-mmio registers itself (as a driver would) so that
//! the device is live before the vCPU starts, and starts the vCPU at CPL3
//! in 64-bit mode.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::virtio::features::VIRTIO_F_VERSION_1;
use devices::virtio::mmio::reg;
use devices::virtio::pmem::{EngineConfig, FaultEngineKind, PmemConfig, PmemStats};
use devices::virtio::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::guest::{
    exception_name, probe_code, vectors_offset, ProbeExitCode, ProbeHeader, StepOp, StepSpec,
    CONTROL_EXIT, CONTROL_FAULT, CONTROL_STEP, HDR_FAULT_ERROR, HDR_FAULT_RIP, HDR_FAULT_VECTOR,
    HDR_STEPS_DONE, STEPS_OFFSET, STEP_SIZE,
};
use super::paging::*;
use super::ProbeError;
use vmm::error::VmmError;
use vmm::exit::ExitSignal;
use vmm::fault::FaultStats;
use vmm::kvm_stats::{self, KvmStats, TraceCounter};
use vmm::layout::{self, MMIO_GAP_START};
use vmm::machine::{Machine, MachineConfig};
use vmm::pmem::{AttachError, DeviceEventLoop};
use vmm::vcpu::ExitHandler;
use vmm::vstate::open_kvm;
use vmm::worker::StopEvent;

/// What the probe routine executes: 64-bit mode, rdtsc and rdtscp to time
/// each access, lfence and mfence (SSE2) to order them.
const PROBE_FEATURES: &[vmm::cpu::Feature] = &[
    vmm::cpu::LM,
    vmm::cpu::TSC,
    vmm::cpu::RDTSCP,
    vmm::cpu::SSE2,
];
/// Entries of the probe's request queue.
pub const PROBE_QUEUE_SIZE: u16 = 16;
pub(super) const VRING_DESC_F_NEXT: u16 = 1;
pub(super) const VRING_DESC_F_WRITE: u16 = 2;
/// avail.flags: the probe polls the used ring, no interrupt wanted.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// The most steps the parameter pages hold (one slot stays the end mark).
pub const MAX_STEPS: usize = (PARAMS_SIZE as usize - STEPS_OFFSET) / STEP_SIZE - 1;

/// What the probe VM is made of.
#[derive(Debug, Clone)]
pub struct ProbeVmConfig {
    /// The engine and its options, as `--pmem engine=` gives them.
    pub engine: EngineConfig,
    /// The backing file; created (or grown sparse) to the region's size.
    pub backing: PathBuf,
    /// Size of the pmem region in 4 KiB pages; rounded up to 2 MiB.
    pub region_pages: u64,
    /// How long the guest may run before it is stopped as hung.
    pub timeout: Duration,
}

/// What the VMM saw at the end of one step.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub spec: StepSpec,
    /// TSC ticks per access (or per flush request).
    pub ticks: Vec<u64>,
    /// KVM vCPU and VM statistic deltas over the step (including the one
    /// MMIO exit that ends it).
    pub vcpu_stats: BTreeMap<String, i64>,
    pub vm_stats: BTreeMap<String, i64>,
    /// The fault engine's and the device's counters after the step.
    pub engine: FaultStats,
    pub device: PmemStats,
    /// Wall time of the step as the VMM saw it.
    pub wall: Duration,
}

/// Everything a probe run produced.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    /// Only the tests read it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub engine: FaultEngineKind,
    /// The guest's TSC frequency, for converting ticks.
    pub tsc_khz: u32,
    pub steps: Vec<StepResult>,
    /// KVM_RUN failed with EFAULT and was retried.
    pub efault_retries: u64,
    /// Exits because the dirty ring filled up.
    pub dirty_ring_full_exits: u64,
    /// How the engine tracked writes: "dirty ring", "dirty bitmap ...", or
    /// None where KVM tracks nothing (uffd). Only the tests read it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub dirty_log: Option<&'static str>,
    /// From creating the VM to the vCPU's first entry.
    pub setup: Duration,
}

/// A probe VM ready to run its program, all at once ([`ProbeVm::run`]) or
/// a few steps at a time ([`ProbeVm::run_steps`]), so that several VMs and
/// host-side baselines can take turns.
pub struct ProbeVm {
    engine: FaultEngineKind,
    machine: Machine,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    /// pmemvm's own exit handler: the probe's control page aside, every
    /// exit takes the path it takes under `pmemvm run`.
    exits: ExitHandler,
    events: Option<DeviceEventLoop>,
    steps: Vec<(StepSpec, u64)>,
    vm_stats: KvmStats,
    vcpu_stats: KvmStats,
    /// `kvm:kvm_page_fault` events of the thread running the vCPU: the
    /// EPT/NPT violations. Opened by the first run, on that thread.
    page_faults: Option<Option<TraceCounter>>,
    tsc_khz: u32,
    timeout: Duration,
    created: Instant,
    /// From creation to the first KVM_RUN.
    setup: Option<Duration>,
    results: Vec<StepResult>,
    /// Statistics at the end of the last step (or at the first entry).
    last: Option<Snapshot>,
}

/// Why the run loop returned.
enum LoopEnd {
    /// The asked number of steps is done; the guest waits in its next step.
    Paused,
    /// The probe reported success after its last step.
    Exited,
}

pub(super) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { what, source }
}

pub(super) fn guest_write(
    what: &'static str,
    addr: u64,
) -> impl Fn(vm_memory::GuestMemoryError) -> ProbeError {
    move |_| ProbeError::GuestMemory { what, addr }
}

/// Guest RAM needed for `samples` results: the fixed low area plus the
/// results, in 2 MiB units, at least [`MIN_RAM`].
pub fn ram_for_samples(samples: u64) -> u64 {
    let need = RESULTS_GPA + samples * 8;
    need.div_ceil(2 << 20).max(1) * (2 << 20)
}

/// Page-table pages the reserved range holds (3 MiB).
pub const TABLE_PAGES_MAX: u64 = (PAGE_TABLES_END - PAGE_TABLES_GPA) / PAGE;

/// The 2 MiB blocks of the region (by index) that the steps read or
/// write: the probe maps only these, so that a large sparse region costs
/// no more page tables than the pages it uses.
pub fn touched_blocks(steps: &[StepSpec]) -> BTreeSet<u64> {
    steps
        .iter()
        .filter(|s| s.op != StepOp::Flush)
        .flat_map(|s| s.pages())
        .map(|p| p / 512)
        .collect()
}

/// Page-table pages [`ProbeVm::new`] builds for `ram` bytes of guest RAM
/// and the `blocks` of a pmem region of `region_pages` pages: one PML4,
/// and one table per 512 GiB, 1 GiB and 2 MiB block that a mapped page
/// falls in.
pub fn table_pages_needed(ram: u64, region_pages: u64, blocks: &BTreeSet<u64>) -> u64 {
    const BLOCK: u64 = 2 << 20;
    let region_gpa = layout::pmem_regions(ram, &[region_pages * PAGE])[0];
    let mmio_gpa = layout::VIRTIO_MMIO_BASE;
    let ranges = [
        (GDT_GPA, PAGE),
        (TSS_GPA, PAGE),
        (IDT_GPA, PAGE),
        (FAULT_STACK_GPA, PAGE),
        (STACK_GPA, STACK_PAGES * PAGE),
        (PARAMS_GPA, PARAMS_SIZE),
        (QUEUE_GPA, QUEUE_PAGES * PAGE),
        (CODE_GPA, CODE_MAX),
        (RESULTS_GPA, ram.saturating_sub(RESULTS_GPA)),
        (mmio_gpa, PAGE),
        (CONTROL_GPA, PAGE),
    ]
    .into_iter()
    .chain(blocks.iter().map(|b| (region_gpa + b * BLOCK, BLOCK)));
    let ranges: Vec<(u64, u64)> = ranges.filter(|r| r.1 > 0).collect();
    let mut tables = 1;
    for shift in [39u32, 30, 21] {
        let mut seen = BTreeSet::new();
        for &(start, len) in &ranges {
            seen.extend((start >> shift)..=((start + len - 1) >> shift));
        }
        tables += seen.len() as u64;
    }
    tables
}

impl ProbeVm {
    /// Builds the VM for `steps`; nothing runs yet.
    pub fn new(config: &ProbeVmConfig, steps: &[StepSpec]) -> Result<Self, ProbeError> {
        let created = Instant::now();
        if steps.len() > MAX_STEPS {
            return Err(ProbeError::TooManySteps {
                steps: steps.len(),
                max: MAX_STEPS,
            });
        }
        let region_pages = config.region_pages.max(1).div_ceil(512) * 512;
        if let Some(s) = steps
            .iter()
            .find(|s| s.first_page + s.window_pages() > region_pages)
        {
            return Err(ProbeError::StepOutsideRegion {
                first_page: s.first_page,
                pages: s.window_pages(),
                region_pages,
            });
        }
        let samples: u64 = steps.iter().map(|s| s.count).sum();
        let ram = ram_for_samples(samples).max(MIN_RAM);
        if ram > MMIO_GAP_START {
            return Err(ProbeError::TooManySamples(samples));
        }

        let lab = LabMachine::build(&config.engine, &config.backing, region_pages, ram)?;
        let LabMachine {
            mut machine,
            mem,
            cpuid,
            region_gpa,
            mmio_gpa,
        } = lab;
        let mut tables = fixed_page_tables(&mem, mmio_gpa)?;
        tables.identity_map(RESULTS_GPA, ram - RESULTS_GPA, PageAccess::UserReadWrite)?;
        for block in touched_blocks(steps) {
            for page in block * 512..(block + 1) * 512 {
                let a = region_gpa + page * PAGE;
                tables.map_page(a, a, PageAccess::UserPmem)?;
            }
        }

        // The virtqueue: one request chain (type, then ret) used over and
        // over as descriptor 0 -> 1.
        write_descriptor(&mem, 0, QUEUE_REQUEST_GPA, 4, VRING_DESC_F_NEXT, 1)?;
        write_descriptor(&mem, 1, QUEUE_RESPONSE_GPA, 4, VRING_DESC_F_WRITE, 0)?;
        write_flush_request(&mem)?;

        // Parameters and the step list.
        let header = ProbeHeader {
            region: region_gpa,
            mmio: mmio_gpa,
            avail: QUEUE_AVAIL_GPA,
            used: QUEUE_USED_GPA,
            response: QUEUE_RESPONSE_GPA,
            queue_size: PROBE_QUEUE_SIZE,
            control: CONTROL_GPA,
        };
        mem.write_slice(&header.encode(), GuestAddress(PARAMS_GPA))
            .map_err(guest_write("probe parameters", PARAMS_GPA))?;
        let mut results = RESULTS_GPA;
        let mut placed = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let at = PARAMS_GPA + (STEPS_OFFSET + i * STEP_SIZE) as u64;
            mem.write_slice(&step.encode(results), GuestAddress(at))
                .map_err(guest_write("probe step", at))?;
            placed.push((*step, results));
            results += step.count * 8;
        }
        // Host-side first touch of the results, so the guest's stores there
        // cost only KVM's own fault.
        prefault_ram(&mem, RESULTS_GPA, results - RESULTS_GPA)?;

        let vcpu = user_vcpu(&machine, &cpuid, 0, 1, tables.root(), CODE_GPA, PARAMS_GPA)?;
        let tsc_khz = match vcpu.get_tsc_khz() {
            Ok(khz) if khz > 0 => khz,
            _ => host_tsc_khz(),
        };
        let vm_stats = KvmStats::open_vm(&machine.vm)?;
        let vcpu_stats = KvmStats::open_vcpu(&vcpu)?;

        activate_device(&machine.mmio, mmio_gpa)?;
        let events = DeviceEventLoop::start(&machine.pmem).map_err(ProbeError::EventLoop)?;
        let exit = ExitSignal::new().map_err(ProbeError::EventLoop)?;
        let exits = ExitHandler::new(0, machine.vcpu_context(Bus::new(), Arc::new(exit)));
        Ok(Self {
            engine: config.engine.kind(),
            machine,
            vcpu,
            mem,
            exits,
            events,
            steps: placed,
            vm_stats,
            vcpu_stats,
            page_faults: None,
            tsc_khz,
            timeout: config.timeout,
            created,
            setup: None,
            results: Vec::new(),
            last: None,
        })
    }

    /// Overwrites probe code at `offset`: tests use it to make the probe
    /// fault.
    #[cfg(test)]
    pub(super) fn patch_code(&self, offset: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(CODE_GPA + offset))
            .unwrap();
    }

    /// Runs the probe to its end and collects every step's samples.
    pub fn run(mut self) -> Result<ProbeRun, ProbeError> {
        self.run_loop(None)?;
        if let Some(events) = self.events.take() {
            events.stop();
        }
        Ok(ProbeRun {
            engine: self.engine,
            tsc_khz: self.tsc_khz,
            steps: std::mem::take(&mut self.results),
            efault_retries: self.exits.host_faults(),
            dirty_ring_full_exits: self.exits.dirty_ring_full_exits(),
            dirty_log: self.machine.pmem.dirty_log_kind(),
            setup: self.setup.unwrap_or_default(),
        })
    }

    /// Runs the next `count` steps (fewer if the program ends first) and
    /// returns their results; the guest then waits, not running, until the
    /// next call. [`ProbeVm::run`] finishes the program and returns every
    /// step, these included.
    pub fn run_steps(&mut self, count: usize) -> Result<&[StepResult], ProbeError> {
        let first = self.results.len();
        let target = (first + count).min(self.steps.len());
        if target > first {
            self.run_loop(Some(target))?;
        }
        Ok(&self.results[first..])
    }

    #[cfg(test)]
    pub fn steps_done(&self) -> usize {
        self.results.len()
    }

    fn snapshot(&self) -> Result<Snapshot, ProbeError> {
        let mut vcpu = self.vcpu_stats.read()?;
        if let Some(Some(counter)) = &self.page_faults {
            match counter.read() {
                Ok(n) => {
                    vcpu.insert(kvm_stats::PAGE_FAULT_STAT.to_string(), n);
                }
                Err(e) => log::debug!("reading the kvm_page_fault counter: {e}"),
            }
        }
        Ok(Snapshot {
            vcpu,
            vm: self.vm_stats.read()?,
            at: Instant::now(),
        })
    }

    /// Runs the vCPU until `pause_at` steps are done (`None`: until the
    /// probe exits), with a watchdog of `timeout`.
    fn run_loop(&mut self, pause_at: Option<usize>) -> Result<LoopEnd, ProbeError> {
        vmm::vcpu::install_kick_handler().map_err(ProbeError::EventLoop)?;
        if self.setup.is_none() {
            self.setup = Some(self.created.elapsed());
        }
        if self.page_faults.is_none() {
            let counter = TraceCounter::open_this_thread(kvm_stats::PAGE_FAULT_EVENT)
                .map_err(|e| {
                    log::debug!("kvm:kvm_page_fault events are not counted: {e}");
                })
                .ok();
            self.page_faults = Some(counter);
        }
        if self.last.is_none() {
            self.last = Some(self.snapshot()?);
        }
        let watchdog = Watchdog::start(self.timeout);
        loop {
            if pause_at.is_some_and(|n| self.results.len() >= n) {
                return Ok(LoopEnd::Paused);
            }
            if watchdog.fired() {
                return Err(ProbeError::Timeout {
                    timeout: self.timeout,
                    steps_done: self.results.len(),
                    state: self.describe_state(),
                });
            }
            let steps = self.steps.len();
            let done = self.results.len();
            // The probe's control page first; every other exit is served
            // as under `pmemvm run`.
            match self.vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, _)) if addr == CONTROL_GPA + CONTROL_STEP => {
                    self.record_step()?;
                }
                Ok(VcpuExit::MmioWrite(addr, _)) if addr == CONTROL_GPA + CONTROL_FAULT => {
                    return Err(self.exception(done));
                }
                Ok(VcpuExit::MmioWrite(addr, data)) if addr == CONTROL_GPA + CONTROL_EXIT => {
                    let code = data.first().copied().unwrap_or(0xff);
                    return match ProbeExitCode::from(code) {
                        ProbeExitCode::Done if done == steps => Ok(LoopEnd::Exited),
                        ProbeExitCode::Done => Err(ProbeError::ProtocolViolation(format!(
                            "the probe ended after {done} of {steps} steps"
                        ))),
                        code => Err(ProbeError::ProbeFailed { code, step: done }),
                    };
                }
                Ok(VcpuExit::Shutdown) => {
                    return Err(ProbeError::TripleFault {
                        steps_done: done,
                        state: self.describe_state(),
                    })
                }
                other => {
                    if let Some(end) = self.exits.handle(other) {
                        return Err(ProbeError::UnexpectedExit {
                            exit: format!("{end:?}"),
                            state: self.describe_state(),
                        });
                    }
                }
            }
        }
    }

    /// A step boundary: the step's samples and counter deltas.
    fn record_step(&mut self) -> Result<(), ProbeError> {
        let now = self.snapshot()?;
        let index = self.results.len();
        let Some(&(spec, gpa)) = self.steps.get(index) else {
            return Err(ProbeError::ProtocolViolation(format!(
                "step {index} reported, but the program has {} steps",
                self.steps.len()
            )));
        };
        let ticks = read_u64s(&self.mem, gpa, spec.count)?;
        let stats = self.machine.pmem.devices[0].stats();
        let last = self.last.as_ref().unwrap_or(&now);
        let result = StepResult {
            spec,
            ticks,
            vcpu_stats: kvm_stats::delta(&last.vcpu, &now.vcpu),
            vm_stats: kvm_stats::delta(&last.vm, &now.vm),
            engine: stats.fault,
            device: stats.device,
            wall: now.at - last.at,
        };
        self.results.push(result);
        self.last = Some(self.snapshot()?);
        Ok(())
    }

    /// The exception the probe's handler reported.
    fn exception(&mut self, steps_done: usize) -> ProbeError {
        let field = |at: usize| -> u64 {
            self.mem
                .read_obj(GuestAddress(PARAMS_GPA + at as u64))
                .unwrap_or(u64::MAX)
        };
        let (vector, error_code, rip) = (
            field(HDR_FAULT_VECTOR),
            field(HDR_FAULT_ERROR),
            field(HDR_FAULT_RIP),
        );
        let cr2 = self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
        ProbeError::GuestException {
            vector,
            name: exception_name(vector),
            error_code,
            rip,
            offset: rip.wrapping_sub(CODE_GPA),
            cr2,
            steps_done,
        }
    }

    /// RIP, RSP, CR2 and how far the probe got, for error reports.
    fn describe_state(&mut self) -> String {
        let done: u64 = self
            .mem
            .read_obj(GuestAddress(PARAMS_GPA + HDR_STEPS_DONE as u64))
            .unwrap_or(u64::MAX);
        let regs = self.vcpu.get_regs();
        let sregs = self.vcpu.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} (probe offset {:#x}) rsp {:#x} rsi {:#x} r10 {} cr2 {:#x} cs {:#x}, steps done {done}",
                r.rip,
                r.rip.wrapping_sub(CODE_GPA),
                r.rsp,
                r.rsi,
                r.r10,
                s.cr2,
                s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable ({e}), steps done {done}"),
        }
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            events.stop();
        }
    }
}

/// What every lab VM starts from: a machine with one pmem device on
/// `backing`, the guest RAM, and the KVM CPUID the vCPUs get.
pub(super) struct LabMachine {
    pub machine: Machine,
    pub mem: GuestMemoryMmap,
    pub cpuid: kvm_bindings::CpuId,
    /// Guest-physical start of the pmem region, and its device's MMIO page.
    pub region_gpa: u64,
    pub mmio_gpa: u64,
}

impl LabMachine {
    /// Checks that the host runs the probe code, then builds the machine:
    /// `ram` bytes of RAM and a `region_pages` pmem region served by
    /// `engine`.
    pub fn build(
        engine: &EngineConfig,
        backing: &std::path::Path,
        region_pages: u64,
        ram: u64,
    ) -> Result<Self, ProbeError> {
        let kvm = open_kvm().map_err(VmmError::from)?;
        let cpuid = vmm::cpu::supported_cpuid(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vmm::cpu::require_features(
            &cpuid,
            vmm::host::HostKind::detect(),
            PROBE_FEATURES,
            "the probe guest",
        )?;
        let region_size = region_pages * PAGE;
        let pmem_config = PmemConfig {
            path: backing.to_path_buf(),
            size: Some(region_size),
            readonly: false,
            discard_writes: false,
            engine: *engine,
        };
        let machine = Machine::build(
            kvm,
            &MachineConfig {
                memory: ram,
                pit: false,
                pmem: std::slice::from_ref(&pmem_config),
            },
        )
        .map_err(|e| match e {
            VmmError::Pmem(AttachError::Engine { engine, source, .. })
                if source.raw_os_error() == Some(libc::ENOSYS) =>
            {
                ProbeError::EngineUnavailable(engine)
            }
            e => ProbeError::Vmm(e),
        })?;
        let mem = machine.mem.clone();
        let region_gpa = layout::pmem_regions(ram, &[region_size])[0];
        let mmio_gpa = machine.pmem.devices[0].spec().base;
        Ok(Self {
            machine,
            mem,
            cpuid,
            region_gpa,
            mmio_gpa,
        })
    }
}

/// Page tables holding [`map_fixed_area`]'s mappings, to add the pmem
/// region's pages to.
pub(super) fn fixed_page_tables(
    mem: &GuestMemoryMmap,
    mmio_gpa: u64,
) -> Result<PageTableBuilder<'_>, ProbeError> {
    let mut tables = PageTableBuilder::new(mem, PAGE_TABLES_GPA, PAGE_TABLES_END)?;
    map_fixed_area(mem, &mut tables, mmio_gpa)?;
    Ok(tables)
}

/// Descriptor tables, the probe code and the identity mappings of the
/// fixed low area (tables, stacks, parameters, queue, code) and of the
/// device's and the control page's MMIO.
fn map_fixed_area(
    mem: &GuestMemoryMmap,
    tables: &mut PageTableBuilder,
    mmio_gpa: u64,
) -> Result<(), ProbeError> {
    write_descriptor_tables(mem, CODE_GPA + vectors_offset() as u64)?;
    tables.identity_map(GDT_GPA, PAGE, PageAccess::Supervisor)?;
    tables.identity_map(TSS_GPA, PAGE, PageAccess::Supervisor)?;
    tables.identity_map(IDT_GPA, PAGE, PageAccess::Supervisor)?;
    tables.identity_map(FAULT_STACK_GPA, PAGE, PageAccess::Supervisor)?;
    tables.identity_map(STACK_GPA, STACK_PAGES * PAGE, PageAccess::UserReadWrite)?;
    tables.identity_map(PARAMS_GPA, PARAMS_SIZE, PageAccess::UserReadWrite)?;
    tables.identity_map(QUEUE_GPA, QUEUE_PAGES * PAGE, PageAccess::UserReadWrite)?;
    let code = probe_code();
    if code.len() as u64 > CODE_MAX {
        return Err(ProbeError::CodeTooLarge(code.len()));
    }
    tables.identity_map(CODE_GPA, code.len() as u64, PageAccess::UserReadExecute)?;
    tables.map_page(mmio_gpa, mmio_gpa, PageAccess::UserMmio)?;
    tables.map_page(CONTROL_GPA, CONTROL_GPA, PageAccess::UserMmio)?;
    mem.write_slice(code, GuestAddress(CODE_GPA))
        .map_err(guest_write("probe code", CODE_GPA))
}

/// vCPU `id` of `count`, at CPL3 with paging rooted at `cr3`, about to run
/// `entry` with RDI = `params`.
pub(super) fn user_vcpu(
    machine: &Machine,
    cpuid: &kvm_bindings::CpuId,
    id: u8,
    count: u8,
    cr3: u64,
    entry: u64,
    params: u64,
) -> Result<VcpuFd, ProbeError> {
    let vcpu = machine.create_vcpu(id)?;
    // On hardware KVM, rdtscp is #UD unless the guest's CPUID has it.
    vcpu.set_cpuid2(&vmm::cpu::vcpu_cpuid(cpuid, id, count))
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&user_mode_sregs(sregs, cr3))
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&entry_regs(entry, params, STACK_GPA + STACK_PAGES * PAGE))
        .map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(vcpu)
}

struct Snapshot {
    vcpu: BTreeMap<String, u64>,
    vm: BTreeMap<String, u64>,
    at: Instant,
}

/// The request every chain of the probe's queue starts with (FLUSH), and
/// the avail ring's no-interrupt flag: the probe polls for completions.
pub(super) fn write_flush_request(mem: &GuestMemoryMmap) -> Result<(), ProbeError> {
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(QUEUE_AVAIL_GPA))
        .map_err(guest_write("avail ring", QUEUE_AVAIL_GPA))?;
    mem.write_obj(
        devices::virtio::pmem::VIRTIO_PMEM_REQ_TYPE_FLUSH,
        GuestAddress(QUEUE_REQUEST_GPA),
    )
    .map_err(guest_write("flush request", QUEUE_REQUEST_GPA))
}

pub(super) fn write_descriptor(
    mem: &GuestMemoryMmap,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), ProbeError> {
    let at = QUEUE_DESC_GPA + 16 * u64::from(index);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at))
        .map_err(guest_write("virtqueue descriptor", at))
}

fn prefault_ram(mem: &GuestMemoryMmap, start: u64, len: u64) -> Result<(), ProbeError> {
    let zeros = [0u8; PAGE as usize];
    for page in (start..start + len).step_by(PAGE as usize) {
        mem.write_slice(&zeros, GuestAddress(page))
            .map_err(guest_write("results", page))?;
    }
    Ok(())
}

fn read_u64s(mem: &GuestMemoryMmap, gpa: u64, count: u64) -> Result<Vec<u64>, ProbeError> {
    let mut raw = vec![0u8; count as usize * 8];
    mem.read_slice(&mut raw, GuestAddress(gpa))
        .map_err(guest_write("results", gpa))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut v = [0u8; 8];
            v.copy_from_slice(c);
            u64::from_le_bytes(v)
        })
        .collect())
}

/// Drives the device's virtio-mmio registers the way a driver does at
/// probe time (virtio 1.2, 3.1.1), with the probe's queue in guest RAM.
pub(super) fn activate_device(mmio: &Bus, base: u64) -> Result<(), ProbeError> {
    let write = |offset: u64, v: u32| {
        if mmio.write(base + offset, &v.to_le_bytes()) {
            Ok(())
        } else {
            Err(ProbeError::Activation(format!(
                "no device at {:#x}",
                base + offset
            )))
        }
    };
    let read = |offset: u64| {
        let mut d = [0u8; 4];
        mmio.read(base + offset, &mut d);
        u32::from_le_bytes(d)
    };
    write(reg::STATUS, 0)?;
    write(reg::STATUS, ACKNOWLEDGE)?;
    write(reg::STATUS, ACKNOWLEDGE | DRIVER)?;
    write(reg::DEVICE_FEATURES_SEL, 1)?;
    let high = read(reg::DEVICE_FEATURES);
    let version_1 = 1u32 << (VIRTIO_F_VERSION_1 - 32);
    if high & version_1 == 0 {
        return Err(ProbeError::Activation(
            "the device does not offer VIRTIO_F_VERSION_1".into(),
        ));
    }
    write(reg::DRIVER_FEATURES_SEL, 1)?;
    write(reg::DRIVER_FEATURES, version_1)?;
    write(reg::DRIVER_FEATURES_SEL, 0)?;
    write(reg::DRIVER_FEATURES, 0)?;
    write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)?;
    if read(reg::STATUS) & FEATURES_OK == 0 {
        return Err(ProbeError::Activation("FEATURES_OK refused".into()));
    }
    write(reg::QUEUE_SEL, 0)?;
    let max = read(reg::QUEUE_NUM_MAX);
    if max < u32::from(PROBE_QUEUE_SIZE) {
        return Err(ProbeError::Activation(format!(
            "queue 0 holds {max} entries, the probe needs {PROBE_QUEUE_SIZE}"
        )));
    }
    write(reg::QUEUE_NUM, u32::from(PROBE_QUEUE_SIZE))?;
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, QUEUE_DESC_GPA),
        (reg::QUEUE_DRIVER_LOW, QUEUE_AVAIL_GPA),
        (reg::QUEUE_DEVICE_LOW, QUEUE_USED_GPA),
    ] {
        write(low, addr as u32)?;
        write(low + 4, (addr >> 32) as u32)?;
    }
    write(reg::QUEUE_READY, 1)?;
    write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)?;
    let status = read(reg::STATUS);
    if status & DEVICE_NEEDS_RESET != 0 || status & DRIVER_OK == 0 {
        return Err(ProbeError::Activation(format!(
            "the device did not start (status {status:#x})"
        )));
    }
    Ok(())
}

/// The host TSC frequency, measured against CLOCK_MONOTONIC over 20 ms;
/// used when KVM_GET_TSC_KHZ is unavailable.
pub fn host_tsc_khz() -> u32 {
    let read_tsc = || {
        // SAFETY: rdtsc has no memory effects; it is allowed at CPL3 on
        // Linux hosts.
        unsafe { core::arch::x86_64::_rdtsc() }
    };
    let t0 = Instant::now();
    let c0 = read_tsc();
    std::thread::sleep(Duration::from_millis(20));
    let c1 = read_tsc();
    let ns = t0.elapsed().as_nanos().max(1) as f64;
    ((c1.wrapping_sub(c0)) as f64 / ns * 1e6) as u32
}

/// Kicks the vCPU thread out of KVM_RUN once a deadline passes, and keeps
/// kicking (a kick that lands outside KVM_RUN is lost) until dropped.
struct Watchdog {
    fired: Arc<AtomicBool>,
    /// None, like `thread`, if no eventfd could be made: no watchdog.
    stop: Option<StopEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(timeout: Duration) -> Self {
        let fired = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = StopEvent::new().ok();
        let thread = stop.as_ref().and_then(|stop| {
            let stop = stop.try_clone().ok()?;
            let fired = fired.clone();
            std::thread::Builder::new()
                .name("probe-watchdog".into())
                .spawn(move || {
                    if stop.wait(timeout) {
                        return;
                    }
                    fired.store(true, Ordering::Release);
                    while !stop.wait(Duration::from_millis(5)) {
                        // SAFETY: `target` is the thread that owns this
                        // watchdog; it joins us before it can exit, so the
                        // id is live. The signal has a no-op handler
                        // (install_kick_handler).
                        unsafe { libc::pthread_kill(target, vmm::vcpu::kick_signal()) };
                    }
                })
                .ok()
        });
        Self {
            fired,
            stop,
            thread,
        }
    }
    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            if let Err(e) = stop.request() {
                log::error!("cannot stop the probe watchdog: {e}");
                return;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
