#!/usr/bin/env bash
# make test, second host kind: the suites that need a real two-dimensional
# paging KVM, each in its own boot of the NPT host (guest-images/npt-host).
# The test binaries are built here, on the machine; L1 runs them from the
# same paths (read-only), with /scratch as TMPDIR.
#
#   tests/npt-host.sh [SUITE...]     (default: all; see `suites` below)
#
# Prints one line per suite (time, result) and fails if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."

run=guest-images/npt-host/run
pmemvm=$PWD/target/release/pmemvm
bins=$(cargo test --workspace --release --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
stock=$(cargo test --release --test stock_kernel --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
bin() {
    local b
    b=$(printf '%s\n' "$bins" "$stock" | grep -E "/deps/$1-[0-9a-f]+$" | head -n 1)
    [ -n "$b" ] || { echo "npt-host.sh: no test binary '$1' (cargo test --no-run failed?)" >&2; exit 1; }
    printf '%s' "$b"
}

# One guest at a time: in the NPT host, two L2 guests running at once
# triple-fault or hang now and then, with pmemvm and equally with QEMU as
# the L2 VMM (no pmemvm): QEMU 7.2's SVM emulation under multi-threaded
# TCG. One at a time, neither happened. Measured in the closing note of
# the NPT-host issue; the reproduction is in README.md ("The NPT host").
serial=(--test-threads=1)

suites=(e2e engines host_faults unit probe stock_kernel bench_faults bench_flush bench_crash)
[ $# -gt 0 ] && suites=("$@")

# Each suite takes under a minute there when well; a stuck one is ended
# by L1's init after this, with what each process was stuck in.
export NPT_HOST_TIMEOUT=${NPT_HOST_TIMEOUT_SUITE:-600}

declare -a summary=()
failed=0
for s in "${suites[@]}"; do
    case $s in
    e2e | engines | host_faults) cmd=("$(bin "$s")" "${serial[@]}") ;;
    # The vmm crate's unit tests.
    unit) cmd=("$(bin vmm)" "${serial[@]}") ;;
    # The pmemvm binary's unit tests: the fault-cost lab (src/lab), whose
    # tests boot the probe guest. bin picks the test executable in deps/,
    # not target/release/pmemvm.
    probe) cmd=("$(bin pmemvm)" "${serial[@]}") ;;
    stock_kernel) cmd=("$(bin stock_kernel)" --nocapture) ;;
    bench_faults) cmd=("$pmemvm" bench faults --pages 256 --repeat 1) ;;
    bench_flush) cmd=("$pmemvm" bench flush --dirty 0,1,64 --rounds 3 --repeat 3) ;;
    bench_crash) cmd=("$pmemvm" bench crash --rounds 20 --vcpus 2) ;;
    *) echo "npt-host.sh: unknown suite '$s' (known: ${suites[*]})" >&2; exit 2 ;;
    esac
    echo "=== npt-host: $s: ${cmd[*]}" >&2
    start=$(date +%s.%N)
    out=$(mktemp)
    "$run" "${cmd[@]}" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    result=ok
    # An L2 guest's triple fault is QEMU's (README, "The NPT host": it
    # strikes at random points of boot, a trace shows a fetch fault on the
    # page the guest was executing, and QEMU/KVM guests in L1 fail the same
    # way), and so is an L2 guest that never printed a line (the hang of
    # the same emulation; a test says "the guest printed nothing", or "the
    # guest stalled in early boot" when it went silent before init): the
    # suite runs again, at most twice, and the summary says so. Any other
    # failure stands.
    faults=0
    while [ "$rc" -ne 0 ] && [ "$faults" -lt 2 ] &&
        grep -q -e "guest shut down (triple fault)" -e "(the guest printed nothing)" \
            -e "(the guest stalled in early boot)" "$out"; do
        faults=$((faults + 1))
        echo "=== npt-host: $s: an L2 guest triple-faulted or never started (QEMU's SVM emulation); running the suite again ($faults of 2)" >&2
        "$run" "${cmd[@]}" 2>&1 | tee "$out"
        rc=${PIPESTATUS[0]}
        result="ok after $faults L2 triple fault(s) or hang(s)"
    done
    rm -f "$out"
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    [ "$rc" -eq 0 ] || { result="FAILED ($rc)"; failed=1; }
    summary+=("$(printf '%-14s %7.1f s  %s' "$s" "$secs" "$result")")
done
echo "=== npt-host: suites (NPT host, $(${NPT_HOST_QEMU:-qemu-system-x86_64} --version | head -n 1))" >&2
printf '%s\n' "${summary[@]}" >&2
exit "$failed"
