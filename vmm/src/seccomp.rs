//! Per-thread seccomp filters. Each kind of thread that touches guest
//! input (vCPUs, the device event loop, the uffd fault servicers) may make
//! only the system calls its job needs. A forbidden call traps; the handler
//! names the call and ends pmemvm.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

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
            Self::Vcpu => vec![
                libc::SYS_ioctl,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
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
                libc::SYS_sync_file_range,
                libc::SYS_ioctl,
                // The truncation check before each writeback.
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
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

    pub fn program(self) -> Result<BpfProgram, SeccompError> {
        let rules: BTreeMap<i64, Vec<SeccompRule>> = self
            .allowed()
            .into_iter()
            .map(|nr| (nr, Vec::new()))
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| SeccompError::Build(self.name(), e.to_string()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError::Build(self.name(), e.to_string()))
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

    /// A confined thread that opens a socket is stopped: run in a child
    /// process so that the trap ends the child, not the test runner.
    #[test]
    fn forbidden_call_stops_the_thread() {
        for kind in ThreadKind::ALL {
            let program = kind.program().unwrap();
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
                // An allowed call still works.
                // SAFETY: plain syscalls without memory arguments.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                if tid <= 0 {
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(3) };
                }
                // SAFETY: as above; this one must trap.
                unsafe {
                    libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    libc::_exit(0);
                }
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
                "{}: the forbidden call was not stopped",
                kind.name()
            );
        }
    }
}
