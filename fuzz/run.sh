#!/bin/sh
# Runs every fuzz target (or those in FUZZ_TARGETS) for FUZZ_SECONDS seconds
# each (default 60) and prints the executions per target. Exits non-zero if
# a target found a crash; its input is then in fuzz/artifacts/<target>/.
#
# New inputs go to fuzz/target/corpus/<target>/ (not committed); the curated
# corpus in fuzz/corpus/<target>/ is only read. Needs `cargo install cargo-fuzz`.
set -eu
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-mmio_registers pmem_requests pmem_options}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi
# cargo fuzz passes -Z flags (sanitizers); the machine has only a stable
# toolchain, and RUSTC_BOOTSTRAP lets it take them. Cargo caches rustc's
# answers in target/.rustc_info.json without keying on RUSTC_BOOTSTRAP, so a
# run without it leaves a cached failure behind: drop the cache.
export RUSTC_BOOTSTRAP=1
rm -f target/.rustc_info.json

max_len() {
    case $1 in
    pmem_requests) echo 16392 ;; # 8-byte header + 16 KiB of guest memory image
    pmem_options) echo 256 ;;
    *) echo 4096 ;;
    esac
}

cargo fuzz build
status=0
summary=""
for t in $targets; do
    mkdir -p "target/corpus/$t" "artifacts/$t"
    log="target/fuzz-$t.log"
    echo "fuzz: $t for ${seconds}s (log: fuzz/$log)"
    if cargo fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        grep -E -A1 "panicked at|^==[0-9]+==ERROR" "$log" >&2 || tail -n 20 "$log" >&2
        grep "Test unit written to" "$log" >&2 || true
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    line=$(printf '%-16s %-6s %12s execs %8s exec/s' "$t" "$result" "${execs:-?}" "${rate:-?}")
    echo "fuzz: $line"
    summary="$summary$line
"
done
printf '\nfuzz summary (%ss per target):\n%s' "$seconds" "$summary"
exit $status
