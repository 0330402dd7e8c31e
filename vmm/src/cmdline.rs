//! Assembly of the guest kernel command line.

use crate::host::HostKind;

/// Always given: serial console, reboot through the i8042 (which ends
/// pmemvm), no ACPI (the MP table describes the CPUs, the command line the
/// devices) and no PCI bus to probe.
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 acpi=off pci=off";
/// The same with `--acpi`, where the ACPI tables describe CPUs and devices.
pub const BASE_ACPI: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// What a nested shadow-paging host needs (PLATFORM.md): CPU features its
/// CPL0 emulator cannot execute are switched off, and the three switches of
/// the pmemvm guest-kernel patches are turned on.
pub const NESTED_SHADOW: &str = "noxsave \
clearcpuid=smap,fsgsbase,pcid,invpcid,cx16,rdrand,rdseed,erms,fsrm,clwb,popcnt \
no_int3_selftest no_fpu_fwait syscall_pf_fixup";

/// Added on such a host for more than one vCPU: its emulator re-executes a
/// guest-kernel `vmcall` forever, and Linux makes hypercalls (PV IPIs, PV
/// spinlock kicks) only on SMP. `nopv` turns the KVM guest extras off.
pub const NESTED_SHADOW_SMP: &str = "nopv";

/// Whether to add the host-specific switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostQuirks {
    /// Add them when the host needs them.
    #[default]
    Auto,
    On,
    Off,
}

/// A virtio-mmio device announced to the guest (`virtio_mmio.device=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceSpec {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("the kernel command line is {0} bytes; Linux takes at most {max}", max = crate::layout::CMDLINE_MAX - 1)]
    TooLong(usize),
    #[error("the kernel command line may not contain a NUL byte or a newline")]
    BadCharacter,
}

/// How the guest learns of its virtio-mmio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery<'a> {
    /// `virtio_mmio.device=` words (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    CommandLine(&'a [MmioDeviceSpec]),
    /// The DSDT (see `acpi.rs`); the line then leaves ACPI on.
    Acpi,
}

/// The assembled line, and the host switches it holds (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub line: String,
    pub host_switches: Option<String>,
}

/// Builds the command line: base, host switches, devices, then the user's
/// own words last so that they override ours (Linux takes the last value).
pub fn assemble(
    host: HostKind,
    quirks: HostQuirks,
    vcpus: u8,
    discovery: Discovery,
    user: &str,
) -> Result<Cmdline, CmdlineError> {
    if user.contains(['\0', '\n']) {
        return Err(CmdlineError::BadCharacter);
    }
    let (base, devices) = match discovery {
        Discovery::CommandLine(devices) => (BASE, devices),
        Discovery::Acpi => (BASE_ACPI, &[][..]),
    };
    let mut parts = vec![base.to_string()];
    let host_switches = match (quirks, host) {
        (HostQuirks::On, _) | (HostQuirks::Auto, HostKind::NestedShadow) => Some(if vcpus > 1 {
            format!("{NESTED_SHADOW} {NESTED_SHADOW_SMP}")
        } else {
            NESTED_SHADOW.to_string()
        }),
        _ => None,
    };
    parts.extend(host_switches.clone());
    for d in devices {
        parts.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            d.size / 1024,
            d.base,
            d.irq
        ));
    }
    let user = user.trim();
    if !user.is_empty() {
        parts.push(user.to_string());
    }
    let line = parts.join(" ");
    if line.len() >= crate::layout::CMDLINE_MAX {
        return Err(CmdlineError::TooLong(line.len()));
    }
    Ok(Cmdline {
        line,
        host_switches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line for a guest without devices.
    fn bare(host: HostKind, quirks: HostQuirks, vcpus: u8, user: &str) -> Cmdline {
        assemble(host, quirks, vcpus, Discovery::CommandLine(&[]), user).unwrap()
    }

    #[test]
    fn hardware_host_gets_nothing_extra() {
        let c = bare(HostKind::Hardware, HostQuirks::Auto, 1, "");
        assert_eq!(c.line, BASE);
        assert_eq!(c.host_switches, None);
    }

    #[test]
    fn nested_host_gets_switches_unless_turned_off() {
        let c = bare(HostKind::NestedShadow, HostQuirks::Auto, 1, "quiet");
        assert_eq!(c.line, format!("{BASE} {NESTED_SHADOW} quiet"));
        assert!(c.line.contains("syscall_pf_fixup"));
        assert_eq!(c.host_switches.as_deref(), Some(NESTED_SHADOW));
        let c = bare(HostKind::NestedShadow, HostQuirks::Auto, 2, "");
        assert_eq!(
            c.line,
            format!("{BASE} {NESTED_SHADOW} {NESTED_SHADOW_SMP}")
        );
        let c = bare(HostKind::Hardware, HostQuirks::Auto, 8, "");
        assert!(!c.line.contains("nopv"));
        let c = bare(HostKind::NestedShadow, HostQuirks::Off, 1, "");
        assert_eq!(c.line, BASE);
        let c = bare(HostKind::Hardware, HostQuirks::On, 1, "");
        assert!(c.line.contains("no_fpu_fwait"));
    }

    #[test]
    fn devices_come_before_user_words() {
        let devs = [
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
        ];
        let c = assemble(
            HostKind::Hardware,
            HostQuirks::Auto,
            1,
            Discovery::CommandLine(&devs),
            " pmemvm_mode=demo ",
        )
        .unwrap();
        assert_eq!(
            c.line,
            format!("{BASE} virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 pmemvm_mode=demo")
        );
    }

    #[test]
    fn acpi_leaves_acpi_on_and_the_devices_off_the_line() {
        let c = assemble(
            HostKind::Hardware,
            HostQuirks::Auto,
            1,
            Discovery::Acpi,
            "pmemvm_mode=demo",
        )
        .unwrap();
        assert_eq!(c.line, format!("{BASE_ACPI} pmemvm_mode=demo"));
        assert!(!c.line.contains("acpi=off") && !c.line.contains("virtio_mmio"));
    }

    #[test]
    fn rejects_bad_lines() {
        let long = "x".repeat(3000);
        assert!(matches!(
            assemble(
                HostKind::Hardware,
                HostQuirks::Auto,
                1,
                Discovery::CommandLine(&[]),
                &long
            ),
            Err(CmdlineError::TooLong(_))
        ));
        assert_eq!(
            assemble(
                HostKind::Hardware,
                HostQuirks::Auto,
                1,
                Discovery::CommandLine(&[]),
                "a\nb"
            ),
            Err(CmdlineError::BadCharacter)
        );
    }
}
