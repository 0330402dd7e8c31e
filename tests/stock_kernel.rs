//! Your own kernel: Debian's stock linux-image-amd64, unchanged, boots under
//! pmemvm and mounts a pmem disk with `-o dax`. Its drivers are modules,
//! which the test init loads from the initramfs, and it finds the
//! virtio-mmio devices in ACPI (`--acpi`): it is built without
//! `virtio_mmio.device=`.
//!
//! Needs target/stock-kernel (guest-images/stock-kernel/build.sh) and a
//! hardware-assisted KVM: a stock kernel cannot boot on nested
//! shadow-paging KVM (PLATFORM.md). `make test` runs it in the NPT host;
//! `cargo test` leaves it out (`test = false` in Cargo.toml).

mod common;

use common::{mkfs_ext4, path_str, pmem_arg, stock_guest, tool, TempDir, Vm, WRITABLE_CHECKS};

const MIB: u64 = 1 << 20;

#[test]
fn stock_debian_kernel_mounts_pmem_with_dax() {
    assert!(
        !std::path::Path::new("/sys/module/kvm_pvm").exists(),
        "a stock kernel cannot boot on nested shadow-paging KVM (kvm_pvm): \
         run this test in the NPT host (guest-images/npt-host/run, as make test does)"
    );
    let guest = stock_guest();
    let version =
        std::fs::read_to_string(guest.kernel.with_file_name("version")).unwrap_or_default();
    let tmp = TempDir::new("stock");
    let img = tmp.join("pmem0-ext4.img");
    mkfs_ext4(&img, 64 * MIB);
    let out = Vm::run(
        &guest,
        "pmemvm_mode=dax pmemvm_dax=ext4:pmem0",
        &["--acpi".into(), "--pmem".into(), pmem_arg(&img, "")],
    );
    eprintln!(
        "stock kernel {}: guest run {:.1?}",
        version.trim(),
        out.elapsed
    );
    let modules = std::fs::read_to_string(guest.kernel.with_file_name("load"))
        .expect("target/stock-kernel/load lists the modules");
    assert!(
        !out.output.contains("pmemvm-init: loading module"),
        "a module failed to load:\n{}",
        out.output
    );
    out.expect_output(&format!(
        "pmemvm-init: loaded {} modules",
        modules.lines().count()
    ));
    for check in WRITABLE_CHECKS {
        out.expect_output(&format!("pmemvm-init: check pmem0:{check} ok"));
    }
    out.expect_output("pmemvm-init: dax ok");
    out.expect_code(0);
    let img_s = path_str(&img);
    assert_eq!(
        tool("debugfs", &["-R", "cat hello.txt", img_s]),
        "pmemvm dax write pmem0\n"
    );
    tool("e2fsck", &["-f", "-n", img_s]);
}
