//! The probe guest's memory: where everything sits in guest-physical RAM,
//! the GDT with user segments, and the 4-level page tables the VMM builds
//! so that the probe can start at CPL3 in 64-bit mode with no guest kernel.
//!
//! Guest-virtual addresses equal guest-physical ones (identity map), but
//! only the pages listed in [`ProbeLayout`] are mapped, each with 4 KiB
//! pages: MMIO only works through 4 KiB guest mappings on nested KVM, and
//! the pmem region must use 4 KiB guest pages so that what KVM does per
//! page is what is measured.
//!
//! ```text
//! 0x0000_1000  GDT (supervisor)       0x0000_2000  TSS (supervisor)
//! 0x0000_3000  stack, 2 pages (user RW)
//! 0x0000_5000  IDT (supervisor)       0x0000_6000  exception stack (supervisor)
//! 0x0001_0000  parameter pages, 64 KiB (user RW)
//! 0x0002_0000  virtqueue: descriptors, +0x1000 avail, +0x2000 used,
//!              +0x3000 request and response (user RW)
//! 0x0003_0000  probe code, up to 16 KiB (user RX)
//! 0x0010_0000  page tables, up to 3 MiB (not mapped)
//! 0x0040_0000  results, up to the end of RAM (user RW)
//! 0xd000_0000  the device's virtio-mmio page (user RW, uncached)
//! 0xd100_0000  the probe's control page, no memory behind it (user RW)
//! 4 GiB        the pmem region (user RW, 4 KiB pages)
//! ```

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::guest::{VECTORS, VECTOR_STUB};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::cpu::gdt_entry;

pub const PAGE: u64 = 4096;
pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x2000;
pub const STACK_GPA: u64 = 0x3000;
pub const STACK_PAGES: u64 = 2;
pub const IDT_GPA: u64 = 0x5000;
/// One page; the TSS's RSP0 points at its end.
pub const FAULT_STACK_GPA: u64 = 0x6000;
pub const PARAMS_GPA: u64 = 0x1_0000;
pub const PARAMS_SIZE: u64 = 0x1_0000;
pub const QUEUE_GPA: u64 = 0x2_0000;
pub const QUEUE_DESC_GPA: u64 = QUEUE_GPA;
pub const QUEUE_AVAIL_GPA: u64 = QUEUE_GPA + 0x1000;
pub const QUEUE_USED_GPA: u64 = QUEUE_GPA + 0x2000;
/// `le32 type` of the one FLUSH request the probe sends over and over.
pub const QUEUE_REQUEST_GPA: u64 = QUEUE_GPA + 0x3000;
/// `le32 ret`, written by the device.
pub const QUEUE_RESPONSE_GPA: u64 = QUEUE_GPA + 0x3040;
pub const QUEUE_PAGES: u64 = 4;
pub const CODE_GPA: u64 = 0x3_0000;
pub const CODE_MAX: u64 = 0x4000;
pub const PAGE_TABLES_GPA: u64 = 0x10_0000;
pub const PAGE_TABLES_END: u64 = 0x40_0000;
pub const RESULTS_GPA: u64 = 0x40_0000;
/// The page where the probe reports progress: stores exit as MMIO.
pub const CONTROL_GPA: u64 = 0xd100_0000;
/// The smallest probe VM.
pub const MIN_RAM: u64 = 32 << 20;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_WRITE_THROUGH: u64 = 1 << 3;
const PTE_CACHE_DISABLE: u64 = 1 << 4;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Upper-level entries allow everything; the leaf decides.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// How one 4 KiB guest page may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAccess {
    /// Only CPL0 may touch it (GDT, TSS).
    Supervisor,
    /// CPL3 may read and execute, not write (the probe code).
    UserReadExecute,
    /// CPL3 may read and write.
    UserReadWrite,
    /// CPL3 may read and write, uncached: device registers.
    UserMmio,
    /// CPL3 may read and write; accessed and dirty are preset so that the
    /// guest page tables never need updating under shadow paging and only
    /// the host's work is measured.
    UserPmem,
}

impl PageAccess {
    fn leaf_flags(self) -> u64 {
        match self {
            Self::Supervisor => PTE_PRESENT | PTE_WRITABLE,
            Self::UserReadExecute => PTE_PRESENT | PTE_USER,
            Self::UserReadWrite => PTE_PRESENT | PTE_WRITABLE | PTE_USER,
            Self::UserMmio => {
                PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_WRITE_THROUGH | PTE_CACHE_DISABLE
            }
            Self::UserPmem => PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED | PTE_DIRTY,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    #[error(
        "the probe's page tables need more than the {max} KiB reserved for them; use fewer pages"
    )]
    OutOfTablePages { max: u64 },
    #[error("guest address {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    #[error("cannot write the probe's {what} at guest {addr:#x}")]
    GuestWrite { what: &'static str, addr: u64 },
}

/// Builds 4-level page tables in guest RAM, taking table pages from a
/// fixed range. Tables start zeroed: guest RAM is fresh anonymous memory.
pub struct PageTableBuilder<'a> {
    mem: &'a GuestMemoryMmap,
    start: u64,
    pml4: u64,
    next_table: u64,
    end: u64,
}

impl<'a> PageTableBuilder<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, start: u64, end: u64) -> Result<Self, PagingError> {
        let mut b = Self {
            mem,
            start,
            pml4: 0,
            next_table: start,
            end,
        };
        b.pml4 = b.alloc_table()?;
        Ok(b)
    }

    /// The value for CR3.
    pub fn root(&self) -> u64 {
        self.pml4
    }

    /// Bytes of table pages used so far.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.next_table - self.start
    }

    fn alloc_table(&mut self) -> Result<u64, PagingError> {
        if self.next_table + PAGE > self.end {
            return Err(PagingError::OutOfTablePages {
                max: (self.end - self.start) >> 10,
            });
        }
        let table = self.next_table;
        self.next_table += PAGE;
        self.mem
            .write_slice(&[0u8; PAGE as usize], GuestAddress(table))
            .map_err(|_| PagingError::GuestWrite {
                what: "page table",
                addr: table,
            })?;
        Ok(table)
    }

    fn read_entry(&self, addr: u64) -> Result<u64, PagingError> {
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| PagingError::GuestWrite {
                what: "page table entry",
                addr,
            })
    }

    fn write_entry(&self, addr: u64, value: u64) -> Result<(), PagingError> {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .map_err(|_| PagingError::GuestWrite {
                what: "page table entry",
                addr,
            })
    }

    /// Maps one 4 KiB page at `gva` to `gpa`.
    pub fn map_page(&mut self, gva: u64, gpa: u64, access: PageAccess) -> Result<(), PagingError> {
        if !gva.is_multiple_of(PAGE) {
            return Err(PagingError::Unaligned(gva));
        }
        if !gpa.is_multiple_of(PAGE) {
            return Err(PagingError::Unaligned(gpa));
        }
        let mut table = self.pml4;
        for shift in [39u32, 30, 21] {
            let slot = table + 8 * ((gva >> shift) & 0x1ff);
            let entry = self.read_entry(slot)?;
            table = if entry & PTE_PRESENT != 0 {
                entry & PTE_ADDR_MASK
            } else {
                let next = self.alloc_table()?;
                self.write_entry(slot, next | TABLE_FLAGS)?;
                next
            };
        }
        let slot = table + 8 * ((gva >> 12) & 0x1ff);
        self.write_entry(slot, gpa | access.leaf_flags())
    }

    /// Identity-maps `[start, start + len)`, rounded out to whole pages.
    pub fn identity_map(
        &mut self,
        start: u64,
        len: u64,
        access: PageAccess,
    ) -> Result<(), PagingError> {
        let first = start & !(PAGE - 1);
        let end = (start + len).div_ceil(PAGE) * PAGE;
        for page in (first..end).step_by(PAGE as usize) {
            self.map_page(page, page, access)?;
        }
        Ok(())
    }
}

/// Walks the page tables like the CPU would; for tests.
#[cfg(test)]
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, gva: u64) -> Option<(u64, u64)> {
    let mut table = cr3;
    for shift in [39u32, 30, 21] {
        let entry: u64 = mem
            .read_obj(GuestAddress(table + 8 * ((gva >> shift) & 0x1ff)))
            .ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        table = entry & PTE_ADDR_MASK;
    }
    let leaf: u64 = mem
        .read_obj(GuestAddress(table + 8 * ((gva >> 12) & 0x1ff)))
        .ok()?;
    (leaf & PTE_PRESENT != 0).then_some(((leaf & PTE_ADDR_MASK) | (gva & 0xfff), leaf & 0xfff))
}

// GDT: the kernel pair at 0x10/0x18 (unused, but a sane GDT has them), the
// user pair where Linux has them (data 0x2b, code 0x33), a 64-bit TSS at 0x40.
const GDT_KERNEL_CODE: usize = 2;
const GDT_KERNEL_DATA: usize = 3;
const GDT_USER_DATA: usize = 5;
const GDT_USER_CODE: usize = 6;
const GDT_TSS: usize = 8;
const GDT_ENTRIES: usize = 10;
const TSS_LIMIT: u32 = 0x67;

/// The probe's GDT as raw descriptors, encoded by the boot GDT's
/// [`gdt_entry`]: its flags are the access byte (bits 0..8) and the
/// G/DB/L/AVL nibble (bits 12..16), as in the descriptor's bytes 5-6.
pub fn gdt() -> [u64; GDT_ENTRIES] {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[GDT_KERNEL_CODE] = gdt_entry(0xa09b, 0, 0xfffff);
    gdt[GDT_KERNEL_DATA] = gdt_entry(0xc093, 0, 0xfffff);
    gdt[GDT_USER_DATA] = gdt_entry(0xc0f3, 0, 0xfffff);
    gdt[GDT_USER_CODE] = gdt_entry(0xa0fb, 0, 0xfffff);
    // 64-bit TSS descriptor: 16 bytes, type 0xb (busy), present.
    gdt[GDT_TSS] = gdt_entry(0x008b, TSS_GPA as u32, TSS_LIMIT);
    gdt[GDT_TSS + 1] = TSS_GPA >> 32;
    gdt
}

/// The segment register KVM wants for GDT entry `index`, with RPL = DPL.
fn segment(index: usize) -> kvm_segment {
    vmm::cpu::decode_segment(gdt()[index], index as u16)
}

/// RFLAGS: only the always-one bit. IF stays clear: the probe takes no
/// interrupts, only exceptions.
pub const PROBE_RFLAGS: u64 = 0x2;

/// 64-bit mode at CPL3: user code and data segments, paging with `cr3`.
/// CR4.TSD stays clear so that rdtsc/rdtscp work at CPL3.
pub fn user_mode_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = (usize::from(VECTORS) * IDT_ENTRY - 1) as u16;
    vmm::cpu::enter_long_mode(
        &mut sregs,
        segment(GDT_USER_CODE),
        segment(GDT_USER_DATA),
        cr3,
    );
    let mut tr = segment(GDT_TSS);
    tr.selector = (GDT_TSS * 8) as u16;
    sregs.tr = tr;
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs
}

/// Registers at the probe's entry: RDI points at the parameter page.
pub fn entry_regs(entry: u64, params: u64, stack_top: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: params,
        rsp: stack_top,
        rflags: PROBE_RFLAGS,
        ..Default::default()
    }
}

const IDT_ENTRY: usize = 16;
/// Present, DPL 0, 64-bit interrupt gate.
const IDT_INTERRUPT_GATE: u8 = 0x8e;

/// One IDT entry: an interrupt gate to `handler` in the kernel code segment.
pub fn idt_entry(handler: u64) -> [u8; IDT_ENTRY] {
    let mut e = [0u8; IDT_ENTRY];
    e[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    e[2..4].copy_from_slice(&((GDT_KERNEL_CODE * 8) as u16).to_le_bytes());
    e[5] = IDT_INTERRUPT_GATE;
    e[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    e[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    e
}

/// Writes the GDT, the IDT (vector `v` to `vectors + v * VECTOR_STUB`) and
/// a TSS whose RSP0 is the exception stack (IOPB offset past the limit: no
/// I/O bitmap, IOPL alone decides).
pub fn write_descriptor_tables(mem: &GuestMemoryMmap, vectors: u64) -> Result<(), PagingError> {
    for (i, e) in gdt().iter().enumerate() {
        let addr = GDT_GPA + 8 * i as u64;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|_| PagingError::GuestWrite { what: "GDT", addr })?;
    }
    for v in 0..u64::from(VECTORS) {
        let addr = IDT_GPA + v * IDT_ENTRY as u64;
        let entry = idt_entry(vectors + v * VECTOR_STUB as u64);
        mem.write_slice(&entry, GuestAddress(addr))
            .map_err(|_| PagingError::GuestWrite { what: "IDT", addr })?;
    }
    let mut tss = [0u8; 0x68];
    tss[4..12].copy_from_slice(&(FAULT_STACK_GPA + PAGE).to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    mem.write_slice(&tss, GuestAddress(TSS_GPA))
        .map_err(|_| PagingError::GuestWrite {
            what: "TSS",
            addr: TSS_GPA,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIN_RAM as usize)]).unwrap()
    }

    #[test]
    fn maps_4k_pages_with_the_asked_access() {
        let mem = mem();
        let mut b = PageTableBuilder::new(&mem, PAGE_TABLES_GPA, PAGE_TABLES_END).unwrap();
        b.identity_map(CODE_GPA, 100, PageAccess::UserReadExecute)
            .unwrap();
        b.map_page(0x1_0000_0000, 0x1_0000_0000, PageAccess::UserPmem)
            .unwrap();
        b.map_page(0x1_0000_1000, 0x1_0000_1000, PageAccess::UserPmem)
            .unwrap();
        b.map_page(0xd000_0000, 0xd000_0000, PageAccess::UserMmio)
            .unwrap();
        let cr3 = b.root();
        assert_eq!(
            translate(&mem, cr3, CODE_GPA + 8),
            Some((CODE_GPA + 8, PTE_PRESENT | PTE_USER))
        );
        let (pa, flags) = translate(&mem, cr3, 0x1_0000_1010).unwrap();
        assert_eq!(pa, 0x1_0000_1010);
        assert_eq!(flags & 0x67, 0x67);
        let (_, flags) = translate(&mem, cr3, 0xd000_0050).unwrap();
        assert_eq!(flags & 0x1f, 0x1f);
        assert_eq!(translate(&mem, cr3, CODE_GPA + PAGE), None);
        assert_eq!(translate(&mem, cr3, 0x1_0000_2000), None);
        // PML4, then PDPT+PD+PT for the code, PDPT+PD+PT for 4 GiB and a
        // PD+PT for 0xd000_0000 (same PDPT as the code).
        assert_eq!(b.used(), 8 * PAGE);
    }

    #[test]
    fn running_out_of_table_pages_is_an_error() {
        let mem = mem();
        let mut b =
            PageTableBuilder::new(&mem, PAGE_TABLES_GPA, PAGE_TABLES_GPA + 4 * PAGE).unwrap();
        b.map_page(0, 0, PageAccess::Supervisor).unwrap();
        b.map_page(0x1000, 0x1000, PageAccess::Supervisor).unwrap();
        assert!(matches!(
            b.map_page(0x20_0000, 0x20_0000, PageAccess::Supervisor),
            Err(PagingError::OutOfTablePages { .. })
        ));
        assert_eq!(
            b.map_page(0x1001, 0, PageAccess::Supervisor),
            Err(PagingError::Unaligned(0x1001))
        );
    }

    #[test]
    fn user_segments_are_ring_3_long_mode() {
        let s = user_mode_sregs(kvm_sregs::default(), 0x10_0000);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db), (0x33, 3, 1, 0));
        assert_eq!((s.cs.type_, s.cs.s, s.cs.present), (0xb, 1, 1));
        assert_eq!((s.ss.selector, s.ss.dpl, s.ss.type_), (0x2b, 3, 3));
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.s), (0x40, 0xb, 0));
        assert_eq!((s.tr.base, s.tr.limit), (TSS_GPA, TSS_LIMIT));
        // EFER.LME and EFER.LMA.
        let long_mode = (1 << 8) | (1 << 10);
        assert_eq!(s.efer & long_mode, long_mode);
        assert_eq!(s.cr4 & (1 << 2), 0, "CR4.TSD would fault rdtsc at CPL3");
        let r = entry_regs(CODE_GPA, PARAMS_GPA, STACK_GPA + 0x2000);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts stay off");
        assert_eq!(gdt()[GDT_USER_CODE], 0x00af_fb00_0000_ffff);
        assert_eq!(gdt()[GDT_USER_DATA], 0x00cf_f300_0000_ffff);
        assert_eq!((s.idt.base, s.idt.limit), (IDT_GPA, 32 * 16 - 1));
    }

    #[test]
    fn idt_gates_reach_each_stub_at_cpl0() {
        let e = idt_entry(0x1234_5678_9abc_def0);
        assert_eq!(u16::from_le_bytes([e[0], e[1]]), 0xdef0);
        assert_eq!(u16::from_le_bytes([e[2], e[3]]), 0x10, "kernel code");
        assert_eq!((e[4], e[5]), (0, 0x8e));
        assert_eq!(u16::from_le_bytes([e[6], e[7]]), 0x9abc);
        assert_eq!(u32::from_le_bytes([e[8], e[9], e[10], e[11]]), 0x1234_5678);
        let mem = mem();
        write_descriptor_tables(&mem, 0x3_0100).unwrap();
        let mut gate = [0u8; 16];
        mem.read_slice(&mut gate, GuestAddress(IDT_GPA + 6 * 16))
            .unwrap();
        assert_eq!(gate, idt_entry(0x3_0100 + 6 * 16));
        let rsp0: u64 = mem.read_obj(GuestAddress(TSS_GPA + 4)).unwrap();
        assert_eq!(rsp0, FAULT_STACK_GPA + PAGE);
    }
}
