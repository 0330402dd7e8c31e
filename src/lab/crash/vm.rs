//! The crash VM: the probe machine with 1 to [`MAX_VCPUS`] vCPUs running
//! the crash routine, and the child process (`pmemvm bench crash-vm`) that
//! runs it until the bench ends it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use devices::bus::Bus;
use devices::virtio::pmem::EngineConfig;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::exit::ExitSignal;
use vmm::pmem::DeviceEventLoop;
use vmm::vcpu::ExitHandler;

use super::super::guest::{
    crash_entry_offset, record_tag, ProbeExitCode, CONTROL_ACK, CONTROL_EXIT, CONTROL_FAULT,
    CRASH_HEADER_SIZE, CR_AREA, CR_FLUSH_MASK, CR_HEAD, CR_INFLIGHT_MAX, CR_LOCK, CR_RECORDS,
    CR_SEED, CR_SHARED, CR_TAG, HDR_AVAIL, HDR_CONTROL, HDR_MAGIC, HDR_MMIO, HDR_QUEUE_MASK,
    HDR_RESPONSE, HDR_USED, PROBE_MAGIC,
};
use super::super::paging::*;
use super::super::vm::{
    activate_device, fixed_page_tables, guest_write, user_vcpu, write_descriptor,
    write_flush_request, LabMachine, PROBE_QUEUE_SIZE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use super::super::ProbeError;
use super::{CrashLayout, MAX_VCPUS};

/// Guest RAM: the fixed low area and page tables; no results.
const CRASH_RAM: u64 = MIN_RAM;
/// Records a vCPU writes while its flush is in flight before it waits: a
/// page's worth, so that flushes stay small and rounds acknowledge many.
const INFLIGHT_MAX: u64 = 64;
/// The queue lock the vCPUs take to publish a request (a spare word of
/// the queue's request page).
const QUEUE_LOCK_GPA: u64 = QUEUE_REQUEST_GPA + 0x20;

/// What a crash VM is made of.
#[derive(Debug, Clone)]
pub struct CrashVmConfig {
    pub engine: EngineConfig,
    pub backing: PathBuf,
    pub layout: CrashLayout,
    /// Seeds each vCPU's LCG (flush intervals, waited or not).
    pub seed: u64,
    /// Flushes go out every 1..=flush_mask+1 records.
    pub flush_mask: u64,
}

/// The ack file: vCPU `v`'s last acknowledged seq as a little-endian u64
/// at byte `8 * v`. Written with pwrite before the vCPU runs on, so it
/// outlives a SIGKILL of the process.
pub struct AckFile(File);

impl AckFile {
    pub fn create(path: &Path, vcpus: u8) -> std::io::Result<Self> {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.set_len(u64::from(vcpus) * 8)?;
        Ok(Self(f))
    }

    fn record(&self, vcpu: u8, seq: u64) -> std::io::Result<()> {
        self.0.write_all_at(&seq.to_le_bytes(), u64::from(vcpu) * 8)
    }

    /// Each vCPU's last acknowledged seq.
    pub fn read(path: &Path, vcpus: u8) -> std::io::Result<Vec<u64>> {
        let raw = std::fs::read(path)?;
        Ok((0..usize::from(vcpus))
            .map(|v| {
                raw.get(v * 8..v * 8 + 8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            })
            .collect())
    }
}

/// A crash VM, built and ready to run.
pub struct CrashVm {
    /// Keeps the VM, its memory and its pmem device alive.
    machine: vmm::machine::Machine,
    vcpus: Vec<VcpuFd>,
    exits: Arc<vmm::vcpu::VcpuContext>,
    events: Option<DeviceEventLoop>,
    mem: vm_memory::GuestMemoryMmap,
}

/// Appends one line per successful flush to `path`: the runs it wrote
/// back, `FIRST+PAGES` each, space-separated (an empty line for none).
fn log_flushes(vm: &CrashVm, path: &Path) -> std::io::Result<()> {
    let file = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let file = std::sync::Mutex::new(file);
    vm.machine.pmem.devices[0]
        .tracker()
        .observe_flushes(Box::new(move |set| {
            let mut line = set
                .runs(u64::MAX)
                .map(|r| format!("{}+{}", r.first, r.pages))
                .collect::<Vec<_>>()
                .join(" ");
            line.push('\n');
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            // One write per flush: a kill leaves whole lines.
            if let Err(e) = f.write_all(line.as_bytes()) {
                log::error!("crash VM: cannot log a flush: {e}");
            }
        }));
    Ok(())
}

/// The pages of each flush in a log [`log_flushes`] wrote.
pub fn read_flush_log(path: &Path) -> std::io::Result<Vec<Vec<u64>>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(|line| {
            line.split_whitespace()
                .filter_map(|run| {
                    let (first, pages) = run.split_once('+')?;
                    Some((first.parse::<u64>().ok()?, pages.parse::<u64>().ok()?))
                })
                .flat_map(|(first, pages)| first..first + pages)
                .collect()
        })
        .collect())
}

/// How a vCPU of a crash VM stopped (when nothing ended the VM first).
#[derive(Debug)]
pub enum VcpuEnd {
    /// It filled its area.
    Full,
    Failed(ProbeError),
}

impl CrashVm {
    pub fn new(config: &CrashVmConfig) -> Result<Self, ProbeError> {
        let layout = config.layout;
        if layout.vcpus == 0 || layout.vcpus > MAX_VCPUS || layout.area_pages() == 0 {
            return Err(ProbeError::Config(format!(
                "a crash VM runs 1 to {MAX_VCPUS} vCPUs, each with a page of its own ({} vCPUs, {} pages)",
                layout.vcpus, layout.region_pages
            )));
        }
        let mut lab = LabMachine::build(
            &config.engine,
            &config.backing,
            layout.region_pages,
            CRASH_RAM,
        )?;
        let (mem, region_gpa, mmio_gpa) = (lab.mem.clone(), lab.region_gpa, lab.mmio_gpa);
        let mut tables = fixed_page_tables(&mem, mmio_gpa)?;
        for page in 0..layout.region_pages {
            let a = region_gpa + page * PAGE;
            tables.map_page(a, a, PageAccess::UserPmem)?;
        }

        // One request chain per vCPU (2v -> 2v+1): the shared FLUSH request,
        // then the vCPU's own response word.
        write_flush_request(&mem)?;
        let count = layout.vcpus;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for v in 0..count {
            let head = 2 * u16::from(v);
            let response = QUEUE_RESPONSE_GPA + 8 * u64::from(v);
            write_descriptor(
                &mem,
                head,
                QUEUE_REQUEST_GPA,
                4,
                VRING_DESC_F_NEXT,
                head + 1,
            )?;
            write_descriptor(&mem, head + 1, response, 4, VRING_DESC_F_WRITE, 0)?;
            let header = PARAMS_GPA + (usize::from(v) * CRASH_HEADER_SIZE) as u64;
            let seed = config
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(u64::from(v));
            for (at, value) in [
                (HDR_MAGIC, PROBE_MAGIC),
                (HDR_MMIO, mmio_gpa),
                (HDR_AVAIL, QUEUE_AVAIL_GPA),
                (HDR_USED, QUEUE_USED_GPA),
                (HDR_RESPONSE, response),
                (HDR_QUEUE_MASK, u64::from(PROBE_QUEUE_SIZE) - 1),
                (HDR_CONTROL, CONTROL_GPA),
                (CR_AREA, region_gpa + layout.area_first_page(v) * PAGE),
                (CR_RECORDS, layout.records()),
                (CR_SHARED, region_gpa + 8 * u64::from(v)),
                (CR_HEAD, u64::from(head)),
                (CR_LOCK, QUEUE_LOCK_GPA),
                (CR_SEED, seed),
                (CR_TAG, record_tag(v)),
                (CR_FLUSH_MASK, config.flush_mask),
                (CR_INFLIGHT_MAX, INFLIGHT_MAX),
            ] {
                let gpa = header + at as u64;
                mem.write_obj(value, GuestAddress(gpa))
                    .map_err(guest_write("crash header", gpa))?;
            }
            vcpus.push(user_vcpu(
                &lab.machine,
                &lab.cpuid,
                v,
                count,
                tables.root(),
                CODE_GPA + crash_entry_offset() as u64,
                header,
            )?);
        }
        activate_device(&lab.machine.mmio, mmio_gpa)?;
        let events = DeviceEventLoop::start(&lab.machine.pmem).map_err(ProbeError::EventLoop)?;
        let exit = ExitSignal::new().map_err(ProbeError::EventLoop)?;
        let exits = lab.machine.vcpu_context(Bus::new(), Arc::new(exit));
        Ok(Self {
            machine: lab.machine,
            vcpus,
            exits,
            events,
            mem,
        })
    }

    /// Runs every vCPU on its own thread, recording acknowledgements in
    /// `acks`, until each has stopped; returns how each stopped. Nothing
    /// stops a healthy vCPU but a full area: the bench ends the process.
    pub fn run(mut self, acks: AckFile) -> Vec<VcpuEnd> {
        let acks = Arc::new(acks);
        let (tx, rx) = mpsc::channel();
        let threads: Vec<_> = std::mem::take(&mut self.vcpus)
            .into_iter()
            .enumerate()
            .map(|(v, vcpu)| {
                let ctx = self.exits.clone();
                let acks = acks.clone();
                let tx = tx.clone();
                let mem = self.mem.clone();
                std::thread::Builder::new()
                    .name(format!("crash-vcpu{v}"))
                    .spawn(move || {
                        let end = run_vcpu(v as u8, vcpu, ctx, &acks, &mem);
                        let _ = tx.send((v, end));
                    })
            })
            .collect();
        drop(tx);
        let mut ends: Vec<(usize, VcpuEnd)> = rx.iter().collect();
        for t in threads.into_iter().flatten() {
            let _ = t.join();
        }
        ends.sort_by_key(|(v, _)| *v);
        ends.into_iter().map(|(_, e)| e).collect()
    }
}

impl Drop for CrashVm {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            events.stop();
        }
    }
}

fn run_vcpu(
    v: u8,
    mut vcpu: VcpuFd,
    ctx: Arc<vmm::vcpu::VcpuContext>,
    acks: &AckFile,
    mem: &vm_memory::GuestMemoryMmap,
) -> VcpuEnd {
    let mut exits = ExitHandler::new(v, ctx);
    let header = PARAMS_GPA + (usize::from(v) * CRASH_HEADER_SIZE) as u64;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) if addr == CONTROL_GPA + CONTROL_ACK => {
                let mut raw = [0u8; 8];
                let n = data.len().min(8);
                raw[..n].copy_from_slice(&data[..n]);
                if let Err(e) = acks.record(v, u64::from_le_bytes(raw)) {
                    return VcpuEnd::Failed(ProbeError::EventLoop(e));
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) if addr == CONTROL_GPA + CONTROL_EXIT => {
                let code = ProbeExitCode::from(data.first().copied().unwrap_or(0xff));
                return match code {
                    ProbeExitCode::AreaFull => VcpuEnd::Full,
                    code => VcpuEnd::Failed(ProbeError::ProbeFailed {
                        code,
                        step: usize::from(v),
                    }),
                };
            }
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == CONTROL_GPA + CONTROL_FAULT => {
                let field = |at: usize| -> u64 {
                    mem.read_obj(GuestAddress(header + at as u64))
                        .unwrap_or(u64::MAX)
                };
                use super::super::guest::{
                    exception_name, HDR_FAULT_ERROR, HDR_FAULT_RIP, HDR_FAULT_VECTOR,
                };
                let (vector, error_code, rip) = (
                    field(HDR_FAULT_VECTOR),
                    field(HDR_FAULT_ERROR),
                    field(HDR_FAULT_RIP),
                );
                return VcpuEnd::Failed(ProbeError::GuestException {
                    vector,
                    name: exception_name(vector),
                    error_code,
                    rip,
                    offset: rip.wrapping_sub(CODE_GPA),
                    cr2: vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0),
                    steps_done: 0,
                });
            }
            Ok(VcpuExit::Shutdown) => {
                return VcpuEnd::Failed(ProbeError::TripleFault {
                    steps_done: 0,
                    state: format!("crash vCPU {v}"),
                })
            }
            other => {
                if let Some(end) = exits.handle(other) {
                    return VcpuEnd::Failed(ProbeError::UnexpectedExit {
                        exit: format!("{end:?}"),
                        state: format!("crash vCPU {v}"),
                    });
                }
            }
        }
    }
}

/// The child process's side (`pmemvm bench crash-vm`): build the VM, log
/// each flush's pages to `flush_log`, say "running" on stdout, wait for a
/// line on stdin, run until ended. A child whose parent died, or
/// that outlives `limit`, ends itself.
pub fn child_main(
    config: &CrashVmConfig,
    acks: &Path,
    flush_log: &Path,
    limit: Duration,
) -> Result<(), ProbeError> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and changes
    // only this process's death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let acks = AckFile::create(acks, config.layout.vcpus).map_err(ProbeError::EventLoop)?;
    let vm = CrashVm::new(config)?;
    log_flushes(&vm, flush_log).map_err(ProbeError::EventLoop)?;
    std::thread::Builder::new()
        .name("crash-limit".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("pmemvm: crash VM still running after {limit:?}: ending it");
            std::process::exit(3);
        })
        .map_err(ProbeError::EventLoop)?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "running");
        let _ = out.flush();
    }
    // The bench notes what its file system holds now, then says go: the
    // syncs before that are the engine's start, not flushes.
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(ProbeError::EventLoop)?;
    for (v, end) in vm.run(acks).into_iter().enumerate() {
        match end {
            VcpuEnd::Full => println!("vcpu {v} full"),
            VcpuEnd::Failed(e) => return Err(e),
        }
    }
    Ok(())
}
