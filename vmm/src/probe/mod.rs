//! The fault-cost lab: a built-in probe guest that needs no kernel, for
//! measuring what guest page faults, first writes (mkwrite) and virtio-pmem
//! flushes cost with each fault engine.
//!
//! - [`kvm_stats`]: KVM's binary statistics, reusable by the main VMM.

pub mod kvm_stats;

pub use kvm_stats::{KvmStats, KvmStatsError};
