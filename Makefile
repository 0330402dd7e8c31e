# pmemvm: build, guest image, demo boot, checks and benchmarks.
# `make run` and `make test` work from a fresh Debian 12 machine with /dev/kvm.

# What `make run` and this machine's tests need: the guest kernel's build,
# the initramfs and the file systems the tests make.
PKGS := linux-source-6.1 flex bison libelf-dev libssl-dev bc xz-utils patch \
        make gcc musl-tools cpio e2fsprogs xfsprogs kmod
# QEMU, for the NPT host and the comparisons with QEMU only.
QEMU_PKGS := qemu-system-x86
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
PMEMVM := target/release/pmemvm
GUEST := --kernel target/guest/vmlinux --initrd target/guest/initramfs.cpio.gz
# Each name N has a target bench-N running `cargo bench --bench bench_N`
# (tests/bench_N.rs, registered as a [[bench]] in Cargo.toml; a - in N is
# a _ in the file name).
BENCHES := boot vs-qemu

.PHONY: all deps deps-qemu guest npt-host stock-kernel build run lint test test-host test-npt $(addprefix bench-,$(BENCHES)) bench-flush bench-faults crash-test

all: build

# Installs only the missing packages of $(1), without recommends, so a
# second run needs no network.
define install
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
endef

deps:
	@command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs) and put ~/.cargo/bin on PATH" >&2; exit 1; }
	$(call install,$(PKGS))

deps-qemu:
	$(call install,$(QEMU_PKGS))

guest: deps
	guest-images/build.sh

# The NPT host: an L1 Linux that QEMU TCG runs with AMD SVM and nested
# paging, so its KVM is a real two-dimensional-paging one
# (guest-images/npt-host/run CMD runs CMD inside it).
npt-host: deps deps-qemu
	guest-images/npt-host/build.sh

# Debian's stock kernel with the test init and its modules, for pmemvm --acpi.
stock-kernel: guest
	guest-images/stock-kernel/build.sh

build:
	cargo build --release

# The demo guest with a 64 MiB pmem disk (created sparse on first use).
run: deps guest build
	$(PMEMVM) run $(GUEST) --cmdline "pmemvm_mode=demo" --pmem file=target/demo.pmem,size=64M

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# Every test on both host kinds: this machine's KVM, then the NPT host
# (tests/npt-host.sh: e2e, engines, host_faults, the vmm unit tests, the
# lab's probe tests, the stock kernel, a small bench faults, bench flush
# and bench crash). Either failing fails.
test: guest npt-host stock-kernel lint
	$(MAKE) test-host
	$(MAKE) test-npt

# This machine's KVM only. The end-to-end tests boot target/guest and need
# /dev/kvm; then 20 crash rounds per engine and way of ending (SIGKILL,
# power cut), which fail on any acknowledged record lost.
test-host:
	cargo test --workspace --release
	$(PMEMVM) bench crash --rounds 20 --vcpus 2

# The NPT host only.
test-npt: deps-qemu
	tests/npt-host.sh

# The in-guest DAX checks (init.c's dax mode) on ext4, xfs and a read-only
# ext4, one boot; each check's line and the host's stats assertions.
.PHONY: dax-test
dax-test: guest
	cargo test --release --test e2e dax_ext4_xfs -- --nocapture

$(addprefix bench-,$(BENCHES)): bench-%: guest build deps-qemu
	cargo bench --bench bench_$(subst -,_,$*)

# Flush requests timed end to end in the probe guest (guest request to
# guest completion), per engine and peer policy, beside host
# fdatasync/fsync/msync; then the same across region sizes.
# Raw figures and their figures (pmemvm report) go to target/bench/.
bench-flush: build
	mkdir -p target/bench
	$(PMEMVM) bench flush --dirty 0,1,64,4096 --layout contiguous --json target/bench/flush.json
	$(PMEMVM) report target/bench/flush.json --svg target/bench/flush.svg >/dev/null
	$(PMEMVM) bench flush --dirty 64 --layout scattered --json target/bench/flush-scattered.json
	$(PMEMVM) bench flush --dirty 1,64 --region 16M,256M,1G,4G --backing sparse --repeat 3 --json target/bench/flush-regions.json
	$(PMEMVM) report target/bench/flush-regions.json --svg target/bench/flush-regions.svg >/dev/null

# Crash consistency at scale: 1000 SIGKILLs and 1000 power cuts per engine,
# 2 vCPUs racing; fails on any acknowledged record lost, with the seed and
# round that replay it. Figures and their plot go to target/bench/.
crash-test: build
	mkdir -p target/bench
	$(PMEMVM) bench crash --rounds 1000 --vcpus 2 --json target/bench/crash.json
	$(PMEMVM) report target/bench/crash.json --svg target/bench/crash.svg >/dev/null

# First-touch, mkwrite and re-dirty costs per engine in the probe guest.
bench-faults: build
	mkdir -p target/bench
	$(PMEMVM) bench faults --json target/bench/faults.json
	$(PMEMVM) report target/bench/faults.json --svg target/bench/faults.svg >/dev/null

# Every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each, then the executions
# per target. Needs `cargo install cargo-fuzz`; see fuzz/README.md.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh
