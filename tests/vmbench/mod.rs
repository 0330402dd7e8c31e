//! Shared by the benchmarks that compare pmemvm with QEMU (bench_boot,
//! bench_vs_qemu): the guest images, both VMMs' command lines, a running
//! VMM whose console arrives line by line under a time limit, and the
//! statistics.
//!
//! Nothing here panics on what a VM prints: every failure is an `Err` with
//! the last console lines and stderr, for the bench to report.

// Each bench uses a different subset.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// The first line the guest init prints.
pub const INIT_STARTED: &str = "pmemvm-init: started";
/// pmemvm logs the complete guest command line after this (debug level).
const CMDLINE_LOG: &str = "guest command line: ";
/// Console lines kept for an error message.
const KEEP_LINES: usize = 20;

/// The guest kernel and initramfs built by `make guest`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Guest {
    pub fn find() -> Result<Guest, String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest");
        let guest = Guest {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio.gz"),
        };
        for f in [&guest.kernel, &guest.initrd] {
            if !f.is_file() {
                return Err(format!(
                    "guest image {} is missing: build it with `make guest`",
                    f.display()
                ));
            }
        }
        Ok(guest)
    }
}

/// The QEMU binary (`QEMU`, default qemu-system-x86_64), checked to run.
pub fn qemu_binary() -> Result<String, String> {
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    match Command::new(&qemu).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(qemu),
        _ => Err(format!(
            "cannot run QEMU ('{qemu}'): install the Debian package qemu-system-x86 \
             (make deps) or point QEMU= at the binary"
        )),
    }
}

/// `pmemvm run` on the guest with the user words `cmdline` and `extra`
/// arguments, logging the guest command line it assembles.
pub fn pmemvm_command(guest: &Guest, cmdline: &str, extra: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pmemvm"));
    c.arg("run")
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .arg("--cmdline")
        .arg(cmdline)
        .args(extra)
        .env("RUST_LOG", "info,vmm::vm=debug");
    c
}

/// QEMU on the same kernel (booted through its PVH note), initramfs and
/// complete guest command line, one vCPU, the console on stdout, and the
/// exit device on pmemvm's exit port (the exit status is then (v<<1)|1).
/// `machine` chooses the machine and its devices, `memory` is `-m`'s value.
/// IA32_ARCH_CAPABILITIES is left out: nested hosts refuse to set it.
pub fn qemu_command(
    bin: &str,
    machine: &[&str],
    memory: &str,
    guest: &Guest,
    cmdline: &str,
) -> Command {
    let mut c = Command::new(bin);
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
        .args(machine)
        .args(["-m", memory, "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-display", "none"])
        .args(["-monitor", "none", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .arg("-append")
        .arg(cmdline);
    c
}

/// What the reader threads of a running VMM report.
enum Event {
    /// A console (stdout) line.
    Line(String),
    /// The guest command line pmemvm logged.
    Cmdline(String),
    /// Stdout closed: the process ended.
    Eof,
    /// Stderr closed; all it held.
    Stderr(String),
}

/// A VMM process being read line by line; killed when dropped.
pub struct Running {
    name: String,
    child: Child,
    rx: Receiver<Event>,
    start: Instant,
    deadline: Instant,
    last: VecDeque<String>,
    cmdline: Option<String>,
    stderr: String,
}

/// How a VMM process ended.
pub struct Finished {
    /// Its exit status, as `ExitStatus` prints it.
    pub status: String,
    pub code: Option<i32>,
    /// The guest command line, when the VMM logged it.
    pub cmdline: Option<String>,
}

impl Running {
    /// Spawns `cmd`; the clock starts now and the process may run for
    /// `timeout`.
    pub fn spawn(cmd: &mut Command, timeout: Duration) -> Result<Running, String> {
        let name = Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(cmd.get_program())
            .to_string_lossy()
            .into_owned();
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            thread::spawn(move || read_stdout(stdout, tx));
        }
        if let Some(stderr) = child.stderr.take() {
            thread::spawn(move || read_stderr(stderr, tx));
        }
        Ok(Running {
            name,
            child,
            rx,
            start,
            deadline: start + timeout,
            last: VecDeque::new(),
            cmdline: None,
            stderr: String::new(),
        })
    }

    /// Spawns `cmd` and reads lines until init's first one; returns the
    /// process and the seconds that took, or why init never started.
    pub fn spawn_to_init(cmd: &mut Command, timeout: Duration) -> Result<(Running, f64), String> {
        let mut vm = Running::spawn(cmd, timeout)?;
        loop {
            match vm.next_line() {
                Ok(Some(l)) if l.contains(INIT_STARTED) => {
                    let secs = vm.elapsed();
                    return Ok((vm, secs));
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(vm.fail("exited before init started")),
                Err(why) => return Err(vm.fail(&format!("no \"{INIT_STARTED}\": {why}"))),
            }
        }
    }

    /// Seconds since the spawn.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The next console line, or why there is none: the process ended
    /// (`Ok(None)`) or the time limit passed (`Err`).
    pub fn next_line(&mut self) -> Result<Option<String>, String> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Event::Line(l)) => {
                    self.keep(l.clone());
                    return Ok(Some(l));
                }
                Ok(Event::Cmdline(c)) => self.cmdline = Some(c),
                Ok(Event::Stderr(all)) => self.stderr = all,
                Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "time limit of {:.0} s passed",
                        (self.deadline - self.start).as_secs_f64()
                    ))
                }
            }
        }
    }

    /// The guest command line pmemvm logged, if seen yet.
    pub fn cmdline(&self) -> Option<&str> {
        self.cmdline.as_deref()
    }

    /// Waits up to `grace` for the process to exit by itself, then kills it.
    pub fn finish(mut self, grace: Duration) -> Finished {
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let (status, code) = self.reap();
        Finished {
            status,
            code,
            cmdline: self.cmdline.take(),
        }
    }

    /// Kills the process and describes the failure `why` with the last
    /// console lines and stderr.
    pub fn fail(mut self, why: &str) -> String {
        let (status, _) = self.reap();
        let console: Vec<&str> = self.last.iter().map(String::as_str).collect();
        format!(
            "{}: {why} after {:.1} s (status {status})\n--- last console lines:\n{}\n--- stderr:\n{}",
            self.name,
            self.elapsed(),
            console.join("\n"),
            tail(&self.stderr, KEEP_LINES)
        )
    }

    /// Kills the process (it may have exited already), waits for it and
    /// collects what its readers still hold.
    fn reap(&mut self) -> (String, Option<i32>) {
        let _ = self.child.kill();
        let status = match self.child.wait() {
            Ok(s) => (s.to_string(), s.code()),
            Err(e) => (format!("unknown: {e}"), None),
        };
        // The pipes close with the process, and the readers pass on what
        // they still hold. A bounded wait: a child the VMM left behind may
        // keep them open.
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(e) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            match e {
                Event::Cmdline(c) => self.cmdline = Some(c),
                Event::Line(l) => self.keep(l),
                Event::Eof => {}
                Event::Stderr(all) => {
                    self.stderr = all;
                    break;
                }
            }
        }
        status
    }

    /// Keeps the last console lines for an error message.
    fn keep(&mut self, line: String) {
        if self.last.len() == KEEP_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Calls `f` with each line of `r` until the end or until `f` says stop.
/// Lines are decoded leniently: a guest may print anything.
fn each_line(r: impl Read, mut f: impl FnMut(String) -> bool) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !f(String::from_utf8_lossy(&buf).trim_end().to_string()) {
                    return;
                }
            }
        }
    }
}

/// Passes on the console lines, then the end of the output.
fn read_stdout(stdout: impl Read, tx: Sender<Event>) {
    each_line(stdout, |l| tx.send(Event::Line(l)).is_ok());
    let _ = tx.send(Event::Eof);
}

/// Drains stderr, passing on the logged guest command line, then all of it.
fn read_stderr(stderr: impl Read, tx: Sender<Event>) {
    let mut all = String::new();
    each_line(stderr, |l| {
        if let Some(i) = l.find(CMDLINE_LOG) {
            let _ = tx.send(Event::Cmdline(l[i + CMDLINE_LOG.len()..].to_string()));
        }
        all.push_str(&l);
        all.push('\n');
        true
    });
    let _ = tx.send(Event::Stderr(all));
}

/// Sorts the samples and returns (min, median, max); `None` when empty.
pub fn summary(t: &mut [f64]) -> Option<(f64, f64, f64)> {
    if t.is_empty() {
        return None;
    }
    t.sort_by(f64::total_cmp);
    let n = t.len();
    let median = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    Some((t[0], median, t[n - 1]))
}

pub fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v} is not a whole number")),
        Err(_) => Ok(default),
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The command as one might type it (for the report).
pub fn shell_words(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains([' ', '"', '\'']) {
                format!("\"{a}\"")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
