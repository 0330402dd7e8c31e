//! Probe VM tests. They need /dev/kvm and fail (loudly) without it.

use std::path::Path;
use std::time::Duration;

use devices::virtio::pmem::{EngineConfig, FaultEngineKind};

use super::backing::{BackingKind, ScratchDir};
use super::bench::{self, FaultBenchConfig, FaultOp, PagePattern, ProbeCase};
use super::flush::{self, FlushBenchConfig, FlushLayout};
use super::guest::{PageOrder, StepOp, StepSpec};
use super::vm::{ProbeRun, ProbeVm, ProbeVmConfig};
use super::ProbeError;

const ENGINES: [FaultEngineKind; 4] = [
    FaultEngineKind::Kernel,
    FaultEngineKind::Uffd,
    FaultEngineKind::Prefault,
    FaultEngineKind::Mirror,
];

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM): load kvm_intel/kvm_amd or run them on a KVM host"
    );
}

fn run(
    dir: &mut ScratchDir,
    engine: FaultEngineKind,
    region_pages: u64,
    steps: &[StepSpec],
) -> Result<ProbeRun, ProbeError> {
    require_kvm();
    let backing = dir
        .create_file(region_pages.div_ceil(512) * 512 * 4096)
        .unwrap();
    let config = ProbeVmConfig {
        engine: EngineConfig::with_defaults(engine),
        backing,
        region_pages,
        timeout: Duration::from_secs(20),
    };
    ProbeVm::new(&config, steps)?.run()
}

fn step(op: StepOp, count: u64, first_page: u64, order: PageOrder) -> StepSpec {
    StepSpec {
        op,
        count,
        first_page,
        order,
    }
}

fn flush() -> StepSpec {
    step(StepOp::Flush, 1, 0, PageOrder::Stride { stride: 1 })
}

/// Every engine must run here: an unavailable one (EngineUnavailable) fails
/// the test, as it fails the others, rather than being skipped.
#[test]
fn every_engine_returns_one_sample_per_page() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let seq = PageOrder::Stride { stride: 1 };
    let random = PageOrder::Random { stride: 1, seed: 7 };
    let steps = [
        step(StepOp::Read, 64, 0, seq),
        step(StepOp::Write, 64, 0, seq),
        step(StepOp::Write, 64, 64, random),
        step(StepOp::Read, 64, 64, random),
        flush(),
    ];
    for engine in ENGINES {
        let run = run(&mut dir, engine, 512, &steps)
            .unwrap_or_else(|e| panic!("engine {}: {e}", engine.name()));
        assert_eq!(run.engine, engine);
        assert_eq!(run.steps.len(), steps.len());
        for (result, spec) in run.steps.iter().zip(&steps) {
            assert_eq!(result.ticks.len() as u64, spec.count, "{spec:?}");
            assert!(result.ticks.iter().all(|&t| t > 0), "{:?}", result.ticks);
        }
        assert!(run.tsc_khz > 0);
        assert!(run.steps[0].vcpu_stats.contains_key("exits"));
        // The flush wrote back exactly the 128 written pages.
        let last = run.steps.last().unwrap();
        assert_eq!(last.device.writebacks, 1, "engine {}", engine.name());
        assert_eq!(
            last.engine.flush.last_pages,
            128,
            "engine {}",
            engine.name()
        );
    }
}

#[test]
fn random_writes_touch_every_page_of_the_window() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    require_kvm();
    let backing = dir.create_file(2 << 20).unwrap();
    let config = ProbeVmConfig {
        engine: EngineConfig::default(),
        backing: backing.clone(),
        region_pages: 512,
        timeout: Duration::from_secs(20),
    };
    let write = step(
        StepOp::Write,
        100,
        3,
        PageOrder::Random {
            stride: 2,
            seed: 99,
        },
    );
    ProbeVm::new(&config, &[write]).unwrap().run().unwrap();
    let data = std::fs::read(&backing).unwrap();
    let written = |p: usize| data[p * 4096..p * 4096 + 8] != [0u8; 8];
    let mut touched: Vec<usize> = (0..512).filter(|&p| written(p)).collect();
    touched.sort_unstable();
    let expected: Vec<usize> = (0..100).map(|i| 3 + 2 * i).collect();
    assert_eq!(touched, expected);
}

#[test]
fn a_flush_writes_back_exactly_the_dirty_pages_once() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let steps = [
        step(StepOp::Write, 5, 10, PageOrder::Stride { stride: 7 }),
        flush(),
        flush(),
        // The catch is armed again: re-dirtying two of them is seen.
        step(StepOp::Write, 2, 17, PageOrder::Stride { stride: 7 }),
        flush(),
    ];
    for engine in ENGINES {
        let run = run(&mut dir, engine, 512, &steps)
            .unwrap_or_else(|e| panic!("engine {}: {e}", engine.name()));
        let name = engine.name();
        let first = &run.steps[1];
        assert_eq!(first.device.flush_requests, 1, "{name}");
        assert_eq!(first.device.writebacks, 1, "{name}");
        assert_eq!(first.engine.flush.last_pages, 5, "{name}");
        assert_eq!(first.engine.flush.pages, 5, "{name}");
        let second = &run.steps[2];
        assert_eq!(second.device.writebacks, 2, "{name}");
        assert_eq!(second.engine.flush.last_pages, 0, "{name}");
        assert_eq!(second.engine.flush.pages, 5, "{name}");
        assert!(first.ticks[0] > 0 && second.ticks[0] > 0);
        let third = &run.steps[4];
        assert_eq!(third.device.writebacks, 3, "{name}");
        assert_eq!(third.engine.flush.last_pages, 2, "{name}");
        assert_eq!(third.engine.flush.pages, 7, "{name}");
    }
}

/// Reads are not writes: a flush after the guest only read writes nothing
/// back, whatever the engine and however its pages were populated.
#[test]
fn reads_leave_nothing_to_write_back() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let steps = [
        step(StepOp::Read, 64, 0, PageOrder::Stride { stride: 1 }),
        flush(),
    ];
    for engine in ENGINES {
        let run = run(&mut dir, engine, 512, &steps)
            .unwrap_or_else(|e| panic!("engine {}: {e}", engine.name()));
        assert_eq!(
            run.steps[1].engine.flush.last_pages,
            0,
            "engine {}: a read-only guest had pages written back",
            engine.name()
        );
    }
}

#[test]
fn a_paused_probe_resumes_where_it_stopped() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    require_kvm();
    let backing = dir.create_file(2 << 20).unwrap();
    let config = ProbeVmConfig {
        engine: EngineConfig::default(),
        backing,
        region_pages: 512,
        timeout: Duration::from_secs(20),
    };
    let seq = PageOrder::Stride { stride: 1 };
    let steps = [
        step(StepOp::Write, 8, 0, seq),
        flush(),
        step(StepOp::Write, 3, 100, seq),
        flush(),
    ];
    let mut vm = ProbeVm::new(&config, &steps).unwrap();
    let first = vm.run_steps(2).unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[1].engine.flush.last_pages, 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.run_steps(1).unwrap()[0].ticks.len(), 3);
    assert_eq!(vm.steps_done(), 3);
    let run = vm.run().unwrap();
    assert_eq!(run.steps.len(), 4);
    assert_eq!(run.steps[3].engine.flush.last_pages, 3);
}

/// More first writes between two flushes than the dirty ring holds: where
/// the engine uses the ring, KVM stops the vCPU with
/// KVM_EXIT_DIRTY_RING_FULL, the VMM harvests, and no write is lost.
#[test]
fn a_full_dirty_ring_loses_no_write() {
    let pages = u64::from(vmm::fault::dirty_log::RING_ENTRIES) + 512;
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    require_kvm();
    let backing = dir.create_file(pages * 4096).unwrap();
    let config = ProbeVmConfig {
        engine: EngineConfig::default(),
        backing: backing.clone(),
        region_pages: pages,
        timeout: Duration::from_secs(300),
    };
    let steps = [
        step(StepOp::Write, pages, 0, PageOrder::Stride { stride: 1 }),
        flush(),
    ];
    let run = ProbeVm::new(&config, &steps).unwrap().run().unwrap();
    assert_eq!(run.steps[1].engine.flush.last_pages, pages);
    match run.dirty_log {
        Some("dirty ring") => assert!(
            run.dirty_ring_full_exits >= 1,
            "{pages} first writes into a {}-entry ring, and no ring-full exit",
            vmm::fault::dirty_log::RING_ENTRIES
        ),
        other => {
            assert!(
                other.is_some_and(|k| k.starts_with("dirty bitmap")),
                "{other:?}"
            );
            assert_eq!(run.dirty_ring_full_exits, 0);
        }
    }
    let data = std::fs::read(&backing).unwrap();
    let blank: Vec<u64> = (0..pages)
        .filter(|&p| data[p as usize * 4096..][..8] == [0u8; 8])
        .collect();
    assert!(blank.is_empty(), "pages never written back: {blank:?}");
}

/// An exception in the probe is reported with its vector and RIP, not
/// as a triple fault (which on SVM resets the vCPU, state and all).
/// A one-flush probe on the kernel engine, for tests that patch its code.
fn flush_probe(dir: &mut ScratchDir, timeout: Duration) -> ProbeVm {
    require_kvm();
    let config = ProbeVmConfig {
        engine: EngineConfig::default(),
        backing: dir.create_file(2 << 20).unwrap(),
        region_pages: 512,
        timeout,
    };
    ProbeVm::new(&config, &[flush()]).unwrap()
}

#[test]
fn a_probe_exception_is_reported_with_its_vector() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let vm = flush_probe(&mut dir, Duration::from_secs(20));
    // ud2 as the first instruction.
    vm.patch_code(0, &[0x0f, 0x0b]);
    match vm.run() {
        Err(ProbeError::GuestException {
            vector: 6,
            offset: 0,
            steps_done: 0,
            ..
        }) => {}
        other => panic!("want #UD at probe offset 0, got {other:?}"),
    }
}

/// A probe that never ends is stopped by the watchdog, which kicks the
/// vCPU out of KVM_RUN, and reported as hung, not waited for forever.
#[test]
fn a_hung_probe_is_stopped_at_its_timeout() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let vm = flush_probe(&mut dir, Duration::from_millis(300));
    // jmp . as the first instruction.
    vm.patch_code(0, &[0xeb, 0xfe]);
    let started = std::time::Instant::now();
    match vm.run() {
        Err(ProbeError::Timeout { steps_done: 0, .. }) => {}
        other => panic!("want a timeout after 0 steps, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn steps_outside_the_region_are_refused() {
    let mut dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let steps = [step(StepOp::Read, 10, 510, PageOrder::Stride { stride: 1 })];
    assert!(matches!(
        run(&mut dir, FaultEngineKind::Kernel, 512, &steps),
        Err(ProbeError::StepOutsideRegion { .. })
    ));
}

fn keys(v: &serde_json::Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

#[test]
fn fault_bench_json_has_the_expected_shape() {
    require_kvm();
    let config = FaultBenchConfig {
        engines: vec![
            ProbeCase::Engine(FaultEngineKind::Kernel),
            ProbeCase::Engine(FaultEngineKind::Prefault),
        ],
        ops: FaultOp::ALL.to_vec(),
        pattern: PagePattern::Random,
        pages: 16,
        backing: BackingKind::Sparse,
        repeat: 2,
        ..Default::default()
    };
    let report = bench::run_faults(&config).unwrap();
    let dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let path = dir.path().join("faults.json");
    report.write_json(&path).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        keys(&v),
        [
            "bench",
            "checks",
            "config",
            "host",
            "runs",
            "skipped_engines",
            "summary"
        ]
    );
    assert_eq!(v["bench"], "faults");
    // The figures agree with KVM's counts.
    assert_eq!(report.failure(), None, "{}", report.table());
    assert!(v["checks"].as_array().unwrap().len() > 20);
    assert_eq!(v["config"]["pages"], 16);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 engines x 2 repeats");
    for run in runs {
        assert!(run["tsc_khz"].as_u64().unwrap() > 0);
        for step in run["steps"].as_array().unwrap() {
            let count = step["count"].as_u64().unwrap();
            assert_eq!(step["ticks"].as_array().unwrap().len() as u64, count);
            assert!(step["kvm_vcpu"].is_object() && step["kvm_vm"].is_object());
            assert!(step["engine_after"]["flush"]["pages"].is_u64());
        }
    }
    let summary = v["summary"].as_array().unwrap();
    // Per engine: first read, first write, mkwrite, warm read, warm write,
    // re-dirty after flush, flush.
    assert_eq!(summary.len(), 2 * 7);
    for row in summary {
        for key in [
            "engine",
            "event",
            "samples",
            "p50_ns",
            "p99_ns",
            "mean_ns",
            "per_second",
        ] {
            assert!(!row[key].is_null(), "{key} missing in {row}");
        }
        assert!(row["kvm_per_sample"].is_object());
    }
    let first_reads = summary.iter().find(|r| r["event"] == "first_read").unwrap();
    assert_eq!(
        first_reads["samples"],
        2 * 2 * 16,
        "2 ops x 2 repeats x 16 pages"
    );
    let table = report.table();
    assert!(table.contains("mkwrite (write after read)"));
    assert!(table.contains("checks: "), "{table}");
}

#[test]
fn flush_bench_json_has_the_expected_shape() {
    require_kvm();
    let config = FlushBenchConfig {
        cases: vec![
            ProbeCase::Engine(FaultEngineKind::Kernel),
            ProbeCase::PEERS[0],
        ],
        dirty: vec![0, 3],
        layout: FlushLayout::Scattered,
        backing: BackingKind::Sparse,
        rounds: 2,
        repeat: 3,
        ..Default::default()
    };
    let report = flush::run_flush(&config).unwrap();
    let dir = ScratchDir::new(BackingKind::Sparse, None).unwrap();
    let path = dir.path().join("flush.json");
    report.write_json(&path).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        keys(&v),
        [
            "bench",
            "checks",
            "config",
            "host",
            "host_syncs",
            "probe_runs",
            "skipped_engines",
            "summary"
        ]
    );
    assert_eq!(v["bench"], "flush");
    assert_eq!(report.failure(), None, "{}", report.table());
    let summary = v["summary"].as_array().unwrap();
    // Per dirty count: the engine, the peer and three host methods.
    assert_eq!(summary.len(), 2 * 5);
    for row in summary {
        for key in [
            "case",
            "dirty",
            "samples",
            "p50_ns",
            "p99_ns",
            "mean_ns",
            "p50_vs_fdatasync",
            "p50_vs_best_peer",
            "spread",
        ] {
            assert!(!row[key].is_null(), "{key} missing in {row}");
        }
        assert_eq!(row["samples"], 2 * 3, "2 rounds x 3 repeats");
        assert_eq!(row["repeat_p50_ns"].as_array().unwrap().len(), 3);
    }
    let probe3 = summary
        .iter()
        .find(|r| r["case"] == "probe kernel" && r["dirty"] == 3)
        .unwrap();
    assert_eq!(probe3["writeback_pages"], 3);
    assert!(probe3["breakdown"]["sync_us"].as_f64().unwrap() > 0.0);
    let peer3 = summary
        .iter()
        .find(|r| r["case"] == "peer fsync (QEMU, CH)" && r["dirty"] == 3)
        .unwrap();
    assert_eq!(peer3["p50_vs_best_peer"], 1.0);
    // A warm-up round plus two measured, three methods, two dirty counts,
    // three repeats.
    assert_eq!(v["host_syncs"].as_array().unwrap().len(), 3 * 3 * 2 * 3);
    assert_eq!(v["probe_runs"].as_array().unwrap().len(), 2 * 3);
    let table = report.table();
    assert!(table.contains("peer fsync (QEMU, CH)"), "{table}");
    assert!(table.contains("where a flush's time goes"), "{table}");
    assert!(table.contains("checks: "), "{table}");
}
