#!/usr/bin/env bash
# Builds the pmemvm test guest: a minimal kernel from Debian's linux-source-6.1
# with the patches in patches/, and a tiny static init packed as an initramfs.
# Outputs are cached by a hash of their inputs, outside the repo, so a second
# run takes seconds. The results are linked into OUT (default target/guest).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/guest}
tag=guest
. "$here/lib.sh"

need_kernel_tools
need_tool musl-gcc musl-tools

# --- kernel -----------------------------------------------------------------
kernel=(tinyconfig "$here/kernel.config" "vmlinux bzImage"
    "vmlinux arch/x86/boot/bzImage usr/gen_init_cpio" "$here"/patches/*.patch)
kdir=$(kernel_dir kernel "${kernel[@]}")
kernel_key=${kdir##*-}
if [ -f "$kdir/vmlinux" ]; then
    say "kernel: cached in $kdir"
else
    say "kernel: building $src_pkg ($(src_ver)) into $kdir; about 7 min with 2 cores"
    build_kernel "$kdir" "${kernel[@]}"
    say "kernel: done ($(du -h "$kdir/vmlinux" | cut -f1) vmlinux, $(du -h "$kdir/bzImage" | cut -f1) bzImage)"
fi

# --- init and initramfs ----------------------------------------------------
init_key=$( { musl_ver; hash_of "$here"/init/* "$here/build.sh" "$here/lib.sh"; } | sha256sum | cut -c1-16)
idir=$cache/initramfs-$init_key-$kernel_key
if [ -f "$idir/initramfs.cpio.gz" ]; then
    say "initramfs: cached in $idir"
else
    say "initramfs: building the static init"
    stage=$(mktemp -d "$cache/build-init.XXXXXX")
    static_init "$stage/init" "$here"/init/*.c
    { base_cpio_list; cat <<LIST; } > "$stage/list"
dir /mnt 0755 0 0
dir /tmp 01777 0 0
file /init $stage/init 0755 0 0
LIST
    "$kdir/gen_init_cpio" "$stage/list" | gzip -9n > "$stage/initramfs.cpio.gz"
    rm -rf "$idir"
    mv "$stage" "$idir"
    say "initramfs: done (init $(stat -c %s "$idir/init") bytes, initramfs $(stat -c %s "$idir/initramfs.cpio.gz") bytes)"
fi

mkdir -p "$out"
ln -sfn "$kdir/vmlinux" "$out/vmlinux"
ln -sfn "$kdir/bzImage" "$out/bzImage"
ln -sfn "$idir/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
# For images built on top of this one (stock-kernel/build.sh).
ln -sfn "$idir/init" "$out/init"
ln -sfn "$kdir/gen_init_cpio" "$out/gen_init_cpio"
say "ready: $out/{vmlinux,bzImage,initramfs.cpio.gz}"
