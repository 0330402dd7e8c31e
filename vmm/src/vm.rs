//! Building the VM from a [`VmConfig`] and running it to its end.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::legacy::{ExitPort, SerialConsole, EXIT_PORT, I8042};
use devices::virtio::pmem::PmemConfig;
use kvm_ioctls::Cap;
use vm_memory::{Bytes, GuestAddress};

use crate::acpi;
use crate::boot::{self, BootError};
use crate::cmdline::{self, HostQuirks, MmioDeviceSpec};
use crate::cpu;
use crate::error::{io_err, kvm_err, VmmError};
use crate::exit::{ExitSignal, RunEnd};
use crate::host::HostKind;
use crate::layout::{self, MAX_MEMORY, MIN_MEMORY};
use crate::machine::{Machine, MachineConfig};
use crate::mptable;
use crate::pmem::DeviceEventLoop;
use crate::stats::{KvmCounters, StatsFile};
use crate::vcpu::{self, VcpuContext};
use crate::vstate::{open_kvm, IrqLine};
const SERIAL_PORT: u64 = 0x3f8;
const I8042_PORT: u64 = 0x60;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The user's part of the guest command line.
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u8,
    pub host_quirks: HostQuirks,
    /// `--pmem` devices, in guest order (/dev/pmem0 first).
    pub pmem: Vec<PmemConfig>,
    /// Where to write the JSON statistics when the VM ends.
    pub stats: Option<PathBuf>,
    /// Describe CPUs and devices in ACPI tables instead of the MP table and
    /// the command line, for kernels that find devices only that way.
    pub acpi: bool,
}

fn check_memory(size: u64) -> Result<(), VmmError> {
    if size < MIN_MEMORY {
        return Err(VmmError::TooLittleMemory(size));
    }
    if size > MAX_MEMORY {
        return Err(VmmError::TooMuchMemory(size));
    }
    if !size.is_multiple_of(4096) {
        return Err(VmmError::UnalignedMemory);
    }
    Ok(())
}

/// Copies stdin to the serial console until EOF.
fn spawn_stdin_reader(serial: Arc<Mutex<SerialConsole>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no console input: cannot start the stdin thread: {e}");
    }
}

/// Boots the guest and runs it until it exits; returns pmemvm's exit status.
pub fn run(config: VmConfig) -> Result<i32, VmmError> {
    let started = Instant::now();
    check_memory(config.memory)?;
    let mptable = mptable::build(config.vcpus)?;
    // Fail on a bad path now, not after the guest has run.
    let stats = config.stats.as_deref().map(StatsFile::create).transpose()?;
    let kvm = open_kvm()?;
    let host = HostKind::detect();
    let mut cpuid = cpu::supported_cpuid(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    cpu::require_features(&cpuid, host, cpu::LINUX_BOOT, "a 64-bit Linux guest")?;
    // A hardware-reduced ACPI guest has no PIT to calibrate its LAPIC timer
    // against: it needs the TSC-deadline mode, which KVM emulates but
    // leaves to the VMM to announce.
    if config.acpi {
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            cpu::set_feature(&mut cpuid, cpu::TSC_DEADLINE);
        } else {
            log::warn!("--acpi: KVM has no TSC-deadline timer; the guest may find no timer");
        }
    }
    let mut machine = Machine::build(
        kvm,
        &MachineConfig {
            memory: config.memory,
            pit: true,
            pmem: &config.pmem,
        },
    )?;
    let mem = machine.mem.clone();
    let pmem = machine.pmem.clone();
    let specs: Vec<MmioDeviceSpec> = pmem.devices.iter().map(|d| d.spec()).collect();

    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&mem, path, &kernel, config.memory)?),
        None => None,
    };
    let acpi = if config.acpi {
        let tables = acpi::build(config.vcpus, &specs)?;
        tables.write(&mem)?;
        Some(tables.rsdp())
    } else {
        None
    };
    let discovery = if config.acpi {
        cmdline::Discovery::Acpi
    } else {
        cmdline::Discovery::CommandLine(&specs)
    };
    let line = cmdline::assemble(
        host,
        config.host_quirks,
        config.vcpus,
        discovery,
        &config.cmdline,
    )?;
    if let Some(switches) = line.host_switches {
        log::info!(
            "host is {}: adding guest switches '{switches}' (turn off with --host-quirks off)",
            host.describe()
        );
    }
    log::debug!("guest command line: {}", line.line);
    cpu::write_boot_tables(&mem)?;
    mem.write_slice(&mptable, GuestAddress(layout::MPTABLE_ADDR))
        .map_err(|e| BootError::GuestWrite {
            what: "the MP table",
            detail: e.to_string(),
        })?;
    let params = boot::zero_page(
        &kernel,
        line.line.len(),
        initrd,
        &layout::e820_map(config.memory),
        acpi,
    );
    boot::write_boot_data(&mem, &params, &line.line)?;

    let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit eventfd"))?);
    let serial_irq = IrqLine::register(&machine.vm, layout::SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        Box::new(std::io::stdout()) as Box<dyn Write + Send>,
    )));
    let mut pio = Bus::new();
    pio.insert(SERIAL_PORT, 8, serial.clone())?;
    pio.insert(
        I8042_PORT,
        5,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    pio.insert(
        u64::from(EXIT_PORT),
        1,
        Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
    )?;
    spawn_stdin_reader(serial);

    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let fd = machine.create_vcpu(id)?;
        cpu::configure_vcpu(&fd, id, config.vcpus, &cpuid, kernel.entry)?;
        vcpus.push(fd);
    }
    let kvm_counters = stats
        .as_ref()
        .and_then(|_| KvmCounters::open(&machine.vm, &vcpus));
    let ctx = machine.vcpu_context(pio, exit.clone());
    let events = DeviceEventLoop::start(&pmem).map_err(io_err("starting the device event loop"))?;
    vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick signal handler"))?;
    let mut threads = Vec::new();
    for (id, fd) in vcpus.into_iter().enumerate() {
        let ctx = ctx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id as u8, fd, ctx))
            .map_err(io_err("starting a vCPU thread"))?;
        threads.push(handle);
    }
    log::debug!("guest started {:?} after pmemvm", started.elapsed());

    let end = exit.wait();
    stop_vcpus(&ctx, threads);
    if let Some(events) = events {
        events.stop();
    }
    let _ = std::io::stdout().flush();
    if let Some(stats) = stats {
        stats.write(pmem.devices.iter().map(|d| d.stats()), kvm_counters)?;
    }
    match end {
        RunEnd::Fault(what) => Err(VmmError::GuestFault(what)),
        end => Ok(end.status()),
    }
}

/// Stops every vCPU thread, kicking each out of KVM_RUN until it returns.
fn stop_vcpus(ctx: &VcpuContext, threads: Vec<std::thread::JoinHandle<()>>) {
    ctx.stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in threads {
        // A kick can land just before the thread enters KVM_RUN and be
        // lost; keep kicking until it is out.
        while !t.is_finished() && Instant::now() < deadline {
            vcpu::kick(&t);
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::warn!("a vCPU thread did not stop in time; exiting anyway");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn memory_limits() {
        assert!(matches!(
            check_memory(16 * MIB),
            Err(VmmError::TooLittleMemory(_))
        ));
        assert!(matches!(
            check_memory(MAX_MEMORY + 4096),
            Err(VmmError::TooMuchMemory(_))
        ));
        assert!(matches!(
            check_memory(512 * MIB + 1),
            Err(VmmError::UnalignedMemory)
        ));
        assert!(check_memory(512 * MIB).is_ok());
        let msg = VmmError::TooLittleMemory(16 * MIB).to_string();
        assert!(msg.contains("16 MiB") && msg.contains("64 MiB"), "{msg}");
    }
}
