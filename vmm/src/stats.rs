//! `--stats PATH`: the JSON record of what the devices did, written when the
//! VM ends.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::kvm_stats::{self, KvmStats};
use crate::pmem::DeviceStats;

#[derive(Debug, thiserror::Error)]
#[error("--stats {path}: {source}")]
pub struct StatsError {
    path: String,
    source: std::io::Error,
}

#[derive(Serialize)]
struct Stats {
    pmem: Vec<DeviceStats>,
}

/// The stats file, created (and truncated) before the guest starts so that a
/// bad path fails at once.
pub struct StatsFile {
    path: PathBuf,
    file: File,
}

impl StatsFile {
    pub fn create(path: &Path) -> Result<Self, StatsError> {
        let file = File::create(path).map_err(|source| stats_err(path, source))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes each device's record, with the VM's KVM counters in each.
    pub fn write(
        mut self,
        pmem: impl IntoIterator<Item = DeviceStats>,
        kvm: Option<KvmCounters>,
    ) -> Result<(), StatsError> {
        let kvm = kvm.map(|k| k.delta()).unwrap_or_default();
        let stats = Stats {
            pmem: pmem
                .into_iter()
                .map(|mut s| {
                    s.kvm = kvm.clone();
                    s
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other);
        if let Ok(j) = json.as_mut() {
            j.push(b'\n');
        }
        json.and_then(|j| self.file.write_all(&j))
            .and_then(|()| self.file.sync_data())
            .map_err(|source| stats_err(&self.path, source))
    }
}

fn stats_err(path: &Path, source: std::io::Error) -> StatsError {
    StatsError {
        path: path.display().to_string(),
        source,
    }
}

/// KVM's binary statistics over the VM's life: the VM's own plus the sum
/// over its vCPUs (pf_taken, pf_fixed, exits, pages_4k, ...).
pub struct KvmCounters {
    vm: KvmStats,
    vcpus: Vec<KvmStats>,
    before: BTreeMap<String, u64>,
}

impl KvmCounters {
    /// `None` (with a warning) where KVM has no binary stats.
    pub fn open(vm: &VmFd, vcpus: &[VcpuFd]) -> Option<Self> {
        let opened = KvmStats::open_vm(vm).and_then(|vm| {
            let vcpus = vcpus
                .iter()
                .map(KvmStats::open_vcpu)
                .collect::<Result<Vec<_>, _>>()?;
            Ok((vm, vcpus))
        });
        match opened {
            Ok((vm, vcpus)) => {
                let mut c = Self {
                    vm,
                    vcpus,
                    before: BTreeMap::new(),
                };
                c.before = c.sample();
                Some(c)
            }
            Err(e) => {
                log::warn!("--stats: no KVM statistics: {e}");
                None
            }
        }
    }

    fn sample(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for stats in std::iter::once(&self.vm).chain(&self.vcpus) {
            match stats.read() {
                Ok(values) => {
                    for (name, v) in values {
                        *all.entry(name).or_insert(0u64) += v;
                    }
                }
                Err(e) => log::warn!("--stats: reading KVM statistics: {e}"),
            }
        }
        all
    }

    /// Change since `open`, for every statistic that changed.
    pub fn delta(&self) -> BTreeMap<String, i64> {
        kvm_stats::delta(&self.before, &self.sample())
            .into_iter()
            .filter(|&(_, d)| d != 0)
            .collect()
    }
}
