//! End-to-end tests: pmemvm boots the real test guest (guest-images/) and the
//! guest init (guest-images/init/init.c) runs one mode, chosen with
//! `pmemvm_mode=` on the guest command line, and reports through the console
//! and pmemvm's exit status.
//!
//! A boot to init takes about 35 s on nested shadow-paging KVM, so each test
//! is one boot and the in-guest work is kept small. They need /dev/kvm,
//! target/guest/{vmlinux,bzImage,initramfs.cpio.gz} (guest-images/build.sh),
//! e2fsprogs and xfsprogs, and fail loudly without them.

mod common;
/// The power-cut file system of `pmemvm bench crash`, shared as source.
#[allow(dead_code)]
#[path = "../src/lab/powercut.rs"]
mod powercut;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::{
    bzimage_guest, file_contains, guest, mkfs_ext4, mkfs_xfs, path_str, pmem_arg, tool,
    tool_with_codes, TempDir, Vm, WRITABLE_CHECKS, WRITABLE_METRICS,
};

const MIB: u64 = 1 << 20;

const STARTED: &str = "pmemvm-init: started";
const SIGKILL: i32 = 9;

#[test]
fn boot_to_init_exit_status() {
    let guest = guest();
    let out = Vm::run(
        &guest,
        "pmemvm_mode=exit=42",
        &["--vcpus".into(), "2".into()],
    );
    out.expect_code(42);
    out.expect_output(STARTED);
    out.expect_output("pmemvm-init: exiting with status 42");
    eprintln!("boot_to_init_exit_status: {:.1?}", out.elapsed);
}

/// A bzImage boots as fast as the vmlinux: pmemvm decompresses its payload
/// on the host rather than leaving it to the guest's slow decompressor.
#[test]
fn bzimage_payload_decompressed_on_the_host() {
    let out = Vm::run(&bzimage_guest(), "pmemvm_mode=exit=9", &[]);
    out.expect_code(9);
    out.expect_output("kernel: bzImage payload (");
    out.expect_output("decompressed on the host in");
    out.expect_output("pmemvm-init: exiting with status 9");
    eprintln!(
        "bzimage_payload_decompressed_on_the_host: {:.1?}",
        out.elapsed
    );
}

#[test]
fn guest_reboot_exits_cleanly() {
    let guest = guest();
    let out = Vm::run(&guest, "pmemvm_mode=reboot", &[]);
    out.expect_code(0);
    out.expect_output(STARTED);
    out.expect_output("pmemvm-init: rebooting");
    assert!(
        !out.output.contains("pmemvm-init: reboot:"),
        "reboot(2) returned in the guest; output:\n{}",
        out.output
    );
    eprintln!("guest_reboot_exits_cleanly: {:.1?}", out.elapsed);
}

/// The checks init.c's dax mode prints for a read-only mount.
const READONLY_CHECKS: &[&str] = &[
    "mount",
    "proc-mounts-dax",
    "queue-dax",
    "ro-content",
    "statx-dax",
    "ro-write-erofs",
    "umount",
];

/// A hash of the whole file, to show a read-only disk came back unchanged.
fn file_hash(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// One boot, three disks: ext4 and xfs written through write() and a DAX
/// mapping and fsynced, and a read-only ext4 the host prepared. Then the
/// host reads the images and the --stats record.
#[test]
fn dax_ext4_xfs_two_devices_and_readonly() {
    let guest = guest();
    let tmp = TempDir::new("dax");
    let ext4 = tmp.join("pmem0-ext4.img");
    let xfs = tmp.join("pmem1-xfs.img");
    let ro = tmp.join("pmem2-ro-ext4.img");
    let stats = tmp.join("stats.json");
    mkfs_ext4(&ext4, 64 * MIB);
    // mkfs.xfs (xfsprogs 6.1) refuses anything under 300 MiB. The file is
    // sparse: only the 64 MiB log mkfs zeroes takes space.
    mkfs_xfs(&xfs, 300 * MIB);
    mkfs_ext4(&ro, 64 * MIB);
    let ro_src = tmp.join("ro.txt");
    std::fs::write(&ro_src, "pmemvm readonly pmem2\n").unwrap();
    tool(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} ro.txt", path_str(&ro_src)),
            path_str(&ro),
        ],
    );
    let ro_hash = file_hash(&ro);

    let out = Vm::run(
        &guest,
        "pmemvm_mode=dax pmemvm_dax=ext4:pmem0,xfs:pmem1,ro-ext4:pmem2",
        &[
            "--pmem".into(),
            pmem_arg(&ext4, ""),
            "--pmem".into(),
            pmem_arg(&xfs, ""),
            "--pmem".into(),
            pmem_arg(&ro, ",readonly=on"),
            "--stats".into(),
            path_str(&stats).into(),
        ],
    );
    eprintln!(
        "dax_ext4_xfs_two_devices_and_readonly: guest run {:.1?}",
        out.elapsed
    );
    out.expect_output(STARTED);
    let failed: Vec<&str> = out
        .output
        .lines()
        .filter(|l| l.contains("FAILED"))
        .collect();
    assert!(
        failed.is_empty(),
        "guest checks failed: {failed:#?}\noutput:\n{}",
        out.output
    );
    for (dev, checks) in [
        ("pmem0", WRITABLE_CHECKS),
        ("pmem1", WRITABLE_CHECKS),
        ("pmem2", READONLY_CHECKS),
    ] {
        for check in checks {
            out.expect_output(&format!("pmemvm-init: check {dev}:{check} ok"));
        }
    }
    for dev in ["pmem0", "pmem1"] {
        for metric in WRITABLE_METRICS {
            out.expect_output(&format!("pmemvm-init: metric {dev}:{metric} "));
        }
    }
    out.expect_output("pmemvm-init: dax done, 0 failed");
    out.expect_output("pmemvm-init: fsync returned pmem0");
    out.expect_output("pmemvm-init: fsync returned pmem1");
    out.expect_output("pmemvm-init: dax ok");
    out.expect_code(0);
    out.expect_host_choices();

    // ext4: the files, read by debugfs from the image, and a clean fsck.
    let ext4_s = path_str(&ext4);
    assert_eq!(
        tool("debugfs", &["-R", "cat hello.txt", ext4_s]),
        "pmemvm dax write pmem0\n"
    );
    assert_eq!(
        tool("debugfs", &["-R", "cat mmap.txt", ext4_s]),
        "pmemvm dax mmap pmem0\n"
    );
    tool("e2fsck", &["-f", "-n", ext4_s]);

    // xfs: the names in the root directory, the contents somewhere in the
    // image (xfs_db cannot simply cat a file), and a clean xfs_repair -n.
    let xfs_s = path_str(&xfs);
    let ls = tool("xfs_db", &["-r", "-c", "ls /", xfs_s]);
    for name in ["hello.txt", "mmap.txt"] {
        assert!(ls.contains(name), "xfs root lacks {name}:\n{ls}");
    }
    for content in ["pmemvm dax write pmem1\n", "pmemvm dax mmap pmem1\n"] {
        assert!(
            file_contains(&xfs, content.as_bytes()),
            "{content:?} is not in the xfs image"
        );
    }
    tool("xfs_repair", &["-n", xfs_s]);

    // The read-only disk is byte for byte what the host made.
    assert_eq!(file_hash(&ro), ro_hash, "readonly=on disk was modified");

    // --stats: flushes on both writable disks, no errors anywhere.
    let text = std::fs::read_to_string(&stats).expect("read --stats file");
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad --stats JSON ({e}):\n{text}"));
    let pmem = json["pmem"]
        .as_array()
        .unwrap_or_else(|| panic!("no pmem array:\n{text}"));
    assert_eq!(pmem.len(), 3, "{text}");
    for (i, (path, size)) in [(&ext4, 64 * MIB), (&xfs, 300 * MIB), (&ro, 64 * MIB)]
        .into_iter()
        .enumerate()
    {
        let d = &pmem[i];
        let file = d["file"].as_str().unwrap_or_default();
        assert!(
            Path::new(file).file_name() == path.file_name(),
            "pmem[{i}].file is {file:?}, want {}\n{text}",
            path.display()
        );
        assert_eq!(d["size"].as_u64(), Some(size), "pmem[{i}].size\n{text}");
        let errors = d["errors"]
            .as_object()
            .unwrap_or_else(|| panic!("pmem[{i}] has no errors object\n{text}"));
        assert!(!errors.is_empty(), "pmem[{i}].errors is empty\n{text}");
        for (kind, n) in errors {
            assert_eq!(n.as_u64(), Some(0), "pmem[{i}].errors.{kind}\n{text}");
        }
        if i < 2 {
            let flushes = d["flush_requests"].as_u64().unwrap_or(0);
            assert!(
                flushes >= 1,
                "pmem[{i}].flush_requests is {flushes}\n{text}"
            );
            let writebacks = d["writebacks"].as_u64().unwrap_or(0);
            assert!(
                (1..=flushes).contains(&writebacks),
                "pmem[{i}].writebacks is {writebacks} for {flushes} flushes\n{text}"
            );
            let max = d["flush_latency_us"]["max"].as_u64().unwrap_or(0);
            assert!(max >= 1, "pmem[{i}].flush_latency_us.max is {max}\n{text}");
        }
    }
    assert_eq!(
        pmem[2]["readonly_writes"].as_u64(),
        Some(0),
        "the read-only ext4 mount wrote to its disk\n{text}"
    );
}

/// The guest writes through a DAX mapping and fsyncs; pmemvm is SIGKILLed
/// the moment the guest says so; the data is in the image after the
/// journal is replayed, as it would be on the next boot.
#[test]
fn crash_after_fsync_keeps_data() {
    let guest = guest();
    let tmp = TempDir::new("crash");
    let img = tmp.join("crash-ext4.img");
    mkfs_ext4(&img, 64 * MIB);
    let mut vm = Vm::start(
        &guest,
        "pmemvm_mode=crash pmemvm_dax=ext4:pmem0",
        &["--pmem".into(), pmem_arg(&img, "")],
    );
    vm.wait_for("pmemvm-init: fsync returned crash");
    vm.kill();
    let out = vm.wait();
    eprintln!(
        "crash_after_fsync_keeps_data: guest run {:.1?}",
        out.elapsed
    );
    assert_eq!(
        out.status.signal(),
        Some(SIGKILL),
        "pmemvm should have died of SIGKILL, got {}; output:\n{}",
        out.status,
        out.output
    );
    out.expect_output("pmemvm-init: check pmem0:fsync-mmap ok");

    // The fsync committed the new file to the ext4 journal; replay it the
    // way a mount would (e2fsck exits 1 when it changed something), then
    // the file system must be clean and hold the file.
    let img_s = path_str(&img);
    tool_with_codes("e2fsck", &["-f", "-y", img_s], &[0, 1]);
    tool("e2fsck", &["-f", "-n", img_s]);
    assert_eq!(
        tool("debugfs", &["-R", "cat crash.txt", img_s]),
        "pmemvm crash pmem0\n"
    );
}

/// The same under a power cut, on every engine in one boot: each ext4
/// image lives on the power-cut file system, which keeps only what a
/// completed fsync made durable. The guest writes crash.txt through DAX and
/// fsyncs it, then writes unsynced.txt with no fsync; the host cuts the
/// power under all four files and kills pmemvm. After the journal replays,
/// each file system must be clean and hold crash.txt.
#[test]
fn power_cut_after_fsync_keeps_data_on_every_engine() {
    const ENGINES: [&str; 4] = ["kernel", "mirror", "uffd", "prefault"];
    let guest = guest();
    let tmp = TempDir::new("powercut");
    let fs = powercut::PowerCutFs::mount(&tmp.join("cut"))
        .unwrap_or_else(|e| panic!("the power-cut file system: {e}"));
    let mut args = Vec::new();
    let mut specs = Vec::new();
    for (i, engine) in ENGINES.iter().enumerate() {
        let local = tmp.join(&format!("{engine}-mkfs.img"));
        mkfs_ext4(&local, 32 * MIB);
        let name = format!("{engine}.img");
        let on_fs = fs.path(&name);
        std::fs::copy(&local, &on_fs).unwrap();
        // The fresh file system is durable before the guest starts.
        std::fs::File::open(&on_fs).unwrap().sync_all().unwrap();
        args.push("--pmem".to_string());
        args.push(pmem_arg(&on_fs, &format!(",engine={engine}")));
        specs.push(format!("ext4:pmem{i}"));
    }
    let mut vm = Vm::start(
        &guest,
        &format!("pmemvm_mode=crash pmemvm_dax={}", specs.join(",")),
        &args,
    );
    vm.wait_for("pmemvm-init: fsync returned crash");
    let images: Vec<_> = ENGINES
        .iter()
        .map(|e| fs.cut(&format!("{e}.img")).unwrap())
        .collect();
    vm.kill();
    let out = vm.wait();
    eprintln!(
        "power_cut_after_fsync_keeps_data_on_every_engine: guest run {:.1?}",
        out.elapsed
    );
    for (i, (engine, image)) in ENGINES.iter().zip(&images).enumerate() {
        out.expect_output(&format!("pmemvm-init: check pmem{i}:fsync-mmap ok"));
        let syncs = fs.sync_log(&format!("{engine}.img")).unwrap();
        let cut = tmp.join(&format!("{engine}-after-cut.img"));
        std::fs::write(&cut, image.to_vec()).unwrap();
        let img = path_str(&cut);
        tool_with_codes("e2fsck", &["-f", "-y", img], &[0, 1]);
        tool("e2fsck", &["-f", "-n", img]);
        assert_eq!(
            tool("debugfs", &["-R", "cat crash.txt", img]),
            format!("pmemvm crash pmem{i}\n"),
            "{engine}: crash.txt after the power cut ({} syncs reached the file system)",
            syncs.len()
        );
        let unsynced = tool_with_codes("debugfs", &["-R", "cat unsynced.txt", img], &[0, 1]);
        eprintln!(
            "{engine}: {} syncs; unsynced.txt after the cut: {:?}",
            syncs.len(),
            unsynced.trim()
        );
    }
}
