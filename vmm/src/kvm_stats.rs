//! KVM's binary statistics (KVM_GET_STATS_FD, Linux 5.14): the per-VM and
//! per-vCPU counters such as `pf_taken`, `exits` or `pages_4k`, read from a
//! stats file descriptor.
//!
//! kvm-ioctls does not wrap this ioctl, so the layout below follows
//! include/uapi/linux/kvm.h:
//!
//! ```text
//! struct kvm_stats_header { u32 flags, name_size, num_desc,
//!                           id_offset, desc_offset, data_offset; };
//! struct kvm_stats_desc   { u32 flags; s16 exponent; u16 size;
//!                           u32 offset; u32 bucket_size; char name[name_size]; };
//! ```
//!
//! The data block holds `size` u64 values per descriptor at `offset`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::{VcpuFd, VmFd};

/// _IO(KVMIO, 0xce).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;

const KVM_STATS_TYPE_SHIFT: u32 = 0;
const KVM_STATS_TYPE_MASK: u32 = 0xf << KVM_STATS_TYPE_SHIFT;

/// What a statistic counts (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Only grows: deltas are meaningful.
    Cumulative,
    /// A current value (e.g. pages mapped now).
    Instant,
    /// The highest value seen.
    Peak,
    /// A histogram; [`KvmStats::read`] leaves these out.
    Histogram,
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match (flags & KVM_STATS_TYPE_MASK) >> KVM_STATS_TYPE_SHIFT {
            0 => Self::Cumulative,
            1 => Self::Instant,
            2 => Self::Peak,
            3 | 4 => Self::Histogram,
            t => Self::Unknown(t),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    #[error("KVM_GET_STATS_FD failed (this KVM has no binary stats, Linux < 5.14?): {0}")]
    Open(io::Error),
    #[error("reading the KVM stats {what} failed: {source}")]
    Read {
        what: &'static str,
        source: io::Error,
    },
    #[error("the KVM stats header is malformed: {0}")]
    Malformed(String),
}

/// One statistic's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatDescriptor {
    pub name: String,
    pub kind: StatKind,
    /// Power-of-ten or power-of-two exponent of the unit, as KVM says.
    pub exponent: i16,
    /// Number of u64 values (1 for scalars, buckets for histograms).
    pub size: u16,
    offset: u32,
}

/// A VM's or a vCPU's stats file, with its descriptors read once.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    descriptors: Vec<StatDescriptor>,
    data_offset: u64,
    data_len: usize,
}

/// The tracepoint that fires for each EPT/NPT violation KVM handles
/// (`npf_interception`, `handle_ept_violation`), and on shadow-paging
/// hosts for each guest page fault it intercepts.
pub const PAGE_FAULT_EVENT: (&str, &str) = ("kvm", "kvm_page_fault");
/// The name its count goes by among the vCPU statistics.
pub const PAGE_FAULT_STAT: &str = "kvm_page_fault";

/// How often one tracepoint fired in the thread that opened the counter
/// (perf_event_open, counting mode: no buffer, no samples).
#[derive(Debug)]
pub struct TraceCounter {
    file: File,
}

impl TraceCounter {
    /// Counts `system:event` in the calling thread, kernel side included.
    /// Needs tracefs (for the event id) and the right to trace kernel
    /// events (root, or kernel.perf_event_paranoid -1).
    pub fn open_this_thread((system, event): (&str, &str)) -> io::Result<Self> {
        let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/{system}/{event}/id")).ok()
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no tracepoint {system}:{event} (is tracefs mounted at /sys/kernel/tracing?)"
                    ),
                )
            })?;
        let id: u64 = id.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad tracepoint id {id:?}"),
            )
        })?;
        let mut attr = perf_event_open_sys::bindings::perf_event_attr {
            type_: perf_event_open_sys::bindings::PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<perf_event_open_sys::bindings::perf_event_attr>() as u32,
            config: id,
            ..Default::default()
        };
        attr.set_exclude_hv(1);
        // SAFETY: `attr` is a valid perf_event_attr that outlives the call;
        // pid 0 / cpu -1 is this thread on any CPU. The result is checked.
        let fd = unsafe { perf_event_open_sys::perf_event_open(&mut attr, 0, -1, -1, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file })
    }

    pub fn read(&self) -> io::Result<u64> {
        use std::io::Read;
        let mut count = [0u8; 8];
        (&self.file).read_exact(&mut count)?;
        Ok(u64::from_le_bytes(count))
    }
}

fn stats_fd(fd: &impl AsRawFd) -> Result<File, KvmStatsError> {
    // SAFETY: argument-less ioctl on a valid KVM VM or vCPU fd; it returns a
    // new fd or -1.
    let new_fd = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD) };
    if new_fd < 0 {
        return Err(KvmStatsError::Open(io::Error::last_os_error()));
    }
    // SAFETY: `new_fd` is a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(new_fd) })
}

fn read_exact_at(
    file: &File,
    len: usize,
    offset: u64,
    what: &'static str,
) -> Result<Vec<u8>, KvmStatsError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| KvmStatsError::Read { what, source })?;
    Ok(buf)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl KvmStats {
    /// The VM-wide statistics (pages_4k, pages_2m, remote_tlb_flush, ...).
    pub fn open_vm(vm: &VmFd) -> Result<Self, KvmStatsError> {
        Self::from_file(stats_fd(vm)?)
    }

    /// One vCPU's statistics (pf_taken, pf_fixed, exits, ...).
    pub fn open_vcpu(vcpu: &VcpuFd) -> Result<Self, KvmStatsError> {
        Self::from_file(stats_fd(vcpu)?)
    }

    fn from_file(file: File) -> Result<Self, KvmStatsError> {
        let header = read_exact_at(&file, HEADER_SIZE, 0, "header")?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        let (descriptors, data_len) = parse_descriptors(&file, name_size, num_desc, desc_offset)?;
        Ok(Self {
            file,
            descriptors,
            data_offset,
            data_len,
        })
    }

    pub fn descriptors(&self) -> &[StatDescriptor] {
        &self.descriptors
    }

    pub fn kind(&self, name: &str) -> Option<StatKind> {
        self.descriptors
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.kind)
    }

    /// The current value of every scalar statistic (histograms left out).
    pub fn read(&self) -> Result<BTreeMap<String, u64>, KvmStatsError> {
        let data = read_exact_at(&self.file, self.data_len, self.data_offset, "data")?;
        Ok(self
            .descriptors
            .iter()
            .filter(|d| d.size == 1 && d.kind != StatKind::Histogram)
            .map(|d| {
                let at = d.offset as usize;
                let mut v = [0u8; 8];
                v.copy_from_slice(&data[at..at + 8]);
                (d.name.clone(), u64::from_le_bytes(v))
            })
            .collect())
    }
}

fn parse_descriptors(
    file: &File,
    name_size: usize,
    num_desc: usize,
    desc_offset: u64,
) -> Result<(Vec<StatDescriptor>, usize), KvmStatsError> {
    if name_size == 0 || name_size > 4096 || num_desc > 65536 {
        return Err(KvmStatsError::Malformed(format!(
            "name_size {name_size}, num_desc {num_desc}"
        )));
    }
    let desc_size = DESC_FIXED_SIZE + name_size;
    let raw = read_exact_at(file, desc_size * num_desc, desc_offset, "descriptors")?;
    let descriptors = decode_descriptors(&raw, name_size, num_desc)?;
    let data_len = descriptors
        .iter()
        .map(|d| d.offset as usize + 8 * usize::from(d.size))
        .max()
        .unwrap_or(0);
    Ok((descriptors, data_len))
}

fn decode_descriptors(
    raw: &[u8],
    name_size: usize,
    num_desc: usize,
) -> Result<Vec<StatDescriptor>, KvmStatsError> {
    let desc_size = DESC_FIXED_SIZE + name_size;
    (0..num_desc)
        .map(|i| {
            let d = &raw[i * desc_size..(i + 1) * desc_size];
            let name = &d[DESC_FIXED_SIZE..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = std::str::from_utf8(&name[..end])
                .map_err(|_| KvmStatsError::Malformed(format!("descriptor {i}: name not UTF-8")))?;
            let offset = u32_at(d, 8);
            if !offset.is_multiple_of(8) {
                return Err(KvmStatsError::Malformed(format!(
                    "{name}: data offset {offset} is not 8-byte aligned"
                )));
            }
            Ok(StatDescriptor {
                name: name.to_string(),
                kind: StatKind::from_flags(u32_at(d, 0)),
                exponent: i16::from_le_bytes([d[4], d[5]]),
                size: u16::from_le_bytes([d[6], d[7]]),
                offset,
            })
        })
        .collect()
}

/// `after - before` for every statistic in both, signed: instant values
/// (pages mapped now) can go down.
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .filter_map(|(name, &a)| {
            let b = *before.get(name)?;
            Some((name.clone(), a.wrapping_sub(b) as i64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&(-9i16).to_le_bytes());
        d.extend_from_slice(&size.to_le_bytes());
        d.extend_from_slice(&offset.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend_from_slice(&n);
        d
    }

    #[test]
    fn decodes_descriptors() {
        let mut raw = desc(0, 1, 0, "pf_taken", 48);
        raw.extend(desc(1 << 0, 1, 8, "pages_4k", 48));
        raw.extend(desc(3, 32, 16, "halt_poll_hist", 48));
        let d = decode_descriptors(&raw, 48, 3).unwrap();
        assert_eq!(d[0].name, "pf_taken");
        assert_eq!(d[0].kind, StatKind::Cumulative);
        assert_eq!(d[0].exponent, -9);
        assert_eq!(d[1].kind, StatKind::Instant);
        assert_eq!(
            (d[2].kind, d[2].size, d[2].offset),
            (StatKind::Histogram, 32, 16)
        );
        let bad = desc(0, 1, 4, "x", 48);
        assert!(matches!(
            decode_descriptors(&bad, 48, 1),
            Err(KvmStatsError::Malformed(_))
        ));
    }

    #[test]
    fn deltas_are_signed() {
        let before = BTreeMap::from([("a".to_string(), 5u64), ("b".to_string(), 10)]);
        let after = BTreeMap::from([
            ("a".to_string(), 7u64),
            ("b".to_string(), 4),
            ("c".to_string(), 1),
        ]);
        let d = delta(&before, &after);
        assert_eq!(
            d,
            BTreeMap::from([("a".to_string(), 2), ("b".to_string(), -6)])
        );
    }

    #[test]
    fn reads_real_vm_and_vcpu_stats() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let vm_stats = KvmStats::open_vm(&vm).unwrap().read().unwrap();
        assert!(vm_stats.contains_key("remote_tlb_flush"), "{vm_stats:?}");
        let s = KvmStats::open_vcpu(&vcpu).unwrap();
        assert_eq!(s.kind("exits"), Some(StatKind::Cumulative));
        let v = s.read().unwrap();
        assert!(
            v.contains_key("pf_taken") && v.contains_key("exits"),
            "{v:?}"
        );
    }
}
