#!/usr/bin/env bash
# Boots the test guest (target/guest, demo mode) ROUNDS times inside the NPT
# host and counts the guests that do not finish: a triple fault (pmemvm
# reports it; QEMU with -no-reboot just ends) or a hang (killed after
# 90 s). It measures how dependable the NPT host is, for pmemvm and, as the
# control that has no pmemvm in it, for QEMU as the L2 VMM.
#
#   guest-images/npt-host/run guest-images/npt-host/boots.sh [ROUNDS] [AT_ONCE]
#
# AT_ONCE guests boot side by side in each round (default 1). Environment:
#   VMM=pmemvm|qemu   the L2 VMM (default pmemvm)
#   VCPUS=N           vCPUs per guest (default 2)
# Prints a line per failed guest and a summary line:
#   boots: VMM vcpus=N at_once=N: OK ok, TF triple fault, H hung
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
guest=$root/target/guest
pmemvm=$root/target/release/pmemvm
rounds=${1:-20}
at_once=${2:-1}
vmm=${VMM:-pmemvm}
vcpus=${VCPUS:-2}
work=$(mktemp -d "${TMPDIR:-/tmp}/boots.XXXXXX")
trap 'rm -rf "$work"' EXIT

cmdline="pmemvm_mode=demo"
boot() {
    local g=$1
    case $vmm in
    pmemvm)
        timeout 90 "$pmemvm" run --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
            --vcpus "$vcpus" --cmdline "$cmdline" --pmem "file=$work/$g.img,size=16M" ;;
    qemu)
        timeout 90 qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -M microvm \
            -m 512M -smp "$vcpus" -nographic -no-reboot -display none -monitor none \
            -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio.gz" \
            -append "console=ttyS0 reboot=k panic=-1 acpi=off pci=off $cmdline" ;;
    *) echo "boots: VMM must be pmemvm or qemu" >&2; exit 2 ;;
    esac > "$work/$g.log" 2>&1 < /dev/null
    echo $? > "$work/$g.rc"
}
ok=0 tf=0 hung=0
start=$SECONDS
for round in $(seq 1 "$rounds"); do
    for g in $(seq 1 "$at_once"); do boot "$g" & done
    wait
    for g in $(seq 1 "$at_once"); do
        rc=$(cat "$work/$g.rc")
        if grep -q "demo ok" "$work/$g.log"; then
            ok=$((ok + 1))
            continue
        fi
        if [ "$rc" = 124 ]; then
            hung=$((hung + 1)) what=hung
        else
            tf=$((tf + 1)) what="triple fault or reset (status $rc)"
        fi
        echo "round $round guest $g: $what; last lines:"
        grep -v '^\s*$' "$work/$g.log" | tail -n 3 | cut -c1-160 | sed 's/^/    /'
    done
done
echo "boots: $vmm vcpus=$vcpus at_once=$at_once: $ok ok, $tf triple fault, $hung hung ($((SECONDS - start)) s)"
