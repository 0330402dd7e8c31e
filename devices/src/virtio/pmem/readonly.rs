//! The guest-physical range of a read-only pmem device, as seen on the MMIO
//! bus. The VMM maps it with a read-only memslot, so reads never leave the
//! guest but each write becomes an MMIO exit. Writes are dropped and counted;
//! the guest sees its store vanish, as with ROM.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use super::device::PmemDevice;
use super::metrics::PmemMetrics;
use crate::bus::BusDevice;
use crate::ratelimit::LogLimiter;

pub struct ReadonlyRegion {
    /// Keeps the mapping behind `host` alive.
    _device: Arc<Mutex<PmemDevice>>,
    host: *const u8,
    size: u64,
    path: String,
    metrics: Arc<PmemMetrics>,
    warn: LogLimiter,
}

// SAFETY: `host` points into the backing mapping owned by `_device`, which
// lives as long as this value; it is only read, and reads of shared memory
// that the guest may change concurrently are benign byte copies.
unsafe impl Send for ReadonlyRegion {}

impl ReadonlyRegion {
    pub fn new(device: Arc<Mutex<PmemDevice>>) -> Self {
        let (host, size, path, metrics) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            let b = d.backing();
            (
                b.host_addr() as *const u8,
                b.size(),
                b.path().display().to_string(),
                d.metrics(),
            )
        };
        Self {
            _device: device,
            host,
            size,
            path,
            metrics,
            warn: LogLimiter::new(4, 10_000),
        }
    }

    /// Length of the bus range to register.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl BusDevice for ReadonlyRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A read-only slot serves reads without exits; this runs only when
        // KVM had to emulate an instruction touching the range.
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.size);
        if !in_range {
            data.fill(0xff);
            return;
        }
        // SAFETY: offset..offset+len lies inside the live mapping (checked
        // above) and `data` is a distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host.add(offset as usize),
                data.as_mut_ptr(),
                data.len(),
            )
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let n = self.metrics.readonly_writes.fetch_add(1, Relaxed) + 1;
        if self.warn.allow() {
            log::warn!(
                "virtio-pmem {}: guest wrote {} bytes at offset {offset:#x} of a read-only device; dropped ({n} so far)",
                self.path,
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::pmem::{PmemBacking, PmemConfig};
    use vm_memory::GuestAddress;

    #[test]
    fn writes_are_dropped_and_counted_reads_see_the_file() {
        let dir = std::env::temp_dir().join(format!("pmemvm-ro-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ro.img");
        let mut content = vec![0u8; 2 << 20];
        content[..5].copy_from_slice(b"hello");
        std::fs::write(&path, &content).unwrap();
        let cfg: PmemConfig = format!("file={},readonly=on", path.display())
            .parse()
            .unwrap();
        let backing = PmemBacking::open(&cfg).unwrap();
        let dev = PmemDevice::new(backing, GuestAddress(1 << 32)).unwrap();
        let metrics = dev.metrics();
        let mut region = ReadonlyRegion::new(Arc::new(Mutex::new(dev)));
        assert_eq!(region.size(), 2 << 20);

        region.write(0, b"XXXXX");
        region.write(8, &[1]);
        let mut d = [0u8; 5];
        region.read(0, &mut d);
        assert_eq!(&d, b"hello");
        let mut tail = [0u8; 4];
        region.read((2 << 20) - 2, &mut tail);
        assert_eq!(tail, [0xff; 4], "a read past the end is open bus");
        assert_eq!(metrics.snapshot().readonly_writes, 2);
        assert_eq!(&std::fs::read(&path).unwrap()[..5], b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
