//! The guest-physical range of a read-only pmem device, as seen on the MMIO
//! bus. The VMM maps it with a read-only memslot, so reads never leave the
//! guest but each write becomes an MMIO exit. Writes are dropped and counted;
//! the guest sees its store vanish, as with ROM.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::device::PmemDevice;
use super::metrics::PmemMetrics;
use crate::bus::BusDevice;
use crate::ratelimit::LogLimiter;

pub struct ReadonlyRegion {
    /// Read with pread, not through the mapping: a file another program
    /// truncated gives a short read here, not a SIGBUS in the VMM.
    file: File,
    size: u64,
    path: String,
    metrics: Arc<PmemMetrics>,
    warn: LogLimiter,
}

impl ReadonlyRegion {
    pub fn new(device: &PmemDevice) -> io::Result<Self> {
        let b = device.backing();
        Ok(Self {
            file: b.file().try_clone()?,
            size: b.size(),
            path: b.path().display().to_string(),
            metrics: device.metrics(),
            warn: LogLimiter::new(4, 10_000),
        })
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
        if let Err(e) = self.file.read_exact_at(data, offset) {
            data.fill(0xff);
            if self.warn.allow() {
                log::warn!("virtio-pmem {}: read at {offset:#x}: {e}", self.path);
            }
        }
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
        let wb = Box::new(crate::virtio::pmem::device::tests::FakeWriteback::default());
        let dev = PmemDevice::new(backing, GuestAddress(1 << 32), wb).unwrap();
        let metrics = dev.metrics();
        let mut region = ReadonlyRegion::new(&dev).unwrap();
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
        // Truncated by another program: reads fail soft, no SIGBUS.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut far = [0u8; 8];
        region.read(1 << 20, &mut far);
        assert_eq!(far, [0xff; 8]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
