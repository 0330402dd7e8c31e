//! ACPI tables for guests that find their devices through ACPI, as
//! distribution kernels do: Debian's is built without
//! CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so `virtio_mmio.device=` means
//! nothing to it. `--acpi` gives the guest, in the BIOS area from
//! [`ACPI_START`]:
//! - an RSDP pointing at an XSDT;
//! - a hardware-reduced FADT (no PM blocks, no SCI, no legacy PIC or PIT:
//!   the LAPIC's TSC-deadline timer keeps time, see `vm.rs`);
//! - a MADT with each vCPU's local APIC and the IOAPIC, ISA IRQs
//!   identity-mapped as the in-kernel irqchip routes them;
//! - a DSDT naming COM1 and each virtio-mmio device (`LNRO0005`, the id
//!   the virtio_mmio driver matches) with its registers and edge-triggered
//!   interrupt.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cmdline::MmioDeviceSpec;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, SERIAL_IRQ};

/// Where the RSDP goes: the first place Linux's search of the BIOS area
/// (0xe0000-0xfffff) looks. The other tables follow it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"PMEMVM";
const OEM_TABLE: [u8; 8] = *b"PMEMVMTB";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: an i8042 is there (pmemvm's reboot port); no VGA, no
/// MSI, no CMOS RTC.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_MSI: u16 = 1 << 3;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
const COM1_PORT: u16 = 0x3f8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables into guest memory")]
    GuestWrite,
}

/// The tables, laid out from [`ACPI_START`]: (guest address, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    pub fn rsdp(&self) -> u64 {
        ACPI_START
    }

    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.tables {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|_| AcpiError::GuestWrite)?;
        }
        Ok(())
    }
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The DSDT: COM1, then one LNRO0005 device per virtio-mmio transport.
fn dsdt(devices: &[MmioDeviceSpec]) -> Vec<u8> {
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_res = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_res]);

    struct Virtio {
        name: String,
        uid: u32,
        mem: aml::Memory32Fixed,
        irq: aml::Interrupt,
    }
    let virtio: Vec<Virtio> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| Virtio {
            name: format!("V{i:03X}"),
            uid: i as u32,
            mem: aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
            irq: aml::Interrupt::new(true, true, false, false, d.irq),
        })
        .collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let crs: Vec<aml::ResourceTemplate> = virtio
        .iter()
        .map(|v| aml::ResourceTemplate::new(vec![&v.mem, &v.irq]))
        .collect();
    let uid: Vec<aml::Name> = virtio
        .iter()
        .map(|v| aml::Name::new("_UID".into(), &v.uid))
        .collect();
    let res: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devices: Vec<aml::Device> = virtio
        .iter()
        .zip(uid.iter().zip(&res))
        .map(|(v, (u, r))| aml::Device::new(v.name.as_str().into(), vec![&hid, u, r]))
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("_SB_".into(), children);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    sb.to_aml_bytes(&mut table);
    bytes(&table)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_MSI | BOOT_ARCH_NO_CMOS_RTC).into();
    bytes(&fadt.finalize())
}

/// Local APIC ids 0..vcpus, and the IOAPIC with the id the MP table gives
/// it (one above the last CPU).
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    bytes(&madt)
}

/// Builds every table for `vcpus` vCPUs and the virtio-mmio `devices`.
pub fn build(vcpus: u8, devices: &[MmioDeviceSpec]) -> Result<AcpiTables, AcpiError> {
    let align = |a: u64| a.div_ceil(16) * 16;
    let xsdt_addr = align(ACPI_START + Rsdp::len() as u64);
    // The XSDT has two entries: FADT and MADT.
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let madt = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(devices);
    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt_addr + xsdt.len() as u64, fadt_addr);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }
    Ok(AcpiTables {
        tables: vec![
            (ACPI_START, bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn devices() -> Vec<MmioDeviceSpec> {
        vec![
            MmioDeviceSpec {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceSpec {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ]
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let t = build(2, &devices()).unwrap();
        let find = |addr: u64| &t.tables.iter().find(|(a, _)| *a == addr).unwrap().1;
        let rsdp = find(t.rsdp());
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = find(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        assert_eq!(sum(xsdt), 0);
        let fadt = find(u64_at(xsdt, 36));
        let madt = find(u64_at(xsdt, 44));
        assert_eq!((&fadt[..4], &madt[..4]), (&b"FACP"[..], &b"APIC"[..]));
        for table in [fadt, madt] {
            assert_eq!(u32_at(table, 4) as usize, table.len());
            assert_eq!(sum(table), 0);
        }
        // FADT: hardware-reduced, X_DSDT at offset 140.
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
        let dsdt = find(u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(dsdt), 0);
        // MADT: the header, two local APICs (type 0) and an IOAPIC (1).
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR as u32);
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!((madt[44], madt[47]), (0, 0));
        assert_eq!((madt[52], madt[55]), (0, 1));
        assert_eq!((madt[60], madt[62]), (1, 2));
        assert_eq!(u32_at(madt, 64), IOAPIC_ADDR as u32);
        let last = t.tables.last().unwrap();
        assert!(last.0 + last.1.len() as u64 <= ACPI_END);
    }

    #[test]
    fn the_dsdt_names_each_virtio_device_with_its_resources() {
        let dsdt = dsdt(&devices());
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005"));
        assert!(has(b"V000") && has(b"V001") && has(b"COM1"));
        // Memory32Fixed: 0x86, length 9, read-write, base, size.
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(has(&mem));
        // Extended interrupt: 0x89, length 6, consumer + edge, one IRQ 6.
        let mut irq = vec![0x89, 6, 0, 0b11, 1];
        irq.extend_from_slice(&6u32.to_le_bytes());
        assert!(has(&irq));
    }
}
