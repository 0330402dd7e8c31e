//! What kind of KVM host this is. Nested shadow-paging hosts (PLATFORM.md)
//! emulate guest CPL0 code and cannot run a stock kernel configuration, so
//! the guest needs extra command-line switches there; real VMX/SVM hosts
//! need none.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// The CPU has VMX or SVM: KVM runs the guest on hardware.
    Hardware,
    /// No VMX/SVM but /dev/kvm works: a nested, shadow-paging KVM that
    /// emulates guest kernel code.
    NestedShadow,
}

impl HostKind {
    /// Reads the host's CPU flags and loaded KVM modules.
    pub fn detect() -> HostKind {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::classify(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
    }

    pub fn classify(cpuinfo: &str, pvm_module: bool) -> HostKind {
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if pvm_module || !hw {
            HostKind::NestedShadow
        } else {
            HostKind::Hardware
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware-assisted KVM (VMX/SVM)",
            HostKind::NestedShadow => "nested shadow-paging KVM without VMX/SVM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD: &str = "processor\t: 0\nflags\t\t: fpu vme sse2 svm npt\n";
    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vmx ept\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n";

    #[test]
    fn classifies_hosts() {
        assert_eq!(HostKind::classify(AMD, false), HostKind::Hardware);
        assert_eq!(HostKind::classify(INTEL, false), HostKind::Hardware);
        assert_eq!(HostKind::classify(NONE, false), HostKind::NestedShadow);
        // The PVM module wins even where the flags would say hardware.
        assert_eq!(HostKind::classify(AMD, true), HostKind::NestedShadow);
        // "svm" must be a whole flag, not part of another one.
        assert_eq!(
            HostKind::classify("flags : svm_lock\n", false),
            HostKind::NestedShadow
        );
    }
}
