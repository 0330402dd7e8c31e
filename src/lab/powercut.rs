//! A power-cut file system for crash-consistency tests, modelled on LazyFS:
//! a FUSE file system, kept in memory, that remembers for each regular file
//! what the last completed FSYNC made durable and can "cut the power" on it.
//!
//! Each file has a durable state (pages and size as of its last completed
//! FSYNC, datasync or not) and a volatile state on top (pages written,
//! zeroed or punched since, and the current size). Reads see the volatile
//! state, then the durable one, then zeroes. WRITE, truncation, extension
//! and fallocate change only the volatile state; FSYNC makes the whole
//! current state durable under the file's lock and logs the pages it wrote.
//!
//! [`PowerCutFs::cut`] freezes a file and returns its durable image. From
//! then on WRITE, FSYNC, SETATTR and FALLOCATE on it fail with EIO and
//! change nothing, so the dirty page cache of a killed process, written back
//! after the cut, never becomes durable. READ still serves the current
//! (volatile) state, so the kernel's view of the file stays coherent.
//!
//! Regular files are not opened with direct I/O: the kernel's page cache is
//! what makes a shared writable mmap possible. Note that `sync(1)` without
//! arguments makes nothing durable here: the kernel writes dirty pages back
//! but sends no FSYNC; `sync FILE`, `dd conv=fsync`, fsync(2), fdatasync(2)
//! and msync(MS_SYNC) do.
//!
//! One flat directory (the root); pages are sparse, 4 KiB, and all-zero
//! pages are not stored, so a 4 GiB sparse file costs nothing.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, Request};

/// The file system's page size: the unit of the durable state and the sync
/// log.
pub const PAGE: usize = 4096;
const PAGE_U64: u64 = PAGE as u64;

type Page = [u8; PAGE];
static ZERO_PAGE: Page = [0; PAGE];

/// How long the kernel may cache names and attributes. Every change goes
/// through the kernel, so its cache never goes stale.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// Larger than any file a test needs, small enough that no offset overflows.
const MAX_SIZE: u64 = 1 << 50;

#[derive(Debug, thiserror::Error)]
pub enum PowerCutError {
    #[error("creating the mount point {path}: {source}")]
    MountPoint { path: PathBuf, source: io::Error },
    #[error(
        "mounting the power-cut FUSE file system at {path} failed ({source}): it needs root and /dev/fuse"
    )]
    Mount { path: PathBuf, source: io::Error },
    #[error("no file {0:?} in the power-cut file system")]
    NoSuchFile(String),
}

/// One completed FSYNC of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRecord {
    /// The pages this sync wrote to the durable state, ascending: every page
    /// written, zeroed or punched since the previous sync, and every durable
    /// page a truncation since then dropped.
    pub pages: Vec<u64>,
    /// The durable size after it.
    pub size: u64,
}

/// What happened to a file, counted since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileCounters {
    pub writes: u64,
    pub bytes_written: u64,
    /// Completed FSYNCs.
    pub syncs: u64,
    /// The sum of the sync records' page counts.
    pub pages_synced: u64,
    /// WRITE, FSYNC, SETATTR and FALLOCATE refused with EIO after the cut.
    pub refused_after_cut: u64,
}

/// A file's durable content: what a power cut leaves. Holes and pages never
/// synced read as zeroes. Cheap to clone: pages are shared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DurableImage {
    size: u64,
    /// Only pages with a non-zero byte.
    pages: BTreeMap<u64, Arc<Page>>,
}

impl DurableImage {
    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Page `idx`; zeroes for a hole or a page beyond the end.
    pub fn page(&self, idx: u64) -> &[u8; PAGE] {
        self.pages.get(&idx).map_or(&ZERO_PAGE, |p| p)
    }

    /// The indices of the pages holding a non-zero byte, ascending.
    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn stored_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().copied()
    }

    /// Reads from `offset` into `buf`, up to the end of the image; returns
    /// the number of bytes read.
    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> usize {
        let end = self.size.min(offset.saturating_add(buf.len() as u64));
        let len = end.saturating_sub(offset) as usize;
        copy_pages(&mut buf[..len], offset, |idx| Some(self.page(idx)));
        len
    }

    /// The whole image; allocates its full size, holes included.
    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.size as usize];
        self.read(0, &mut v);
        v
    }
}

/// Fills `buf` with the bytes from `offset`, page by page.
fn copy_pages<'a>(buf: &mut [u8], offset: u64, page: impl Fn(u64) -> Option<&'a Page>) {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let (idx, off) = (at / PAGE_U64, (at % PAGE_U64) as usize);
        let n = (PAGE - off).min(buf.len() - done);
        let src = page(idx).unwrap_or(&ZERO_PAGE);
        buf[done..done + n].copy_from_slice(&src[off..off + n]);
        done += n;
    }
}

/// A file's content: the durable state and the volatile state on top.
#[derive(Default)]
struct FileData {
    durable: DurableImage,
    /// Pages changed since the last sync; `None` reads as zeroes. Never
    /// holds an all-zero `Some`.
    volatile: BTreeMap<u64, Option<Arc<Page>>>,
    /// The current size.
    size: u64,
    /// Durable pages from this one on were truncated away since the last
    /// sync (the partial page at the cut was copied into `volatile`).
    first_hidden: Option<u64>,
}

impl FileData {
    /// Page `idx` as a reader sees it now; `None` is zeroes.
    fn current(&self, idx: u64) -> Option<&Page> {
        if let Some(p) = self.volatile.get(&idx) {
            return p.as_deref();
        }
        if self.first_hidden.is_some_and(|h| idx >= h) {
            return None;
        }
        self.durable.pages.get(&idx).map(|p| &**p)
    }

    fn read(&self, offset: u64, len: u32) -> Vec<u8> {
        let end = self.size.min(offset.saturating_add(u64::from(len)));
        let mut buf = vec![0; end.saturating_sub(offset) as usize];
        copy_pages(&mut buf, offset, |idx| self.current(idx));
        buf
    }

    /// Applies `f` to volatile page `idx`, copied from the current page
    /// first; an all-zero result is stored as `None`.
    fn modify(&mut self, idx: u64, f: impl FnOnce(&mut Page)) {
        let mut page = match self.current(idx) {
            Some(p) => Arc::new(*p),
            None => Arc::new([0; PAGE]),
        };
        // The new Arc is not shared: no copy.
        f(Arc::make_mut(&mut page));
        let page = (page.iter().any(|&b| b != 0)).then_some(page);
        self.volatile.insert(idx, page);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (idx, off) = (at / PAGE_U64, (at % PAGE_U64) as usize);
            let n = (PAGE - off).min(data.len() - done);
            let src = &data[done..done + n];
            self.modify(idx, |p| p[off..off + n].copy_from_slice(src));
            done += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    /// Zeroes `[start, end)` in the volatile state.
    fn zero(&mut self, start: u64, end: u64) {
        let mut at = start;
        while at < end {
            let (idx, off) = (at / PAGE_U64, (at % PAGE_U64) as usize);
            let n = (PAGE - off).min((end - at) as usize);
            if n == PAGE {
                self.volatile.insert(idx, None);
            } else {
                self.modify(idx, |p| p[off..off + n].fill(0));
            }
            at += n as u64;
        }
    }

    fn set_size(&mut self, size: u64) {
        if size < self.size {
            // Bytes beyond the size always read as zeroes, so a later
            // extension shows zeroes: zero the partial page's tail, drop
            // the volatile pages beyond and hide the durable ones.
            let keep = size.div_ceil(PAGE_U64);
            let off = (size % PAGE_U64) as usize;
            if off != 0 {
                self.modify(size / PAGE_U64, |p| p[off..].fill(0));
            }
            self.volatile.split_off(&keep);
            self.first_hidden = Some(self.first_hidden.map_or(keep, |h| h.min(keep)));
        }
        self.size = size;
    }

    /// Makes the current state durable; returns what it wrote.
    fn sync(&mut self) -> SyncRecord {
        let mut pages: Vec<u64> = Vec::new();
        if let Some(h) = self.first_hidden.take() {
            pages.extend(self.durable.pages.split_off(&h).into_keys());
        }
        for (idx, page) in std::mem::take(&mut self.volatile) {
            match page {
                Some(p) => self.durable.pages.insert(idx, p),
                None => self.durable.pages.remove(&idx),
            };
            pages.push(idx);
        }
        pages.sort_unstable();
        pages.dedup();
        self.durable.size = self.size;
        SyncRecord {
            pages,
            size: self.size,
        }
    }

    /// An upper bound of the 512-byte blocks the file holds.
    fn blocks(&self) -> u64 {
        let pages = (self.durable.pages.len() + self.volatile.len()) as u64;
        (pages * (PAGE_U64 / 512)).min(self.size.div_ceil(512))
    }
}

struct FileState {
    /// The name it was last linked under.
    name: OsString,
    linked: bool,
    /// Open handles; an unlinked file is dropped when the last one closes.
    open: u32,
    cut: bool,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    data: FileData,
    log: Vec<SyncRecord>,
    counters: FileCounters,
}

impl FileState {
    fn attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: self.data.size,
            blocks: self.data.blocks(),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind: FileType::RegularFile,
            perm: self.perm,
            nlink: u32::from(self.linked),
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: PAGE as u32,
        }
    }

    /// EIO, counted, once the file is cut.
    fn refuse_if_cut(&mut self) -> Result<(), Errno> {
        if self.cut {
            self.counters.refused_after_cut += 1;
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

type File = Mutex<FileState>;

/// The root directory and the files. Lock order: `Tree`, then a file.
#[derive(Default)]
struct Tree {
    names: BTreeMap<OsString, u64>,
    files: HashMap<u64, Arc<File>>,
    /// The last inode number handed out (never reused).
    last_ino: u64,
}

impl Tree {
    /// Unlinks `ino`, dropping it if nothing holds it open.
    fn unlink(&mut self, ino: u64) {
        if let Some(f) = self.files.get(&ino) {
            let mut st = lock(f);
            st.linked = false;
            if st.open == 0 {
                drop(st);
                self.files.remove(&ino);
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    tree: Mutex<Tree>,
    /// FSYNC answers success and makes nothing durable: a device that lies,
    /// so that a crash check can be shown to catch one.
    fsync_lies: std::sync::atomic::AtomicBool,
}

/// A poisoned lock still guards consistent state: every update completes
/// before it can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        lock(&self.tree)
    }

    fn file(&self, ino: INodeNo) -> Result<Arc<File>, Errno> {
        self.tree().files.get(&ino.0).cloned().ok_or(Errno::ESTALE)
    }

    fn by_name(&self, name: &str) -> Result<Arc<File>, PowerCutError> {
        let tree = self.tree();
        tree.names
            .get(OsStr::new(name))
            .and_then(|ino| tree.files.get(ino))
            .cloned()
            .ok_or_else(|| PowerCutError::NoSuchFile(name.to_string()))
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: PAGE as u32,
        }
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        if ino.0 == ROOT {
            return Ok(self.root_attr());
        }
        let f = self.file(ino)?;
        let attr = lock(&f).attr(ino.0);
        Ok(attr)
    }

    /// Creates regular file `name` in the root, opened once if `open`.
    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        open: bool,
    ) -> Result<FileAttr, Errno> {
        if parent.0 != ROOT {
            return Err(Errno::ENOTDIR);
        }
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut tree = self.tree();
        if tree.names.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        tree.last_ino += 1;
        let ino = tree.last_ino + ROOT;
        let now = SystemTime::now();
        let st = FileState {
            name: name.to_owned(),
            linked: true,
            open: u32::from(open),
            cut: false,
            perm: (mode & !umask & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            atime: now,
            mtime: now,
            ctime: now,
            data: FileData::default(),
            log: Vec::new(),
            counters: FileCounters::default(),
        };
        let attr = st.attr(ino);
        tree.names.insert(name.to_owned(), ino);
        tree.files.insert(ino, Arc::new(Mutex::new(st)));
        Ok(attr)
    }
}

/// The power-cut file system, mounted; unmounted on drop.
pub struct PowerCutFs {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    _session: fuser::BackgroundSession,
}

impl PowerCutFs {
    /// Mounts an empty file system at `mountpoint`, creating the directory.
    pub fn mount(mountpoint: &Path) -> Result<Self, PowerCutError> {
        std::fs::create_dir_all(mountpoint).map_err(|source| PowerCutError::MountPoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("pmemvm-powercut".into()),
            fuser::MountOption::RW,
            fuser::MountOption::NoAtime,
        ];
        // fuser's default max_write is already its largest (16 MiB); the
        // kernel caps it at fs.fuse.max_pages_limit pages.
        let session = fuser::spawn_mount(
            FuseServer {
                shared: shared.clone(),
            },
            mountpoint,
            &config,
        )
        .map_err(|source| PowerCutError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        Ok(PowerCutFs {
            shared,
            mountpoint: mountpoint.to_path_buf(),
            _session: session,
        })
    }

    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// From now on FSYNC succeeds without making anything durable.
    pub fn lie_about_fsync(&self) {
        self.shared
            .fsync_lies
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The path of file `name` in the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Cuts the power to file `name`: from now on its durable state never
    /// changes (writes and syncs fail with EIO); returns that state.
    pub fn cut(&self, name: &str) -> Result<DurableImage, PowerCutError> {
        let f = self.shared.by_name(name)?;
        let mut st = lock(&f);
        st.cut = true;
        Ok(st.data.durable.clone())
    }

    /// File `name`'s durable state now, without cutting.
    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn durable(&self, name: &str) -> Result<DurableImage, PowerCutError> {
        let f = self.shared.by_name(name)?;
        let r = lock(&f).data.durable.clone();
        Ok(r)
    }

    /// One record per completed FSYNC of file `name`, oldest first.
    pub fn sync_log(&self, name: &str) -> Result<Vec<SyncRecord>, PowerCutError> {
        let f = self.shared.by_name(name)?;
        let r = lock(&f).log.clone();
        Ok(r)
    }

    // Used by the tests here and in tests/e2e.rs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn counters(&self, name: &str) -> Result<FileCounters, PowerCutError> {
        let f = self.shared.by_name(name)?;
        let r = lock(&f).counters;
        Ok(r)
    }

    /// Drops, now, every unlinked file last named `name` that a process
    /// still holds open (an unlinked file nobody holds is dropped at once);
    /// their handles then fail with ESTALE. Returns how many it dropped.
    pub fn forget(&self, name: &str) -> usize {
        let mut tree = self.shared.tree();
        let before = tree.files.len();
        tree.files.retain(|_, f| {
            let st = lock(f);
            st.linked || st.name != name
        });
        before - tree.files.len()
    }
}

/// The FUSE request handlers, run by fuser's session thread.
struct FuseServer {
    shared: Arc<Shared>,
}

/// Runs `op` on file `ino` under its lock.
fn with_file<T>(
    shared: &Shared,
    ino: INodeNo,
    op: impl FnOnce(&mut FileState) -> Result<T, Errno>,
) -> Result<T, Errno> {
    let f = shared.file(ino)?;
    let mut st = lock(&f);
    op(&mut st)
}

impl fuser::Filesystem for FuseServer {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: fuser::ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let ino = self.shared.tree().names.get(name).copied();
        match ino.map(|ino| self.shared.attr(INodeNo(ino))) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match self.shared.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: fuser::ReplyAttr,
    ) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.shared.root_attr());
        }
        let time = |t: fuser::TimeOrNow| match t {
            fuser::TimeOrNow::SpecificTime(t) => t,
            fuser::TimeOrNow::Now => SystemTime::now(),
        };
        let r = with_file(&self.shared, ino, |st| {
            st.refuse_if_cut()?;
            if let Some(size) = size {
                if size > MAX_SIZE {
                    return Err(Errno::EFBIG);
                }
                st.data.set_size(size);
                st.mtime = SystemTime::now();
            }
            if let Some(mode) = mode {
                st.perm = (mode & 0o7777) as u16;
            }
            st.uid = uid.unwrap_or(st.uid);
            st.gid = gid.unwrap_or(st.gid);
            st.atime = atime.map_or(st.atime, time);
            st.mtime = mtime.map_or(st.mtime, time);
            st.ctime = SystemTime::now();
            Ok(st.attr(ino.0))
        });
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: fuser::ReplyEntry,
    ) {
        match self.shared.create(req, parent, name, mode, umask, false) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        // The kernel sends CREATE only after a failed lookup; O_EXCL or not,
        // a name that appeared since is EEXIST.
        match self.shared.create(req, parent, name, mode, umask, true) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: fuser::ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: fuser::ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut tree = self.shared.tree();
        match tree.names.remove(name) {
            Some(ino) => {
                tree.unlink(ino);
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: fuser::ReplyEmpty,
    ) {
        if parent.0 != ROOT || newparent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        if flags.contains(fuser::RenameFlags::RENAME_EXCHANGE)
            || flags.contains(fuser::RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let mut tree = self.shared.tree();
        let Some(&ino) = tree.names.get(name) else {
            return reply.error(Errno::ENOENT);
        };
        if name == newname {
            return reply.ok();
        }
        if let Some(&old) = tree.names.get(newname) {
            if flags.contains(fuser::RenameFlags::RENAME_NOREPLACE) {
                return reply.error(Errno::EEXIST);
            }
            tree.unlink(old);
        }
        tree.names.remove(name);
        tree.names.insert(newname.to_owned(), ino);
        if let Some(f) = tree.files.get(&ino) {
            lock(f).name = newname.to_owned();
        }
        reply.ok();
    }

    fn open(
        &self,
        _req: &Request,
        ino: INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        if ino.0 == ROOT {
            return reply.error(Errno::EISDIR);
        }
        // Our content is what the kernel wrote: its cache stays valid.
        match with_file(&self.shared, ino, |st| {
            st.open += 1;
            Ok(())
        }) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        match with_file(&self.shared, ino, |st| Ok(st.data.read(offset, size))) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let r = with_file(&self.shared, ino, |st| {
            st.refuse_if_cut()?;
            if offset.saturating_add(data.len() as u64) > MAX_SIZE {
                return Err(Errno::EFBIG);
            }
            st.data.write(offset, data);
            st.counters.writes += 1;
            st.counters.bytes_written += data.len() as u64;
            st.mtime = SystemTime::now();
            st.ctime = st.mtime;
            Ok(())
        });
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let mut tree = self.shared.tree();
        if let Some(f) = tree.files.get(&ino.0) {
            let mut st = lock(f);
            st.open = st.open.saturating_sub(1);
            if !st.linked && st.open == 0 {
                drop(st);
                tree.files.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let lies = self
            .shared
            .fsync_lies
            .load(std::sync::atomic::Ordering::Relaxed);
        let r = with_file(&self.shared, ino, |st| {
            st.refuse_if_cut()?;
            if lies {
                return Ok(());
            }
            let record = st.data.sync();
            st.counters.syncs += 1;
            st.counters.pages_synced += record.pages.len() as u64;
            st.log.push(record);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, OsString::from(".")),
            (ROOT, FileType::Directory, OsString::from("..")),
        ];
        entries.extend(
            self.shared
                .tree()
                .names
                .iter()
                .map(|(name, &ino)| (ino, FileType::RegularFile, name.clone())),
        );
        // An entry's offset is the one of the entry after it.
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        // Names are not subject to power cuts here.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        let blocks = MAX_SIZE / PAGE_U64;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: fuser::ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let r = with_file(&self.shared, ino, |st| {
            st.refuse_if_cut()?;
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            if end > MAX_SIZE {
                return Err(Errno::EFBIG);
            }
            match mode {
                0 => {
                    if end > st.data.size {
                        st.data.set_size(end);
                    }
                }
                KEEP_SIZE => {}
                PUNCH => {
                    let end = end.min(st.data.size);
                    st.data.zero(offset, end);
                }
                _ => return Err(Errno::EOPNOTSUPP),
            }
            st.mtime = SystemTime::now();
            st.ctime = st.mtime;
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // What follows is unsupported; answered here so that fuser does not log
    // a warning each time the kernel or a tool (cp, mkfs) tries it.

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// The kernel falls back to its own SEEK_SET/CUR/END (and no holes).
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// The kernel falls back to reads and writes.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    /// A mount in a fresh temp dir; unmounted and removed on drop.
    struct TestMount {
        fs: Option<PowerCutFs>,
        dir: PathBuf,
    }

    impl TestMount {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("pmemvm-powercut-{}-{tag}", std::process::id()));
            let fs = PowerCutFs::mount(&dir).unwrap_or_else(|e| panic!("{e}"));
            TestMount { fs: Some(fs), dir }
        }

        fn fs(&self) -> &PowerCutFs {
            self.fs.as_ref().unwrap()
        }
    }

    impl Drop for TestMount {
        fn drop(&mut self) {
            drop(self.fs.take());
            let _ = fs::remove_dir(&self.dir);
        }
    }

    fn rw(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }

    fn errno(r: io::Result<impl std::fmt::Debug>) -> i32 {
        r.expect_err("the call should have failed")
            .raw_os_error()
            .unwrap()
    }

    fn page_of(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    #[test]
    fn fsynced_writes_survive_the_cut_and_later_ones_do_not() {
        let m = TestMount::new("basic");
        let fs = m.fs();
        let mut f = File::create(fs.path("a.img")).unwrap();
        f.write_all(&[1; 10_000]).unwrap();
        f.sync_all().unwrap();
        f.write_all_at(&[2; 100], 0).unwrap();
        f.write_all_at(&[3; 100], 20_000).unwrap();

        let img = fs.cut("a.img").unwrap();
        assert_eq!(img.size(), 10_000);
        assert_eq!(img.to_vec(), vec![1; 10_000]);

        // Refused, and nothing durable changes.
        assert_eq!(errno(f.write_at(&[4; 10], 0)), libc::EIO);
        assert_eq!(errno(f.sync_all()), libc::EIO);
        assert_eq!(errno(f.set_len(0)), libc::EIO);
        assert_eq!(fs.durable("a.img").unwrap(), img);
        let c = fs.counters("a.img").unwrap();
        assert_eq!((c.writes, c.syncs, c.refused_after_cut), (3, 1, 3), "{c:?}");

        // Reads serve the state at the cut.
        let mut buf = Vec::new();
        File::open(fs.path("a.img"))
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        assert_eq!(buf.len(), 20_100);
        assert_eq!(&buf[..100], &[2; 100]);
        assert_eq!(&buf[100..10_000], &[1; 9_900]);
        assert!(fs.cut("nope").is_err());
    }

    #[test]
    fn mmap_stores_are_durable_only_after_msync() {
        let m = TestMount::new("mmap");
        let fs = m.fs();
        let len = 16 * PAGE;
        let f = rw(&fs.path("m.img"));
        f.set_len(len as u64).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a fresh mapping of a file we own, length within the file;
        // we check for MAP_FAILED and unmap it below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        let p = p.cast::<u8>();
        // SAFETY: pages 3 and 5 lie inside the mapping, which nothing else
        // aliases; msync covers exactly the mapping.
        unsafe {
            p.add(3 * PAGE).write_bytes(0xab, PAGE);
            assert_eq!(libc::msync(p.cast(), len, libc::MS_SYNC), 0);
            p.add(5 * PAGE).write_bytes(0xcd, 16);
        }
        let img = fs.cut("m.img").unwrap();
        assert_eq!(img.size(), len as u64);
        assert_eq!(img.stored_pages().collect::<Vec<_>>(), [3]);
        assert_eq!(img.page(3), &[0xab; PAGE]);
        assert_eq!(img.page(5), &[0; PAGE]);

        // Unmapping (or the fsync) writes page 5 back: refused, and the
        // image stands. The fsync fails with that writeback's EIO.
        // SAFETY: the mapping made above, not used after this.
        assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
        assert_eq!(errno(f.sync_data()), libc::EIO);
        drop(f);
        assert_eq!(fs.durable("m.img").unwrap(), img);
        let c = fs.counters("m.img").unwrap();
        assert_eq!((c.writes, c.syncs), (1, 2), "{c:?}");
        assert!(c.refused_after_cut >= 1, "{c:?}");
    }

    #[test]
    fn the_sync_log_lists_the_pages_each_sync_wrote() {
        let m = TestMount::new("log");
        let fs = m.fs();
        let f = rw(&fs.path("l.img"));
        f.write_all_at(&page_of(1), 0).unwrap();
        f.write_all_at(&page_of(2), 2 * PAGE_U64).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[5; 10], 5 * PAGE_U64 + 100).unwrap();
        f.write_all_at(&[6; 10], 2 * PAGE_U64 + PAGE_U64 - 5)
            .unwrap();
        f.sync_all().unwrap();
        f.sync_all().unwrap();
        let size = 5 * PAGE_U64 + 110;
        assert_eq!(
            fs.sync_log("l.img").unwrap(),
            [
                SyncRecord {
                    pages: vec![0, 2],
                    size: 3 * PAGE_U64
                },
                SyncRecord {
                    pages: vec![2, 3, 5],
                    size
                },
                SyncRecord {
                    pages: vec![],
                    size
                },
            ]
        );
        let c = fs.counters("l.img").unwrap();
        assert_eq!((c.writes, c.syncs, c.pages_synced), (4, 3, 5), "{c:?}");
        assert_eq!(c.bytes_written, 2 * PAGE_U64 + 20);
    }

    #[test]
    fn truncation_extension_and_holes_are_volatile_until_fsync() {
        let m = TestMount::new("size");
        let fs = m.fs();
        let name = "t.img";
        let mut f = rw(&fs.path(name));
        f.write_all_at(&[0x11; 3 * PAGE], 0).unwrap();
        f.sync_all().unwrap();
        let synced = fs.durable(name).unwrap();
        assert_eq!(synced.to_vec(), vec![0x11; 3 * PAGE]);

        // Shrink, then extend again: the current view shows zeroes beyond
        // the cut point, the durable state is untouched until fsync.
        f.set_len(5000).unwrap();
        f.set_len(3 * PAGE_U64).unwrap();
        let mut now = vec![0; 3 * PAGE];
        f.read_exact_at(&mut now, 0).unwrap();
        assert_eq!(&now[..5000], &[0x11; 5000]);
        assert!(now[5000..].iter().all(|&b| b == 0));
        assert_eq!(fs.durable(name).unwrap(), synced);
        f.sync_all().unwrap();
        assert_eq!(fs.durable(name).unwrap().to_vec(), now);
        assert_eq!(fs.sync_log(name).unwrap()[1].pages, [1, 2]);

        // Punch a whole page and part of another.
        f.write_all_at(&[0x22; 3 * PAGE], 0).unwrap();
        f.sync_all().unwrap();
        let punch = |off: u64, len: u64| {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on an open fd; no memory is passed.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
            assert_eq!(r, 0, "punch: {}", io::Error::last_os_error());
        };
        punch(PAGE_U64, PAGE_U64);
        punch(100, 100);
        assert_eq!(fs.durable(name).unwrap().to_vec(), vec![0x22; 3 * PAGE]);
        f.sync_data().unwrap();
        let img = fs.durable(name).unwrap();
        let mut want = vec![0x22; 3 * PAGE];
        want[100..200].fill(0);
        want[PAGE..2 * PAGE].fill(0);
        assert_eq!(img.to_vec(), want);
        assert_eq!(img.stored_pages().collect::<Vec<_>>(), [0, 2]);

        // Extend with fallocate and with a write past the end; then
        // truncate to nothing without fsync: the cut keeps the old size.
        // SAFETY: as above.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 5 * PAGE as i64) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        assert_eq!(f.metadata().unwrap().len(), 5 * PAGE_U64);
        assert_eq!(fs.durable(name).unwrap().size(), 3 * PAGE_U64);
        f.sync_all().unwrap();
        assert_eq!(fs.durable(name).unwrap().size(), 5 * PAGE_U64);
        // Modes other than 0, KEEP_SIZE and PUNCH_HOLE are not supported.
        let zero_range = libc::FALLOC_FL_ZERO_RANGE;
        // SAFETY: as above.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), zero_range, 0, PAGE as i64) };
        let err = io::Error::last_os_error().raw_os_error();
        assert_eq!((r, err), (-1, Some(libc::EOPNOTSUPP)));
        f.seek(SeekFrom::Start(7 * PAGE_U64)).unwrap();
        f.write_all(&[9]).unwrap();
        f.set_len(0).unwrap();
        let img = fs.cut(name).unwrap();
        assert_eq!(img.size(), 5 * PAGE_U64);
        want.resize(5 * PAGE, 0);
        assert_eq!(img.to_vec(), want);
        // After the cut, fallocate is EIO too.
        // SAFETY: as above.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 9 * PAGE as i64) };
        assert_eq!(
            (r, io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::EIO))
        );
    }

    #[test]
    fn a_sparse_4_gib_file_costs_nothing_and_reads_zeroes() {
        let m = TestMount::new("sparse");
        let fs = m.fs();
        let name = "s.img";
        let f = rw(&fs.path(name));
        let size = 4u64 << 30;
        f.set_len(size).unwrap();
        f.sync_all().unwrap();
        let mut buf = vec![0xff; 1 << 20];
        f.read_exact_at(&mut buf, size - (1 << 20)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        f.write_all_at(&[7; 10], 3 << 30).unwrap();
        f.sync_all().unwrap();
        let img = fs.durable(name).unwrap();
        assert_eq!(img.size(), size);
        assert_eq!(
            img.stored_pages().collect::<Vec<_>>(),
            [(3 << 30) / PAGE_U64]
        );
        let mut tail = [0xff; 16];
        assert_eq!(img.read(size - 8, &mut tail), 8);
        assert_eq!(
            tail,
            [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        let tree = fs.shared.tree();
        let st = lock(&tree.files[&tree.names[OsStr::new(name)]]);
        assert_eq!(
            (st.data.durable.pages.len(), st.data.volatile.len()),
            (1, 0)
        );
    }

    /// cp, dd, mkfs.ext4, ls, mv and rm on it; an unlinked file's state is
    /// dropped when its last handle closes, or by `forget`.
    #[test]
    fn tools_work_and_unlinked_files_are_dropped() {
        let m = TestMount::new("tools");
        let fs = m.fs();
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
            assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let img = fs.path("disk.img");
        let img_s = img.to_str().unwrap();
        run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={img_s}"),
                "bs=1M",
                "count=32",
                "conv=fsync",
                "status=none",
            ],
        );
        run("mkfs.ext4", &["-F", "-q", img_s]);
        run("sync", &[img_s]);
        let durable = fs.durable("disk.img").unwrap();
        assert_eq!(durable.size(), 32 << 20);
        // The superblock's magic, at 1024 + 56.
        assert_eq!(&durable.page(0)[1080..1082], &[0x53, 0xef]);
        let copy = fs.path("copy.img");
        run("cp", &[img_s, copy.to_str().unwrap()]);
        run(
            "mv",
            &[
                copy.to_str().unwrap(),
                fs.path("moved.img").to_str().unwrap(),
            ],
        );
        assert_eq!(
            run("ls", &[fs.mountpoint().to_str().unwrap()]),
            "disk.img\nmoved.img\n"
        );
        assert_eq!(
            fs::read(fs.path("moved.img")).unwrap(),
            fs::read(&img).unwrap()
        );
        // Not synced: cp wrote it, nobody fsynced it.
        assert_eq!(fs.durable("moved.img").unwrap().size(), 0);

        let held = File::open(&img).unwrap();
        run("rm", &[img_s, fs.path("moved.img").to_str().unwrap()]);
        assert!(fs.durable("disk.img").is_err());
        assert_eq!(fs.shared.tree().files.len(), 1, "only the held file stays");
        assert_eq!(fs.forget("disk.img"), 1);
        assert!(fs.shared.tree().files.is_empty());
        assert_eq!(errno(held.sync_all()), libc::ESTALE);
    }
}
