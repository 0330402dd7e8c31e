//! The checks behind pmemvm's fuzz targets, one public function per target.
//!
//! Each function takes one fuzz input, drives the device code with it and
//! panics when the code panics or breaks a property the guest relies on.
//! The cargo-fuzz binaries in `fuzz/fuzz_targets/` call them through this
//! crate; `devices/tests/fuzz_corpus.rs` includes this very file with
//! `#[path]` and replays every committed corpus file under `cargo test`, so
//! both always run the same checks. Hence this file only uses what the
//! devices crate's tests can use (its dependencies), no fuzzing crate.
//!
//! Input formats (all integers little-endian; reads past the end of the
//! input yield zeros):
//!
//! * [`mmio_registers`]: a list of operations on the virtio-mmio window of a
//!   virtio-pmem device, reached through a [`Bus`]. See [`MmioOp`].
//! * [`pmem_requests`]: an 8-byte header (queue size, flags, ring addresses)
//!   followed by the initial contents of a 64 KiB guest memory. See
//!   [`pmem_requests`].
//! * [`pmem_options`]: a string (invalid UTF-8 replaced), parsed as a
//!   `--pmem` value and as a size.

use std::cell::RefCell;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::Bus;
use devices::size::parse_size;
use devices::virtio::mmio::{reg, MmioTransport, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::pmem::{
    EngineConfig, PmemBacking, PmemConfig, PmemDevice, PmemErrorKind, UffdConfig, Writeback,
    WritebackReport, MAX_POLL_US, MAX_POPULATE, QUEUE_SIZE, VIRTIO_PMEM_REQ_TYPE_FLUSH,
    VIRTIO_PMEM_RESP_OK,
};
use devices::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use devices::virtio::{VirtioDevice, VirtioInterrupt, DEVICE_ID_PMEM};
use devices::Interrupt;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical start and size the pmem device reports in its config.
const PMEM_START: u64 = 0x1_0000_0000;
const PMEM_SIZE: u64 = 2 << 20;

// ---------------------------------------------------------------------------
// Shared rig: one device per thread, reset before every input.
// ---------------------------------------------------------------------------

/// Counts interrupts; never fails.
#[derive(Default)]
struct Irq(AtomicUsize);

impl Interrupt for Irq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A writeback that costs nothing (no fdatasync per input) and fails on
/// demand, so inputs reach the EIO path too.
struct FuzzWriteback {
    fail: Arc<AtomicBool>,
}

impl Writeback for FuzzWriteback {
    fn writeback(&mut self) -> io::Result<WritebackReport> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "writeback failure chosen by the fuzz input",
            ));
        }
        Ok(WritebackReport::default())
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio-pmem device on a 2 MiB backing file, served by an event loop
/// exactly as the VMM serves it. Built once per thread (the backing file
/// and its mapping are the expensive part) and reset before every input,
/// which leaves only counters behind.
struct Rig {
    dev: Arc<Mutex<PmemDevice>>,
    em: EventManager<Subscriber>,
    fail_writeback: Arc<AtomicBool>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a fresh sparse 2 MiB backing file and removes its name at once: the
/// open descriptor keeps it alive, and nothing is left behind.
fn temp_backing() -> PmemBacking {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "pmemvm-fuzz-{}-{}.img",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let config: PmemConfig = format!("file={},size=2M", path.display())
        .parse()
        .unwrap_or_else(|e| panic!("fuzz rig: backing file option for {path:?}: {e}"));
    let backing = PmemBacking::open(&config)
        .unwrap_or_else(|e| panic!("fuzz rig: cannot open a backing file: {e}"));
    let _ = std::fs::remove_file(&path);
    backing
}

impl Rig {
    fn new() -> Self {
        let fail_writeback = Arc::new(AtomicBool::new(false));
        let writeback = FuzzWriteback {
            fail: fail_writeback.clone(),
        };
        let dev = PmemDevice::new(
            temp_backing(),
            GuestAddress(PMEM_START),
            Box::new(writeback),
        )
        .unwrap_or_else(|e| panic!("fuzz rig: cannot create the device: {e}"));
        let dev = Arc::new(Mutex::new(dev));
        let mut em: EventManager<Subscriber> =
            EventManager::new().unwrap_or_else(|e| panic!("fuzz rig: event manager: {e:?}"));
        em.add_subscriber(dev.clone());
        Self {
            dev,
            em,
            fail_writeback,
        }
    }

    /// Forgets the previous input: device inactive, no pending kick.
    fn start(&self, fail_writeback: bool) {
        let mut dev = lock(&self.dev);
        dev.reset();
        // Nonblocking: an error only means nothing was pending.
        let _ = dev.queue_events()[0].read();
        self.fail_writeback.store(fail_writeback, Ordering::SeqCst);
    }

    /// Serves whatever notification is pending, like one turn of the VMM's
    /// event loop. Returns the number of events dispatched.
    fn run_event_loop(&mut self) -> usize {
        self.em
            .run_with_timeout(0)
            .unwrap_or_else(|e| panic!("fuzz rig: event loop: {e:?}"))
    }

    /// Kicks the queue the way an ioeventfd does, then serves it.
    fn notify_and_serve(&mut self) {
        let kicked = lock(&self.dev).queue_events()[0].write(1);
        kicked.unwrap_or_else(|e| panic!("fuzz rig: queue eventfd: {e}"));
        assert_eq!(
            self.run_event_loop(),
            1,
            "the queue kick was not dispatched"
        );
    }

    fn is_active(&self) -> bool {
        lock(&self.dev).is_active()
    }

    fn error_count(&self, kind: PmemErrorKind) -> u64 {
        lock(&self.dev).metrics().error_count(kind)
    }
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn with_rig<R>(f: impl FnOnce(&mut Rig) -> R) -> R {
    RIG.with(|cell| {
        let mut slot = cell.borrow_mut();
        // A panic inside the device (a finding, when replaying the corpus)
        // poisons its lock, and the event manager unwraps that lock: start
        // over with a new device rather than fail every later input.
        if slot.as_ref().is_some_and(|rig| rig.dev.is_poisoned()) {
            *slot = None;
        }
        f(slot.get_or_insert_with(Rig::new))
    })
}

/// Reads the fuzz input front to back; past its end, zeros.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        b
    }

    /// Up to `n` bytes, little-endian, zero-extended.
    fn uint(&mut self, n: usize) -> u64 {
        let take = n.min(self.data.len());
        let mut bytes = [0u8; 8];
        bytes[..take].copy_from_slice(&self.data[..take]);
        self.data = &self.data[take..];
        u64::from_le_bytes(bytes)
    }

    fn u16(&mut self) -> u16 {
        self.uint(2) as u16
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

// ---------------------------------------------------------------------------
// mmio_registers
// ---------------------------------------------------------------------------

/// Where the fuzzed transport sits on the MMIO bus.
const MMIO_BASE: u64 = 0xd000_0000;
/// Guest memory of the mmio target: room for a 256-entry queue at the
/// addresses [`init_sequence`] uses.
const MMIO_MEM_SIZE: u64 = 0x4000;

/// Offsets the fuzzer picks by index (besides raw offsets).
const REGISTERS: [u64; 36] = [
    reg::MAGIC_VALUE,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    NOTIFY_OFFSET,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_SEL,
    reg::SHM_LEN_LOW,
    reg::SHM_BASE_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
    reg::CONFIG + 4,
    reg::CONFIG + 8,
    reg::CONFIG + 12,
    reg::CONFIG + 14,
    reg::CONFIG + 16,
    0x0f0,
    0x0fe,
    MMIO_SIZE - 8,
    MMIO_SIZE - 4,
];

/// Register values worth trying, picked by index.
const VALUES: [u64; 24] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    0xb,
    0xf,
    0x40,
    0x4f,
    0x80,
    0x8f,
    16,
    128,
    256,
    512,
    0x1000,
    0x2000,
    0x3ff0,
    0x1_0000,
    0xffff_ffff,
    0x1_0000_0001,
    u64::MAX,
];

/// One operation of an `mmio_registers` input. The first byte picks it
/// (`byte % 8`); `byte >> 3 & 3` picks the access width of reads and writes
/// (1, 2, 4, 8 bytes). Then:
/// * address: one byte; below 0xc0 it indexes [`REGISTERS`], else a `u16`
///   follows: an offset from 16 bytes below the window to 16 above it;
/// * value (writes): one byte; below 0x80 it indexes [`VALUES`], else
///   `width` raw bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MmioOp {
    Read,
    Write,
    /// The driver's full init sequence (reset .. DRIVER_OK); one byte
    /// follows: the queue size is `1 << (byte % 9)`.
    InitSequence,
    /// 8 bytes stored into guest memory: `u16` address, `u64` value.
    PokeMemory,
    /// A QueueNotify write (queue `byte >> 3 & 1`), then one event loop turn.
    NotifyAndServe,
    /// One event loop turn.
    Serve,
}

impl MmioOp {
    fn from_byte(b: u8) -> Self {
        match b % 8 {
            0..=2 => Self::Read,
            3..=4 => Self::Write,
            5 => Self::InitSequence,
            6 => {
                if b & 0x80 == 0 {
                    Self::PokeMemory
                } else {
                    Self::Serve
                }
            }
            _ => Self::NotifyAndServe,
        }
    }
}

/// The guest's side of the `mmio_registers` target: a bus with the
/// transport on it, and what the guest can observe.
struct MmioGuest<'r> {
    rig: &'r mut Rig,
    bus: Bus,
    mem: GuestMemoryMmap,
    config: [u8; 16],
}

impl MmioGuest<'_> {
    fn read(&mut self, offset: u64, len: usize) -> [u8; 8] {
        let mut data = [0xa5u8; 8];
        let addr = MMIO_BASE.wrapping_add(offset);
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= MMIO_SIZE);
        let claimed = self.bus.read(addr, &mut data[..len]);
        assert_eq!(
            claimed, inside,
            "bus claim of a {len}-byte read at offset {offset:#x}"
        );
        if claimed {
            self.check_read(offset, &data[..len]);
        }
        data
    }

    fn write(&mut self, offset: u64, value: u64, len: usize) {
        let addr = MMIO_BASE.wrapping_add(offset);
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= MMIO_SIZE);
        let claimed = self.bus.write(addr, &value.to_le_bytes()[..len]);
        assert_eq!(
            claimed, inside,
            "bus claim of a {len}-byte write at offset {offset:#x}"
        );
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let d = self.read(offset, 4);
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    fn w32(&mut self, offset: u64, value: u32) {
        self.write(offset, u64::from(value), 4);
    }

    /// What any read must return, whatever happened before.
    fn check_read(&self, offset: u64, data: &[u8]) {
        let len = data.len();
        if offset >= reg::CONFIG {
            // Config space: the device's 16 bytes, zeros for any access
            // that does not fit in them.
            let mut want = [0u8; 8];
            let start = (offset - reg::CONFIG) as usize;
            if let Some(src) = self.config.get(start..start + len) {
                want[..len].copy_from_slice(src);
            }
            assert_eq!(data, &want[..len], "{len}-byte config read at {offset:#x}");
            return;
        }
        if len != 4 || !offset.is_multiple_of(4) {
            assert!(
                data.iter().all(|&b| b == 0),
                "bad {len}-byte register read at {offset:#x} returned {data:x?}"
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let fixed = match offset {
            reg::MAGIC_VALUE => Some(0x7472_6976),
            reg::VERSION => Some(2),
            reg::DEVICE_ID => Some(DEVICE_ID_PMEM),
            reg::CONFIG_GENERATION => Some(0),
            reg::SHM_LEN_LOW => Some(u32::MAX),
            _ => None,
        };
        if let Some(want) = fixed {
            assert_eq!(v, want, "register {offset:#x}");
        }
        if offset == reg::INTERRUPT_STATUS {
            assert_eq!(v & !3, 0, "InterruptStatus {v:#x} has unknown bits");
        }
    }

    /// Properties of the device status that hold between any two accesses.
    fn check_invariants(&mut self) {
        let status = self.r32(reg::STATUS);
        let known = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
        assert_eq!(status & !known, 0, "status {status:#x} has unknown bits");
        let requires = [
            (DRIVER, ACKNOWLEDGE),
            (FEATURES_OK, DRIVER),
            (DRIVER_OK, FEATURES_OK),
            (DEVICE_NEEDS_RESET, DRIVER_OK),
        ];
        for (bit, needs) in requires {
            assert!(
                status & bit == 0 || status & needs != 0,
                "status {status:#x}: {bit:#x} set without {needs:#x}"
            );
        }
        let running = status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0;
        assert_eq!(
            self.rig.is_active(),
            running,
            "device activity disagrees with status {status:#x}"
        );
        self.r32(reg::INTERRUPT_STATUS);
    }

    /// What the Linux driver does, with the queue rings at 0x0, 0x1000 and
    /// 0x2000 of guest memory. Must always end with the device running.
    fn init_sequence(&mut self, queue_size: u32) {
        self.w32(reg::STATUS, 0);
        assert_eq!(self.r32(reg::STATUS), 0, "status after reset");
        assert!(!self.rig.is_active(), "device active after reset");
        assert_eq!(self.r32(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r32(reg::DEVICE_ID), DEVICE_ID_PMEM);
        self.w32(reg::STATUS, ACKNOWLEDGE);
        self.w32(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(self.r32(reg::DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, 1);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, 0);
        self.w32(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            self.r32(reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            "FEATURES_OK refused"
        );
        self.w32(reg::QUEUE_SEL, 0);
        assert_eq!(self.r32(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        assert_eq!(self.r32(reg::QUEUE_READY), 0);
        self.w32(reg::QUEUE_NUM, queue_size);
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, 0u32),
            (reg::QUEUE_DRIVER_LOW, 0x1000),
            (reg::QUEUE_DEVICE_LOW, 0x2000),
        ] {
            self.w32(low, addr);
            self.w32(low + 4, 0);
        }
        self.w32(reg::QUEUE_READY, 1);
        assert_eq!(self.r32(reg::QUEUE_READY), 1);
        self.w32(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.r32(reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            "DRIVER_OK refused after a valid init sequence"
        );
        assert!(self.rig.is_active(), "device not running after DRIVER_OK");
    }
}

fn mmio_offset(input: &mut Input) -> u64 {
    let pick = input.u8();
    if pick < 0xc0 {
        REGISTERS[usize::from(pick) % REGISTERS.len()]
    } else {
        // -16 .. MMIO_SIZE + 16: accesses that straddle the window too.
        (u64::from(input.u16()) % (MMIO_SIZE + 32)).wrapping_sub(16)
    }
}

/// Arbitrary reads and writes of the virtio-mmio window of a virtio-pmem
/// device, through the MMIO bus, mixed with full init sequences, guest
/// memory stores and queue processing. Checks after every access that
/// nothing panicked, that reads return what the spec fixes (identification
/// registers, config space, zeros for refused accesses) and that the status
/// register and the device agree; at the end, that a reset stops the device.
pub fn mmio_registers(data: &[u8]) {
    with_rig(|rig| {
        rig.start(false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MMIO_MEM_SIZE as usize)])
            .unwrap_or_else(|e| panic!("fuzz rig: guest memory: {e}"));
        let device: Arc<Mutex<dyn VirtioDevice>> = rig.dev.clone();
        let transport = MmioTransport::new(mem.clone(), device, Arc::new(Irq::default()))
            .unwrap_or_else(|e| panic!("fuzz rig: transport: {e}"));
        let mut bus = Bus::new();
        bus.insert(MMIO_BASE, MMIO_SIZE, Arc::new(Mutex::new(transport)))
            .unwrap_or_else(|e| panic!("fuzz rig: bus: {e}"));
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&PMEM_START.to_le_bytes());
        config[8..].copy_from_slice(&PMEM_SIZE.to_le_bytes());
        let mut guest = MmioGuest {
            rig,
            bus,
            mem,
            config,
        };

        let mut input = Input::new(data);
        // Bounded by the input length: every operation consumes a byte.
        while !input.is_empty() {
            let b = input.u8();
            let width = [1usize, 2, 4, 8][usize::from(b >> 3 & 3)];
            match MmioOp::from_byte(b) {
                MmioOp::Read => {
                    let offset = mmio_offset(&mut input);
                    guest.read(offset, width);
                }
                MmioOp::Write => {
                    let offset = mmio_offset(&mut input);
                    let pick = input.u8();
                    let value = if pick < 0x80 {
                        VALUES[usize::from(pick) % VALUES.len()]
                    } else {
                        input.uint(width)
                    };
                    guest.write(offset, value, width);
                }
                MmioOp::InitSequence => {
                    let size = 1u32 << (input.u8() % 9);
                    guest.init_sequence(size);
                }
                MmioOp::PokeMemory => {
                    let addr = u64::from(input.u16()) % MMIO_MEM_SIZE;
                    let value = input.uint(8).to_le_bytes();
                    let n = (MMIO_MEM_SIZE - addr).min(8) as usize;
                    guest
                        .mem
                        .write_slice(&value[..n], GuestAddress(addr))
                        .unwrap_or_else(|e| panic!("fuzz rig: guest memory store: {e}"));
                }
                MmioOp::NotifyAndServe => {
                    guest.w32(NOTIFY_OFFSET, u32::from(b >> 3 & 1));
                    guest.rig.run_event_loop();
                }
                MmioOp::Serve => {
                    guest.rig.run_event_loop();
                }
            }
            guest.check_invariants();
        }

        guest.w32(reg::STATUS, 0);
        assert_eq!(guest.r32(reg::STATUS), 0, "status after the final reset");
        assert!(
            !guest.rig.is_active(),
            "device active after the final reset"
        );
    })
}

// ---------------------------------------------------------------------------
// pmem_requests
// ---------------------------------------------------------------------------

/// Guest memory of the request target.
const REQ_MEM_SIZE: u64 = 0x1_0000;
const DESC_SIZE: u64 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// `pmem_requests` header flags.
const REQ_FLAG_FAIL_WRITEBACK: u8 = 0x1;
const REQ_FLAG_SECOND_ROUND: u8 = 0x2;

/// Split-queue geometry, in guest memory of [`REQ_MEM_SIZE`] bytes.
#[derive(Debug, Clone, Copy)]
struct Rings {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl std::fmt::Display for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-entry queue, desc {:#x}, avail {:#x}, used {:#x}",
            self.size, self.desc, self.avail, self.used
        )
    }
}

impl Rings {
    fn desc_range(&self) -> (u64, u64) {
        (self.desc, self.desc + DESC_SIZE * u64::from(self.size))
    }

    /// flags, idx, ring[size], used_event.
    fn avail_range(&self) -> (u64, u64) {
        (self.avail, self.avail + 6 + 2 * u64::from(self.size))
    }

    /// flags, idx, ring[size] of (id, len), avail_event.
    fn used_range(&self) -> (u64, u64) {
        (self.used, self.used + 6 + 8 * u64::from(self.size))
    }

    fn fit(&self) -> bool {
        [self.desc_range(), self.avail_range(), self.used_range()]
            .iter()
            .all(|&(_, end)| end <= REQ_MEM_SIZE)
    }

    fn overlap(&self) -> bool {
        let r = [self.desc_range(), self.avail_range(), self.used_range()];
        let meet = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
        meet(r[0], r[1]) || meet(r[0], r[2]) || meet(r[1], r[2])
    }
}

fn u16_at(mem: &[u8], at: u64) -> u16 {
    let at = at as usize;
    u16::from_le_bytes([mem[at], mem[at + 1]])
}

fn u32_at(mem: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes([mem[at], mem[at + 1], mem[at + 2], mem[at + 3]])
}

fn u64_at(mem: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut b = [0u8; 8];
    b.copy_from_slice(&mem[at..at + 8]);
    u64::from_le_bytes(b)
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut image = vec![0u8; REQ_MEM_SIZE as usize];
    mem.read_slice(&mut image, GuestAddress(0))
        .unwrap_or_else(|e| panic!("fuzz rig: guest memory read: {e}"));
    image
}

/// Bytes of guest memory the device may write while serving the queue as
/// laid out in `image`: every device-writable buffer of the descriptor table
/// (whoever reaches it) and the used ring. Nothing else: the device offers
/// no indirect descriptors, so an indirect table is not the driver's to use.
fn writable_bytes(image: &[u8], rings: &Rings) -> Vec<bool> {
    let mut allowed = vec![false; image.len()];
    let mut allow = |start: u64, len: u64| {
        let end = start.saturating_add(len).min(REQ_MEM_SIZE);
        if start < end {
            allowed[start as usize..end as usize].fill(true);
        }
    };
    for i in 0..u64::from(rings.size) {
        let at = rings.desc + DESC_SIZE * i;
        let flags = u16_at(image, at + 12);
        if flags & VRING_DESC_F_WRITE != 0 {
            allow(u64_at(image, at), u64::from(u32_at(image, at + 8)));
        }
    }
    let (used, used_end) = rings.used_range();
    allow(used, used_end - used);
    allowed
}

/// Panics at the first byte that changed outside `allowed`.
fn check_writes(before: &[u8], after: &[u8], allowed: &[bool], what: &str, rings: &Rings) {
    // Whole-chunk comparisons first: a byte loop over 64 KiB, with every
    // comparison traced by the fuzzer's instrumentation, costs more than
    // everything the device does.
    const CHUNK: usize = 256;
    let changed = before
        .chunks(CHUNK)
        .zip(after.chunks(CHUNK))
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .map(|(i, _)| i * CHUNK);
    let stray = changed
        .flat_map(|start| start..(start + CHUNK).min(before.len()))
        .find(|&a| before[a] != after[a] && !allowed[a]);
    if let Some(a) = stray {
        let end = (a..before.len())
            .find(|&e| before[e] == after[e] || allowed[e])
            .unwrap_or(before.len());
        panic!(
            "{what}: the device wrote guest memory {a:#x}..{end:#x} ({:x?} -> {:x?}), outside \
             every device-writable descriptor buffer and the used ring ({rings})",
            &before[a..end.min(a + 16)],
            &after[a..end.min(a + 16)],
        );
    }
}

/// Writes one descriptor into guest memory.
fn put_desc(
    mem: &GuestMemoryMmap,
    rings: &Rings,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    let at = GuestAddress(rings.desc + DESC_SIZE * u64::from(index));
    mem.write_slice(&raw, at)
        .unwrap_or_else(|e| panic!("fuzz rig: descriptor store: {e}"));
}

fn store<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, value: T, at: u64) {
    mem.write_obj(value, GuestAddress(at))
        .unwrap_or_else(|e| panic!("fuzz rig: guest memory store at {at:#x}: {e}"));
}

/// Arbitrary descriptor tables and rings, laid over a guest memory image.
///
/// Input: `[size, flags, desc: u16, avail: u16, used: u16, image..]`. The
/// queue has `1 << (size % 9)` entries; `desc`, `avail` and `used` are
/// guest addresses, rounded down to the alignment the spec requires (16, 2,
/// 4); `image` is the initial content of guest memory from address 0 (64
/// KiB at most, zeros after it). Flags: [`REQ_FLAG_FAIL_WRITEBACK`] makes
/// every writeback fail; [`REQ_FLAG_SECOND_ROUND`] kicks the queue twice.
///
/// Checks that the device activates if the rings fit in guest memory
/// (refusing an available ring at address 0 is allowed) and only then; that serving the queue never panics and writes nothing outside
/// the device-writable buffers of the descriptor table and the used ring;
/// and that it keeps serving: a well-formed flush added after the input's
/// requests (when the queue has room for one: at least 2 entries, rings not
/// overlapping) completes with status 0 and a used element of length 4.
pub fn pmem_requests(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    let rings = Rings {
        size,
        desc: u64::from(input.u16() & !0xf),
        avail: u64::from(input.u16() & !0x1),
        used: u64::from(input.u16() & !0x3),
    };
    let image = input.rest();
    let image = &image[..image.len().min(REQ_MEM_SIZE as usize)];

    with_rig(|rig| {
        rig.start(flags & REQ_FLAG_FAIL_WRITEBACK != 0);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REQ_MEM_SIZE as usize)])
            .unwrap_or_else(|e| panic!("fuzz rig: guest memory: {e}"));
        mem.write_slice(image, GuestAddress(0))
            .unwrap_or_else(|e| panic!("fuzz rig: guest memory image: {e}"));

        let mut queue = Queue::new(QUEUE_SIZE).unwrap_or_else(|e| panic!("fuzz rig: queue: {e}"));
        let configured = queue
            .try_set_size(rings.size)
            .and_then(|()| queue.try_set_desc_table_address(GuestAddress(rings.desc)))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(rings.avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(rings.used)));
        configured.unwrap_or_else(|e| panic!("fuzz rig: queue {rings}: {e}"));
        queue.set_ready(true);
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(Irq::default())));
        let activated = lock(&rig.dev).activate(mem.clone(), vec![queue], interrupt);
        match activated {
            Ok(()) => assert!(rings.fit(), "activated with rings outside memory: {rings}"),
            Err(e) => {
                // Refusing an available ring at address 0 is a fair answer
                // too: virtio-queue takes that address for "never set up"
                // and serves nothing from it.
                assert!(
                    !rings.fit() || rings.avail == 0,
                    "refused rings inside memory {rings}: {e}"
                );
                return;
            }
        }

        // The device's next available index, as the spec defines it: a
        // round consumes everything up to avail.idx unless that claims more
        // than `size` new entries, which a device must refuse.
        let mut next_avail: u16 = 0;
        let rounds = if flags & REQ_FLAG_SECOND_ROUND != 0 {
            2
        } else {
            1
        };
        for round in 1..=rounds {
            let before = snapshot(&mem);
            let allowed = writable_bytes(&before, &rings);
            rig.notify_and_serve();
            let after = snapshot(&mem);
            check_writes(&before, &after, &allowed, &format!("round {round}"), &rings);
            let idx = u16_at(&before, rings.avail + 2);
            if idx.wrapping_sub(next_avail) <= rings.size {
                next_avail = idx;
            }
        }

        if rings.size < 2 || rings.overlap() {
            return;
        }
        // A good flush: request and status in 16 bytes clear of the rings.
        let r = [rings.desc_range(), rings.avail_range(), rings.used_range()];
        let Some(req) = (0..REQ_MEM_SIZE / 16)
            .map(|i| REQ_MEM_SIZE - 16 * (i + 1))
            .find(|&p| r.iter().all(|&(s, e)| p + 16 <= s || e <= p))
        else {
            return;
        };
        let status = req + 8;
        rig.fail_writeback.store(false, Ordering::SeqCst);
        store(&mem, VIRTIO_PMEM_REQ_TYPE_FLUSH, req);
        store(&mem, u32::MAX, status);
        put_desc(&mem, &rings, 0, req, 4, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, &rings, 1, status, 4, VRING_DESC_F_WRITE, 0);
        let slot = rings.avail + 4 + 2 * u64::from(next_avail % rings.size);
        store(&mem, 0u16, slot);
        store(&mem, next_avail.wrapping_add(1), rings.avail + 2);

        let before = snapshot(&mem);
        let allowed = writable_bytes(&before, &rings);
        let not_ready = rig.error_count(PmemErrorKind::QueueNotReady);
        rig.notify_and_serve();
        let after = snapshot(&mem);
        check_writes(&before, &after, &allowed, "good flush", &rings);
        let got = u32_at(&after, status);
        assert!(
            got == VIRTIO_PMEM_RESP_OK,
            "a good flush after the input was not served: status {got:#x} (queue refused as \
             not ready {} time(s) in this round), rings {rings}",
            rig.error_count(PmemErrorKind::QueueNotReady) - not_ready,
        );
        let used_idx = u16_at(&after, rings.used + 2);
        let elem = rings.used + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % rings.size);
        assert_eq!(
            (u32_at(&after, elem), u32_at(&after, elem + 4)),
            (0, 4),
            "used element of the good flush"
        );
    })
}

// ---------------------------------------------------------------------------
// pmem_options
// ---------------------------------------------------------------------------

/// What [`parse_size`] must make of `s`, worked out independently: the
/// trimmed string is decimal digits and an optional binary unit.
fn expected_size(s: &str) -> Option<(u64, u64)> {
    let t = s.trim();
    let split = t
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    let significant = digits.trim_start_matches('0');
    let n: u128 = if significant.is_empty() {
        0
    } else {
        significant.parse().ok()?
    };
    let bytes = u64::try_from(n.checked_mul(1u128 << shift)?).ok()?;
    Some((bytes, 1u64 << shift))
}

fn check_size(s: &str) {
    let got = parse_size(s);
    let want = expected_size(s);
    assert_eq!(
        got.as_ref().ok(),
        want.as_ref().map(|(bytes, _)| bytes),
        "parse_size({s:?}) = {got:?}"
    );
    match got {
        Ok(bytes) => {
            let unit = want.map_or(1, |(_, unit)| unit);
            assert_eq!(
                bytes % unit,
                0,
                "parse_size({s:?}) = {bytes}, not in its unit"
            );
            // Round trips: in bytes, and in the unit the input used.
            assert_eq!(parse_size(&bytes.to_string()), Ok(bytes));
            let suffix = match unit.trailing_zeros() {
                0 => "",
                10 => "K",
                20 => "M",
                30 => "G",
                _ => "T",
            };
            assert_eq!(
                parse_size(&format!("{}{suffix}", bytes / unit)),
                Ok(bytes),
                "round trip of parse_size({s:?})"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `config` as a `--pmem` value, every option spelled out.
fn render(config: &PmemConfig) -> String {
    let switch = |on: bool| if on { "on" } else { "off" };
    let path = config
        .path
        .to_str()
        .unwrap_or_else(|| panic!("a path parsed from a string is not a string: {config:?}"));
    let mut s = format!(
        "file={path},readonly={},discard_writes={},engine={}",
        switch(config.readonly),
        switch(config.discard_writes),
        config.engine.name()
    );
    if let Some(size) = config.size {
        s.push_str(&format!(",size={size}"));
    }
    match config.engine {
        EngineConfig::Uffd(uffd) => s.push_str(&format!(
            ",populate={},poll_us={}",
            uffd.populate, uffd.poll_us
        )),
        EngineConfig::Kernel(flush) | EngineConfig::Prefault(flush) => {
            s.push_str(&format!(",flush={}", flush.name()))
        }
        _ => {}
    }
    s
}

fn check_pmem_config(s: &str) {
    let config = match s.parse::<PmemConfig>() {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let (uffd_engine, uffd) = match config.engine {
        EngineConfig::Uffd(uffd) => (true, uffd),
        _ => (false, UffdConfig::default()),
    };
    // Every part is key=value with a distinct key; the config holds the values.
    let mut keys = Vec::new();
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .unwrap_or_else(|| panic!("{s:?} accepted with part {part:?} not key=value"));
        assert!(!keys.contains(&key), "{s:?} accepted with {key} twice");
        keys.push(key);
        match key {
            "file" => assert_eq!(config.path.to_str(), Some(value), "path of {s:?}"),
            "size" => assert_eq!(config.size, parse_size(value).ok(), "size of {s:?}"),
            "engine" => assert_eq!(config.engine.name(), value, "engine of {s:?}"),
            "flush" => assert_eq!(config.engine.flush_policy().name(), value, "flush of {s:?}"),
            "populate" => assert_eq!(
                value.parse::<u16>().ok(),
                Some(uffd.populate),
                "populate of {s:?}"
            ),
            "poll_us" => assert_eq!(
                value.parse::<u16>().ok(),
                Some(uffd.poll_us),
                "poll_us of {s:?}"
            ),
            "readonly" | "discard_writes" => {}
            _ => panic!("{s:?} accepted with unknown key {key:?}"),
        }
    }
    assert!(keys.contains(&"file"), "{s:?} accepted without file=");
    assert!(
        config.size.is_some() == keys.contains(&"size"),
        "size of {s:?}"
    );
    assert!(
        !config.path.as_os_str().is_empty(),
        "{s:?} accepted with an empty path"
    );
    assert!(
        !config.readonly || !config.discard_writes,
        "{s:?}: readonly and discard"
    );
    assert!(
        (1..=MAX_POPULATE).contains(&uffd.populate),
        "{s:?}: populate {}",
        uffd.populate
    );
    assert!(
        uffd_engine || !keys.contains(&"populate"),
        "{s:?}: populate= without engine=uffd"
    );
    assert!(
        uffd.poll_us <= MAX_POLL_US,
        "{s:?}: poll_us {}",
        uffd.poll_us
    );
    assert!(
        uffd_engine || !keys.contains(&"poll_us"),
        "{s:?}: poll_us= without engine=uffd"
    );
    assert!(
        matches!(
            config.engine,
            EngineConfig::Kernel(_) | EngineConfig::Prefault(_)
        ) || !keys.contains(&"flush"),
        "{s:?}: flush= without engine=kernel or prefault"
    );
    let again = render(&config);
    assert_eq!(
        again.parse::<PmemConfig>(),
        Ok(config),
        "round trip via {again:?}"
    );
}

/// `--pmem` values and sizes: [`PmemConfig::from_str`] and
/// [`parse_size`] on the input (as UTF-8, invalid sequences replaced), and
/// on each of its comma-separated parts' values as a size. Checks: no
/// panic; `parse_size` accepts exactly decimal digits with an optional
/// binary unit that fit in 64 bits, with the right value, and round-trips;
/// an accepted `--pmem` value has a non-empty file, every key once, values
/// matching the string, no contradictory switches, and round-trips through
/// its own rendering.
pub fn pmem_options(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    check_size(&s);
    for part in s.split(',') {
        if let Some((_, value)) = part.split_once('=') {
            check_size(value);
        }
    }
    check_pmem_config(&s);
}
