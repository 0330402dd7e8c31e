//! Every kernel ABI number pmemvm writes by hand, grouped by the uapi header
//! it comes from (as installed in /usr/include by linux-libc-dev 6.1). The
//! crates we use lack these, or hide them behind their own wrappers.

/// The ioctl request encoding, include/uapi/asm-generic/ioctl.h:
/// `_IOC(dir, type, nr, size)`.
pub mod ioctl {
    const NONE: u64 = 0;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> libc::c_ulong {
        ((dir << 30) | ((size as u64) << 16) | (ty << 8) | nr) as libc::c_ulong
    }

    /// `_IO(type, nr)`.
    pub const fn io(ty: u64, nr: u64) -> libc::c_ulong {
        ioc(NONE, ty, nr, 0)
    }

    /// `_IOR(type, nr, T)`: the kernel writes a `T`.
    pub const fn ior<T>(ty: u64, nr: u64) -> libc::c_ulong {
        ioc(READ, ty, nr, size_of::<T>())
    }

    /// `_IOW(type, nr, T)`: the kernel reads a `T`.
    pub const fn iow<T>(ty: u64, nr: u64) -> libc::c_ulong {
        ioc(WRITE, ty, nr, size_of::<T>())
    }

    /// `_IOWR(type, nr, T)`.
    pub const fn iowr<T>(ty: u64, nr: u64) -> libc::c_ulong {
        ioc(READ | WRITE, ty, nr, size_of::<T>())
    }
}

/// include/uapi/linux/kvm.h: the VM and vCPU ioctls that kvm-ioctls does
/// not expose on a plain fd (dirty-log harvests run on a dup of the VM fd)
/// or that seccomp filters name.
pub mod kvm {
    use super::ioctl::{io, ior, iow, iowr};
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_regs, kvm_sregs};

    const KVMIO: u64 = 0xAE;

    pub const KVM_RUN: libc::c_ulong = io(KVMIO, 0x80);
    pub const KVM_GET_REGS: libc::c_ulong = ior::<kvm_regs>(KVMIO, 0x81);
    pub const KVM_GET_SREGS: libc::c_ulong = ior::<kvm_sregs>(KVMIO, 0x83);
    pub const KVM_GET_DIRTY_LOG: libc::c_ulong = iow::<kvm_dirty_log>(KVMIO, 0x42);
    pub const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = iowr::<kvm_clear_dirty_log>(KVMIO, 0xc0);
    pub const KVM_RESET_DIRTY_RINGS: libc::c_ulong = io(KVMIO, 0xc7);

    /// `KVM_DIRTY_GFN_F_DIRTY`: KVM published the ring entry.
    pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
    /// `KVM_DIRTY_GFN_F_RESET`: the VMM harvested it; the next reset frees it.
    pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
}

/// include/uapi/linux/userfaultfd.h; the syscall number is
/// `libc::SYS_userfaultfd` (arch/x86/entry/syscalls/syscall_64.tbl).
pub mod userfaultfd {
    use super::ioctl::{io, ior, iowr};

    /// `USERFAULTFD_IOC`, the ioctl type of /dev/userfaultfd.
    const USERFAULTFD_IOC: u64 = 0xAA;
    /// `USERFAULTFD_IOC_NEW`: a new userfaultfd from /dev/userfaultfd.
    pub const USERFAULTFD_IOC_NEW: libc::c_ulong = io(USERFAULTFD_IOC, 0x00);

    /// `UFFDIO`, the ioctl type of a userfaultfd.
    const UFFDIO: u64 = 0xAA;
    /// `_UFFDIO_*` command numbers; bit positions in the `ioctls` answers.
    pub const _UFFDIO_REGISTER: u64 = 0x00;
    pub const _UFFDIO_WAKE: u64 = 0x02;
    pub const _UFFDIO_COPY: u64 = 0x03;
    pub const _UFFDIO_WRITEPROTECT: u64 = 0x06;
    pub const _UFFDIO_API: u64 = 0x3F;

    pub const UFFDIO_API: libc::c_ulong = iowr::<UffdioApi>(UFFDIO, _UFFDIO_API);
    pub const UFFDIO_REGISTER: libc::c_ulong = iowr::<UffdioRegister>(UFFDIO, _UFFDIO_REGISTER);
    pub const UFFDIO_WAKE: libc::c_ulong = ior::<UffdioRange>(UFFDIO, _UFFDIO_WAKE);
    pub const UFFDIO_COPY: libc::c_ulong = iowr::<UffdioCopy>(UFFDIO, _UFFDIO_COPY);
    pub const UFFDIO_WRITEPROTECT: libc::c_ulong =
        iowr::<UffdioWriteprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);

    /// `UFFD_API`.
    pub const UFFD_API: u64 = 0xAA;
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
    pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_FEATURE_MISSING_SHMEM`: MISSING registers on shmem (memfd).
    pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
    /// `UFFD_FEATURE_THREAD_ID`: each message names the faulting thread.
    pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: WP registers on shmem (5.19+).
    pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

    /// `UFFDIO_REGISTER_MODE_MISSING` / `_WP`.
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    /// `UFFDIO_COPY_MODE_WP`: map the copied pages write-protected.
    pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
    /// `UFFDIO_WRITEPROTECT_MODE_WP`: set (1) or clear (0) the protection;
    /// clearing wakes the faulting thread.
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

    /// `UFFD_EVENT_PAGEFAULT`.
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    /// `UFFD_PAGEFAULT_FLAG_WRITE` / `_WP`.
    pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
    pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

    /// `struct uffdio_api`.
    #[repr(C)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    /// `struct uffdio_register`.
    #[repr(C)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_copy`; `copy` is written back by the kernel: bytes
    /// copied, or a negative errno when nothing was.
    #[repr(C)]
    pub struct UffdioCopy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    /// `struct uffdio_writeprotect`.
    #[repr(C)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }

    /// `struct uffd_msg` (packed, 32 bytes) with the `pagefault` arm of its
    /// union spelt out; every field is naturally aligned, so `repr(C)` lays
    /// it out exactly like the packed C struct.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct UffdMsg {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub pf_flags: u64,
        pub pf_address: u64,
        pub pf_ptid: u32,
        pub pad: u32,
    }

    const _: () = assert!(size_of::<UffdMsg>() == 32);
    const _: () = assert!(size_of::<UffdioApi>() == 24);
    const _: () = assert!(size_of::<UffdioRange>() == 16);
    const _: () = assert!(size_of::<UffdioRegister>() == 32);
    const _: () = assert!(size_of::<UffdioCopy>() == 40);
    const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
}

/// include/uapi/asm-generic/mman-common.h.
pub mod mman {
    /// `MADV_POPULATE_READ` / `_WRITE` (Linux 5.14): fault a range in.
    pub const MADV_POPULATE_READ: libc::c_int = 22;
    pub const MADV_POPULATE_WRITE: libc::c_int = 23;
}

/// include/uapi/linux/magic.h: `statfs.f_type` of the file systems whose
/// shared pages are mapped writable on a read fault.
pub mod magic {
    pub const TMPFS_MAGIC: i64 = 0x0102_1994;
    pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
}

#[cfg(test)]
mod tests {
    use super::{kvm::*, magic::*, mman::*, userfaultfd::*};

    #[test]
    fn abi_numbers_match_the_c_header() {
        // Printed by a C program including <linux/kvm.h>,
        // <linux/userfaultfd.h>, <linux/magic.h> and
        // <asm-generic/mman-common.h> (linux-libc-dev 6.1, x86_64).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
        assert_eq!((KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET), (1, 2));
        assert_eq!(
            KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET,
            kvm_bindings::KVM_DIRTY_GFN_F_MASK
        );

        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(libc::SYS_userfaultfd, 323);
        assert_eq!((UFFD_API, UFFD_EVENT_PAGEFAULT), (0xaa, 0x12));
        assert_eq!(UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0x1);
        assert_eq!(UFFD_FEATURE_MISSING_SHMEM, 0x20);
        assert_eq!(UFFD_FEATURE_THREAD_ID, 0x100);
        assert_eq!(UFFD_FEATURE_WP_HUGETLBFS_SHMEM, 0x1000);

        assert_eq!((MADV_POPULATE_READ, MADV_POPULATE_WRITE), (22, 23));
        assert_eq!((TMPFS_MAGIC, HUGETLBFS_MAGIC), (0x0102_1994, 0x9584_58f6));
    }
}
