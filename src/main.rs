//! pmemvm: a small KVM VMM whose centre is a file-backed virtio-pmem device.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vmm::{HostQuirks, PmemConfig, VmConfig};

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
    /// guest: file=PATH[,size=SIZE][,readonly=on][,discard_writes=on].
    /// Repeat for more disks.
    #[arg(long, value_name = "file=PATH[,...]")]
    pmem: Vec<PmemConfig>,
    /// Write device statistics as JSON to this file when the VM ends.
    #[arg(long, value_name = "PATH")]
    stats: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    devices::size::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => vmm::run(VmConfig {
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
        }),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("pmemvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
