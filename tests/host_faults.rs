//! Host faults under a running guest, end to end:
//! - another program truncates the backing file: pmemvm survives, says so,
//!   fails every flush from then on, never grows the file back, and the
//!   guest runs on to its own exit;
//! - the host file system fails fsync with EIO (a FUSE file system of this
//!   test that loses its unflushed writes, as a disk losing its volatile
//!   cache does): the guest's fsync fails, the pages stay dirty, and the
//!   next flush really writes them, although the page cache holds them
//!   clean ("fsyncgate").
//!
//! - a file system that acknowledges fsync and keeps nothing: `bench
//!   crash`'s power-cut check reports the acknowledged records lost, with
//!   the command that replays the round.
//!
//! One boot per engine (kernel, uffd, prefault) for the truncation, one boot
//! for EIO; the crash check needs no Linux guest.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use common::{guest, pmem_arg, TempDir, Vm};

const PAGE: u64 = 4096;
const DEVICE: u64 = 16 << 20;
/// Must match raw_pages[] in guest-images/init/init.c.
const RAW_PAGES: [u64; 5] = [10, 17, 24, 31, 38];

fn page(path: &Path, index: u64) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut buf, index * PAGE).unwrap();
    buf
}

fn stats(path: &Path) -> serde_json::Value {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap()
}

fn acks(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("pmemvm-init: ack ")?.trim().parse().ok())
        .collect()
}

/// The guest writes, fsyncs and acknowledges; the test truncates the file
/// under it to 2 pages (the acks land on pages 10..74).
fn truncation_round(engine: &str) {
    let guest = guest();
    let dir = TempDir::new(&format!("truncate-{engine}"));
    let img = dir.join("pmem.img");
    let stats_path = dir.join("stats.json");
    let args = vec![
        "--pmem".to_string(),
        pmem_arg(&img, &format!(",size=16M,engine={engine}")),
        "--stats".to_string(),
        stats_path.display().to_string(),
    ];
    let mut vm = Vm::start(&guest, "pmemvm_mode=acks pmemvm_raw=pmem0", &args);
    vm.wait_for("pmemvm-init: ack 3");
    // The VMM's lock is advisory: nothing stops this.
    let short = 2 * PAGE;
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(short)
        .unwrap();
    let out = vm.wait();

    // The guest's own exit (status 1 from its failed fsync), not a signal
    // and not a VMM failure.
    out.expect_code(1);
    out.expect_output("pmemvm-init: acks FAILED (status 1)");
    let acked = acks(&out.output);
    let last = *acked.last().unwrap();
    out.expect_output(&format!("pmemvm-init: acks: seq {}: I/O error", last + 1));
    // Ack 3 was read when the file was cut; at most the ack then on its
    // way to the console and one flush then in progress may follow it.
    assert!(
        last <= 5,
        "{engine}: acks went on to {last} after the file was truncated at ack 3:\n{}",
        out.output
    );
    // From the guard (a guest store past the end) or from the flush,
    // whichever saw it first.
    out.expect_output("the backing file was truncated to 8192 bytes");
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        short,
        "{engine}: pmemvm grew the truncated file back"
    );

    let json = stats(&stats_path);
    let r = &json["pmem"][0];
    assert_eq!(r["engine"], engine, "{r}");
    assert_eq!(r["backing_truncated"], true, "{r}");
    assert!(
        r["errors"]["writeback_failed"].as_u64().unwrap() >= 1,
        "{r}"
    );
    assert!(
        r["dirty_pages"].as_u64().unwrap() >= 1,
        "{engine}: the failed flush's page must stay dirty: {r}"
    );
    let ok = r["writebacks"].as_u64().unwrap() - r["errors"]["writeback_failed"].as_u64().unwrap();
    assert_eq!(ok, acked.len() as u64, "one good flush per ack: {r}");
}

#[test]
fn truncated_file_kernel_engine() {
    truncation_round("kernel");
}

#[test]
fn truncated_file_uffd_engine() {
    truncation_round("uffd");
}

#[test]
fn truncated_file_prefault_engine() {
    truncation_round("prefault");
}

/// What the failing file system did, per file.
#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    fsyncs_ok: AtomicU64,
    fsyncs_failed: AtomicU64,
    /// Pages of WRITEs received after a failed FSYNC.
    rewritten_bytes: AtomicU64,
}

struct FlakyFile {
    name: String,
    store: File,
    /// Writes not yet made durable: the device's volatile cache. A failed
    /// FSYNC loses them.
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
    /// FSYNCs still to fail.
    fail_fsyncs: AtomicU64,
    counters: Counters,
}

/// A FUSE file system with a few flat files, each backed by a host file.
/// WRITEs are cached until an FSYNC; an FSYNC may fail on demand with EIO
/// and then drops the cache. The kernel's FUSE client, its page cache and
/// its error reporting are the real ones.
struct FlakyFs {
    files: Vec<Arc<FlakyFile>>,
}

const TTL: Duration = Duration::from_secs(1);

impl FlakyFs {
    fn file(&self, ino: fuser::INodeNo) -> Option<&Arc<FlakyFile>> {
        let i = u64::from(ino).checked_sub(2)?;
        self.files.get(usize::try_from(i).ok()?)
    }

    fn attr(&self, ino: fuser::INodeNo) -> Option<fuser::FileAttr> {
        let (kind, size, perm) = if u64::from(ino) == 1 {
            (fuser::FileType::Directory, 0, 0o755)
        } else {
            let f = self.file(ino)?;
            (
                fuser::FileType::RegularFile,
                f.store.metadata().ok()?.len(),
                0o644,
            )
        };
        Some(fuser::FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: PAGE as u32,
        })
    }
}

impl fuser::Filesystem for FlakyFs {
    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &OsStr,
        reply: fuser::ReplyEntry,
    ) {
        let found = (u64::from(parent) == 1)
            .then(|| self.files.iter().position(|f| OsStr::new(&f.name) == name))
            .flatten()
            .and_then(|i| self.attr(fuser::INodeNo(i as u64 + 2)));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    /// The page cache is kept across opens, so what the test reads before
    /// pmemvm opens a file is still cached for the guest.
    fn open(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        reply.opened(fuser::FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let len = f.store.metadata().map(|m| m.len()).unwrap_or(0);
        let end = (offset + u64::from(size)).min(len);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        if f.store.read_exact_at(&mut buf, offset).is_err() {
            return reply.error(fuser::Errno::EIO);
        }
        // The cache is newer than the store.
        for (at, data) in f.pending.lock().unwrap().iter() {
            let (lo, hi) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        reply.data(&buf);
    }

    fn write(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        f.counters.writes.fetch_add(1, SeqCst);
        if f.counters.fsyncs_failed.load(SeqCst) > 0 {
            f.counters
                .rewritten_bytes
                .fetch_add(data.len() as u64, SeqCst);
        }
        f.pending.lock().unwrap().push((offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let mut pending = f.pending.lock().unwrap();
        if f.fail_fsyncs
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            pending.clear();
            f.counters.fsyncs_failed.fetch_add(1, SeqCst);
            return reply.error(fuser::Errno::EIO);
        }
        for (at, data) in pending.drain(..) {
            if f.store.write_all_at(&data, at).is_err() {
                return reply.error(fuser::Errno::EIO);
            }
        }
        if f.store.sync_data().is_err() {
            return reply.error(fuser::Errno::EIO);
        }
        f.counters.fsyncs_ok.fetch_add(1, SeqCst);
        reply.ok();
    }
}

/// The mounted file system; unmounted on drop.
struct Mounted {
    files: Vec<Arc<FlakyFile>>,
    mnt: PathBuf,
    _session: fuser::BackgroundSession,
}

/// Mounts a FlakyFs at `mnt` with one `DEVICE`-sized file per name, stored
/// in `store/NAME`; each file's first `fail` FSYNCs fail.
fn mount_flaky(mnt: PathBuf, store: &Path, names: &[&str], fail: u64) -> Mounted {
    fs::create_dir_all(&mnt).unwrap();
    fs::create_dir_all(store).unwrap();
    let files: Vec<Arc<FlakyFile>> = names
        .iter()
        .map(|name| {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(store.join(name))
                .unwrap();
            f.set_len(DEVICE).unwrap();
            Arc::new(FlakyFile {
                name: name.to_string(),
                store: f,
                pending: Mutex::new(Vec::new()),
                fail_fsyncs: AtomicU64::new(fail),
                counters: Counters::default(),
            })
        })
        .collect();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("pmemvm-flaky".into()),
        fuser::MountOption::RW,
    ];
    let session = fuser::spawn_mount(
        FlakyFs {
            files: files.clone(),
        },
        &mnt,
        &config,
    )
    .unwrap_or_else(|e| {
        panic!(
            "mounting the test's FUSE file system at {} failed ({e}): this test needs root and /dev/fuse",
            mnt.display()
        )
    });
    Mounted {
        files,
        mnt,
        _session: session,
    }
}

/// EIO from the host's fsync, on both engines in one boot: the first FSYNC
/// of each file fails and loses the writes the kernel had sent it. The
/// guest (raw mode) writes 5 pages and fsyncs (EIO), fsyncs again (the 5
/// pages, still dirty, written for real), writes page 17 again and fsyncs.
#[test]
fn fsync_eio_fails_the_flush_and_the_retry_writes_the_pages() {
    let guest = guest();
    let dir = TempDir::new("eio");
    let store = dir.join("store");
    let fuse = mount_flaky(dir.join("mnt"), &store, &["kernel.img", "uffd.img"], 1);
    let stats_path = dir.join("stats.json");
    let mut args = Vec::new();
    for (name, engine) in [("kernel.img", "kernel"), ("uffd.img", "uffd")] {
        // The guest reads pages 0 and 1 as it probes the disk (the
        // partition scan, nd_pmem's info block). Uncached, on a host with
        // EPT/NPT, such a read blocks, KVM serves it through its async
        // page-fault worker, which faults the page in for writing, and then
        // maps it writable, so the kernel engine's dirty log counts a page
        // the guest only read (README, "engine="). This test is about EIO:
        // the whole file is read into the FUSE cache first.
        fs::read(fuse.mnt.join(name))
            .unwrap_or_else(|e| panic!("reading {name} through FUSE: {e}"));
        args.push("--pmem".to_string());
        args.push(pmem_arg(&fuse.mnt.join(name), &format!(",engine={engine}")));
    }
    args.push("--stats".into());
    args.push(stats_path.display().to_string());
    let out = Vm::run(&guest, "pmemvm_mode=raw pmemvm_raw=pmem0,pmem1", &args);

    // The guest saw EIO on its first fsync and exits by itself.
    out.expect_code(1);
    for dev in ["pmem0", "pmem1"] {
        out.expect_output(&format!("pmemvm-init: raw {dev} FAILED: I/O error"));
    }
    for name in ["kernel.img", "uffd.img"] {
        out.expect_output(&format!(
            "writeback of {} failed: Input/output error",
            fuse.mnt.join(name).display()
        ));
    }

    let json = stats(&stats_path);
    for (i, f) in fuse.files.iter().enumerate() {
        let r = &json["pmem"][i];
        let c = &f.counters;
        let what = format!("pmem{i} ({}): {r}", f.name);
        assert_eq!(r["writebacks"], 3, "{what}");
        assert_eq!(r["errors"]["writeback_failed"], 1, "{what}");
        // The failed flush's 5 pages stayed dirty: the second flush wrote
        // them, the third page 17 again.
        assert_eq!(r["flush"]["pages"], 6, "{what}");
        assert_eq!(r["flush"]["last_pages"], 1, "{what}");
        assert_eq!(r["dirty_pages"], 0, "{what}");
        assert_eq!(
            (c.fsyncs_failed.load(SeqCst), c.fsyncs_ok.load(SeqCst)),
            (1, 2),
            "{what}"
        );
        // The retry sent the pages again: the page cache held them clean.
        assert!(
            c.rewritten_bytes.load(SeqCst) >= 6 * PAGE,
            "{what}: only {} bytes written after the failed fsync",
            c.rewritten_bytes.load(SeqCst)
        );
        // What the file system made durable, read from its store.
        let path = store.join(&f.name);
        assert_eq!(fs::metadata(&path).unwrap().len(), DEVICE, "{}", f.name);
        for p in RAW_PAGES {
            let tag = if p == 17 { "again" } else { "first" };
            let want = format!("pmemvm raw pmem{i} page {p} {tag}\n");
            assert!(
                page(&path, p).starts_with(want.as_bytes()),
                "{}: page {p} lacks {want:?}: the data of the failed flush never became durable",
                f.name
            );
        }
    }
}

/// The crash bench's check can fail: on a power-cut file system whose
/// fsync lies, every engine loses acknowledged records, and the bench says
/// so, with the replay command, and exits 1.
#[test]
fn crash_check_catches_a_file_system_that_lies_about_fsync() {
    let dir = TempDir::new("lying-fsync");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pmemvm"))
        .args(["bench", "crash", "--engine", "kernel,mirror,uffd,prefault"])
        .args([
            "--end",
            "cut",
            "--rounds",
            "2",
            "--vcpus",
            "2",
            "--lying-fsync",
        ])
        .arg("--dir")
        .arg(dir.join(""))
        .output()
        .expect("run pmemvm bench crash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("acknowledged records lost"), "{stderr}");
    for engine in ["kernel", "mirror", "uffd", "prefault"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(engine))
            .unwrap_or_else(|| panic!("no {engine} row:\n{stdout}"));
        let lost: u64 = row.split_whitespace().nth(5).unwrap().parse().unwrap();
        assert!(
            lost > 0,
            "{engine} lost nothing on a lying fsync:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!(
                "LOST: pmemvm bench crash --engine {engine} --end cut --vcpus 2 --seed 1 --first-round"
            )),
            "{stdout}"
        );
    }
}
