#!/usr/bin/env bash
# The NPT host's known fault, reproduced with no pmemvm in it: boots the
# test guest (target/guest) with QEMU/KVM inside L1, two guests at a time,
# ROUNDS times, and counts the guests that do not finish: a triple fault
# resets them (-no-reboot ends QEMU), or they hang (killed after 60 s).
#
#   guest-images/npt-host/run guest-images/npt-host/pairs.sh [ROUNDS] [AT_ONCE]
#
# AT_ONCE=1 boots them one at a time, for comparison.
set -u
here=$(cd "$(dirname "$0")" && pwd)
guest=$here/../../target/guest
rounds=${1:-10}
at_once=${2:-2}
work=${TMPDIR:-/tmp}/pairs.$$
mkdir -p "$work"
boot() {
    timeout 60 qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -M microvm \
        -m 512M -smp 1 -nographic -no-reboot -display none -monitor none -serial stdio \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio.gz" \
        -append "console=ttyS0 reboot=k panic=-1 acpi=off pci=off pmemvm_mode=demo" \
        > "$work/$1.log" 2>&1 < /dev/null
    echo $? > "$work/$1.rc"
}
ok=0 bad=0
for round in $(seq 1 "$rounds"); do
    for g in $(seq 1 "$at_once"); do boot "$g" & done
    wait
    for g in $(seq 1 "$at_once"); do
        if grep -q "demo ok" "$work/$g.log"; then
            ok=$((ok + 1))
        else
            bad=$((bad + 1))
            rc=$(cat "$work/$g.rc")
            what=$([ "$rc" = 124 ] && echo "hung" || echo "reset (triple fault)")
            echo "round $round guest $g: $what; last line: $(tail -n 1 "$work/$g.log" | cut -c1-100)"
        fi
    done
done
rm -rf "$work"
echo "$at_once at a time: $ok guests finished, $bad did not"
