//! x86_64 vCPU set-up for the Linux 64-bit boot protocol: GDT, identity
//! page tables, long mode, registers, CPUID, MSRs and the local APIC.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_STACK_TOP, GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot write boot {0} into guest memory")]
    GuestWrite(&'static str),
    #[error(
        "{who} needs CPU features that KVM does not offer here: {missing}. The host CPU \
         (or the CPU model its own VMM gives it, such as QEMU's -cpu) lacks them"
    )]
    MissingFeatures { who: &'static str, missing: String },
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// The boot GDT. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and
/// __BOOT_DS = 0x18, so entries 0 and 1 stay null.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code, DPL0
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data, DPL0
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: busy 64-bit TSS
];
const CODE_INDEX: u16 = 2;
const DATA_INDEX: u16 = 3;
const TSS_INDEX: u16 = 4;

pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register matching GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    decode_segment(GDT[index as usize], index)
}

/// The KVM segment register for the raw GDT descriptor `e` at `index`,
/// its selector's RPL equal to the descriptor's DPL.
pub fn decode_segment(e: u64, index: u16) -> kvm_segment {
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let present = ((e >> 47) & 1) as u8;
    let dpl = ((e >> 45) & 3) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | (((e >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) | u16::from(dpl),
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

/// Writes the GDT and page tables that identity-map the first GiB with
/// 2 MiB pages: enough for the kernel, the zero page and the initrd until
/// Linux builds its own.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| CpuError::GuestWrite("GDT"))?;
    }
    let tables = [(PML4_ADDR, PDPT_ADDR), (PDPT_ADDR, PD_ADDR)];
    for (table, next) in tables {
        mem.write_obj(next | PTE_PRESENT_RW, GuestAddress(table))
            .map_err(|_| CpuError::GuestWrite("page tables"))?;
    }
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PDE_2M_PAGE, GuestAddress(PD_ADDR + i * 8))
            .map_err(|_| CpuError::GuestWrite("page tables"))?;
    }
    Ok(())
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// 64-bit mode with 4-level paging rooted at `cr3`: `code` in CS, `data`
/// in every other segment register. The VMM's boot state and the probe's.
pub fn enter_long_mode(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment, cr3: u64) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Long mode with paging on, flat segments from the boot GDT.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    enter_long_mode(
        &mut sregs,
        segment(CODE_INDEX),
        segment(DATA_INDEX),
        PML4_ADDR,
    );
    sregs.tr = segment(TSS_INDEX);
    sregs
}

/// Registers at the 64-bit kernel entry: RSI points at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, write-back by default: otherwise Linux maps RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The host's supported CPUID with this vCPU's APIC id filled in.
pub fn vcpu_cpuid(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
                // Logical processor count, valid with HTT.
                e.ebx = (e.ebx & 0xff00_ffff) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

/// A CPUID feature bit that pmemvm or its guests rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    leaf: u32,
    /// true: EDX, false: ECX.
    edx: bool,
    bit: u8,
}

impl Feature {
    const fn edx(name: &'static str, leaf: u32, bit: u8) -> Self {
        Self {
            name,
            leaf,
            edx: true,
            bit,
        }
    }

    const fn ecx(name: &'static str, leaf: u32, bit: u8) -> Self {
        Self {
            name,
            leaf,
            edx: false,
            bit,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} (CPUID {:#x} {} bit {})",
            self.name,
            self.leaf,
            if self.edx { "EDX" } else { "ECX" },
            self.bit
        )
    }
}

pub const FPU: Feature = Feature::edx("fpu", 1, 0);
pub const PSE: Feature = Feature::edx("pse", 1, 3);
pub const TSC: Feature = Feature::edx("tsc", 1, 4);
pub const MSR: Feature = Feature::edx("msr", 1, 5);
pub const PAE: Feature = Feature::edx("pae", 1, 6);
pub const CX8: Feature = Feature::edx("cx8", 1, 8);
pub const APIC: Feature = Feature::edx("apic", 1, 9);
pub const PGE: Feature = Feature::edx("pge", 1, 13);
pub const CMOV: Feature = Feature::edx("cmov", 1, 15);
pub const FXSR: Feature = Feature::edx("fxsr", 1, 24);
pub const SSE: Feature = Feature::edx("sse", 1, 25);
pub const SSE2: Feature = Feature::edx("sse2", 1, 26);
pub const TSC_DEADLINE: Feature = Feature::ecx("tsc_deadline_timer", 1, 24);
pub const RDTSCP: Feature = Feature::edx("rdtscp", 0x8000_0001, 27);
pub const LM: Feature = Feature::edx("lm", 0x8000_0001, 29);

/// What a 64-bit Linux refuses to boot without (REQUIRED_MASK0/1 in
/// arch/x86/include/asm/required-features.h; without them it halts in
/// verify_cpu and prints nothing), and the local APIC that pmemvm's MP
/// table and irqchip give it.
pub const LINUX_BOOT: &[Feature] = &[
    FPU, PSE, TSC, MSR, PAE, CX8, APIC, PGE, CMOV, FXSR, SSE, SSE2, LM,
];

/// The features `wanted` that `cpuid` lacks.
pub fn missing_features(cpuid: &CpuId, wanted: &[Feature]) -> Vec<Feature> {
    wanted
        .iter()
        .copied()
        .filter(|f| {
            !cpuid.as_slice().iter().any(|e| {
                e.function == f.leaf
                    && e.index == 0
                    && (if f.edx { e.edx } else { e.ecx }) & (1 << f.bit) != 0
            })
        })
        .collect()
}

/// Sets `feature` in sub-leaf 0 of its leaf.
pub fn set_feature(cpuid: &mut CpuId, feature: Feature) {
    for e in cpuid.as_mut_slice() {
        if e.function == feature.leaf && e.index == 0 {
            if feature.edx {
                e.edx |= 1 << feature.bit;
            } else {
                e.ecx |= 1 << feature.bit;
            }
        }
    }
}

/// The host CPU's own CPUID for the leaves of `wanted`, as a CpuId.
fn host_cpuid(wanted: &[Feature]) -> Option<CpuId> {
    let mut leaves: Vec<u32> = wanted.iter().map(|f| f.leaf).collect();
    leaves.sort_unstable();
    leaves.dedup();
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = leaves
        .into_iter()
        .map(|leaf| {
            let r = core::arch::x86_64::__cpuid_count(leaf, 0);
            kvm_bindings::kvm_cpuid_entry2 {
                function: leaf,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }
        })
        .collect();
    CpuId::from_entries(&entries).ok()
}

/// Fails, naming each missing feature, unless the guest's CPU has all of
/// `wanted`. That CPU is KVM's supported CPUID, except on nested
/// shadow-paging hosts, where the guest sees the host's own CPUID whatever
/// KVM_SET_CPUID2 says (PLATFORM.md).
pub fn require_features(
    cpuid: &CpuId,
    host: crate::host::HostKind,
    wanted: &[Feature],
    who: &'static str,
) -> Result<(), CpuError> {
    let missing = if host == crate::host::HostKind::NestedShadow {
        host_cpuid(wanted).map_or_else(|| wanted.to_vec(), |c| missing_features(&c, wanted))
    } else {
        missing_features(cpuid, wanted)
    };
    if missing.is_empty() {
        return Ok(());
    }
    Err(CpuError::MissingFeatures {
        who,
        missing: missing
            .iter()
            .map(Feature::describe)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// Virtual wire mode: the PIC through LINT0, NMIs through LINT1, as the MP
/// table says.
pub fn wire_lint(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
    state
}

/// Sets up one vCPU. Only the bootstrap vCPU gets registers: the others wait
/// for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), CpuError> {
    let kvm = |what: &'static str| {
        move |source| CpuError::Kvm {
            vcpu: id,
            what,
            source,
        }
    };
    vcpu.set_cpuid2(&vcpu_cpuid(cpuid, id, count))
        .map_err(kvm("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| CpuError::Kvm {
        vcpu: id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        log::debug!(
            "vCPU {id}: KVM took {set} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    vcpu.set_lapic(&wire_lint(lapic))
        .map_err(kvm("KVM_SET_LAPIC"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    if id == 0 {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&long_mode_sregs(sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(entry))
            .map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostKind;

    #[test]
    fn gdt_segments_are_flat_long_mode() {
        let cs = segment(CODE_INDEX);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (0x10, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment(DATA_INDEX);
        assert_eq!(
            (ds.selector, ds.l, ds.db, ds.type_, ds.limit),
            (0x18, 0, 1, 3, 0xffff_ffff)
        );
        let tr = segment(TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x20, 0xb, 0));
        assert_eq!(segment(0).unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0x1234_5678, 0xfffff) >> 56, 0x12);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 3);
        for i in [0u64, 8, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * i)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
        let gdt2: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 16)).unwrap();
        assert_eq!(gdt2, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_bits() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.cr3, PML4_ADDR);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, 2));
    }

    #[test]
    fn lint_pins_are_wired() {
        let s = wire_lint(kvm_lapic_state::default());
        assert_eq!((lapic_reg(&s, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&s, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn nested_hosts_check_the_host_cpu() {
        // This test runs on x86_64, which has these: an empty KVM CPUID
        // must not matter where the guest sees the host's CPUID.
        let empty = CpuId::new(0).unwrap();
        assert!(require_features(&empty, HostKind::NestedShadow, &[FPU, LM, SSE2], "t").is_ok());
        assert!(require_features(&empty, HostKind::Hardware, &[FPU], "t").is_err());
    }

    #[test]
    fn missing_features_are_named() {
        let mut cpuid = CpuId::new(2).unwrap();
        let e = &mut cpuid.as_mut_slice()[0];
        e.function = 1;
        e.edx = (1 << 4) | (1 << 26);
        let e = &mut cpuid.as_mut_slice()[1];
        e.function = 0x8000_0001;
        e.edx = 1 << 29;
        assert!(missing_features(&cpuid, &[TSC, SSE2, LM]).is_empty());
        assert_eq!(missing_features(&cpuid, &[TSC, RDTSCP, LM]), vec![RDTSCP]);
        let msg = require_features(
            &cpuid,
            HostKind::Hardware,
            &[RDTSCP, FPU],
            "the probe guest",
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("the probe guest needs")
                && msg.contains("rdtscp (CPUID 0x80000001 EDX bit 27), fpu (CPUID 0x1 EDX bit 0)"),
            "{msg}"
        );
        set_feature(&mut cpuid, TSC_DEADLINE);
        assert!(missing_features(&cpuid, &[TSC_DEADLINE, TSC]).is_empty());
        // A sub-leaf other than 0 does not count.
        cpuid.as_mut_slice()[1].index = 1;
        assert_eq!(missing_features(&cpuid, &[LM]), vec![LM]);
    }

    #[test]
    fn cpuid_gets_the_apic_id() {
        let mut base = CpuId::new(2).unwrap();
        base.as_mut_slice()[0].function = 1;
        base.as_mut_slice()[0].ebx = 0xaa00_0800;
        base.as_mut_slice()[1].function = 0xb;
        let c = vcpu_cpuid(&base, 3, 4);
        assert_eq!(c.as_slice()[0].ebx >> 24, 3);
        assert_eq!((c.as_slice()[0].ebx >> 16) & 0xff, 4);
        assert_eq!(c.as_slice()[0].ebx & 0xffff, 0x0800);
        assert_ne!(c.as_slice()[0].ecx & (1 << 31), 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
