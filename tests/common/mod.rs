//! Helpers for the end-to-end tests: find the guest, run pmemvm with a
//! time limit while collecting its console, make scratch directories and
//! run host file-system tools.
//!
//! Every test boots a real guest, so the prerequisites are checked loudly:
//! a missing /dev/kvm or guest image is a failure with a message, never a
//! silent skip.
//!
//! Environment knobs:
//! - `PMEMVM_E2E_TIMEOUT=SECS`: time limit per guest run (default 300).
//! - `PMEMVM_E2E_CONSOLE=1`: echo every console line to stderr as it
//!   arrives, prefixed with the test name (with `--nocapture`).
//! - `PMEMVM_E2E_PMEM_OPTS=k=v[,k=v]`: appended to every `--pmem`, e.g.
//!   `engine=uffd` to run the suite on another fault engine.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one guest run may take before it is killed, unless
/// `PMEMVM_E2E_TIMEOUT` says otherwise. A boot to init takes about 35 s on
/// nested shadow-paging KVM, and tests run in parallel on two cores, so this
/// leaves a wide margin.
pub const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// On a host with two-dimensional paging (the NPT host) a guest reaches
/// init in about 5 s; one silent this long before init started is stuck
/// in early boot, QEMU's L2 hang (PLATFORM.md), and is ended at once
/// rather than at [`VM_TIMEOUT`]. Nested shadow paging boots too slowly
/// for a silence limit, so there is none.
const EARLY_BOOT_SILENCE: Duration = Duration::from_secs(60);

pub fn vm_timeout() -> Duration {
    match std::env::var("PMEMVM_E2E_TIMEOUT") {
        Ok(v) => Duration::from_secs(
            v.parse()
                .unwrap_or_else(|_| panic!("PMEMVM_E2E_TIMEOUT={v:?} is not a number of seconds")),
        ),
        Err(_) => VM_TIMEOUT,
    }
}

/// A `--pmem` value for `path`: `file=PATH`, then `extra` (",k=v..."), then
/// `PMEMVM_E2E_PMEM_OPTS`.
pub fn pmem_arg(path: &Path, extra: &str) -> String {
    let mut arg = format!("file={}{extra}", path_str(path));
    if let Ok(opts) = std::env::var("PMEMVM_E2E_PMEM_OPTS") {
        if !opts.is_empty() {
            arg.push(',');
            arg.push_str(&opts);
        }
    }
    arg
}

/// The guest kernel and initramfs built by guest-images/build.sh.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Checks /dev/kvm and the guest images; panics with what to do if one is
/// missing.
pub fn guest() -> Guest {
    image(
        "target/guest",
        "vmlinux",
        "guest-images/build.sh (about 7 min the first time, seconds after an init.c change)",
    )
}

/// The same test kernel as a bzImage, with the same initramfs.
pub fn bzimage_guest() -> Guest {
    image(
        "target/guest",
        "bzImage",
        "guest-images/build.sh (about 7 min the first time, seconds after an init.c change)",
    )
}

/// Debian's own kernel with the test init and its modules
/// (guest-images/stock-kernel/build.sh).
pub fn stock_guest() -> Guest {
    image(
        "target/stock-kernel",
        "vmlinuz",
        "guest-images/stock-kernel/build.sh (make stock-kernel)",
    )
}

fn image(dir: &str, kernel: &str, build: &str) -> Guest {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "the end-to-end tests need read-write access to /dev/kvm ({e}); \
             run them on a host with KVM"
        );
    }
    let dir = root.join(dir);
    let guest = Guest {
        kernel: dir.join(kernel),
        initrd: dir.join("initramfs.cpio.gz"),
    };
    for p in [&guest.kernel, &guest.initrd] {
        assert!(
            p.is_file(),
            "missing guest image {}: build it with {build}",
            p.display()
        );
    }
    guest
}

/// The checks init.c's dax mode prints for a writable mount.
pub const WRITABLE_CHECKS: &[&str] = &[
    "mount",
    "proc-mounts-dax",
    "queue-dax",
    "write",
    "mmap-write",
    "fsync-write",
    "fsync-mmap",
    "readback-write",
    "readback-mmap",
    "statx-dax",
    "map-sync-eopnotsupp",
    "punch-hole",
    "fallocate",
    "truncate-mapped-sigbus",
    "truncate-mapped-regrow",
    "first-touch",
    "fsync-1page",
    "umount",
];
/// Figures the writable checks print for the host ("metric DEV:NAME V UNIT").
pub const WRITABLE_METRICS: &[&str] =
    &["first-touch-write-p50", "warm-write-p50", "fsync-1page-p50"];
/// Whether this is a nested shadow-paging KVM host (PLATFORM.md), by the
/// same signs pmemvm uses: the kvm_pvm module, or no VMX/SVM flag.
pub fn nested_shadow_host() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    Path::new("/sys/module/kvm_pvm").exists() || !hw
}

/// What a finished pmemvm run left behind.
pub struct Outcome {
    pub status: ExitStatus,
    /// stdout and stderr interleaved line by line: the guest console and
    /// pmemvm's log.
    pub output: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// Panics with the whole console unless pmemvm exited with `code`.
    pub fn expect_code(&self, code: i32) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "pmemvm ended with {} after {:.1?}, want exit status {code}; output:\n{}",
            self.status,
            self.elapsed,
            self.output
        );
    }

    /// What pmemvm chose for this host kind: guest switches and the dirty
    /// bitmap on a nested shadow-paging host; neither, and the dirty ring,
    /// on a host with VMX/SVM (the NPT host). For runs with a kernel-engine
    /// device.
    pub fn expect_host_choices(&self) {
        if nested_shadow_host() {
            self.expect_output("adding guest switches");
            self.expect_output("first writes tracked with the KVM dirty bitmap");
        } else {
            assert!(
                !self.output.contains("adding guest switches"),
                "pmemvm added guest switches on a VMX/SVM host; output:\n{}",
                self.output
            );
            self.expect_output("first writes tracked with the KVM dirty ring");
        }
    }

    /// Panics with the whole console unless it holds `needle`.
    pub fn expect_output(&self, needle: &str) {
        assert!(
            self.output.contains(needle),
            "console lacks {needle:?}; output:\n{}",
            self.output
        );
    }
}

/// A running pmemvm. Dropping it kills the process, so a failing test never
/// leaves a VM behind.
pub struct Vm {
    child: Child,
    lines: Receiver<String>,
    output: String,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    timeout: Duration,
    echo: Option<String>,
    /// Whether [`EARLY_BOOT_SILENCE`] applies (a two-dimensional-paging
    /// host), and whether it ended the run.
    early_boot_limit: bool,
    stalled: bool,
}

impl Vm {
    /// Starts `pmemvm run` on the test guest with the guest command line
    /// `cmdline` and the extra pmemvm arguments `args`.
    pub fn start(guest: &Guest, cmdline: &str, args: &[String]) -> Vm {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pmemvm"));
        cmd.arg("run")
            .arg("--kernel")
            .arg(&guest.kernel)
            .arg("--initrd")
            .arg(&guest.initrd)
            .arg("--cmdline")
            .arg(cmdline)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let readers = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .into_iter()
        .map(|pipe| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf);
                            let line = line.trim_end_matches(['\n', '\r']).to_string();
                            if tx.send(line).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
        let echo = std::env::var_os("PMEMVM_E2E_CONSOLE").map(|_| {
            std::thread::current()
                .name()
                .unwrap_or("pmemvm")
                .to_string()
        });
        Vm {
            child,
            lines,
            output: String::new(),
            readers,
            started,
            timeout: vm_timeout(),
            echo,
            early_boot_limit: !nested_shadow_host(),
            stalled: false,
        }
    }

    /// Runs pmemvm to its end (at most [`vm_timeout`]).
    pub fn run(guest: &Guest, cmdline: &str, args: &[String]) -> Outcome {
        Self::start(guest, cmdline, args).wait()
    }

    fn push(&mut self, line: String) {
        if let Some(name) = &self.echo {
            eprintln!(
                "[{name} {:6.1}s] {line}",
                self.started.elapsed().as_secs_f64()
            );
        }
        self.output.push_str(&line);
        self.output.push('\n');
    }

    fn deadline(&self) -> Instant {
        self.started + self.timeout
    }

    /// How long the console may stay silent now: [`EARLY_BOOT_SILENCE`]
    /// on a two-dimensional-paging host until the guest's init has started,
    /// else up to the deadline.
    fn silence_limit(&self) -> Option<Duration> {
        (self.early_boot_limit && !self.output.contains("pmemvm-init: started"))
            .then_some(EARLY_BOOT_SILENCE)
    }

    /// Kills pmemvm and panics with the console so far.
    fn timed_out(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.push(line);
        }
        // Said apart, since tests/npt-host.sh tells an L2 guest that never
        // started (QEMU's fault there) from one that went wrong.
        let silent = if self.output.is_empty() {
            " (the guest printed nothing)"
        } else if self.stalled {
            " (the guest stalled in early boot)"
        } else {
            ""
        };
        panic!(
            "pmemvm killed after {:.1?} waiting for {what}{silent}; output:\n{}",
            self.started.elapsed(),
            self.output
        );
    }

    /// Waits until a console line contains `needle`; panics with the console
    /// if pmemvm ends or the time limit passes first.
    pub fn wait_for(&mut self, needle: &str) {
        loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            let wait = self.silence_limit().map_or(left, |s| s.min(left));
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.stalled = wait < left;
                    self.timed_out(&format!("{needle:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait for pmemvm");
                    panic!(
                        "pmemvm ended ({status}) after {:.1?} before printing {needle:?}; output:\n{}",
                        self.started.elapsed(),
                        self.output
                    );
                }
            }
        }
    }

    /// Waits until every needle has appeared on a console line, in any
    /// order; panics like [`Vm::wait_for`].
    pub fn wait_for_all(&mut self, needles: &[&str]) {
        let mut left: Vec<&str> = needles
            .iter()
            .copied()
            .filter(|n| !self.output.contains(n))
            .collect();
        while let Some(&first) = left.first() {
            self.wait_for(first);
            left.retain(|n| !self.output.contains(n));
        }
    }

    /// Sends SIGKILL now.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL pmemvm");
    }

    /// Waits for pmemvm to end and for its output to drain.
    pub fn wait(mut self) -> Outcome {
        loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            let wait = self.silence_limit().map_or(left, |s| s.min(left));
            match self.lines.recv_timeout(wait) {
                Ok(line) => self.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    self.stalled = wait < left;
                    self.timed_out("pmemvm to exit")
                }
                // Both pipes closed: pmemvm is gone (or closed them on exit).
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for pmemvm") {
                break s;
            }
            if Instant::now() >= self.deadline() {
                self.timed_out("pmemvm to exit after closing its output");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            status,
            output: std::mem::take(&mut self.output),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scratch directory under the system temp dir, named after the test and
/// this process. Removed on drop, unless the test failed: then it is kept
/// for a post-mortem and its path printed.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("pmemvm-e2e-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs a host tool; returns its stdout, panics with its stderr if it
/// cannot start or exits with a status outside `ok_codes`.
pub fn tool_with_codes(program: &str, args: &[&str], ok_codes: &[i32]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): the end-to-end tests need e2fsprogs \
                 and xfsprogs on the host (tools in /usr/sbin must be on PATH)"
            )
        });
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok_codes.contains(&code),
        "{program} {args:?} ended with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a host tool that must succeed; returns its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    tool_with_codes(program, args, &[0])
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size)
        .unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
}

/// A sparse file holding a fresh ext4 with 4 KiB blocks (DAX needs the
/// block size to equal the page size).
pub fn mkfs_ext4(path: &Path, size: u64) {
    sparse_file(path, size);
    tool("mkfs.ext4", &["-q", "-F", "-b", "4096", path_str(path)]);
}

/// A sparse file holding a fresh xfs (4 KiB blocks by default).
pub fn mkfs_xfs(path: &Path, size: u64) {
    sparse_file(path, size);
    tool("mkfs.xfs", &["-q", "-f", path_str(path)]);
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Does the file hold `needle` anywhere? Reads it in chunks, so a few
/// hundred MiB of (mostly sparse) image cost well under a second.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 4 << 20];
    let keep = needle.len().saturating_sub(1);
    let mut have = 0;
    loop {
        let n = f
            .read(&mut buf[have..])
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            return false;
        }
        have += n;
        if buf[..have].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        // Keep a tail so a match across two reads is still seen.
        let tail = have.min(keep);
        buf.copy_within(have - tail..have, 0);
        have = tail;
    }
}
