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
use crate::fault::dirty_log::DirtyLog;
use crate::fault::{Backoff, TruncationGuard};

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    pub exit: Arc<ExitSignal>,
    pub stop: AtomicBool,
    /// KVM dirty rings to drain when one fills up.
    pub dirty_log: Option<Arc<DirtyLog>>,
    /// The pmem devices whose file is mapped into the guest: consulted on
    /// EFAULT, in case the file shrank.
    pub truncation_guards: Vec<Arc<TruncationGuard>>,
}

static UNKNOWN_PIO: LogLimiter = LogLimiter::new(8, 1000);
static UNKNOWN_MMIO: LogLimiter = LogLimiter::new(8, 1000);
static EMPTY_RING_FULL: LogLimiter = LogLimiter::new(4, 100_000);
static GUARD_FAILED: LogLimiter = LogLimiter::new(4, 100_000);
/// Linux writes to port 0x80 to delay I/O; nothing is there.
const POST_PORT: u16 = 0x80;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
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
/// memory and the vCPU goes on at once ([`truncation_gone`]); otherwise the
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

pub fn run(id: u8, mut vcpu: VcpuFd, ctx: Arc<VcpuContext>) {
    crate::seccomp::confine_or_warn(crate::seccomp::ThreadKind::Vcpu);
    let mut host_wait = HostFaultWait::new();
    while !ctx.stop.load(Ordering::Acquire) {
        let end = match vcpu.run() {
            // KVM_RUN failed with EFAULT, and (on kernels with
            // KVM_CAP_MEMORY_FAULT_INFO) said where: kvm-ioctls returns
            // that as an exit. Both mean the same to the VMM.
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                if !truncation_gone(&ctx) {
                    host_wait.fault(id, Some((gpa, size)));
                }
                None
            }
            Ok(exit) => {
                host_wait.progress(id);
                handle_exit(id, exit, &ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) if e.errno() == libc::EFAULT => {
                if !truncation_gone(&ctx) {
                    host_wait.fault(id, None);
                }
                None
            }
            Err(e) => Some(RunEnd::Fault(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
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

/// Whether a pmem file shrank and its lost part was just overlaid, so that
/// KVM_RUN can be retried at once.
fn truncation_gone(ctx: &VcpuContext) -> bool {
    let mut patched = false;
    for guard in &ctx.truncation_guards {
        match guard.check() {
            Ok(p) => patched |= p,
            Err(e) => {
                if GUARD_FAILED.allow() {
                    log::error!("checking a pmem file for truncation failed: {e}");
                }
            }
        }
    }
    patched
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
        VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
            let harvested = ctx.dirty_log.as_ref().map(|log| log.harvest());
            match harvested {
                Some(Ok(0)) => {
                    if EMPTY_RING_FULL.allow() {
                        log::warn!(
                            "vCPU {id}: dirty ring full but nothing to harvest: {:?}",
                            ctx.dirty_log.as_ref().map(|l| l.ring_positions())
                        );
                    }
                    None
                }
                Some(Ok(_)) => None,
                Some(Err(e)) => Some(RunEnd::Fault(format!(
                    "vCPU {id}: draining the full dirty ring failed: {e}"
                ))),
                None => Some(RunEnd::Fault(format!(
                    "vCPU {id}: dirty ring full, but pmemvm enabled no ring"
                ))),
            }
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
