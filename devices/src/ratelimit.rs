//! Rate limits for logging guest-triggered events: a misbehaving guest must
//! not be able to flood the host's log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets the first `burst` events through, then one in every `every`.
pub struct LogLimiter {
    seen: AtomicU64,
    burst: u64,
    every: u64,
}

impl LogLimiter {
    pub const fn new(burst: u64, every: u64) -> Self {
        Self {
            seen: AtomicU64::new(0),
            burst,
            every,
        }
    }

    /// Counts one event; true when this one should be logged.
    pub fn allow(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        n < self.burst || (self.every > 0 && (n - self.burst) % self.every == self.every - 1)
    }

    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_sampled() {
        let l = LogLimiter::new(3, 100);
        let allowed: Vec<u64> = (1..=1000).filter(|_| l.allow()).collect();
        assert_eq!(allowed.len(), 3 + 9);
        assert_eq!(&allowed[..4], &[1, 2, 3, 103]);
        assert_eq!(l.count(), 1000);
    }
}
