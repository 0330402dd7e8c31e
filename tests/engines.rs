//! End-to-end tests of the fault engines in one shared Linux guest boot:
//! every engine writes back exactly the pages the guest dirtied, and two
//! vCPUs racing writes against flushes lose nothing.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{guest, nested_shadow_host, pmem_arg, TempDir, Vm};

const PAGE: u64 = 4096;
/// Must match raw_pages[] and the stress layout in guest-images/init/init.c.
const RAW_PAGES: [u64; 5] = [10, 17, 24, 31, 38];
const STRESS_FIRST_PAGE: u64 = 100;
const STRESS_PAGES: u64 = 8;
const STRESS_ROUNDS: u64 = 40;
const STRESS_MAGIC: u64 = 0x706d_656d_766d_0000;

fn page(path: &std::path::Path, index: u64) -> Vec<u8> {
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut buf, index * PAGE).unwrap();
    buf
}

#[test]
fn engines_write_back_exactly_the_dirty_pages() {
    let guest = guest();
    let dir = TempDir::new("engines");
    // pmem0..3: exact counts per engine; pmem4..6: racing writers, the
    // uffd ones served by a polling servicer.
    let devices = [
        ("kernel.img", "kernel", ""),
        ("uffd.img", "uffd", ""),
        ("prefault.img", "prefault", ""),
        ("mirror.img", "mirror", ""),
        ("stress-kernel.img", "kernel", ""),
        ("stress-uffd.img", "uffd", ",poll_us=200"),
        ("stress-mirror.img", "mirror", ""),
    ];
    const EXACT: usize = 4;
    let stats = dir.join("stats.json");
    let mut args = vec!["--vcpus".to_string(), "2".to_string()];
    for (file, engine, extra) in devices {
        args.push("--pmem".into());
        args.push(pmem_arg(
            &dir.join(file),
            &format!(",size=16M,engine={engine}{extra}"),
        ));
    }
    args.push("--stats".into());
    args.push(stats.display().to_string());
    let out = Vm::run(
        &guest,
        "pmemvm_mode=raw pmemvm_raw=pmem0,pmem1,pmem2,pmem3 pmemvm_stress=pmem4,pmem5,pmem6",
        &args,
    );
    out.expect_code(0);
    for (i, _) in devices.iter().enumerate() {
        let kind = if i < EXACT { "raw" } else { "stress" };
        out.expect_output(&format!("pmemvm-init: {kind} pmem{i} ok"));
    }

    let json: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    let records = json["pmem"].as_array().unwrap();
    assert_eq!(records.len(), devices.len());
    for (i, (file, engine, _)) in devices.iter().enumerate() {
        let r = &records[i];
        assert_eq!(r["engine"], *engine, "{r}");
        let errors = r["errors"].as_object().unwrap();
        assert!(errors.values().all(|v| v == 0), "pmem{i}: {r}");
        assert!(
            r["kvm"]["exits"].as_i64().unwrap_or(0) > 0,
            "pmem{i}: no KVM statistics: {r}"
        );
        if i < EXACT {
            // 5 pages, fsync; fsync with nothing dirty; 1 page again, fsync.
            assert_eq!(r["writebacks"], 3, "pmem{i} ({engine}): {r}");
            assert_eq!(r["flush"]["pages"], 6, "pmem{i} ({engine}): {r}");
            assert_eq!(r["flush"]["last_pages"], 1, "pmem{i} ({engine}): {r}");
            let path = dir.join(file);
            for p in RAW_PAGES {
                let what = if p == 17 { "again" } else { "first" };
                let want = format!("pmemvm raw pmem{i} page {p} {what}\n");
                assert!(
                    page(&path, p).starts_with(want.as_bytes()),
                    "pmem{i} ({engine}) page {p} lacks {want:?}"
                );
            }
        } else {
            // Both writers' last round reached the file: a write racing a
            // flush was written back by it or by the next one.
            let path = dir.join(file);
            for p in STRESS_FIRST_PAGE..STRESS_FIRST_PAGE + STRESS_PAGES {
                let data = page(&path, p);
                for who in 0..2u64 {
                    let at = (who * 512) as usize;
                    let word = |k: usize| {
                        u64::from_le_bytes(data[at + 8 * k..at + 8 * k + 8].try_into().unwrap())
                    };
                    assert_eq!(word(0), STRESS_MAGIC | who << 8, "pmem{i} page {p}");
                    assert_eq!(
                        word(1),
                        STRESS_ROUNDS,
                        "pmem{i} ({engine}) page {p} writer {who}: last round lost"
                    );
                }
            }
        }
    }
}

/// Unmounts the test's tmpfs, even when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} failed ({status}): this test needs root",
            at.display()
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem holding `dir`; returns the filler file.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    path
}

/// The host filesystem fills up under both engines: the guest's writes wait
/// (a store the host cannot back for kernel, a failed block reservation for
/// uffd), pmemvm says so, and everything completes once space returns.
#[test]
fn full_host_filesystem_stalls_writes_until_space_returns() {
    let guest = guest();
    let dir = TempDir::new("enospc");
    let mnt = Tmpfs::mount(dir.join("mnt"), "8M");
    let kernel_img = mnt.0.join("kernel.img");
    let uffd_img = mnt.0.join("uffd.img");
    // Page 0 of the kernel device is where the go signal lands: allocate it
    // now so that writing it later needs no space.
    let k = fs::File::create(&kernel_img).unwrap();
    k.set_len(16 << 20).unwrap();
    k.write_all_at(&[0u8; PAGE as usize], 0).unwrap();
    fs::File::create(&uffd_img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let stats = dir.join("stats.json");
    let args = vec![
        "--vcpus".to_string(),
        "2".to_string(),
        "--pmem".to_string(),
        pmem_arg(&kernel_img, ",engine=kernel"),
        "--pmem".to_string(),
        pmem_arg(&uffd_img, ",engine=uffd"),
        "--stats".to_string(),
        stats.display().to_string(),
    ];
    let mut vm = Vm::start(
        &guest,
        "pmemvm_mode=raw pmemvm_raw=pmem0,pmem1 pmemvm_go=pmem0",
        &args,
    );
    vm.wait_for("pmemvm-init: raw waiting for go");
    let filler = fill(&mnt.0);
    k.write_all_at(b"pmemvm-go", 0).unwrap();
    // pmemvm watches the kernel engine's file system from its device
    // loop. Where the kernel engine's stores then stall depends on the
    // host kind: on a nested shadow-paging host guest-kernel code is
    // emulated, so its stores arrive as MMIO exits and are written through
    // by the vCPU, which says so; on a VMX/SVM host they are real stores,
    // and KVM retries the fault in its async page-fault loop without
    // returning to pmemvm.
    let mut stalls = vec![
        "its file system is full",
        "the faulting vCPU waits until space returns",
    ];
    if nested_shadow_host() {
        stalls.push("the vCPU waits and retries");
    }
    vm.wait_for_all(&stalls);
    fs::remove_file(&filler).unwrap();
    let out = vm.wait();
    out.expect_code(0);
    out.expect_output("pmemvm-init: raw pmem0 ok");
    out.expect_output("pmemvm-init: raw pmem1 ok");
    out.expect_output("its file system has space again");
    if nested_shadow_host() {
        out.expect_output("done after waiting");
    }

    let json: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    let uffd = &json["pmem"][1];
    assert!(uffd["stalls"].as_u64().unwrap() >= 1, "{uffd}");
    // On a VMX/SVM host KVM maps a tmpfs page writable for a guest read
    // (tmpfs maps shared pages writable on read faults) and its dirty log
    // counts it: the kernel engine writes back the two pages the guest only
    // read, page 0 (the go signal it polls) and page 1 (which nd_pmem reads
    // at probe), unchanged. pmemvm warns about tmpfs at start.
    let kernel_extra = if nested_shadow_host() {
        0
    } else {
        out.expect_output("is on tmpfs, which maps pages writable on reads");
        assert_eq!(&page(&kernel_img, 0)[..9], b"pmemvm-go");
        assert_eq!(page(&kernel_img, 1), vec![0u8; PAGE as usize]);
        2
    };
    for (i, path) in [&kernel_img, &uffd_img].into_iter().enumerate() {
        let r = &json["pmem"][i];
        let extra = if i == 0 { kernel_extra } else { 0 };
        assert_eq!(r["flush"]["pages"], 6 + extra, "pmem{i}: {r}");
        let want = format!("pmemvm raw pmem{i} page 17 again\n");
        assert!(
            page(path, 17).starts_with(want.as_bytes()),
            "pmem{i}: page 17 lacks {want:?}: nothing may be lost"
        );
    }
}

/// Crash consistency: the guest writes, fsyncs and acknowledges sequence
/// numbers until pmemvm is SIGKILLed at a random moment; every acknowledged
/// write must be in the file. The uffd and mirror engines keep guest data
/// in their own mirror, so only a working flush gets it to the file before
/// the kill.
#[test]
fn sigkill_loses_no_acknowledged_write() {
    let guest = guest();
    let dir = TempDir::new("acks");
    let rounds = [("uffd", 0u64), ("kernel", 1), ("mirror", 2), ("uffd", 3)];
    let mut losses = 0;
    for (round, (engine, seed)) in rounds.iter().enumerate() {
        let img = dir.join(&format!("round{round}.img"));
        let args = vec![
            "--pmem".to_string(),
            pmem_arg(&img, &format!(",size=16M,engine={engine}")),
        ];
        let mut vm = Vm::start(&guest, "pmemvm_mode=acks pmemvm_raw=pmem0", &args);
        vm.wait_for("pmemvm-init: ack 3");
        // A pseudo-random extra wait of 0-1.5 s, different per round.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        std::thread::sleep(std::time::Duration::from_millis(
            (nanos ^ (seed * 7919)) % 1500,
        ));
        vm.kill();
        let out = vm.wait();
        let acked: Vec<u64> = out
            .output
            .lines()
            .filter_map(|l| l.strip_prefix("pmemvm-init: ack ")?.trim().parse().ok())
            .collect();
        assert!(acked.len() >= 3, "round {round}: {}", out.output);
        // Each slot must hold its last acknowledged number or a later one.
        for &seq in &acked {
            let data = page(&img, 10 + seq % 64);
            let text = String::from_utf8_lossy(&data[..32]).to_string();
            let held: u64 = text
                .strip_prefix("pmemvm ack ")
                .and_then(|t| t.split('\n').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if held < seq || held % 64 != seq % 64 {
                losses += 1;
                eprintln!("round {round} ({engine}): ack {seq} lost, page holds {text:?}");
            }
        }
        eprintln!(
            "crash round {round} ({engine}): killed after {} acks",
            acked.len()
        );
    }
    assert_eq!(losses, 0, "acknowledged writes lost");
}
