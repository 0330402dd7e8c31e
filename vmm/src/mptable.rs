//! The Intel MultiProcessor table that tells an ACPI-less Linux guest about
//! its CPUs, the IOAPIC and how ISA interrupts are wired to it.

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};

pub const MAX_CPUS: u8 = 8;
/// IOAPIC input pins, one per GSI.
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature with "FPU" and "APIC on chip" feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; pmemvm supports 1 to {MAX_CPUS}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs
/// (APIC ids 0..cpus, CPU 0 the bootstrap processor), laid out to be
/// written at [`MPTABLE_ADDR`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n arrives at IOAPIC pin n with the bus's default polarity and
    // trigger mode; the in-kernel irqchip routes GSIs the same way.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // Virtual wire mode: the 8259 on LINT0 of every CPU, NMI on LINT1.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR + FLOATING_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"PMEMVM  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, rev 1.4
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in 1..=MAX_CPUS {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            // It must fit in the reserved last KiB of base memory.
            assert!(t.len() <= 1024);
        }
    }

    #[test]
    fn lists_each_cpu_once_with_one_bootstrap() {
        let t = build(4).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        let mut off = HEADER_LEN;
        let (mut cpus, mut bsp, mut ioapics, mut ints) = (vec![], 0, 0, 0);
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(table[off + 1]);
                    if table[off + 3] & CPU_BOOTSTRAP != 0 {
                        bsp += 1;
                    }
                    off += 20;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(table[off + 1], 4, "IOAPIC id follows the CPUs");
                    ioapics += 1;
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    ints += 1;
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!((bsp, ioapics, ints), (1, 1, IOAPIC_PINS as usize));
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert_eq!(build(0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(9), Err(MpTableError::CpuCount(9)));
    }
}
