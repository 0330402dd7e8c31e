//! Guest-physical memory layout of a pmemvm guest and its e820 map.
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack top       0x0000_9000  page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line  0x0009_fc00  MP table (last KiB of base RAM)
//! 0x0010_0000  RAM above 1 MiB ...  up to 3 GiB, the rest above 4 GiB
//! 0xd000_0000  virtio-mmio devices  0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC
//! ```
//! pmem regions sit above the top of RAM, each aligned to 1 GiB.

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// COMMAND_LINE_SIZE of x86 Linux, including the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the last KiB of conventional memory, where Linux looks for the
/// MP floating pointer when the BIOS data area names no EBDA.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
pub const HIMEM_START: u64 = 0x10_0000;
/// Where 64-bit kernels are linked to load (CONFIG_PHYSICAL_START).
pub const KERNEL_START: u64 = 0x100_0000;

/// RAM stops here and continues above 4 GiB, leaving room for device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices: above the legacy ISA lines in use
/// (timer 0, keyboard 1, cascade 2, COM1 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const SERIAL_IRQ: u32 = 4;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// The smallest guest a 6.1 kernel with an initramfs boots in comfortably.
pub const MIN_MEMORY: u64 = 64 * MIB;
/// Leave room below MAXPHYADDR for pmem regions above RAM.
pub const MAX_MEMORY: u64 = 1 << 40;
pub const PMEM_ALIGN: u64 = GIB;

/// An e820 entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The guest RAM regions for `mem_size` bytes: one below the MMIO gap and,
/// for large guests, one above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// First guest-physical address above RAM.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_regions(mem_size)
        .last()
        .map_or(0, |&(start, size)| start + size)
}

/// The e820 map Linux gets: base memory minus the MP table area, the
/// reserved legacy hole, then RAM from 1 MiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_ADDR,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: EBDA_END - MPTABLE_ADDR,
            kind: E820Kind::Reserved,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let start_hi = start.max(HIMEM_START);
        let end = start + size;
        if end > start_hi {
            map.push(E820Entry {
                addr: start_hi,
                size: end - start_hi,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Guest-physical starts for pmem regions of the given sizes, above RAM.
pub fn pmem_regions(mem_size: u64, sizes: &[u64]) -> Vec<u64> {
    let mut next = align_up(ram_end(mem_size).max(MMIO_GAP_END), PMEM_ALIGN);
    sizes
        .iter()
        .map(|&size| {
            let start = next;
            next = align_up(start + size, PMEM_ALIGN);
            start
        })
        .collect()
}

pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_region_and_holes() {
        let map = e820_map(512 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[1].addr + map[1].size, 0xa0000);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: 512 * MIB - HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        // Entries never overlap and the MP table is not RAM.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        assert!(!map.iter().any(|e| e.kind == E820Kind::Ram
            && e.addr <= MPTABLE_ADDR
            && MPTABLE_ADDR < e.addr + e.size));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 5 * GIB;
        assert_eq!(
            ram_regions(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
        let map = e820_map(mem);
        let last = map.last().unwrap();
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.addr + last.size, MMIO_GAP_END + mem - MMIO_GAP_START);
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            total,
            mem - (EBDA_END - MPTABLE_ADDR) - (HIMEM_START - EBDA_END)
        );
        assert!(!map
            .iter()
            .any(|e| e.addr < MMIO_GAP_END && e.addr + e.size > MMIO_GAP_START));
    }

    #[test]
    fn exactly_at_the_gap_stays_below() {
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_end(MMIO_GAP_START), MMIO_GAP_START);
    }

    #[test]
    fn pmem_regions_are_aligned_and_disjoint() {
        let starts = pmem_regions(512 * MIB, &[2 * MIB, 3 * GIB, 64 * MIB]);
        assert_eq!(starts, vec![4 * GIB, 5 * GIB, 8 * GIB]);
        let starts = pmem_regions(5 * GIB, &[2 * MIB]);
        assert_eq!(starts, vec![6 * GIB]);
    }
}
