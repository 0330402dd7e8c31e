//! virtio-pmem counters and flush latency. Updated by the event loop thread,
//! read by anyone through [`PmemMetrics::snapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Everything that can go wrong while serving the request queue. Each kind
/// has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmemErrorKind {
    /// Notification while the device is not active, or the queue is unusable.
    QueueNotReady,
    /// The available ring index claims more chains than the queue holds.
    BadAvailRing,
    /// A descriptor points outside guest memory.
    DescriptorOutOfBounds,
    /// A descriptor's next index leads back into the chain.
    DescriptorLoop,
    /// More descriptors than any pmem request needs.
    ChainTooLong,
    /// An indirect descriptor, which the device does not offer.
    IndirectDescriptor,
    /// The chain ends early: bad head or next index, unreadable descriptor.
    ChainBroken,
    /// Request not device-readable, status not device-writable, or a
    /// readable descriptor after a writable one.
    WrongDirection,
    /// Request shorter than `le32 type` or status shorter than `le32 ret`.
    WrongLength,
    /// Request type other than FLUSH.
    UnknownRequestType,
    /// The writeback serving a flush failed (the guest got status 1).
    WritebackFailed,
    /// Writing a response or the used ring failed.
    ResponseFailed,
    /// Raising the interrupt failed.
    InterruptFailed,
}

impl PmemErrorKind {
    pub const ALL: [PmemErrorKind; 13] = [
        Self::QueueNotReady,
        Self::BadAvailRing,
        Self::DescriptorOutOfBounds,
        Self::DescriptorLoop,
        Self::ChainTooLong,
        Self::IndirectDescriptor,
        Self::ChainBroken,
        Self::WrongDirection,
        Self::WrongLength,
        Self::UnknownRequestType,
        Self::WritebackFailed,
        Self::ResponseFailed,
        Self::InterruptFailed,
    ];

    /// Stable name used as the key in [`PmemStats::errors`].
    pub fn name(self) -> &'static str {
        match self {
            Self::QueueNotReady => "queue_not_ready",
            Self::BadAvailRing => "bad_avail_ring",
            Self::DescriptorOutOfBounds => "descriptor_out_of_bounds",
            Self::DescriptorLoop => "descriptor_loop",
            Self::ChainTooLong => "chain_too_long",
            Self::IndirectDescriptor => "indirect_descriptor",
            Self::ChainBroken => "chain_broken",
            Self::WrongDirection => "wrong_direction",
            Self::WrongLength => "wrong_length",
            Self::UnknownRequestType => "unknown_request_type",
            Self::WritebackFailed => "writeback_failed",
            Self::ResponseFailed => "response_failed",
            Self::InterruptFailed => "interrupt_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters of one virtio-pmem device.
#[derive(Debug)]
pub struct PmemMetrics {
    file: String,
    size: u64,
    /// Valid FLUSH requests received.
    pub flush_requests: AtomicU64,
    /// Writebacks performed (one serves every flush popped in its round).
    pub writebacks: AtomicU64,
    /// Writebacks that returned an error.
    pub writeback_errors: AtomicU64,
    /// Bytes the writebacks reported as written, where they knew.
    pub writeback_bytes: AtomicU64,
    /// Guest writes dropped because the device is read-only.
    pub readonly_writes: AtomicU64,
    errors: [AtomicU64; PmemErrorKind::ALL.len()],
    latency_us: Mutex<Histogram<u64>>,
}

/// Flush latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencyStats {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// A point-in-time copy of [`PmemMetrics`], ready to serialize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PmemStats {
    pub file: String,
    pub size: u64,
    pub flush_requests: u64,
    pub writebacks: u64,
    pub writeback_bytes: u64,
    pub readonly_writes: u64,
    /// From popping the request to writing its response.
    pub flush_latency_us: LatencyStats,
    /// Count per [`PmemErrorKind::name`], all kinds present.
    pub errors: BTreeMap<&'static str, u64>,
}

impl PmemMetrics {
    // The histogram bounds are constants; they cannot fail at run time.
    #[allow(clippy::expect_used)]
    pub fn new(file: String, size: u64) -> Self {
        // 1 µs .. 1 h at 3 significant digits: a few tens of KiB.
        let histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("constant histogram bounds are valid");
        Self {
            file,
            size,
            flush_requests: AtomicU64::new(0),
            writebacks: AtomicU64::new(0),
            writeback_errors: AtomicU64::new(0),
            writeback_bytes: AtomicU64::new(0),
            readonly_writes: AtomicU64::new(0),
            errors: Default::default(),
            latency_us: Mutex::new(histogram),
        }
    }

    pub fn error(&self, kind: PmemErrorKind) {
        self.errors[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error_count(&self, kind: PmemErrorKind) -> u64 {
        self.errors[kind.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn record_flush_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(us);
    }

    pub fn snapshot(&self) -> PmemStats {
        let flush_latency_us = {
            let h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
            if h.is_empty() {
                LatencyStats::default()
            } else {
                LatencyStats {
                    p50: h.value_at_quantile(0.5),
                    p99: h.value_at_quantile(0.99),
                    max: h.max(),
                }
            }
        };
        PmemStats {
            file: self.file.clone(),
            size: self.size,
            flush_requests: self.flush_requests.load(Ordering::Relaxed),
            writebacks: self.writebacks.load(Ordering::Relaxed),
            writeback_bytes: self.writeback_bytes.load(Ordering::Relaxed),
            readonly_writes: self.readonly_writes.load(Ordering::Relaxed),
            flush_latency_us,
            errors: PmemErrorKind::ALL
                .iter()
                .map(|&k| (k.name(), self.error_count(k)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_matches_all() {
        for (i, k) in PmemErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn snapshot_reports_counts_and_percentiles() {
        let m = PmemMetrics::new("/x.img".into(), 2 << 20);
        let empty = m.snapshot();
        assert_eq!(empty.flush_latency_us, LatencyStats::default());
        assert_eq!(empty.errors.len(), PmemErrorKind::ALL.len());
        for us in 1..=100u64 {
            m.record_flush_latency(Duration::from_micros(us * 10));
        }
        m.error(PmemErrorKind::DescriptorLoop);
        m.error(PmemErrorKind::DescriptorLoop);
        m.flush_requests.fetch_add(3, Ordering::Relaxed);
        let s = m.snapshot();
        assert_eq!(s.file, "/x.img");
        assert_eq!(s.size, 2 << 20);
        assert_eq!(s.flush_requests, 3);
        assert_eq!(s.errors["descriptor_loop"], 2);
        assert_eq!(s.errors["wrong_length"], 0);
        // 3 significant digits: exact at these magnitudes.
        assert_eq!(s.flush_latency_us.p50, 500);
        assert_eq!(s.flush_latency_us.p99, 990);
        assert_eq!(s.flush_latency_us.max, 1000);
    }
}
