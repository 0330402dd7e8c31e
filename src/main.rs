//! pmemvm: a small KVM VMM whose centre is a file-backed virtio-pmem device.

// As in the vmm crate: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vmm::{HostQuirks, PmemConfig, VmConfig};

mod lab;

#[derive(Parser)]
#[command(
    name = "pmemvm",
    version,
    about = "A small KVM VMM with a file-backed virtio-pmem device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest.
    Run(RunArgs),
    /// Measure fault and flush costs per fault engine with a built-in
    /// probe guest (no kernel needed).
    Bench(BenchArgs),
    /// Summarise the JSON of `bench faults` or `bench flush` and draw it
    /// as an SVG.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The JSON that `bench faults --json` or `bench flush --json` wrote.
    #[arg(value_name = "PATH.json")]
    json: PathBuf,
    /// Draw the figure to this SVG file: latency histograms per event for
    /// faults, flush latency by dirty pages for flush.
    #[arg(long, value_name = "PATH.svg")]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-page cost of first reads, first writes, mkwrite, warm accesses
    /// and re-dirtying after a flush, with KVM statistics.
    Faults(BenchFaultsArgs),
    /// End-to-end virtio-pmem FLUSH latency against host fdatasync, fsync
    /// and msync of the same kind of file.
    Flush(BenchFlushArgs),
    /// Crash consistency: crash VMs that write, flush and acknowledge
    /// records are ended by SIGKILL or a power cut at random moments; every
    /// acknowledged record must survive.
    Crash(BenchCrashArgs),
    /// One crash VM, run by `bench crash` in a child process.
    #[command(hide = true)]
    CrashVm(CrashVmArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CrashEndArg {
    Kill,
    Cut,
    Both,
}

#[derive(clap::Args)]
struct BenchCrashArgs {
    /// Fault engines (default: kernel, mirror, uffd, prefault).
    #[arg(long, value_delimiter = ',')]
    engine: Vec<lab::ProbeCase>,
    /// vCPUs writing records at once, 1 to 4.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    vcpus: u8,
    /// Rounds per engine and way of ending.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100000))]
    rounds: u32,
    /// kill: SIGKILL of the VMM; cut: a power cut of the file system under
    /// the backing file (unsynced data dropped), then SIGKILL.
    #[arg(long, value_enum, default_value = "both")]
    end: CrashEndArg,
    /// Seed of the rounds (guest patterns and end moments).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Index of the first round: with --seed and --rounds 1, replays one.
    #[arg(long, default_value_t = 0)]
    first_round: u32,
    /// Rounds end at a random moment up to this many ms after the VM's
    /// first acknowledged flush.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=60000))]
    max_delay_ms: u64,
    /// Directory for backing files and the power-cut mount (default: the temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Write every round's figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// The power-cut file system answers fsync without making anything
    /// durable, so the check must report losses (a test of the check).
    #[arg(long, hide = true)]
    lying_fsync: bool,
}

#[derive(clap::Args)]
struct CrashVmArgs {
    #[arg(long)]
    engine: lab::ProbeCase,
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
    vcpus: u8,
    #[arg(long)]
    region_pages: u64,
    #[arg(long)]
    seed: u64,
    #[arg(long)]
    flush_mask: u64,
    #[arg(long)]
    backing: PathBuf,
    #[arg(long)]
    acks: PathBuf,
    #[arg(long)]
    flush_log: PathBuf,
}

#[derive(clap::Args)]
struct BenchCommonArgs {
    /// Fault engines to compare, side by side: kernel, mirror, uffd, prefault, and
    /// the peers peer-fsync (QEMU, Cloud Hypervisor) and peer-msync
    /// (crosvm, Firecracker): the kernel engine's mapping flushed as they
    /// do (default: the engines for faults; engines and peers for flush).
    #[arg(long, value_delimiter = ',')]
    engine: Vec<lab::ProbeCase>,
    /// Pages the uffd engine inserts per fault.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=512))]
    populate: Option<u16>,
    /// Microseconds the uffd fault servicer polls for the next fault before
    /// it sleeps (0 to 1000; default 0).
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=1000))]
    poll_us: Option<u16>,
    /// The backing file: ext4 (written, synced), tmpfs or sparse.
    #[arg(long, default_value = "ext4")]
    backing: lab::BackingKind,
    /// Directory for the backing files (default: the temp dir, /dev/shm for tmpfs).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Write every raw figure as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchFaultsArgs {
    #[command(flatten)]
    common: BenchCommonArgs,
    /// What to do to each page (default: all four, each in its own pages).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "read|write|read-write|write-flush-write"
    )]
    op: Vec<lab::FaultOp>,
    /// Page order: seq, random or stride:K.
    #[arg(long, default_value = "seq")]
    pattern: lab::PagePattern,
    /// Pages per op and run.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=262144))]
    pages: u64,
    /// Fresh probe VMs per engine, interleaved across engines; with 3 or
    /// more, each row shows the spread of the per-repeat p50s.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// Seed of the random page order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchFlushArgs {
    #[command(flatten)]
    common: BenchCommonArgs,
    /// Dirty page counts to flush.
    #[arg(long, value_delimiter = ',', default_value = "0,1,64,4096")]
    dirty: Vec<u64>,
    /// Where the dirty pages are.
    #[arg(
        long,
        default_value = "contiguous",
        value_name = "contiguous|scattered"
    )]
    layout: lab::FlushLayout,
    /// The pmem region: bytes or K/M/G, a multiple of 2 MiB (default: the
    /// least the dirty counts and layout need, at least 16 MiB). A list
    /// (16M,256M,1G,4G) runs each size in turn; over 1 GiB needs
    /// --backing sparse.
    #[arg(long, value_name = "SIZE[,SIZE...]", value_delimiter = ',', value_parser = parse_size)]
    region: Vec<u64>,
    /// Measured flushes per dirty count in each VM (after one warm-up round).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    rounds: u32,
    /// Fresh VMs and files per case; with 3 or more, each row shows the
    /// spread of the per-repeat p50s.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuirksArg {
    /// Add the guest switches this host needs (none on VMX/SVM hosts).
    Auto,
    On,
    Off,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line words, added after pmemvm's own.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM: bytes or K/M/G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs, 1 to 8.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    vcpus: u8,
    /// Guest command-line switches for nested shadow-paging KVM hosts.
    #[arg(long, value_enum, default_value = "auto")]
    host_quirks: QuirksArg,
    /// A virtio-pmem disk backed by a host file, seen as /dev/pmemN in the
    /// guest: file=PATH[,size=SIZE][,readonly=on][,discard_writes=on]
    /// [,engine=kernel|mirror|uffd|prefault][,flush=dirty|fsync|msync][,populate=N][,poll_us=N].
    /// engine=mirror: KVM maps a memfd copy of the file and a flush copies the dirty pages to it (holds the data twice).
    /// Repeat for more disks.
    #[arg(long, value_name = "file=PATH[,...]")]
    pmem: Vec<PmemConfig>,
    /// Write device statistics as JSON to this file when the VM ends.
    #[arg(long, value_name = "PATH")]
    stats: Option<PathBuf>,
    /// Describe the vCPUs and devices in ACPI tables (a DSDT naming each
    /// virtio-mmio device) instead of the MP table and `virtio_mmio.device=`:
    /// for kernels without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, such as
    /// distribution kernels.
    #[arg(long)]
    acpi: bool,
    /// Run without the per-thread seccomp filters (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    devices::size::parse_size(s).map_err(|e| e.to_string())
}

/// Runs one bench command, prints its table, writes its JSON.
fn bench(what: BenchCommand) -> ExitCode {
    match run_bench(what) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmemvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(what: BenchCommand) -> Result<(), lab::ProbeError> {
    let (table, json, failure) = match what {
        BenchCommand::CrashVm(a) => {
            let config = lab::crash::vm::CrashVmConfig {
                engine: a.engine.engine_config(lab::UffdOptions::default()),
                backing: a.backing,
                layout: lab::crash::CrashLayout {
                    vcpus: a.vcpus,
                    region_pages: a.region_pages,
                },
                seed: a.seed,
                flush_mask: a.flush_mask,
            };
            return lab::crash::vm::child_main(
                &config,
                &a.acks,
                &a.flush_log,
                Duration::from_secs(600),
            );
        }
        BenchCommand::Crash(a) => {
            let defaults = lab::crash::bench::CrashBenchConfig::default();
            let report = lab::crash::bench::run_crash(&lab::crash::bench::CrashBenchConfig {
                cases: if a.engine.is_empty() {
                    defaults.cases
                } else {
                    a.engine
                },
                ends: match a.end {
                    CrashEndArg::Kill => vec![lab::crash::bench::CrashEnd::Kill],
                    CrashEndArg::Cut => vec![lab::crash::bench::CrashEnd::Cut],
                    CrashEndArg::Both => defaults.ends,
                },
                vcpus: a.vcpus,
                rounds: a.rounds,
                first_round: a.first_round,
                seed: a.seed,
                max_delay: Duration::from_millis(a.max_delay_ms),
                dir: a.dir,
                lying_fsync: a.lying_fsync,
                ..defaults
            })?;
            if let Some(path) = &a.json {
                report.write_json(path)?;
            }
            (report.table(), a.json, report.failure())
        }
        BenchCommand::Faults(a) => {
            let report = lab::run_faults(&lab::FaultBenchConfig {
                engines: if a.common.engine.is_empty() {
                    lab::ProbeCase::ENGINES.to_vec()
                } else {
                    a.common.engine
                },
                ops: if a.op.is_empty() {
                    lab::FaultOp::ALL.to_vec()
                } else {
                    a.op
                },
                pattern: a.pattern,
                pages: a.pages,
                uffd: lab::UffdOptions {
                    populate: a.common.populate,
                    poll_us: a.common.poll_us,
                },
                backing: a.common.backing,
                dir: a.common.dir,
                repeat: a.repeat,
                seed: a.seed,
                progress: true,
            })?;
            if let Some(path) = &a.common.json {
                report.write_json(path)?;
            }
            (report.table(), a.common.json, report.failure())
        }
        BenchCommand::Flush(a) => {
            let defaults = lab::FlushBenchConfig::default();
            let report = lab::run_flush(&lab::FlushBenchConfig {
                cases: if a.common.engine.is_empty() {
                    defaults.cases
                } else {
                    a.common.engine
                },
                dirty: a.dirty,
                layout: a.layout,
                regions: a.region,
                uffd: lab::UffdOptions {
                    populate: a.common.populate,
                    poll_us: a.common.poll_us,
                },
                backing: a.common.backing,
                dir: a.common.dir,
                rounds: a.rounds,
                repeat: a.repeat,
                progress: true,
            })?;
            if let Some(path) = &a.common.json {
                report.write_json(path)?;
            }
            (report.table(), a.common.json, report.failure())
        }
    };
    print!("{table}");
    if let Some(path) = json {
        eprintln!("raw figures written to {}", path.display());
    }
    match failure {
        Some(failure) => Err(lab::ProbeError::ChecksFailed(failure)),
        None => Ok(()),
    }
}

/// Prints a bench JSON's summary and draws it if asked.
fn report(a: &ReportArgs) -> ExitCode {
    match lab::report::run(&a.json, a.svg.as_deref()) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pmemvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => {
            if a.no_seccomp {
                log::warn!("--no-seccomp: vCPU, device and fault threads run unconfined");
                vmm::seccomp::disable();
            }
            vmm::run(VmConfig {
                kernel: a.kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                memory: a.memory,
                vcpus: a.vcpus,
                host_quirks: match a.host_quirks {
                    QuirksArg::Auto => HostQuirks::Auto,
                    QuirksArg::On => HostQuirks::On,
                    QuirksArg::Off => HostQuirks::Off,
                },
                pmem: a.pmem,
                stats: a.stats,
                acpi: a.acpi,
            })
        }
        Command::Bench(a) => return bench(a.what),
        Command::Report(a) => return report(&a),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("pmemvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
