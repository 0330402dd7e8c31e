//! Port I/O and MMIO dispatch: the VMM routes each guest access to the device
//! whose range holds the address. Devices see offsets, never KVM types.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (PIO or MMIO) of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let below = self.devices.range(..end).next_back();
        if let Some((&other, e)) = below {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device holding `addr..addr+size`, with the offset of `addr` in it.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns false when no device claims the address,
    /// leaving `data` untouched (callers fill it with ones, like open bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A poisoned device lock means another thread panicked inside the device;
/// its state is still the best we have, so keep serving the guest.
fn lock(m: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        // An access that starts inside but runs past the end is refused.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 1, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf01, 0x100, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x1100, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0, 0, dev),
            Err(BusError::BadRange { .. })
        ));
    }
}
