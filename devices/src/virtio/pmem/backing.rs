//! The host file behind a virtio-pmem device: `--pmem` option parsing,
//! opening, locking, sizing and mapping, and the [`Writeback`] trait a fault
//! engine implements to make the guest's stores durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::size::{parse_size, SizeError};

/// The guest's nvdimm code maps the region in 2 MiB sections, so the size
/// (and the guest-physical start) must be multiples of this.
pub const PMEM_ALIGN: u64 = 2 << 20;

/// Parsed value of `--pmem file=PATH[,size=SIZE][,readonly=on|off][,discard_writes=on|off]`
/// `[,engine=kernel|mirror|uffd|prefault][,flush=dirty|fsync|msync][,populate=N][,poll_us=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmemConfig {
    /// Backing file. Commas cannot appear in it (they separate options).
    pub path: PathBuf,
    /// Create the file sparse or grow it to this size; never shrinks it.
    pub size: Option<u64>,
    /// Map read-only; the file is opened O_RDONLY with a shared lock.
    pub readonly: bool,
    /// Map privately: guest writes never reach the file.
    pub discard_writes: bool,
    /// How the VMM serves the guest's faults on the region.
    pub engine: EngineConfig,
}

/// `engine=`, with the options only that engine takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineConfig {
    Kernel(FlushPolicy),
    Prefault(FlushPolicy),
    Uffd(UffdConfig),
    /// The kernel engine's design on a memfd mirror of the file; it takes
    /// no options (its flush is always the dirty set).
    Mirror,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::Kernel(FlushPolicy::DirtySet)
    }
}

/// `flush=`, for the kernel and prefault engines: what a flush request
/// writes back. Only `dirty` is pmemvm's design; the others are what other
/// VMMs do, so that the same guest can be measured under their policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushPolicy {
    /// Exactly the pages KVM's dirty log saw written since the last flush.
    #[default]
    DirtySet,
    /// fsync of the whole file, with no dirty logging (QEMU, Cloud Hypervisor).
    Fsync,
    /// msync(MS_SYNC) of the whole mapping, with no dirty logging (crosvm,
    /// Firecracker).
    Msync,
}

impl FlushPolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::DirtySet => "dirty",
            Self::Fsync => "fsync",
            Self::Msync => "msync",
        }
    }
}

impl FromStr for FlushPolicy {
    type Err = PmemConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dirty" => Ok(Self::DirtySet),
            "fsync" => Ok(Self::Fsync),
            "msync" => Ok(Self::Msync),
            _ => Err(PmemConfigError::BadFlush(s.to_string())),
        }
    }
}

/// `populate=` and `poll_us=`, for `engine=uffd` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdConfig {
    /// Pages the uffd engine inserts per fault (1..=512).
    pub populate: u16,
    /// Microseconds the uffd fault servicer keeps polling for the next
    /// fault before it sleeps (0..=1000, default 0): a faulting vCPU then
    /// waits for no wake-up, at the price of a busy CPU while faults come.
    pub poll_us: u16,
}

impl Default for UffdConfig {
    fn default() -> Self {
        Self {
            populate: DEFAULT_POPULATE,
            poll_us: 0,
        }
    }
}

impl EngineConfig {
    /// The engine `kind` with its default options.
    pub fn with_defaults(kind: FaultEngineKind) -> Self {
        match kind {
            FaultEngineKind::Kernel => Self::Kernel(FlushPolicy::DirtySet),
            FaultEngineKind::Prefault => Self::Prefault(FlushPolicy::DirtySet),
            FaultEngineKind::Uffd => Self::Uffd(UffdConfig::default()),
            FaultEngineKind::Mirror => Self::Mirror,
        }
    }

    pub fn kind(&self) -> FaultEngineKind {
        match self {
            Self::Kernel(_) => FaultEngineKind::Kernel,
            Self::Prefault(_) => FaultEngineKind::Prefault,
            Self::Uffd(_) => FaultEngineKind::Uffd,
            Self::Mirror => FaultEngineKind::Mirror,
        }
    }

    pub fn flush_policy(&self) -> FlushPolicy {
        match self {
            Self::Kernel(p) | Self::Prefault(p) => *p,
            Self::Uffd(_) | Self::Mirror => FlushPolicy::DirtySet,
        }
    }

    /// Whether the engine needs KVM's dirty log (when the guest's writes
    /// reach the file).
    pub fn logs_dirty(&self) -> bool {
        matches!(
            self,
            Self::Kernel(FlushPolicy::DirtySet)
                | Self::Prefault(FlushPolicy::DirtySet)
                | Self::Mirror
        )
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// `engine=`: who populates the guest's pmem pages and catches first writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultEngineKind {
    /// KVM populates from the MAP_SHARED file; KVM dirty logging catches
    /// first writes.
    #[default]
    Kernel,
    /// The VMM serves every fault through userfaultfd on a memfd mirror.
    Uffd,
    /// Like `Kernel`, with the whole region populated before boot.
    Prefault,
    /// Like `Kernel` on a memfd mirror of the file, filled at start; a
    /// flush copies the dirty pages from the mirror to the file. Holds the
    /// device's data twice (mirror and page cache).
    Mirror,
}

impl FaultEngineKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Uffd => "uffd",
            Self::Prefault => "prefault",
            Self::Mirror => "mirror",
        }
    }
}

impl FromStr for FaultEngineKind {
    type Err = PmemConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "uffd" => Ok(Self::Uffd),
            "prefault" => Ok(Self::Prefault),
            "mirror" => Ok(Self::Mirror),
            _ => Err(PmemConfigError::BadEngine(s.to_string())),
        }
    }
}

/// Default pages per uffd fault: the vm_insert_range lesson.
pub const DEFAULT_POPULATE: u16 = 16;
pub const MAX_POPULATE: u16 = 512;
/// Longest uffd busy-poll window, as KVM's halt polling is bounded.
pub const MAX_POLL_US: u16 = 1000;

/// Errors in a `--pmem` option value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PmemConfigError {
    #[error("--pmem needs file=PATH")]
    MissingFile,
    #[error("--pmem option `{0}` is not of the form key=value")]
    NotKeyValue(String),
    #[error("--pmem option `{0}` is unknown (expected file, size, readonly, discard_writes, engine, flush, populate, poll_us)")]
    UnknownKey(String),
    #[error("--pmem option `{0}` is given twice")]
    DuplicateKey(String),
    #[error("--pmem {key}={value}: expected on or off")]
    BadSwitch { key: String, value: String },
    #[error("--pmem size=: {0}")]
    BadSize(#[from] SizeError),
    #[error("--pmem file= is empty")]
    EmptyPath,
    #[error("--pmem engine={0}: expected kernel, mirror, uffd or prefault")]
    BadEngine(String),
    #[error("--pmem populate={0}: expected a page count from 1 to {MAX_POPULATE}")]
    BadPopulate(String),
    #[error("--pmem poll_us={0}: expected microseconds from 0 to {MAX_POLL_US}")]
    BadPollUs(String),
    #[error("--pmem {0}= only applies to engine=uffd")]
    UffdOnly(&'static str),
    #[error("--pmem flush={0}: expected dirty, fsync or msync")]
    BadFlush(String),
    #[error("--pmem flush= only applies to engine=kernel and engine=prefault (engine=mirror and engine=uffd always write back the dirty pages)")]
    KernelOnly,
    #[error("--pmem readonly=on and discard_writes=on contradict each other: drop one of them")]
    ReadonlyAndDiscard,
}

fn parse_switch(key: &str, value: &str) -> Result<bool, PmemConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(PmemConfigError::BadSwitch {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl FromStr for PmemConfig {
    type Err = PmemConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut size = None;
        let mut readonly = None;
        let mut discard_writes = None;
        let mut engine = None;
        let mut flush = None;
        let mut populate = None;
        let mut poll_us = None;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| PmemConfigError::NotKeyValue(part.to_string()))?;
            let duplicate = match key {
                "file" => path.replace(PathBuf::from(value)).is_some(),
                "size" => size.replace(parse_size(value)?).is_some(),
                "readonly" => readonly.replace(parse_switch(key, value)?).is_some(),
                "discard_writes" => discard_writes.replace(parse_switch(key, value)?).is_some(),
                "engine" => engine.replace(value.parse()?).is_some(),
                "flush" => flush.replace(value.parse::<FlushPolicy>()?).is_some(),
                "populate" => populate
                    .replace(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|n| (1..=MAX_POPULATE).contains(n))
                            .ok_or_else(|| PmemConfigError::BadPopulate(value.to_string()))?,
                    )
                    .is_some(),
                "poll_us" => poll_us
                    .replace(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|n| *n <= MAX_POLL_US)
                            .ok_or_else(|| PmemConfigError::BadPollUs(value.to_string()))?,
                    )
                    .is_some(),
                _ => return Err(PmemConfigError::UnknownKey(key.to_string())),
            };
            if duplicate {
                return Err(PmemConfigError::DuplicateKey(key.to_string()));
            }
        }
        let path = path.ok_or(PmemConfigError::MissingFile)?;
        if path.as_os_str().is_empty() {
            return Err(PmemConfigError::EmptyPath);
        }
        let engine = match engine.unwrap_or_default() {
            FaultEngineKind::Uffd | FaultEngineKind::Mirror if flush.is_some() => {
                return Err(PmemConfigError::KernelOnly)
            }
            FaultEngineKind::Uffd => EngineConfig::Uffd(UffdConfig {
                populate: populate.unwrap_or(DEFAULT_POPULATE),
                poll_us: poll_us.unwrap_or(0),
            }),
            _ if populate.is_some() => return Err(PmemConfigError::UffdOnly("populate")),
            _ if poll_us.is_some() => return Err(PmemConfigError::UffdOnly("poll_us")),
            FaultEngineKind::Kernel => EngineConfig::Kernel(flush.unwrap_or_default()),
            FaultEngineKind::Prefault => EngineConfig::Prefault(flush.unwrap_or_default()),
            FaultEngineKind::Mirror => EngineConfig::Mirror,
        };
        let config = PmemConfig {
            path,
            size,
            readonly: readonly.unwrap_or(false),
            discard_writes: discard_writes.unwrap_or(false),
            engine,
        };
        if config.readonly && config.discard_writes {
            return Err(PmemConfigError::ReadonlyAndDiscard);
        }
        Ok(config)
    }
}

/// Errors opening a pmem backing file. Each names the file and a way out.
#[derive(Debug, thiserror::Error)]
pub enum PmemBackingError {
    #[error("pmem {}: readonly=on and discard_writes=on contradict each other: drop one of them", .path.display())]
    ReadonlyAndDiscard { path: PathBuf },
    #[error("pmem {}: cannot open: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("pmem {}: no such file; add size=SIZE to create it", .path.display())]
    Missing { path: PathBuf },
    #[error("pmem {}: is in use by another process (another pmemvm?); stop it or use readonly=on in both", .path.display())]
    Locked { path: PathBuf },
    #[error("pmem {}: cannot lock: {source}", .path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("pmem {}: cannot stat: {source}", .path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("pmem {}: not a regular file", .path.display())]
    NotRegularFile { path: PathBuf },
    #[error("pmem {}: size {size} is not usable: {reason}", .path.display())]
    BadSize {
        path: PathBuf,
        size: u64,
        reason: &'static str,
    },
    #[error("pmem {}: the file is {file_size} bytes, larger than size={size}; the file is never shrunk: raise size= or drop it to use the file's size", .path.display())]
    LargerThanSize {
        path: PathBuf,
        file_size: u64,
        size: u64,
    },
    #[error("pmem {}: the file is {file_size} bytes, smaller than size={size}, and {mode} never modifies it: grow it first or drop size=", .path.display())]
    CannotGrow {
        path: PathBuf,
        file_size: u64,
        size: u64,
        mode: &'static str,
    },
    #[error("pmem {}: cannot grow to {size} bytes: {source}", .path.display())]
    Grow {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    #[error("pmem {}: cannot map {size} bytes: {source}", .path.display())]
    Map {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
}

fn check_size(path: &Path, size: u64) -> Result<(), PmemBackingError> {
    let reason = if size == 0 {
        "the region must not be empty; pass size= to create or grow the file"
    } else if !size.is_multiple_of(PMEM_ALIGN) {
        "it must be a multiple of 2 MiB, because the guest maps the region in 2 MiB sections"
    } else if usize::try_from(size).is_err() {
        "it does not fit in the host address space"
    } else {
        return Ok(());
    };
    Err(PmemBackingError::BadSize {
        path: path.to_path_buf(),
        size,
        reason,
    })
}

/// An opened, locked and mapped pmem backing file. Unmapped on drop; the
/// lock goes away with the file descriptor.
#[derive(Debug)]
pub struct PmemBacking {
    file: File,
    path: PathBuf,
    // Kept as an integer: this type never dereferences the mapping; the guest
    // (through KVM) and a Writeback are the ones touching it.
    host_addr: usize,
    size: u64,
    readonly: bool,
    discard_writes: bool,
}

impl PmemBacking {
    /// Opens, locks, sizes and maps the file described by `config`.
    pub fn open(config: &PmemConfig) -> Result<Self, PmemBackingError> {
        let path = config.path.clone();
        if config.readonly && config.discard_writes {
            return Err(PmemBackingError::ReadonlyAndDiscard { path });
        }
        if let Some(size) = config.size {
            // Before opening, so a bad size= does not leave an empty file.
            check_size(&path, size)?;
        }
        // discard_writes never writes the file: open it like readonly=on.
        let writable = !config.readonly && !config.discard_writes;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable && config.size.is_some())
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound if config.size.is_none() => {
                    PmemBackingError::Missing { path: path.clone() }
                }
                _ => PmemBackingError::Open {
                    path: path.clone(),
                    source,
                },
            })?;

        // Lock before sizing, so a file someone else uses is never touched.
        let mode = if writable {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock only reads its arguments; `file` is an open fd.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                PmemBackingError::Locked { path }
            } else {
                PmemBackingError::Lock { path, source: err }
            });
        }

        let meta = file.metadata().map_err(|source| PmemBackingError::Stat {
            path: path.clone(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(PmemBackingError::NotRegularFile { path });
        }
        let file_size = meta.len();
        let size = match config.size {
            None => file_size,
            Some(size) if file_size > size => {
                return Err(PmemBackingError::LargerThanSize {
                    path,
                    file_size,
                    size,
                })
            }
            Some(size) if file_size < size => {
                if !writable {
                    let mode = if config.readonly {
                        "readonly=on"
                    } else {
                        "discard_writes=on"
                    };
                    return Err(PmemBackingError::CannotGrow {
                        path,
                        file_size,
                        size,
                        mode,
                    });
                }
                // ftruncate extends with a hole: no blocks are allocated.
                file.set_len(size)
                    .map_err(|source| PmemBackingError::Grow {
                        path: path.clone(),
                        size,
                        source,
                    })?;
                size
            }
            Some(size) => size,
        };
        check_size(&path, size)?;
        let len = usize::try_from(size).map_err(|_| PmemBackingError::BadSize {
            path: path.clone(),
            size,
            reason: "it does not fit in the host address space",
        })?;

        let (prot, flags) = if config.readonly {
            (libc::PROT_READ, libc::MAP_SHARED)
        } else if config.discard_writes {
            // Private copy-on-write pages; don't reserve swap for the whole
            // region up front.
            (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        } else {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) overlaps no
        // Rust object; fd and len were validated above; the result is checked.
        let addr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(PmemBackingError::Map {
                path,
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            path,
            host_addr: addr as usize,
            size,
            readonly: config.readonly,
            discard_writes: config.discard_writes,
        })
    }

    /// Host virtual address of the mapping (for KVM_SET_USER_MEMORY_REGION).
    /// The mapping goes away with `self`: keep it alive while a memory slot
    /// points at it.
    pub fn host_addr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }

    /// Size of the mapping and of the guest's pmem region, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the mapping is read-only (the KVM slot should be too).
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether guest writes stay in private memory and never reach the file.
    pub fn discard_writes(&self) -> bool {
        self.discard_writes
    }

    /// Whether the guest's writes reach the file, so that an engine must
    /// track them and write them back.
    pub fn writes_reach_file(&self) -> bool {
        !self.readonly && !self.discard_writes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsRawFd for PmemBacking {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for PmemBacking {
    fn drop(&mut self) {
        // SAFETY: host_addr/size describe the mapping created in open() and
        // owned by self; nothing in this process uses it after drop.
        let ret = unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.size as usize) };
        if ret != 0 {
            log::error!(
                "pmem {}: munmap failed: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }
}

/// What one writeback did, as far as the implementation knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackReport {
    /// Pages written to the file, if known.
    pub pages: Option<u64>,
    /// Bytes written to the file, if known.
    pub bytes: Option<u64>,
}

/// Makes every guest store to the pmem region that happened before the call
/// durable in the backing file. Serves virtio-pmem FLUSH requests.
pub trait Writeback: Send {
    fn writeback(&mut self) -> io::Result<WritebackReport>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: u64 = 1 << 20;

    /// A path under the temp dir, removed on drop.
    pub(crate) struct TempPath(pub PathBuf);

    impl TempPath {
        pub(crate) fn new(name: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("pmemvm-test-{}-{n}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            TempPath(p)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn config(path: &Path, rest: &str) -> PmemConfig {
        format!("file={}{rest}", path.display()).parse().unwrap()
    }

    #[test]
    fn parses_full_option() {
        let c: PmemConfig = "file=/tmp/a.img,size=64M,readonly=off,discard_writes=on"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            PmemConfig {
                path: "/tmp/a.img".into(),
                size: Some(64 * MIB),
                readonly: false,
                discard_writes: true,
                engine: EngineConfig::default(),
            }
        );
        let c: PmemConfig = "readonly=on,file=x".parse().unwrap();
        assert_eq!(c.size, None);
        assert!(c.readonly);
        assert!(!c.discard_writes);
    }

    #[test]
    fn parses_engine_and_populate() {
        let c: PmemConfig = "file=x,engine=uffd,populate=512".parse().unwrap();
        assert_eq!(
            c.engine,
            EngineConfig::Uffd(UffdConfig {
                populate: 512,
                poll_us: 0
            })
        );
        let c: PmemConfig = "file=x,engine=uffd,poll_us=200".parse().unwrap();
        assert_eq!(
            c.engine,
            EngineConfig::Uffd(UffdConfig {
                populate: DEFAULT_POPULATE,
                poll_us: 200
            })
        );
        let c: PmemConfig = "file=x,engine=prefault".parse().unwrap();
        assert_eq!(c.engine, EngineConfig::Prefault(FlushPolicy::DirtySet));
        assert_eq!(c.engine.kind(), FaultEngineKind::Prefault);
        assert!(c.engine.logs_dirty());
        let c: PmemConfig = "file=x,engine=mirror".parse().unwrap();
        assert_eq!(c.engine, EngineConfig::Mirror);
        assert_eq!(c.engine.kind(), FaultEngineKind::Mirror);
        assert_eq!(c.engine.name(), "mirror");
        assert_eq!(c.engine.flush_policy(), FlushPolicy::DirtySet);
        assert!(c.engine.logs_dirty());
        assert_eq!(
            EngineConfig::with_defaults(FaultEngineKind::Mirror),
            EngineConfig::Mirror
        );
        let c: PmemConfig = "file=x,flush=fsync".parse().unwrap();
        assert_eq!(c.engine, EngineConfig::Kernel(FlushPolicy::Fsync));
        assert!(!c.engine.logs_dirty());
        let c: PmemConfig = "file=x,engine=prefault,flush=msync".parse().unwrap();
        assert_eq!(c.engine, EngineConfig::Prefault(FlushPolicy::Msync));
        let err = |s: &str| s.parse::<PmemConfig>().unwrap_err();
        assert_eq!(
            err("file=x,engine=ept"),
            PmemConfigError::BadEngine("ept".into())
        );
        for bad in ["0", "513", "-1", "x", ""] {
            assert_eq!(
                err(&format!("file=x,engine=uffd,populate={bad}")),
                PmemConfigError::BadPopulate(bad.into())
            );
        }
        assert_eq!(
            err("file=x,populate=4"),
            PmemConfigError::UffdOnly("populate")
        );
        assert_eq!(
            err("file=x,engine=kernel,poll_us=10"),
            PmemConfigError::UffdOnly("poll_us")
        );
        for bad in ["1001", "-1", "x", ""] {
            assert_eq!(
                err(&format!("file=x,engine=uffd,poll_us={bad}")),
                PmemConfigError::BadPollUs(bad.into())
            );
        }
        assert_eq!(
            err("file=x,flush=all"),
            PmemConfigError::BadFlush("all".into())
        );
        assert_eq!(
            err("file=x,engine=uffd,flush=fsync"),
            PmemConfigError::KernelOnly
        );
        for flush in ["dirty", "fsync", "msync"] {
            assert_eq!(
                err(&format!("file=x,engine=mirror,flush={flush}")),
                PmemConfigError::KernelOnly
            );
        }
        assert_eq!(
            err("file=x,engine=mirror,populate=4"),
            PmemConfigError::UffdOnly("populate")
        );
        assert_eq!(
            err("file=x,engine=mirror,poll_us=10"),
            PmemConfigError::UffdOnly("poll_us")
        );
        assert!(err("file=x,engine=mirrors")
            .to_string()
            .contains("expected kernel, mirror, uffd or prefault"));
        assert_eq!(
            err("file=x,engine=uffd,engine=kernel"),
            PmemConfigError::DuplicateKey("engine".into())
        );
    }

    #[test]
    fn parses_sizes() {
        let size = |v: &str| {
            format!("file=a,size={v}")
                .parse::<PmemConfig>()
                .map(|c| c.size)
        };
        assert_eq!(size("4096"), Ok(Some(4096)));
        assert_eq!(size("2k"), Ok(Some(2048)));
        assert_eq!(size("2M"), Ok(Some(2 * MIB)));
        assert_eq!(size("3G"), Ok(Some(3 << 30)));
        for bad in ["", "M", "1.5G", "-1", "1 M", "99999999999999999999"] {
            assert!(
                matches!(size(bad), Err(PmemConfigError::BadSize(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn rejects_bad_options() {
        use PmemConfigError::*;
        let e = |s: &str| s.parse::<PmemConfig>().unwrap_err();
        assert_eq!(e("size=2M"), MissingFile);
        assert_eq!(e("file="), EmptyPath);
        assert_eq!(e("file=a,bogus=1"), UnknownKey("bogus".into()));
        assert_eq!(e("file=a,file=b"), DuplicateKey("file".into()));
        assert_eq!(e("file=a,readonly"), NotKeyValue("readonly".into()));
        assert!(matches!(e("file=a,readonly=yes"), BadSwitch { .. }));
        assert!(matches!(e("file=a,size=lots"), BadSize(_)));
        assert_eq!(
            e("file=a,readonly=on,discard_writes=on"),
            ReadonlyAndDiscard
        );
    }

    #[test]
    fn size_creates_sparse_file() {
        let p = TempPath::new("sparse");
        let b = PmemBacking::open(&config(&p.0, ",size=64M")).unwrap();
        assert_eq!(b.size(), 64 * MIB);
        assert!(!b.readonly());
        let meta = std::fs::metadata(&p.0).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert!(
            meta.blocks() * 512 < MIB,
            "file is not sparse: {} blocks",
            meta.blocks()
        );
    }

    #[test]
    fn size_grows_but_never_shrinks() {
        let p = TempPath::new("grow");
        std::fs::write(&p.0, b"hello").unwrap();
        // Without size= the file's own size (5 bytes) is unusable.
        let e = PmemBacking::open(&config(&p.0, "")).unwrap_err();
        assert!(
            matches!(e, PmemBackingError::BadSize { size: 5, .. }),
            "{e}"
        );
        drop(PmemBacking::open(&config(&p.0, ",size=4M")).unwrap());
        let data = std::fs::read(&p.0).unwrap();
        assert_eq!(data.len() as u64, 4 * MIB);
        assert_eq!(&data[..5], b"hello", "growing must keep the contents");
        // Existing file size is used without size=.
        assert_eq!(
            PmemBacking::open(&config(&p.0, "")).unwrap().size(),
            4 * MIB
        );
        let e = PmemBacking::open(&config(&p.0, ",size=2M")).unwrap_err();
        assert!(matches!(e, PmemBackingError::LargerThanSize { .. }), "{e}");
        assert!(e.to_string().contains(&p.0.display().to_string()));
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 4 * MIB);
    }

    #[test]
    fn size_must_be_a_positive_multiple_of_2mib() {
        let p = TempPath::new("align");
        let e = PmemBacking::open(&config(&p.0, ",size=3M")).unwrap_err();
        assert!(matches!(e, PmemBackingError::BadSize { .. }));
        assert!(e.to_string().contains("2 MiB"), "{e}");
        assert!(!p.0.exists(), "a refused size= must not create the file");
        let e = PmemBacking::open(&config(&p.0, ",size=0")).unwrap_err();
        assert!(matches!(e, PmemBackingError::BadSize { size: 0, .. }));
        std::fs::write(&p.0, vec![0u8; MIB as usize]).unwrap();
        let e = PmemBacking::open(&config(&p.0, "")).unwrap_err();
        assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
        // Missing file without size= cannot be opened.
        let q = TempPath::new("missing");
        let e = PmemBacking::open(&config(&q.0, "")).unwrap_err();
        assert!(matches!(e, PmemBackingError::Missing { .. }));
        assert!(e.to_string().contains("add size="), "{e}");
    }

    #[test]
    fn second_writer_is_refused() {
        let p = TempPath::new("lock");
        let first = PmemBacking::open(&config(&p.0, ",size=2M")).unwrap();
        let e = PmemBacking::open(&config(&p.0, "")).unwrap_err();
        assert!(matches!(e, PmemBackingError::Locked { .. }), "{e}");
        assert!(e.to_string().contains(&p.0.display().to_string()));
        // Readers are refused too while a writer holds the file...
        assert!(matches!(
            PmemBacking::open(&config(&p.0, ",readonly=on")),
            Err(PmemBackingError::Locked { .. })
        ));
        drop(first);
        // ...and share it with each other, excluding writers.
        let r1 = PmemBacking::open(&config(&p.0, ",readonly=on")).unwrap();
        let r2 = PmemBacking::open(&config(&p.0, ",discard_writes=on")).unwrap();
        assert!(matches!(
            PmemBacking::open(&config(&p.0, "")),
            Err(PmemBackingError::Locked { .. })
        ));
        drop((r1, r2));
        PmemBacking::open(&config(&p.0, "")).unwrap();
    }

    #[test]
    fn readonly_with_discard_writes_is_refused() {
        let p = TempPath::new("rodiscard");
        let c = PmemConfig {
            path: p.0.clone(),
            size: Some(2 * MIB),
            readonly: true,
            discard_writes: true,
            engine: EngineConfig::default(),
        };
        assert!(matches!(
            PmemBacking::open(&c),
            Err(PmemBackingError::ReadonlyAndDiscard { .. })
        ));
        assert!(!p.0.exists());
    }

    #[test]
    fn readonly_and_discard_never_grow_the_file() {
        let p = TempPath::new("nogrow");
        std::fs::write(&p.0, vec![0u8; 2 * MIB as usize]).unwrap();
        for opt in [",size=4M,readonly=on", ",size=4M,discard_writes=on"] {
            let e = PmemBacking::open(&config(&p.0, opt)).unwrap_err();
            assert!(matches!(e, PmemBackingError::CannotGrow { .. }), "{e}");
        }
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 2 * MIB);
    }

    /// Writes through the mapping, as the guest would.
    fn poke(b: &PmemBacking, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= b.size() as usize);
        // SAFETY: the range is inside the live, writable mapping of `b`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), b.host_addr().add(offset), data.len())
        }
    }

    #[test]
    fn shared_mapping_reaches_the_file_and_private_does_not() {
        let p = TempPath::new("mapping");
        {
            let b = PmemBacking::open(&config(&p.0, ",size=2M")).unwrap();
            poke(&b, 4096, b"durable");
            b.file().sync_data().unwrap();
            let data = std::fs::read(&p.0).unwrap();
            assert_eq!(&data[4096..4103], b"durable");
        }
        let b = PmemBacking::open(&config(&p.0, ",discard_writes=on")).unwrap();
        assert!(b.discard_writes());
        poke(&b, 4096, b"discard");
        // A private mapping: nothing reaches the file, synced or not.
        b.file().sync_data().unwrap();
        drop(b);
        let data = std::fs::read(&p.0).unwrap();
        assert_eq!(&data[4096..4103], b"durable");
    }

    #[test]
    fn readonly_maps_read_only() {
        let p = TempPath::new("ro");
        std::fs::write(&p.0, vec![7u8; 2 * MIB as usize]).unwrap();
        let b = PmemBacking::open(&config(&p.0, ",readonly=on")).unwrap();
        assert!(b.readonly());
        // SAFETY: reading the first byte of the live mapping.
        assert_eq!(unsafe { *b.host_addr() }, 7);
        // The fd is read-only, so nothing can write the file through it.
        let mut f = b.file();
        assert!(io::Write::write(&mut f, b"x").is_err());
    }
}
