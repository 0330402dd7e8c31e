//! One thread per vCPU: KVM_RUN, and dispatch of the exits the VMM serves.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::legacy::GuestExit;
use devices::ratelimit::LogLimiter;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitSignal, RunEnd};
use crate::fault::Backoff;

/// What a vCPU does when the host, not the guest, stands in the way:
/// implemented by the pmem devices and their fault engines.
pub trait HostFaultHandler: Send + Sync {
    /// KVM_RUN could not get a guest page from the host (EFAULT, or
    /// KVM_EXIT_MEMORY_FAULT). Returns whether the cause was repaired, so
    /// the vCPU retries at once; otherwise it waits and retries.
    fn memory_fault(&self) -> bool;

    /// KVM_EXIT_DIRTY_RING_FULL: drain the rings so the vCPU can go on.
    fn dirty_ring_full(&self, vcpu: u8) -> Result<(), String>;
}

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    pub exit: Arc<ExitSignal>,
    pub stop: AtomicBool,
    pub host_faults: Arc<dyn HostFaultHandler>,
}

static UNKNOWN_PIO: LogLimiter = LogLimiter::new(8, 1000);
static UNKNOWN_MMIO: LogLimiter = LogLimiter::new(8, 1000);
/// Linux writes to port 0x80 to delay I/O; nothing is there.
const POST_PORT: u16 = 0x80;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler, so the kick interrupts KVM_RUN with EINTR
/// instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Interrupts a vCPU thread's KVM_RUN.
pub fn kick(handle: &JoinHandle<()>) {
    if let Err(e) = handle.kill(kick_signal()) {
        log::debug!("kicking a vCPU thread: {e}");
    }
}

/// KVM_RUN failing with EFAULT: the host could not provide a guest page.
/// A pmem file that another program shrank is overlaid with anonymous
/// memory and the vCPU goes on at once ([`HostFaultHandler`]); otherwise the
/// file's filesystem is likely full (its mkwrite failed), and the vCPU
/// waits and retries rather than killing the guest.
struct HostFaultWait {
    since: Option<std::time::Instant>,
    backoff: Backoff,
}

impl HostFaultWait {
    fn new() -> Self {
        Self {
            since: None,
            backoff: Backoff::new(),
        }
    }

    /// `at`: the guest-physical range, where KVM says
    /// (KVM_EXIT_MEMORY_FAULT, KVM_CAP_MEMORY_FAULT_INFO).
    fn fault(&mut self, id: u8, at: Option<(u64, u64)>) {
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
            let what = match at {
                Some((gpa, size)) => format!(
                    "guest memory {gpa:#x}..{:#x} (KVM_EXIT_MEMORY_FAULT)",
                    gpa.saturating_add(size)
                ),
                None => "a guest page (KVM_RUN: EFAULT)".to_string(),
            };
            log::warn!(
                "vCPU {id}: the host cannot provide {what}; is the pmem file's filesystem full? waiting and retrying"
            );
        }
        std::thread::sleep(self.backoff.next_delay());
    }

    fn progress(&mut self, id: u8) {
        if let Some(since) = self.since.take() {
            log::warn!(
                "vCPU {id}: resumed after waiting {:?} for the host",
                since.elapsed()
            );
            self.backoff.reset();
        }
    }
}

/// The exits of one vCPU that the VMM serves, for pmemvm's run loop and
/// the lab's alike: port and MMIO accesses, host faults, the dirty ring,
/// and the ends of the run.
pub struct ExitHandler {
    id: u8,
    ctx: Arc<VcpuContext>,
    host_wait: HostFaultWait,
    host_faults: u64,
    dirty_ring_full: u64,
}

impl ExitHandler {
    pub fn new(id: u8, ctx: Arc<VcpuContext>) -> Self {
        Self {
            id,
            ctx,
            host_wait: HostFaultWait::new(),
            host_faults: 0,
            dirty_ring_full: 0,
        }
    }

    /// Serves what KVM_RUN returned; `Some` ends the run.
    pub fn handle(&mut self, result: Result<VcpuExit, kvm_ioctls::Error>) -> Option<RunEnd> {
        let id = self.id;
        match result {
            // KVM_RUN failed with EFAULT, and (on kernels with
            // KVM_CAP_MEMORY_FAULT_INFO) said where: kvm-ioctls returns
            // that as an exit. Both mean the same to the VMM.
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                self.host_fault(Some((gpa, size)));
                None
            }
            Err(e) if e.errno() == libc::EFAULT => {
                self.host_fault(None);
                None
            }
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                self.host_wait.progress(id);
                self.dirty_ring_full += 1;
                self.ctx
                    .host_faults
                    .dirty_ring_full(id)
                    .err()
                    .map(|e| RunEnd::Fault(format!("vCPU {id}: {e}")))
            }
            Ok(exit) => {
                self.host_wait.progress(id);
                handle_exit(id, exit, &self.ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(RunEnd::Fault(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }

    fn host_fault(&mut self, at: Option<(u64, u64)>) {
        self.host_faults += 1;
        if !self.ctx.host_faults.memory_fault() {
            self.host_wait.fault(self.id, at);
        }
    }

    /// Times KVM_RUN could not get a page from the host.
    pub fn host_faults(&self) -> u64 {
        self.host_faults
    }

    /// KVM_EXIT_DIRTY_RING_FULL exits served.
    pub fn dirty_ring_full_exits(&self) -> u64 {
        self.dirty_ring_full
    }
}

pub fn run(id: u8, mut vcpu: VcpuFd, ctx: Arc<VcpuContext>) {
    crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::Vcpu);
    let mut exits = ExitHandler::new(id, ctx.clone());
    while !ctx.stop.load(Ordering::Acquire) {
        let end = exits.handle(vcpu.run());
        if let Some(end) = end {
            let end = match end {
                RunEnd::Fault(what) => {
                    RunEnd::Fault(format!("{what}\n{}", dump_state(&mut vcpu, &ctx.mem)))
                }
                other => other,
            };
            ctx.exit.end(end);
            return;
        }
    }
}

fn handle_exit(id: u8, exit: VcpuExit, ctx: &VcpuContext) -> Option<RunEnd> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                if port != POST_PORT && UNKNOWN_PIO.allow() {
                    log::debug!("vCPU {id}: read of unknown port {port:#x} ignored");
                }
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) && port != POST_PORT && UNKNOWN_PIO.allow() {
                log::debug!("vCPU {id}: write of unknown port {port:#x} ignored");
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
                if UNKNOWN_MMIO.allow() {
                    log::warn!("vCPU {id}: read of unmapped MMIO {addr:#x} ignored");
                }
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) && UNKNOWN_MMIO.allow() {
                log::warn!("vCPU {id}: write of unmapped MMIO {addr:#x} ignored");
            }
            None
        }
        VcpuExit::Shutdown => {
            log::info!("vCPU {id}: guest shut down (triple fault); treating it as a reboot");
            Some(RunEnd::Guest(GuestExit::Reset))
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Some(RunEnd::Guest(GuestExit::Reset))
            }
            other => Some(RunEnd::Fault(format!("vCPU {id}: guest system event {other}"))),
        },
        VcpuExit::InternalError => Some(RunEnd::Fault(format!(
            "vCPU {id}: KVM internal error (KVM_EXIT_INTERNAL_ERROR)"
        ))),
        VcpuExit::FailEntry(reason, cpu) => Some(RunEnd::Fault(format!(
            "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::Hlt => Some(RunEnd::Fault(format!(
            "vCPU {id}: the guest halted outside the in-kernel irqchip"
        ))),
        other => Some(RunEnd::Fault(format!("vCPU {id}: unexpected exit {other:?}"))),
    }
}

/// RIP, the instruction bytes there and the registers, for fault reports.
fn dump_state(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap) -> String {
    let mut out = String::new();
    if let Some(suberror) = internal_suberror(vcpu) {
        let _ = writeln!(
            out,
            "  suberror {suberror}{}",
            match suberror {
                1 => " (emulation failure: the instruction below could not be emulated)",
                2 => " (simultaneous exceptions)",
                3 => " (delivery event failure)",
                _ => "",
            }
        );
    }
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "  registers unavailable: {e}");
            return out;
        }
    };
    let _ = write!(out, "  rip {:#018x}", regs.rip);
    match vcpu.translate_gva(regs.rip) {
        Ok(t) if t.valid != 0 => {
            let mut bytes = [0u8; 16];
            match mem.read_slice(&mut bytes, GuestAddress(t.physical_address)) {
                Ok(()) => {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let _ = writeln!(
                        out,
                        " (gpa {:#x}) bytes: {}",
                        t.physical_address,
                        hex.join(" ")
                    );
                }
                Err(_) => {
                    let _ = writeln!(out, " (gpa {:#x}, not in guest RAM)", t.physical_address);
                }
            }
        }
        _ => {
            let _ = writeln!(out, " (not mapped)");
        }
    }
    let r = &regs;
    let _ = writeln!(
        out,
        "  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n  rsi {:#018x} rdi {:#018x} rbp {:#018x} rsp {:#018x}\n  r8  {:#018x} r9  {:#018x} r10 {:#018x} r11 {:#018x}\n  r12 {:#018x} r13 {:#018x} r14 {:#018x} r15 {:#018x}\n  rflags {:#x}",
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rflags
    );
    if let Ok(s) = vcpu.get_sregs() {
        let _ = writeln!(
            out,
            "  cs {:#x} (dpl {}) cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            s.cs.selector, s.cs.dpl, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        );
    }
    out
}

fn internal_suberror(vcpu: &mut VcpuFd) -> Option<u32> {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason says the `internal` member of the union is the one
    // KVM filled in.
    Some(unsafe { run.__bindgen_anon_1.internal.suberror })
}
