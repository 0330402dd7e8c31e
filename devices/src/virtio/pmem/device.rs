//! The virtio-pmem device (virtio 1.2, 5.19): config space, activation and
//! request serving. Requests are served on the event loop thread
//! ([`super::event_handler`]), one writeback per round of popped flushes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::backing::{PmemBacking, Writeback, PMEM_ALIGN};
use super::metrics::{PmemErrorKind, PmemMetrics};
use crate::ratelimit::LogLimiter;
use crate::virtio::{
    guest_warn_limiter, read_config_bytes, warn_limited, ActivateError, VirtioDevice,
    VirtioInterrupt, DEVICE_ID_PMEM,
};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_pmem_req.type` of a flush, the only request type.
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// `virtio_pmem_resp.ret` values. The Linux driver maps non-zero to -EIO.
pub const VIRTIO_PMEM_RESP_OK: u32 = 0;
pub const VIRTIO_PMEM_RESP_EIO: u32 = 1;

/// A request is one readable and one writable descriptor; anything much
/// longer is a broken or hostile driver.
const MAX_CHAIN_DESCS: usize = 16;
/// `le32 type` and `le32 ret`.
const REQ_LEN: usize = 4;

/// Errors creating a [`PmemDevice`].
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("pmem {path}: guest-physical start {start:#x} is not 2 MiB aligned")]
    UnalignedStart { path: String, start: u64 },
    #[error("pmem {path}: region {start:#x}+{size:#x} overflows the guest address space")]
    RegionOverflow { path: String, start: u64, size: u64 },
    #[error("pmem {path}: cannot create the queue eventfd: {source}")]
    QueueEvent {
        path: String,
        source: std::io::Error,
    },
}

/// State that exists only between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// virtio-pmem device backed by a mapped host file.
///
/// Share it as `Arc<Mutex<PmemDevice>>` between the [`crate::virtio::mmio::MmioTransport`]
/// (as `dyn VirtioDevice`) and the event loop (as `MutEventSubscriber`).
pub struct PmemDevice {
    backing: PmemBacking,
    config: [u8; 16],
    writeback: Box<dyn Writeback>,
    queue_events: [EventFd; 1],
    active: Option<Active>,
    metrics: Arc<PmemMetrics>,
    pub(super) warn: LogLimiter,
}

impl PmemDevice {
    /// A device exposing `backing` at guest-physical `guest_start`, serving
    /// flushes with `writeback`: the fault engine's, which knows what is
    /// dirty and how to make it durable.
    pub fn new(
        backing: PmemBacking,
        guest_start: GuestAddress,
        writeback: Box<dyn Writeback>,
    ) -> Result<Self, PmemError> {
        let path = backing.path().display().to_string();
        let start = guest_start.0;
        let size = backing.size();
        if !start.is_multiple_of(PMEM_ALIGN) {
            return Err(PmemError::UnalignedStart { path, start });
        }
        if start.checked_add(size).is_none() {
            return Err(PmemError::RegionOverflow { path, start, size });
        }
        let queue_event =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| PmemError::QueueEvent {
                path: path.clone(),
                source,
            })?;
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&start.to_le_bytes());
        config[8..].copy_from_slice(&size.to_le_bytes());
        Ok(Self {
            metrics: Arc::new(PmemMetrics::new(path, size)),
            backing,
            config,
            writeback,
            queue_events: [queue_event],
            active: None,
            warn: guest_warn_limiter(),
        })
    }

    pub fn backing(&self) -> &PmemBacking {
        &self.backing
    }

    /// Counters; readable from any thread without locking the device (which
    /// stays locked during a writeback).
    pub fn metrics(&self) -> Arc<PmemMetrics> {
        self.metrics.clone()
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub(crate) fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// Serves everything in the request queue: pops all chains, runs one
    /// writeback for all valid flushes among them, then completes every chain
    /// and raises the interrupt once.
    pub(crate) fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            self.metrics.error(PmemErrorKind::QueueNotReady);
            warn_limited!(self.warn, "virtio-pmem: notified while not active");
            return;
        };

        let mut requests = Vec::new();
        let table = DescTable {
            addr: GuestAddress(queue.desc_table()),
            size: queue.size(),
        };
        match queue.iter(&*mem) {
            Ok(chains) => {
                for chain in chains {
                    let parsed = parse_request(chain, mem, table);
                    if let Err(bad) = &parsed {
                        self.metrics.error(bad.kind);
                        warn_limited!(
                            self.warn,
                            "virtio-pmem: bad request at head {}: {}",
                            bad.head,
                            bad.kind.name()
                        );
                    }
                    requests.push(parsed);
                }
            }
            Err(virtio_queue::Error::QueueNotReady) => {
                self.metrics.error(PmemErrorKind::QueueNotReady);
                warn_limited!(self.warn, "virtio-pmem: request queue not ready");
                return;
            }
            Err(e) => {
                self.metrics.error(PmemErrorKind::BadAvailRing);
                warn_limited!(self.warn, "virtio-pmem: cannot read available ring: {e}");
                return;
            }
        }

        let flushes = requests.iter().filter(|r| r.is_ok()).count() as u64;
        let flush_status = if flushes == 0 {
            VIRTIO_PMEM_RESP_OK
        } else {
            let m = &self.metrics;
            m.flush_requests.fetch_add(flushes, Relaxed);
            m.writebacks.fetch_add(1, Relaxed);
            match self.writeback.writeback() {
                Ok(report) => {
                    m.writeback_bytes
                        .fetch_add(report.bytes.unwrap_or(0), Relaxed);
                    VIRTIO_PMEM_RESP_OK
                }
                Err(e) => {
                    m.writeback_errors.fetch_add(1, Relaxed);
                    m.error(PmemErrorKind::WritebackFailed);
                    warn_limited!(
                        self.warn,
                        "virtio-pmem: writeback of {} failed: {e}",
                        self.backing.path().display()
                    );
                    VIRTIO_PMEM_RESP_EIO
                }
            }
        };

        // Responses only now: a successful status means the data is durable.
        let mut completed = 0;
        for request in requests {
            let (head, status, ret, popped_at) = match request {
                Ok(f) => (f.head, Some(f.status), flush_status, Some(f.popped_at)),
                Err(b) => (b.head, b.status, VIRTIO_PMEM_RESP_EIO, None),
            };
            let mut used_len = 0;
            if let Some(status) = status {
                if status.write(mem, ret) {
                    used_len = REQ_LEN as u32;
                } else {
                    self.metrics.error(PmemErrorKind::ResponseFailed);
                }
            }
            if let Some(popped_at) = popped_at {
                self.metrics.record_flush_latency(popped_at.elapsed());
            }
            // A head outside the table cannot be returned; the driver loses
            // that entry, which only hurts itself.
            if head >= queue.size() {
                continue;
            }
            match queue.add_used(&*mem, head, used_len) {
                Ok(()) => completed += 1,
                Err(e) => {
                    self.metrics.error(PmemErrorKind::ResponseFailed);
                    warn_limited!(self.warn, "virtio-pmem: cannot complete head {head}: {e}");
                }
            }
        }

        if completed > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = interrupt.signal_used_queue() {
                self.metrics.error(PmemErrorKind::InterruptFailed);
                warn_limited!(self.warn, "virtio-pmem: interrupt failed: {e}");
            }
        }
    }
}

/// Where `le32 ret` goes: the first 4 bytes of the chain's device-writable
/// buffers, usually a single descriptor.
struct StatusBuffer {
    parts: Vec<(GuestAddress, usize)>,
}

impl StatusBuffer {
    /// `None` when the writable buffers hold fewer than 4 bytes.
    fn from_writable(bufs: &[(GuestAddress, usize)]) -> Option<Self> {
        let mut parts = Vec::new();
        let mut need = REQ_LEN;
        for &(addr, len) in bufs {
            if need == 0 {
                break;
            }
            let n = len.min(need);
            if n > 0 {
                parts.push((addr, n));
                need -= n;
            }
        }
        (need == 0).then_some(Self { parts })
    }

    fn write(&self, mem: &GuestMemoryMmap, ret: u32) -> bool {
        let bytes = ret.to_le_bytes();
        let mut done = 0;
        for &(addr, n) in &self.parts {
            if mem.write_slice(&bytes[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        true
    }
}

/// A valid FLUSH request, waiting for its round's writeback.
struct FlushRequest {
    head: u16,
    status: StatusBuffer,
    popped_at: Instant,
}

/// A request refused without a writeback. Gets status 1 where it has room
/// for one, else completes with used length 0.
struct BadRequest {
    head: u16,
    kind: PmemErrorKind,
    status: Option<StatusBuffer>,
}

fn read_le32(mem: &GuestMemoryMmap, bufs: &[(GuestAddress, usize)]) -> Option<u32> {
    let mut bytes = [0u8; REQ_LEN];
    let mut done = 0;
    for &(addr, len) in bufs {
        if done == REQ_LEN {
            break;
        }
        let n = len.min(REQ_LEN - done);
        mem.read_slice(&mut bytes[done..done + n], addr).ok()?;
        done += n;
    }
    (done == REQ_LEN).then_some(u32::from_le_bytes(bytes))
}

/// The queue's descriptor table, read directly for what the chain iterator
/// hides: virtio-queue follows indirect descriptors on its own, but this
/// device does not offer VIRTIO_RING_F_INDIRECT_DESC, so a chain using one
/// is refused before it is walked.
#[derive(Clone, Copy)]
struct DescTable {
    addr: GuestAddress,
    size: u16,
}

impl DescTable {
    fn chain_has_indirect(self, mem: &GuestMemoryMmap, head: u16) -> bool {
        let mut index = head;
        for _ in 0..MAX_CHAIN_DESCS.min(usize::from(self.size)) {
            let Some(addr) = self.addr.checked_add(u64::from(index) * 16) else {
                return false;
            };
            // Unreadable descriptors are the iterator's to report.
            let Ok(desc) = mem.read_obj::<virtio_queue::desc::split::Descriptor>(addr) else {
                return false;
            };
            if desc.refers_to_indirect_table() {
                return true;
            }
            if !desc.has_next() || desc.next() >= self.size {
                return false;
            }
            index = desc.next();
        }
        false
    }
}

/// Validates one chain. Makes no assumption about how the request and the
/// status are split across descriptors (virtio 1.2, 2.7.4), only that all
/// readable descriptors come first.
fn parse_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    table: DescTable,
) -> Result<FlushRequest, BadRequest> {
    let popped_at = Instant::now();
    let head = chain.head_index();
    let bad = |kind, status| Err(BadRequest { head, kind, status });
    if table.chain_has_indirect(mem, head) {
        return bad(PmemErrorKind::IndirectDescriptor, None);
    }

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut misordered = false;
    let mut ended = false;
    // Loop detection by descriptor index; no indirect descriptors are
    // offered, so indices all refer to the one table.
    let mut visited = vec![head];
    for desc in chain {
        if readable.len() + writable.len() == MAX_CHAIN_DESCS {
            return bad(PmemErrorKind::ChainTooLong, None);
        }
        let buf = (desc.addr(), desc.len() as usize);
        if desc.is_write_only() {
            writable.push(buf);
        } else {
            misordered |= !writable.is_empty();
            readable.push(buf);
        }
        if !desc.has_next() {
            ended = true;
            break;
        }
        if visited.contains(&desc.next()) {
            return bad(PmemErrorKind::DescriptorLoop, None);
        }
        visited.push(desc.next());
    }
    // The iterator stopped while the chain still had a next: bad head or
    // next index, or an unreadable descriptor.
    if !ended {
        return bad(PmemErrorKind::ChainBroken, None);
    }

    let in_memory = |bufs: &[(GuestAddress, usize)], access| {
        bufs.iter()
            .all(|&(addr, len)| mem.check_range(addr, len, access))
    };
    let writable_ok = in_memory(&writable, Permissions::Write);
    let status = if writable_ok {
        StatusBuffer::from_writable(&writable)
    } else {
        None
    };
    if misordered || readable.is_empty() || writable.is_empty() {
        return bad(PmemErrorKind::WrongDirection, status);
    }
    if !writable_ok || !in_memory(&readable, Permissions::Read) {
        return bad(PmemErrorKind::DescriptorOutOfBounds, status);
    }
    let Some(status) = status else {
        return bad(PmemErrorKind::WrongLength, None);
    };
    let Some(req_type) = read_le32(mem, &readable) else {
        return bad(PmemErrorKind::WrongLength, Some(status));
    };
    if req_type != VIRTIO_PMEM_REQ_TYPE_FLUSH {
        return bad(PmemErrorKind::UnknownRequestType, Some(status));
    }
    Ok(FlushRequest {
        head,
        status,
        popped_at,
    })
}

impl VirtioDevice for PmemDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        // No VIRTIO_PMEM_F_SHMEM_REGION, no EVENT_IDX, no indirect
        // descriptors: the transport adds VERSION_1.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if !read_config_bytes(&self.config, offset, data) {
            // Config reads come from the guest, but only at probe: a plain
            // log line is enough here.
            log::warn!(
                "virtio-pmem: config read of {} bytes at {offset:#x} out of range",
                data.len()
            );
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_limited!(
            self.warn,
            "virtio-pmem: config is read-only, write of {} bytes at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        // virtio-queue treats an available ring at address 0 as never set
        // up and would refuse every request on it: refuse the queue now.
        if !queue.is_valid(&mem) || queue.avail_ring() == 0 {
            return Err(ActivateError::QueueInvalid { index: 0 });
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::pmem::backing::tests::TempPath;
    use crate::virtio::pmem::backing::{PmemConfig, WritebackReport};
    use crate::Interrupt;
    use std::io;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    pub(crate) const DESC: u64 = 0x0;
    pub(crate) const AVAIL: u64 = 0x1000;
    pub(crate) const USED: u64 = 0x2000;
    const BUFS: u64 = 0x10000;
    const MEM_SIZE: u64 = 0x40000;
    pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const READ: u16 = 0;

    /// The driver side of the request queue, laid out by hand.
    #[derive(Clone)]
    pub(crate) struct Driver {
        pub(crate) mem: GuestMemoryMmap,
    }

    impl Driver {
        pub(crate) fn new() -> Self {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            Driver { mem }
        }

        pub(crate) fn queue(&self) -> Queue {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_ready(true);
            q
        }

        pub(crate) fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC + 16 * u64::from(index));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, at).unwrap();
        }

        pub(crate) fn publish(&self, head: u16) {
            let idx: u16 = self.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            let slot = AVAIL + 4 + 2 * u64::from(idx % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// Per-head request and status buffers.
        pub(crate) fn req_addr(head: u16) -> u64 {
            BUFS + 64 * u64::from(head)
        }
        pub(crate) fn status_addr(head: u16) -> u64 {
            Self::req_addr(head) + 16
        }

        /// A well-formed request using descriptors `head` and `head + 1`.
        pub(crate) fn request(&self, head: u16, req_type: u32) {
            self.mem
                .write_obj(req_type, GuestAddress(Self::req_addr(head)))
                .unwrap();
            self.mem
                .write_obj(u32::MAX, GuestAddress(Self::status_addr(head)))
                .unwrap();
            self.desc(head, Self::req_addr(head), 4, NEXT, head + 1);
            self.desc(head + 1, Self::status_addr(head), 4, WRITE, 0);
            self.publish(head);
        }

        pub(crate) fn u32_at(&self, addr: u64) -> u32 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        pub(crate) fn status(&self, head: u16) -> u32 {
            self.u32_at(Self::status_addr(head))
        }

        pub(crate) fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// (head, len) of used ring entry `i`.
        pub(crate) fn used(&self, i: u16) -> (u32, u32) {
            let at = USED + 4 + 8 * u64::from(i % QUEUE_SIZE);
            (self.u32_at(at), self.u32_at(at + 4))
        }
    }

    type Hook = Box<dyn FnMut() + Send>;

    /// Counts calls, can fail, and can run a hook mid-writeback.
    #[derive(Clone, Default)]
    pub(crate) struct FakeWriteback {
        pub(crate) calls: Arc<AtomicUsize>,
        pub(crate) fail: Arc<AtomicBool>,
        during: Arc<Mutex<Option<Hook>>>,
    }

    impl Writeback for FakeWriteback {
        fn writeback(&mut self) -> io::Result<WritebackReport> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(hook) = self.during.lock().unwrap().as_mut() {
                hook();
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("disk on fire"));
            }
            Ok(WritebackReport {
                pages: Some(1),
                bytes: Some(4096),
            })
        }
    }

    #[derive(Default)]
    pub(crate) struct CountingIrq(pub(crate) AtomicUsize);
    impl Interrupt for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    pub(crate) struct Fixture {
        pub(crate) dev: PmemDevice,
        pub(crate) drv: Driver,
        pub(crate) wb: FakeWriteback,
        pub(crate) irq: Arc<CountingIrq>,
        pub(crate) interrupt: Arc<VirtioInterrupt>,
    }

    impl Fixture {
        pub(crate) fn calls(&self) -> usize {
            self.wb.calls.load(Ordering::SeqCst)
        }
        pub(crate) fn irqs(&self) -> usize {
            self.irq.0.load(Ordering::SeqCst)
        }
        fn errors(&self, kind: PmemErrorKind) -> u64 {
            self.dev.metrics().error_count(kind)
        }
        fn only_error(&self, kind: PmemErrorKind, count: u64) {
            for k in PmemErrorKind::ALL {
                let want = if k == kind { count } else { 0 };
                assert_eq!(self.errors(k), want, "{}", k.name());
            }
        }
    }

    pub(crate) fn device(wb: FakeWriteback) -> PmemDevice {
        let p = TempPath::new("device");
        let config: PmemConfig = format!("file={},size=2M", p.0.display()).parse().unwrap();
        // The open fd keeps the file alive after TempPath removes its name.
        let backing = PmemBacking::open(&config).unwrap();
        PmemDevice::new(backing, GuestAddress(0x1_0000_0000), Box::new(wb)).unwrap()
    }

    pub(crate) fn fixture() -> Fixture {
        let wb = FakeWriteback::default();
        let mut dev = device(wb.clone());
        let drv = Driver::new();
        let irq = Arc::new(CountingIrq::default());
        let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
        dev.activate(drv.mem.clone(), vec![drv.queue()], interrupt.clone())
            .unwrap();
        Fixture {
            dev,
            drv,
            wb,
            irq,
            interrupt,
        }
    }

    #[test]
    fn config_space_holds_start_and_size() {
        let dev = device(FakeWriteback::default());
        let mut start = [0u8; 8];
        dev.read_config(0, &mut start);
        assert_eq!(u64::from_le_bytes(start), 0x1_0000_0000);
        let mut size = [0u8; 4];
        dev.read_config(8, &mut size);
        assert_eq!(u32::from_le_bytes(size), 2 << 20);
        let mut beyond = [0xffu8; 4];
        dev.read_config(14, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        assert_eq!(dev.device_type(), 27);
        assert_eq!(dev.queue_max_sizes(), &[256]);
    }

    #[test]
    fn start_must_be_2mib_aligned() {
        let p = TempPath::new("unaligned");
        let config: PmemConfig = format!("file={},size=2M", p.0.display()).parse().unwrap();
        let backing = PmemBacking::open(&config).unwrap();
        let wb = Box::new(FakeWriteback::default());
        let e = PmemDevice::new(backing, GuestAddress(0x1000), wb)
            .err()
            .unwrap();
        assert!(matches!(e, PmemError::UnalignedStart { .. }), "{e}");
    }

    #[test]
    fn good_flush_is_written_back_then_answered() {
        let mut f = fixture();
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_OK);
        assert_eq!(f.drv.used_idx(), 1);
        assert_eq!(f.drv.used(0), (0, 4));
        assert_eq!(f.irqs(), 1);
        assert_eq!(f.interrupt.status(), crate::virtio::INTERRUPT_USED_RING);
        let s = f.dev.metrics().snapshot();
        assert_eq!(
            (s.flush_requests, s.writebacks, s.writeback_bytes),
            (1, 1, 4096)
        );
        f.only_error(PmemErrorKind::QueueNotReady, 0);
        // Nothing new: no writeback, no interrupt.
        f.dev.process_queue();
        assert_eq!((f.calls(), f.irqs()), (1, 1));
    }

    #[test]
    fn one_writeback_serves_a_whole_round() {
        let mut f = fixture();
        for head in [0, 2, 4] {
            f.drv.request(head, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        }
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.used_idx(), 3);
        for (i, head) in [0u16, 2, 4].into_iter().enumerate() {
            assert_eq!(f.drv.used(i as u16), (u32::from(head), 4));
            assert_eq!(f.drv.status(head), VIRTIO_PMEM_RESP_OK);
        }
        assert_eq!(f.irqs(), 1);
        let s = f.dev.metrics().snapshot();
        assert_eq!((s.flush_requests, s.writebacks), (3, 1));
    }

    #[test]
    fn requests_arriving_during_a_writeback_wait_for_the_next() {
        let mut f = fixture();
        let drv = f.drv.clone();
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let seen = statuses.clone();
        *f.wb.during.lock().unwrap() = Some(Box::new(move || {
            // The first request must not be answered before its writeback.
            seen.lock().unwrap().push(drv.status(0));
            if seen.lock().unwrap().len() == 1 {
                drv.request(10, VIRTIO_PMEM_REQ_TYPE_FLUSH);
            }
        }));
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.used_idx(), 1);
        assert_eq!(f.drv.status(10), u32::MAX, "answered without a writeback");
        f.dev.process_queue();
        assert_eq!(f.calls(), 2);
        assert_eq!(f.drv.used_idx(), 2);
        assert_eq!(f.drv.used(1), (10, 4));
        assert_eq!(f.drv.status(10), VIRTIO_PMEM_RESP_OK);
        assert_eq!(
            *statuses.lock().unwrap(),
            vec![u32::MAX, VIRTIO_PMEM_RESP_OK]
        );
    }

    #[test]
    fn failed_writeback_answers_eio() {
        let mut f = fixture();
        f.wb.fail.store(true, Ordering::SeqCst);
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.status(2), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.used(1), (2, 4));
        f.only_error(PmemErrorKind::WritebackFailed, 1);
        assert_eq!(f.dev.metrics().writeback_errors.load(Ordering::SeqCst), 1);
        // The device keeps going once the writeback recovers.
        f.wb.fail.store(false, Ordering::SeqCst);
        f.drv.request(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.drv.status(4), VIRTIO_PMEM_RESP_OK);
    }

    #[test]
    fn unknown_request_type_fails_without_writeback() {
        let mut f = fixture();
        f.drv.request(0, 1);
        f.dev.process_queue();
        assert_eq!(f.calls(), 0);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.used(0), (0, 4));
        assert_eq!(f.irqs(), 1);
        f.only_error(PmemErrorKind::UnknownRequestType, 1);
    }

    #[test]
    fn bad_and_good_requests_in_one_round() {
        let mut f = fixture();
        f.drv.request(0, 7);
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.status(2), VIRTIO_PMEM_RESP_OK);
        assert_eq!(f.drv.used_idx(), 2);
        assert_eq!(f.irqs(), 1);
    }

    #[test]
    fn split_request_and_status_are_accepted() {
        let mut f = fixture();
        let req = Driver::req_addr(0);
        f.drv.mem.write_obj(0u32, GuestAddress(req)).unwrap();
        let st = Driver::status_addr(0);
        f.drv.mem.write_obj(u32::MAX, GuestAddress(st)).unwrap();
        f.drv.desc(0, req, 1, NEXT, 1);
        f.drv.desc(1, req + 1, 3, NEXT, 2);
        f.drv.desc(2, st, 2, WRITE | NEXT, 3);
        f.drv.desc(3, st + 2, 8, WRITE, 0);
        f.drv.publish(0);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_OK);
        assert_eq!(f.drv.used(0), (0, 4));
    }

    #[test]
    fn short_request_or_status_is_refused() {
        let mut f = fixture();
        // 2-byte request: status 1.
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(0, Driver::req_addr(0), 2, NEXT, 1);
        // 2-byte status: no room for an answer, nothing written past it.
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(3, Driver::status_addr(2), 2, WRITE, 0);
        f.dev.process_queue();
        assert_eq!(f.calls(), 0);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.used(0), (0, 4));
        assert_eq!(f.drv.status(2), u32::MAX);
        assert_eq!(f.drv.used(1), (2, 0));
        f.only_error(PmemErrorKind::WrongLength, 2);
    }

    #[test]
    fn wrong_directions_are_refused() {
        let mut f = fixture();
        // Status descriptor not writable: nowhere to answer.
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(1, Driver::status_addr(0), 4, READ, 0);
        // Request descriptor writable: the answer lands in the chain's
        // first writable bytes, never elsewhere.
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(2, Driver::req_addr(2), 4, WRITE | NEXT, 3);
        // Readable after writable.
        f.drv.request(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(4, Driver::status_addr(4), 4, WRITE | NEXT, 5);
        f.drv.desc(5, Driver::req_addr(4), 4, READ, 0);
        f.dev.process_queue();
        assert_eq!(f.calls(), 0);
        assert_eq!(f.drv.used_idx(), 3);
        assert_eq!(f.drv.status(0), u32::MAX);
        assert_eq!(f.drv.used(0), (0, 0));
        assert_eq!(f.drv.u32_at(Driver::req_addr(2)), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.status(2), u32::MAX);
        assert_eq!(f.drv.used(1), (2, 4));
        assert_eq!(f.drv.status(4), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.used(2), (4, 4));
        f.only_error(PmemErrorKind::WrongDirection, 3);
    }

    #[test]
    fn addresses_outside_guest_memory_are_refused() {
        let mut f = fixture();
        // Request beyond memory, and straddling its end.
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(0, MEM_SIZE + 0x1000, 4, NEXT, 1);
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(2, MEM_SIZE - 2, 4, NEXT, 3);
        // Status beyond memory; and a huge status length.
        f.drv.request(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(5, u64::MAX - 1, 4, WRITE, 0);
        f.drv.request(6, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(7, Driver::status_addr(6), 0x1000_0000, WRITE, 0);
        f.dev.process_queue();
        assert_eq!(f.calls(), 0);
        assert_eq!(f.drv.used_idx(), 4);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.status(2), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(f.drv.used(2), (4, 0));
        assert_eq!(f.drv.used(3), (6, 0));
        assert_eq!(f.drv.status(6), u32::MAX);
        f.only_error(PmemErrorKind::DescriptorOutOfBounds, 4);
    }

    #[test]
    fn descriptor_loops_are_refused() {
        let mut f = fixture();
        // 0 -> 1 -> 0
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(1, Driver::status_addr(0), 4, WRITE | NEXT, 0);
        // 2 -> 2
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(2, Driver::req_addr(2), 4, NEXT, 2);
        f.dev.process_queue();
        assert_eq!(f.calls(), 0);
        assert_eq!(f.drv.used_idx(), 2);
        assert_eq!(f.drv.used(0), (0, 0));
        assert_eq!(f.drv.used(1), (2, 0));
        assert_eq!(f.drv.status(0), u32::MAX);
        f.only_error(PmemErrorKind::DescriptorLoop, 2);
    }

    #[test]
    fn indirect_descriptors_are_refused() {
        let mut f = fixture();
        // Head 0 points at an indirect table holding a well-formed flush.
        let table = 0x30000;
        let (req, status) = (0x30100u64, 0x30110u64);
        f.drv.mem.write_obj(0u32, GuestAddress(req)).unwrap();
        f.drv.mem.write_obj(u32::MAX, GuestAddress(status)).unwrap();
        for (i, (addr, flags, next)) in [(req, NEXT, 1u16), (status, WRITE, 0)]
            .into_iter()
            .enumerate()
        {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&4u32.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            f.drv
                .mem
                .write_slice(&raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        f.drv.desc(0, table, 32, VRING_DESC_F_INDIRECT as u16, 0);
        f.drv.publish(0);
        // A good request after it is still served.
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.drv.used(0), (0, 0));
        assert_eq!(
            f.drv.u32_at(status),
            u32::MAX,
            "the indirect status was written"
        );
        assert_eq!(f.drv.status(2), VIRTIO_PMEM_RESP_OK);
        assert_eq!(f.calls(), 1);
        f.only_error(PmemErrorKind::IndirectDescriptor, 1);
    }

    #[test]
    fn avail_ring_at_zero_is_refused() {
        let mut dev = device(FakeWriteback::default());
        let drv = Driver::new();
        let irq: Arc<dyn Interrupt> = Arc::new(CountingIrq::default());
        let mut q = drv.queue();
        q.try_set_desc_table_address(GuestAddress(0x8000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        let e = dev.activate(
            drv.mem.clone(),
            vec![q],
            Arc::new(VirtioInterrupt::new(irq)),
        );
        assert!(matches!(e, Err(ActivateError::QueueInvalid { index: 0 })));
    }

    #[test]
    fn overlong_chains_are_refused() {
        let mut f = fixture();
        let n = MAX_CHAIN_DESCS as u16 + 1;
        for i in 0..n {
            f.drv.desc(i, Driver::req_addr(0), 1, NEXT, i + 1);
        }
        f.drv.desc(n, Driver::status_addr(0), 4, WRITE, 0);
        f.drv.publish(0);
        f.dev.process_queue();
        assert_eq!(f.drv.used(0), (0, 0));
        f.only_error(PmemErrorKind::ChainTooLong, 1);
    }

    #[test]
    fn broken_chains_do_not_stop_the_device() {
        let mut f = fixture();
        // Head outside the descriptor table: cannot even be completed.
        f.drv.publish(QUEUE_SIZE + 3);
        // Next index outside the table.
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.drv.desc(0, Driver::req_addr(0), 4, NEXT, 999);
        f.drv.request(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.calls(), 1);
        assert_eq!(f.drv.used_idx(), 2);
        assert_eq!(f.drv.used(0), (0, 0));
        assert_eq!(f.drv.used(1), (2, 4));
        assert_eq!(f.drv.status(2), VIRTIO_PMEM_RESP_OK);
        f.only_error(PmemErrorKind::ChainBroken, 2);
    }

    #[test]
    fn bogus_avail_index_is_refused() {
        let mut f = fixture();
        f.drv
            .mem
            .write_obj(QUEUE_SIZE + 1, GuestAddress(AVAIL + 2))
            .unwrap();
        f.dev.process_queue();
        assert_eq!(f.drv.used_idx(), 0);
        f.only_error(PmemErrorKind::BadAvailRing, 1);
    }

    #[test]
    fn queue_not_ready() {
        let mut dev = device(FakeWriteback::default());
        dev.process_queue();
        assert_eq!(dev.metrics().error_count(PmemErrorKind::QueueNotReady), 1);

        let drv = Driver::new();
        let irq: Arc<dyn Interrupt> = Arc::new(CountingIrq::default());
        let interrupt = Arc::new(VirtioInterrupt::new(irq));
        let mut q = drv.queue();
        q.set_ready(false);
        let e = dev.activate(drv.mem.clone(), vec![q], interrupt.clone());
        assert!(matches!(e, Err(ActivateError::QueueNotReady { index: 0 })));
        let mut q = drv.queue();
        q.try_set_used_ring_address(GuestAddress(MEM_SIZE)).unwrap();
        let e = dev.activate(drv.mem.clone(), vec![q], interrupt.clone());
        assert!(matches!(e, Err(ActivateError::QueueInvalid { index: 0 })));
        let e = dev.activate(drv.mem.clone(), vec![], interrupt.clone());
        assert!(matches!(e, Err(ActivateError::QueueCount { got: 0, .. })));
        assert!(!dev.is_active());
        dev.activate(drv.mem.clone(), vec![drv.queue()], interrupt.clone())
            .unwrap();
        assert!(matches!(
            dev.activate(drv.mem.clone(), vec![drv.queue()], interrupt),
            Err(ActivateError::AlreadyActive)
        ));
    }

    #[test]
    fn reset_stops_serving_until_reactivated() {
        let mut f = fixture();
        f.dev.reset();
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        assert_eq!(f.drv.used_idx(), 0);
        f.only_error(PmemErrorKind::QueueNotReady, 1);
        f.dev
            .activate(f.drv.mem.clone(), vec![f.drv.queue()], f.interrupt.clone())
            .unwrap();
        f.dev.process_queue();
        assert_eq!(f.drv.used_idx(), 1);
        assert_eq!(f.drv.status(0), VIRTIO_PMEM_RESP_OK);
    }

    #[test]
    fn flush_latency_is_recorded() {
        let mut f = fixture();
        *f.wb.during.lock().unwrap() = Some(Box::new(|| {
            std::thread::sleep(std::time::Duration::from_millis(20))
        }));
        f.drv.request(0, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        f.dev.process_queue();
        let lat = f.dev.metrics().snapshot().flush_latency_us;
        assert!(lat.max >= 20_000, "{lat:?}");
        assert!(lat.p50 >= 20_000 && lat.p50 <= lat.max, "{lat:?}");
    }
}
