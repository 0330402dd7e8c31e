//! pmemvm against QEMU's virtio-pmem-pci on the same DAX workload: the same
//! guest kernel, init and command line (`pmemvm_mode=dax`), each VMM with a
//! fresh ext4 image as its pmem disk, runs interleaved (pmemvm, qemu,
//! pmemvm, ...). From each run it takes
//! - the boot time: spawn to init's first line ("pmemvm-init: started"),
//! - each check's time as the guest reports it
//!   (`pmemvm-init: check pmem0:NAME ok N us`),
//! - each metric (`pmemvm-init: metric pmem0:NAME VALUE UNIT`), among them
//!   the flush latency, an in-guest fsync of one dirtied page,
//!
//! and prints the medians and their ratio pmemvm/qemu. Check and metric
//! names are not listed here: whatever the init prints is measured.
//!
//! Run with `make bench-vs-qemu` or `cargo bench --bench bench_vs_qemu`.
//! Environment:
//!   BENCH_RUNS          runs per VMM (default 3)
//!   BENCH_TIMEOUT       seconds allowed for one run (default 300)
//!   BENCH_PMEM_MIB      pmem disk size in MiB (default 64)
//!   BENCH_PMEM_OPTS     extra `--pmem` options for pmemvm, e.g. engine=uffd
//!   BENCH_QEMU_MACHINE  QEMU machine (default pc; needs a PCI bus)
//!   QEMU                the QEMU binary (default qemu-system-x86_64)
//!
//! QEMU gets pmemvm's complete guest command line (logged at debug level)
//! minus what only fits pmemvm: its virtio_mmio.device= entries, and
//! pci=off, as QEMU's pmem device sits on PCI.

// Cargo also builds every tests/*.rs file as an integration test (with the
// test harness, which leaves `main` unused); that copy has no tests.
#![cfg_attr(test, allow(dead_code))]

mod vmbench;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;
use vmbench::{Guest, Running};

const GUEST_WORDS: &str = "pmemvm_mode=dax pmemvm_dax=ext4:pmem0";
const SAY: &str = "pmemvm-init: ";
/// Words of pmemvm's guest command line that QEMU's guest must not get.
const NOT_FOR_QEMU: [&str; 2] = ["virtio_mmio.device=", "pci=off"];
const VMMS: [&str; 2] = ["pmemvm", "qemu"];

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench_vs_qemu: error: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Config {
    guest: Guest,
    qemu: String,
    machine: String,
    pmem_opts: String,
    pmem_size: u64,
    timeout: Duration,
    dir: TempDir,
}

/// Runs the benchmark; `Ok(false)` when it completed with failed checks or
/// runs (the table is printed anyway).
fn bench() -> Result<bool, String> {
    let runs = vmbench::env_number("BENCH_RUNS", 3)?.max(1) as usize;
    let cfg = Config {
        guest: Guest::find()?,
        qemu: vmbench::qemu_binary()?,
        machine: std::env::var("BENCH_QEMU_MACHINE").unwrap_or_else(|_| "pc".into()),
        pmem_opts: std::env::var("BENCH_PMEM_OPTS").unwrap_or_default(),
        pmem_size: vmbench::env_number("BENCH_PMEM_MIB", 64)?.max(16) << 20,
        timeout: Duration::from_secs(vmbench::env_number("BENCH_TIMEOUT", 300)?),
        dir: TempDir::new()?,
    };
    println!(
        "pmemvm vs QEMU virtio-pmem-pci, `{GUEST_WORDS}`: {runs} runs each, interleaved, \
         {} MiB ext4 pmem disk, timeout {} s per run",
        cfg.pmem_size >> 20,
        cfg.timeout.as_secs()
    );

    let mut table = Table::default();
    let mut problems: Vec<String> = Vec::new();
    let mut cmdline: Option<String> = None;
    for run in 1..=runs {
        for (vmm, name) in VMMS.iter().enumerate() {
            let image = cfg.dir.0.join(format!("{name}-{run}.img"));
            mkfs_ext4(&image, cfg.pmem_size)?;
            let result = if vmm == 0 {
                run_pmemvm(&cfg, &image, &mut cmdline)
            } else {
                // Set by the pmemvm run before; that run failing is fatal.
                let line = cmdline.as_deref().ok_or("no guest command line")?;
                run_qemu(&cfg, &image, line, run == 1)
            };
            // Scratch images are 64 MiB each: keep only one at a time.
            let _ = fs::remove_file(&image);
            match result {
                Ok(r) => {
                    println!("run {run}/{runs}: {name:<6} {}", r.progress(vmm == 1));
                    for (key, why) in &r.failed {
                        problems.push(format!("{name} run {run}: check {key} FAILED: {why}"));
                    }
                    if let Some(p) = &r.problem {
                        problems.push(format!("{name} run {run}: {p}"));
                    }
                    table.add(vmm, run, &r);
                }
                Err(e) => {
                    println!("run {run}/{runs}: {name:<6} FAILED (see below)");
                    // A VMM that never got to init once is set up wrong:
                    // more runs would only repeat the same wait.
                    if table.boots[vmm] == 0 {
                        return Err(e);
                    }
                    problems.push(format!("{name} run {run}: {e}"));
                }
            }
        }
    }
    let pmemvm = match cfg.pmem_opts.as_str() {
        "" => "pmemvm: virtio-mmio".to_string(),
        o => format!("pmemvm: virtio-mmio, {o}"),
    };
    table.print(runs, &pmemvm);
    if problems.is_empty() {
        return Ok(true);
    }
    println!("\nproblems:");
    for p in &problems {
        println!("  {}", p.replace('\n', "\n    "));
    }
    Ok(false)
}

fn run_pmemvm(cfg: &Config, image: &Path, cmdline: &mut Option<String>) -> Result<Run, String> {
    let mut pmem = format!("file={}", image.display());
    if !cfg.pmem_opts.is_empty() {
        pmem = format!("{pmem},{}", cfg.pmem_opts);
    }
    let mut cmd = vmbench::pmemvm_command(&cfg.guest, GUEST_WORDS, &["--pmem".into(), pmem]);
    let mut run = run_dax(&mut cmd, cfg.timeout)?;
    let line = run
        .cmdline
        .take()
        .ok_or("pmemvm did not log the guest command line (RUST_LOG=vmm::vm=debug)")?;
    // QEMU's runs are only comparable if every pmemvm run boots the same.
    if cmdline.as_ref().is_some_and(|c| *c != line) {
        return Err(format!("pmemvm changed the guest command line to: {line}"));
    }
    *cmdline = Some(line);
    Ok(run)
}

fn run_qemu(cfg: &Config, image: &Path, pmemvm_line: &str, show: bool) -> Result<Run, String> {
    let path = image.to_str().ok_or("the scratch path is not UTF-8")?;
    // QEMU's option syntax has no escape for a comma in a value.
    if path.contains(',') {
        return Err(format!("QEMU cannot take a path with a comma: {path}"));
    }
    let (line, dropped) = qemu_cmdline(pmemvm_line);
    // virtio-pmem-pci maps its memory in the machine's hotplug area, which
    // exists only with memory slots; the file is shared so that the guest's
    // stores and flushes reach it.
    let memory = "512M,slots=2,maxmem=2G";
    let backend = format!(
        "memory-backend-file,id=mem1,share=on,mem-path={path},size={}",
        cfg.pmem_size
    );
    // -nodefaults: no NIC, VGA or CD-ROM, whose option ROMs and probing
    // would slow the emulated boot.
    let machine = ["-M", cfg.machine.as_str(), "-nodefaults"];
    let mut cmd = vmbench::qemu_command(&cfg.qemu, &machine, memory, &cfg.guest, &line);
    cmd.args(["-object", &backend])
        .args(["-device", "virtio-pmem-pci,memdev=mem1,id=nv1"]);
    if show {
        println!("  qemu guest command line: pmemvm's without {dropped:?}");
        println!("  qemu command: {}", vmbench::shell_words(&cmd));
    }
    run_dax(&mut cmd, cfg.timeout)
}

/// pmemvm's guest command line without the words QEMU's guest must not
/// get, and those words.
fn qemu_cmdline(pmemvm_line: &str) -> (String, Vec<String>) {
    let (dropped, kept): (Vec<&str>, Vec<&str>) = pmemvm_line
        .split_whitespace()
        .partition(|w| NOT_FOR_QEMU.iter().any(|p| w.starts_with(p)));
    (
        kept.join(" "),
        dropped.into_iter().map(String::from).collect(),
    )
}

/// What one run of the DAX workload printed.
#[derive(Default)]
struct Run {
    /// Seconds from spawn to init's first line.
    boot: f64,
    /// Seconds from spawn to the end of the checks.
    done: Option<f64>,
    /// Checks that passed, with the time the guest gave (value, unit).
    ok: Vec<(String, Option<(f64, String)>)>,
    /// Checks that failed, with the reason.
    failed: Vec<(String, String)>,
    /// Metrics: name, value, unit.
    metrics: Vec<(String, f64, String)>,
    /// Why the run ended without the workload's end line.
    problem: Option<String>,
    /// The guest command line, when the VMM logged it.
    cmdline: Option<String>,
    /// How the VMM ended, when it did by itself after the checks.
    exit: Option<vmbench::Finished>,
}

impl Run {
    fn progress(&self, qemu: bool) -> String {
        let mut s = format!(
            "init {:6.2} s, {} checks ok, {} failed, {} metrics",
            self.boot,
            self.ok.len(),
            self.failed.len(),
            self.metrics.len()
        );
        if let Some(d) = self.done {
            s.push_str(&format!(", done at {d:.2} s"));
        }
        if let Some(f) = &self.exit {
            s.push_str(&format!(", {}", f.status));
            // QEMU's isa-debug-exit turns the guest's status v into (v<<1)|1.
            match f.code {
                Some(c) if qemu && c & 1 == 1 => s.push_str(&format!(" (guest {})", c >> 1)),
                _ => {}
            }
        }
        if self.problem.is_some() {
            s.push_str(" (incomplete, see below)");
        }
        s
    }
}

/// One line of the init's DAX workload.
#[derive(Debug, PartialEq)]
enum Said {
    Ok(String, Option<(f64, String)>),
    Failed(String, String),
    Metric(String, f64, String),
    /// The workload's last line: "dax done, K failed" (or, from older
    /// inits, "dax ok" / "dax FAILED ...").
    Done,
    Other,
}

/// Parses a console line; the init's text may follow kernel output on the
/// same line, so it is looked for anywhere.
fn parse(line: &str) -> Said {
    let Some(i) = line.find(SAY) else {
        return Said::Other;
    };
    let text = line[i + SAY.len()..].trim();
    if let Some(rest) = text.strip_prefix("check ") {
        if let Some((key, why)) = rest.split_once(" FAILED") {
            let why = why.trim_start_matches(':').trim();
            return Said::Failed(key.to_string(), why.to_string());
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        return match words.as_slice() {
            [key, "ok"] => Said::Ok(key.to_string(), None),
            [key, "ok", n, unit] => match n.parse() {
                Ok(v) => Said::Ok(key.to_string(), Some((v, unit.to_string()))),
                Err(_) => Said::Ok(key.to_string(), None),
            },
            _ => Said::Other,
        };
    }
    if let Some(rest) = text.strip_prefix("metric ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        if let [key, v, unit] = words.as_slice() {
            if let Ok(v) = v.parse() {
                return Said::Metric(key.to_string(), v, unit.to_string());
            }
        }
        return Said::Other;
    }
    if text.starts_with("dax done") || text == "dax ok" || text.starts_with("dax FAILED") {
        return Said::Done;
    }
    Said::Other
}

/// Boots `cmd`, reads the workload's lines until its end line, and lets the
/// VMM exit (the init powers off right after). `Err` only when init never
/// started; later trouble is the run's `problem`.
fn run_dax(cmd: &mut Command, timeout: Duration) -> Result<Run, String> {
    let (mut vm, boot) = Running::spawn_to_init(cmd, timeout)?;
    let mut run = Run {
        boot,
        ..Run::default()
    };
    loop {
        match vm.next_line() {
            Ok(Some(l)) => match parse(&l) {
                Said::Ok(key, time) => run.ok.push((key, time)),
                Said::Failed(key, why) => run.failed.push((key, why)),
                Said::Metric(key, v, unit) => run.metrics.push((key, v, unit)),
                Said::Done => {
                    run.done = Some(vm.elapsed());
                    break;
                }
                Said::Other => {}
            },
            Ok(None) => {
                let f = vm.finish(Duration::ZERO);
                run.problem = Some(format!(
                    "the VMM exited ({}) before the checks ended",
                    f.status
                ));
                run.cmdline = f.cmdline;
                return Ok(run);
            }
            Err(why) => {
                run.cmdline = vm.cmdline().map(String::from);
                run.problem = Some(vm.fail(&format!("the checks did not end: {why}")));
                return Ok(run);
            }
        }
    }
    // The init powers off right after its last line.
    let mut f = vm.finish(Duration::from_secs(10));
    run.cmdline = f.cmdline.take();
    run.exit = Some(f);
    Ok(run)
}

/// Samples per row and VMM, rows in the order they first appeared.
#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    /// Runs that got to init, per VMM.
    boots: [usize; 2],
}

struct Row {
    label: String,
    unit: String,
    /// (run number, value) per VMM.
    values: [Vec<(usize, f64)>; 2],
    /// Passes without a time, and failures, per VMM.
    untimed: [usize; 2],
    failed: [usize; 2],
}

impl Row {
    fn median(&self, vmm: usize) -> Option<f64> {
        let mut v: Vec<f64> = self.values[vmm].iter().map(|&(_, v)| v).collect();
        vmbench::summary(&mut v).map(|s| s.1)
    }

    /// The median of pmemvm/qemu over the runs both have: neighbouring
    /// runs share the host's load of the moment, so on a busy host this
    /// is steadier than the ratio of the medians.
    fn pair_ratio(&self) -> Option<f64> {
        let mut r: Vec<f64> = self.values[0]
            .iter()
            .filter_map(|&(run, p)| {
                let &(_, q) = self.values[1].iter().find(|&&(r, _)| r == run)?;
                (q > 0.0).then_some(p / q)
            })
            .collect();
        vmbench::summary(&mut r).map(|s| s.1)
    }
}

impl Table {
    fn row(&mut self, label: String, unit: &str) -> &mut Row {
        let i = match self.rows.iter().position(|r| r.label == label) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    label,
                    unit: unit.to_string(),
                    values: Default::default(),
                    untimed: [0; 2],
                    failed: [0; 2],
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    fn add(&mut self, vmm: usize, run_no: usize, run: &Run) {
        self.boots[vmm] += 1;
        let mut put = |label: String, unit: &str, v: f64| {
            self.row(label, unit).values[vmm].push((run_no, v));
        };
        put("boot to init".into(), "s", run.boot);
        if let Some(d) = run.done {
            put("spawn to checks done".into(), "s", d);
        }
        for (key, time) in &run.ok {
            if let Some((v, unit)) = time {
                put(format!("check {key}"), unit, *v);
            }
        }
        for (key, v, unit) in &run.metrics {
            put(format!("metric {key}"), unit, *v);
        }
        for (key, time) in &run.ok {
            if time.is_none() {
                self.row(format!("check {key}"), "").untimed[vmm] += 1;
            }
        }
        for (key, _) in &run.failed {
            self.row(format!("check {key}"), "").failed[vmm] += 1;
        }
    }

    fn print(&self, runs: usize, pmemvm: &str) {
        let width = self.rows.iter().map(|r| r.label.len()).max().unwrap_or(0);
        println!();
        println!("medians of {runs} interleaved runs each ({pmemvm}; qemu: virtio-pmem-pci)");
        println!(
            "{:<width$} {:>5} {:>12} {:>12} {:>12} {:>12}  n (pmemvm/qemu)",
            "", "unit", "pmemvm", "qemu", "pmemvm/qemu", "per pair"
        );
        let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.3}"));
        for r in &self.rows {
            let med = [r.median(0), r.median(1)];
            let cell = |vmm: usize| match med[vmm] {
                Some(m) => format_value(m),
                None if r.failed[vmm] > 0 => "FAILED".into(),
                None if r.untimed[vmm] > 0 => "ok".into(),
                None => "-".into(),
            };
            let of_medians = match med {
                [Some(p), Some(q)] if q > 0.0 => Some(p / q),
                _ => None,
            };
            let mut n = format!("{}/{}", r.values[0].len(), r.values[1].len());
            if r.failed.iter().any(|&f| f > 0) {
                n.push_str(&format!(" ({}/{} failed)", r.failed[0], r.failed[1]));
            }
            println!(
                "{:<width$} {:>5} {:>12} {:>12} {:>12} {:>12}  {n}",
                r.label,
                r.unit,
                cell(0),
                cell(1),
                ratio(of_medians),
                ratio(r.pair_ratio()),
            );
        }
    }
}

/// Up to three decimals, fewer for large values.
fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A sparse file of `size` bytes holding a fresh ext4 with 4 KiB blocks
/// (DAX needs the block size to equal the page size).
fn mkfs_ext4(path: &Path, size: u64) -> Result<(), String> {
    let f = fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("size {}: {e}", path.display()))?;
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q", "-b", "4096"])
        .arg(path)
        .output()
        .map_err(|e| {
            format!("cannot run mkfs.ext4 ({e}): install e2fsprogs, with /usr/sbin on PATH")
        })?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 {} ended with {}: {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The scratch directory for the pmem images, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let dir = std::env::temp_dir().join(format!("pmemvm-bench-vs-qemu-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
