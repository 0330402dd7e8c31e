//! Boot-time benchmark: pmemvm against QEMU, same kernel, initramfs and
//! guest command line, runs interleaved (pmemvm, qemu, pmemvm, qemu, ...).
//!
//! Each sample is the time from spawning the VMM process to the first line
//! the guest init prints ("pmemvm-init: started"); the process is killed as
//! soon as that line arrives. Run with `make bench-boot` or
//! `cargo bench --bench bench_boot`. Environment:
//!   BENCH_RUNS     samples per VMM (default 5)
//!   BENCH_TIMEOUT  seconds allowed for one boot (default 300)
//!   QEMU           the QEMU binary (default qemu-system-x86_64)
//!
//! The guest command line is not duplicated here: the first pmemvm run logs
//! it at debug level ("guest command line: ..."), and QEMU gets exactly that.

// Cargo also builds every tests/*.rs file as an integration test (with the
// test harness, which leaves `main` unused); that copy has no tests.
#![cfg_attr(test, allow(dead_code))]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const INIT_STARTED: &str = "pmemvm-init: started";
const CMDLINE_LOG: &str = "guest command line: ";
const GUEST_MODE: &str = "pmemvm_mode=demo";

/// Things the readers of a running VMM report.
enum Event {
    /// A console (stdout) line.
    Line(String),
    /// The guest command line pmemvm logged.
    Cmdline(String),
    /// Stdout closed: the process ended.
    Eof,
}

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

struct Sample {
    secs: f64,
    /// The guest command line, when the VMM reported it.
    cmdline: Option<String>,
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_boot: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<(), String> {
    let runs = env_number("BENCH_RUNS", 5)?.max(1) as usize;
    let timeout = Duration::from_secs(env_number("BENCH_TIMEOUT", 300)?);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guest = Guest {
        kernel: root.join("target/guest/vmlinux"),
        initrd: root.join("target/guest/initramfs.cpio.gz"),
    };
    for f in [&guest.kernel, &guest.initrd] {
        if !f.exists() {
            return Err(format!(
                "guest image {} is missing: build it with `make guest`",
                f.display()
            ));
        }
    }
    let pmemvm = PathBuf::from(env!("CARGO_BIN_EXE_pmemvm"));
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    match Command::new(&qemu).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(format!(
                "cannot run QEMU ('{qemu}'): install the Debian package qemu-system-x86 \
                 (make deps) or point QEMU= at the binary"
            ))
        }
    }

    println!(
        "boot to \"{INIT_STARTED}\": {runs} runs each, interleaved, timeout {}s",
        timeout.as_secs()
    );
    let mut cmdline: Option<String> = None;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        let s = boot(&mut pmemvm_command(&pmemvm, &guest), timeout)?;
        let line = s
            .cmdline
            .ok_or("pmemvm did not log the guest command line (RUST_LOG=vmm::vm=debug)")?;
        if cmdline.as_ref().is_some_and(|c| *c != line) {
            return Err(format!("pmemvm changed the guest command line to: {line}"));
        }
        println!("run {run}/{runs}: pmemvm {:7.2} s", s.secs);
        times[0].push(s.secs);

        let mut q = qemu_command(&qemu, &guest, &line);
        if cmdline.is_none() {
            println!("  qemu command: {}", shell_words(&q));
            cmdline = Some(line);
        }
        let s = boot(&mut q, timeout)?;
        println!("run {run}/{runs}: qemu   {:7.2} s", s.secs);
        times[1].push(s.secs);
    }

    // Neighbouring runs share the host's load of the moment: their ratios
    // are steadier than the medians' when the host is busy.
    let mut pairs: Vec<f64> = times[0].iter().zip(&times[1]).map(|(p, q)| p / q).collect();
    let stats: Vec<(f64, f64, f64)> = times.iter_mut().map(|t| summary(t)).collect();
    println!();
    println!(
        "{:<8} {:>8} {:>8} {:>8}   (seconds, n={runs})",
        "", "min", "median", "max"
    );
    for (name, (min, med, max)) in ["pmemvm", "qemu"].iter().zip(&stats) {
        println!("{name:<8} {min:>8.2} {med:>8.2} {max:>8.2}");
    }
    println!(
        "ratio pmemvm/qemu of medians: {:.3}",
        stats[0].1 / stats[1].1
    );
    let (min, med, max) = summary(&mut pairs);
    println!("ratio pmemvm/qemu per run pair: median {med:.3} (min {min:.3}, max {max:.3})");
    Ok(())
}

fn pmemvm_command(bin: &Path, guest: &Guest) -> Command {
    let mut c = Command::new(bin);
    c.arg("run")
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .args(["--cmdline", GUEST_MODE])
        .env("RUST_LOG", "info,vmm::vm=debug");
    c
}

/// QEMU with the same kernel (booted through its PVH note), initramfs and
/// complete guest command line. The microvm machine has no firmware tables
/// or PCI to probe, like pmemvm. The exit device sits on pmemvm's exit port.
/// IA32_ARCH_CAPABILITIES is left out: nested hosts refuse to set it.
fn qemu_command(bin: &str, guest: &Guest, cmdline: &str) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "-accel",
        "kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", "512M", "-smp", "1"])
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

/// Spawns `cmd` and times it until init's first line, then kills it.
fn boot(cmd: &mut Command, timeout: Duration) -> Result<Sample, String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let out_tx = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if out_tx.send(Event::Line(line)).is_err() {
                return;
            }
        }
        let _ = out_tx.send(Event::Eof);
    });
    let stderr = child.stderr.take().expect("piped stderr");
    let errors = thread::spawn(move || read_stderr(stderr, tx));

    let result = wait_for_init(&rx, start, timeout);
    // Ours to end either way; it may already have exited.
    let _ = child.kill();
    let status = wait_child(&mut child);
    let stderr_text = errors.join().unwrap_or_default();
    match result {
        Ok((secs, seen)) => {
            let cmdline = seen.or_else(|| {
                rx.try_iter().find_map(|e| match e {
                    Event::Cmdline(c) => Some(c),
                    _ => None,
                })
            });
            Ok(Sample { secs, cmdline })
        }
        Err((why, console)) => Err(format!(
            "{name}: {why} (status {status})\n--- last console lines:\n{}\n--- stderr:\n{}",
            console.join("\n"),
            tail(&stderr_text, 20)
        )),
    }
}

/// Drains stderr, passing on the logged guest command line; returns it all.
fn read_stderr(stderr: impl Read, tx: mpsc::Sender<Event>) -> String {
    let mut all = String::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(i) = line.find(CMDLINE_LOG) {
            let _ = tx.send(Event::Cmdline(line[i + CMDLINE_LOG.len()..].to_string()));
        }
        all.push_str(&line);
        all.push('\n');
    }
    all
}

/// Seconds from `start` to init's first line and the logged command line,
/// or why not and the last console lines.
fn wait_for_init(
    rx: &Receiver<Event>,
    start: Instant,
    timeout: Duration,
) -> Result<(f64, Option<String>), (String, Vec<String>)> {
    let mut last: Vec<String> = Vec::new();
    let mut cmdline = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Event::Line(l)) => {
                if l.contains(INIT_STARTED) {
                    return Ok((start.elapsed().as_secs_f64(), cmdline));
                }
                if last.len() == 20 {
                    last.remove(0);
                }
                last.push(l.trim_end().to_string());
            }
            Ok(Event::Cmdline(c)) => cmdline = Some(c),
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                return Err(("exited before init started".into(), last))
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err((format!("no \"{INIT_STARTED}\" within {timeout:?}"), last))
            }
        }
    }
}

fn wait_child(child: &mut Child) -> String {
    match child.wait() {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown: {e}"),
    }
}

/// Sorts the samples and returns (min, median, max).
fn summary(t: &mut [f64]) -> (f64, f64, f64) {
    t.sort_by(f64::total_cmp);
    let n = t.len();
    let median = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    (t[0], median, t[n - 1])
}

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The command as one might type it (for the report).
fn shell_words(cmd: &Command) -> String {
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
