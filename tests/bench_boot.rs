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

mod vmbench;

use std::process::{Command, ExitCode};
use std::time::Duration;
use vmbench::{Guest, Running, INIT_STARTED};

const GUEST_MODE: &str = "pmemvm_mode=demo";

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
    let runs = vmbench::env_number("BENCH_RUNS", 5)?.max(1) as usize;
    let timeout = Duration::from_secs(vmbench::env_number("BENCH_TIMEOUT", 300)?);
    let guest = Guest::find()?;
    let qemu = vmbench::qemu_binary()?;

    println!(
        "boot to \"{INIT_STARTED}\": {runs} runs each, interleaved, timeout {}s",
        timeout.as_secs()
    );
    let mut cmdline: Option<String> = None;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        let s = boot(
            &mut vmbench::pmemvm_command(&guest, GUEST_MODE, &[]),
            timeout,
        )?;
        let line = s
            .cmdline
            .ok_or("pmemvm did not log the guest command line (RUST_LOG=vmm::vm=debug)")?;
        if cmdline.as_ref().is_some_and(|c| *c != line) {
            return Err(format!("pmemvm changed the guest command line to: {line}"));
        }
        println!("run {run}/{runs}: pmemvm {:7.2} s", s.secs);
        times[0].push(s.secs);

        // The microvm machine has no firmware tables or PCI to probe, like
        // pmemvm.
        let mut q = vmbench::qemu_command(&qemu, &["-M", "microvm"], "512M", &guest, &line);
        if cmdline.is_none() {
            println!("  qemu command: {}", vmbench::shell_words(&q));
            cmdline = Some(line);
        }
        let s = boot(&mut q, timeout)?;
        println!("run {run}/{runs}: qemu   {:7.2} s", s.secs);
        times[1].push(s.secs);
    }

    // Neighbouring runs share the host's load of the moment: their ratios
    // are steadier than the medians' when the host is busy.
    let mut pairs: Vec<f64> = times[0].iter().zip(&times[1]).map(|(p, q)| p / q).collect();
    let stats: Vec<(f64, f64, f64)> = times
        .iter_mut()
        .filter_map(|t| vmbench::summary(t))
        .collect();
    let ((_, pmemvm_med, _), (_, qemu_med, _)) = (stats[0], stats[1]);
    println!();
    println!(
        "{:<8} {:>8} {:>8} {:>8}   (seconds, n={runs})",
        "", "min", "median", "max"
    );
    for (name, (min, med, max)) in ["pmemvm", "qemu"].iter().zip(&stats) {
        println!("{name:<8} {min:>8.2} {med:>8.2} {max:>8.2}");
    }
    println!("ratio pmemvm/qemu of medians: {:.3}", pmemvm_med / qemu_med);
    if let Some((min, med, max)) = vmbench::summary(&mut pairs) {
        println!("ratio pmemvm/qemu per run pair: median {med:.3} (min {min:.3}, max {max:.3})");
    }
    Ok(())
}

/// Spawns `cmd` and times it until init's first line, then kills it.
fn boot(cmd: &mut Command, timeout: Duration) -> Result<Sample, String> {
    let (vm, secs) = Running::spawn_to_init(cmd, timeout)?;
    let cmdline = vm.finish(Duration::ZERO).cmdline;
    Ok(Sample { secs, cmdline })
}
