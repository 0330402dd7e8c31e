#!/usr/bin/env bash
# Builds the NPT host: an L1 kernel from Debian's linux-source-6.1
# (x86_64_defconfig plus l1.config) and an initramfs holding init.c. QEMU
# TCG boots them with AMD SVM and nested paging (see ./run). Cached by a
# hash of the inputs, outside the repo; linked into OUT (default
# target/npt-host).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/npt-host}
tag=npt-host
. "$here/../lib.sh"

need_kernel_tools
need_tool musl-gcc musl-tools

kernel=(x86_64_defconfig "$here/l1.config" bzImage "arch/x86/boot/bzImage usr/gen_init_cpio")
kdir=$(kernel_dir npt-host-kernel "${kernel[@]}")
if [ -f "$kdir/bzImage" ]; then
    say "kernel: cached in $kdir"
else
    say "kernel: building $src_pkg ($(src_ver)) into $kdir; about 12 min with 2 cores"
    start=$(date +%s)
    build_kernel "$kdir" "${kernel[@]}"
    say "kernel: done in $(( $(date +%s) - start )) s ($(du -h "$kdir/bzImage" | cut -f1) bzImage)"
fi

init_key=$( { musl_ver; hash_of "$here/init.c" "$here/../init/line.h" "$here/build.sh" "$here/../lib.sh"; } |
    sha256sum | cut -c1-16)
idir=$cache/npt-host-initramfs-$init_key
if [ -f "$idir/initramfs.cpio.gz" ]; then
    say "initramfs: cached in $idir"
else
    say "initramfs: building the L1 init"
    stage=$(mktemp -d "$cache/build-npt-init.XXXXXX")
    static_init "$stage/init" "$here/init.c"
    { base_cpio_list; cat <<LIST; } > "$stage/list"
dir /run 0755 0 0
dir /host 0755 0 0
dir /scratch 0755 0 0
file /init $stage/init 0755 0 0
LIST
    "$kdir/gen_init_cpio" "$stage/list" | gzip -9n > "$stage/initramfs.cpio.gz"
    rm -rf "$idir"
    mv "$stage" "$idir"
    say "initramfs: done (init $(stat -c %s "$idir/init") bytes)"
fi

mkdir -p "$out"
ln -sfn "$kdir/bzImage" "$out/bzImage"
ln -sfn "$idir/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
say "ready: $out/{bzImage,initramfs.cpio.gz}"
