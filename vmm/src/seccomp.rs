//! Per-thread seccomp filters. Each kind of thread that touches guest
//! input (vCPUs, the device event loop, the uffd fault servicers) may make
//! only the system calls its job needs. A forbidden call traps; the handler
//! names the call and ends pmemvm.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    DeviceEvents,
    FaultServicer,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [Self::Vcpu, Self::DeviceEvents, Self::FaultServicer];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::DeviceEvents => "device event loop",
            Self::FaultServicer => "fault servicer",
        }
    }

    /// The system calls this kind of thread may make.
    pub fn allowed(self) -> Vec<i64> {
        // Every thread: memory management by the allocator, locks, logging
        // to stderr, sleeping, and leaving.
        let mut calls = vec![
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
            libc::SYS_futex,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_sched_yield,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_tgkill,
        ];
        calls.extend(match self {
            // KVM_RUN and the exits it serves: device registers, irqfd and
            // ioeventfd writes, dirty-ring drains, state dumps.
            // pread/pwrite: emulated pmem accesses the host could not map
            // are served from the file (read-only and write-through regions).
            // fstat/statx: on EFAULT, checking whether a pmem file shrank
            // (the overlay that follows is an mmap).
            Self::Vcpu => vec![
                libc::SYS_ioctl,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
            ],
            // Flushes: eventfds, epoll, the writeback I/O, dirty-log
            // harvests and uffd write-protection (both ioctls).
            Self::DeviceEvents => vec![
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_lseek,
                libc::SYS_fdatasync,
                libc::SYS_fsync,
                // flush=msync, the peer policy.
                libc::SYS_msync,
                libc::SYS_sync_file_range,
                libc::SYS_ioctl,
                // The truncation check before each writeback and between
                // events, and the watch for a full file system.
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_fstatfs,
            ],
            // userfaultfd: read events, copy pages in, reserve blocks.
            Self::FaultServicer => vec![
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_lseek,
                libc::SYS_fallocate,
                libc::SYS_ioctl,
            ],
        });
        calls.sort_unstable();
        calls.dedup();
        calls
    }

    /// The ioctl requests this kind of thread may make; any other ioctl
    /// traps like a forbidden call.
    pub fn allowed_ioctls(self) -> Vec<u64> {
        use crate::abi::kvm::{
            KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_GET_REGS, KVM_GET_SREGS,
            KVM_RESET_DIRTY_RINGS, KVM_RUN,
        };
        use crate::abi::userfaultfd::{UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_WRITEPROTECT};
        // Flushes harvest the dirty log (bitmap or rings) and re-protect
        // pages in the uffd mirror.
        let dirty_log = [
            KVM_GET_DIRTY_LOG,
            KVM_CLEAR_DIRTY_LOG,
            KVM_RESET_DIRTY_RINGS,
        ];
        let uffd = [UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_WRITEPROTECT];
        match self {
            // KVM_RUN, register dumps when the guest dies, and draining a
            // full dirty ring.
            Self::Vcpu => [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]
                .into_iter()
                .chain(dirty_log)
                .collect(),
            Self::DeviceEvents => dirty_log.into_iter().chain(uffd).collect(),
            Self::FaultServicer => uffd.to_vec(),
        }
    }

    pub fn program(self) -> Result<BpfProgram, SeccompError> {
        let build = |e: seccompiler::BackendError| SeccompError::Build(self.name(), e.to_string());
        let ioctl_rules = self
            .allowed_ioctls()
            .into_iter()
            .map(|request| {
                // The kernel reads the request as an unsigned int.
                let cond =
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
                SeccompRule::new(vec![cond])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build)?;
        let rules: BTreeMap<i64, Vec<SeccompRule>> = self
            .allowed()
            .into_iter()
            .map(|nr| {
                if nr == libc::SYS_ioctl {
                    (nr, ioctl_rules.clone())
                } else {
                    (nr, Vec::new())
                }
            })
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(build)?;
        filter.try_into().map_err(build)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter for the {0} threads: {1}")]
    Build(&'static str, String),
    #[error(
        "installing the seccomp filter for a {0} thread: {1} (use --no-seccomp to run without)"
    )]
    Apply(&'static str, String),
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// `--no-seccomp`: threads run unconfined.
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// Confines the calling thread, unless filtering is off.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    if !ENABLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    install_trap_handler();
    let program = kind.program()?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Apply(kind.name(), e.to_string()))
}

/// Confines the calling thread or, failing that, says so: a thread that
/// cannot be confined still serves the guest.
pub fn confine_or_warn(kind: ThreadKind) {
    if let Err(e) = confine(kind) {
        log::error!("{e}");
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's SIGSYS part: si_call_addr (a pointer) then si_syscall, at
    // offset 16 (include/uapi/asm-generic/siginfo.h).
    // SAFETY: the kernel hands a valid siginfo_t to an SA_SIGINFO handler.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<libc::c_int>()) };
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"pmemvm: seccomp: forbidden system call ",
        &digits[i..],
        b" stopped pmemvm; rerun with --no-seccomp to debug\n",
    ];
    // Only async-signal-safe calls here: write(2) and _exit(2).
    for part in parts {
        // SAFETY: writes a live buffer to stderr.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: ends the process without running anything else.
    unsafe { libc::_exit(128 + libc::SIGSYS) }
}

fn install_trap_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that only calls async-signal-safe
        // functions; the sigaction struct is fully initialised.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                log::warn!("cannot install the SIGSYS handler: a seccomp violation will kill pmemvm without a message");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            assert!(!kind.program().unwrap().is_empty(), "{}", kind.name());
            assert!(!kind.allowed().contains(&libc::SYS_socket));
            assert!(!kind.allowed().contains(&libc::SYS_execve));
        }
        assert!(ThreadKind::Vcpu.allowed().contains(&libc::SYS_ioctl));
        assert!(!ThreadKind::Vcpu.allowed().contains(&libc::SYS_fdatasync));
    }

    #[test]
    fn only_vcpus_may_run() {
        // The numbers themselves are checked in crate::abi.
        use crate::abi::kvm::KVM_RUN;
        assert!(!ThreadKind::FaultServicer
            .allowed_ioctls()
            .contains(&KVM_RUN));
        assert!(!ThreadKind::DeviceEvents.allowed_ioctls().contains(&KVM_RUN));
    }

    /// Runs `forbidden` in a child confined as `kind`, after an allowed call
    /// and an allowed ioctl; the child must be stopped by the trap.
    fn expect_stopped(kind: ThreadKind, what: &str, forbidden: fn()) {
        let program = kind.program().unwrap();
        let allowed_ioctl = kind.allowed_ioctls()[0];
        // SAFETY: the child only makes raw system calls and _exit;
        // nothing in it needs locks another thread might hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            install_trap_handler();
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(2) };
            }
            // Allowed calls still work.
            // SAFETY: plain syscalls without memory arguments; the ioctl
            // goes to a closed fd and fails with EBADF.
            let (tid, rc) = unsafe {
                (
                    libc::syscall(libc::SYS_gettid),
                    libc::syscall(libc::SYS_ioctl, -1, allowed_ioctl, 0),
                )
            };
            if tid <= 0 || rc != -1 {
                // SAFETY: ends the child.
                unsafe { libc::_exit(3) };
            }
            forbidden();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status),
            "{}: status {status:#x}",
            kind.name()
        );
        assert_eq!(
            libc::WEXITSTATUS(status),
            128 + libc::SIGSYS,
            "{}: {what} was not stopped",
            kind.name()
        );
    }

    /// A confined thread that opens a socket, or makes an ioctl its kind
    /// does not need (here TCGETS, then KVM_RUN where not allowed), is
    /// stopped: in a child process, so the trap ends the child, not the
    /// test runner.
    #[test]
    fn forbidden_call_stops_the_thread() {
        for kind in ThreadKind::ALL {
            // SAFETY: plain syscall; it must trap.
            expect_stopped(kind, "socket()", || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            });
            // SAFETY: as above.
            expect_stopped(kind, "ioctl(TCGETS)", || unsafe {
                libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, 0);
            });
        }
        for kind in [ThreadKind::DeviceEvents, ThreadKind::FaultServicer] {
            // SAFETY: as above.
            expect_stopped(kind, "ioctl(KVM_RUN)", || unsafe {
                libc::syscall(libc::SYS_ioctl, -1, crate::abi::kvm::KVM_RUN, 0);
            });
        }
    }
}
