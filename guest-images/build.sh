#!/usr/bin/env bash
# Builds the pmemvm test guest: a minimal kernel from Debian's linux-source-6.1
# with the patches in patches/, and a tiny static init packed as an initramfs.
# Outputs are cached by a hash of their inputs, outside the repo, so a second
# run takes seconds. The results are linked into OUT (default target/guest).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/guest}
cache=${PMEMVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pmemvm}
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz
jobs=${JOBS:-$(nproc)}

say() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] error: %s\n' "$*" >&2; exit 1; }
need_tool() {
    command -v "$1" >/dev/null 2>&1 ||
        die "missing tool '$1': install the Debian package '$2' (make deps does this)"
}

for t in "gcc gcc" "make make" "flex flex" "bison bison" "bc bc" "xz xz-utils" \
         "patch patch" "musl-gcc musl-tools" "gzip gzip" "sha256sum coreutils"; do
    need_tool $t
done
[ -f /usr/include/libelf.h ] || die "missing libelf headers: install the Debian package 'libelf-dev'"
[ -f /usr/include/openssl/ssl.h ] || die "missing OpenSSL headers: install the Debian package 'libssl-dev'"
[ -f "$src_tar" ] || die "missing $src_tar: install the Debian package '$src_pkg'"

src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null || echo unknown)
# Contents only: sha256sum's own output names each file by its path, which
# would make every checkout (CI clones, worktrees) miss the cache.
hash_of() { for f in "$@"; do sha256sum < "$f"; done | sha256sum | cut -c1-16; }

# --- kernel -----------------------------------------------------------------
kernel_key=$( { echo "$src_ver"; hash_of "$here/kernel.config" "$here"/patches/*.patch "$here/build.sh"; } | sha256sum | cut -c1-16)
kdir=$cache/kernel-$kernel_key
if [ -f "$kdir/vmlinux" ]; then
    say "kernel: cached in $kdir"
else
    say "kernel: building $src_pkg ($src_ver) into $kdir; about 7 min with 2 cores"
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build-kernel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    say "kernel: unpacking $src_tar"
    tar -C "$work" -xf "$src_tar"
    ksrc=$work/linux-source-6.1
    for p in "$here"/patches/*.patch; do
        say "kernel: applying $(basename "$p")"
        patch -d "$ksrc" -p1 --quiet --forward < "$p"
    done
    log=$work/build.log
    say "kernel: configuring (tinyconfig + guest-images/kernel.config)"
    make -C "$ksrc" -s tinyconfig > "$log" 2>&1
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$here/kernel.config" >> "$log" 2>&1
    make -C "$ksrc" -s olddefconfig >> "$log" 2>&1
    # A fragment line that did not stick means a dependency is missing: fail
    # now rather than boot a guest without the feature.
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$ksrc/.config" || die "kernel config: '$line' did not apply (check its dependencies)" ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$ksrc/.config" || die "kernel config: '$sym' is still set" ;;
        esac
    done < "$here/kernel.config"
    say "kernel: compiling with $jobs jobs (log: $log)"
    make -C "$ksrc" -j"$jobs" vmlinux bzImage >> "$log" 2>&1 &
    mk=$!
    while kill -0 "$mk" 2>/dev/null; do
        sleep 20
        kill -0 "$mk" 2>/dev/null || break
        say "kernel: $(grep -c '^  CC' "$log" || true) files compiled so far"
    done
    if ! wait "$mk"; then
        tail -n 40 "$log" >&2
        die "kernel build failed; full log above was in $log"
    fi
    stage=$work/out
    mkdir -p "$stage"
    cp "$ksrc/vmlinux" "$ksrc/arch/x86/boot/bzImage" "$ksrc/.config" "$ksrc/usr/gen_init_cpio" "$stage/"
    rm -rf "$kdir"
    mv "$stage" "$kdir"
    rm -rf "$work"
    trap - EXIT
    say "kernel: done ($(du -h "$kdir/vmlinux" | cut -f1) vmlinux, $(du -h "$kdir/bzImage" | cut -f1) bzImage)"
fi

# --- init and initramfs ----------------------------------------------------
musl_ver=$(dpkg-query -W -f='${Version}' musl-tools 2>/dev/null || echo unknown)
init_key=$( { echo "$musl_ver"; hash_of "$here"/init/* "$here/build.sh"; } | sha256sum | cut -c1-16)
idir=$cache/initramfs-$init_key-$kernel_key
if [ -f "$idir/initramfs.cpio.gz" ]; then
    say "initramfs: cached in $idir"
else
    say "initramfs: building the static init"
    stage=$(mktemp -d "$cache/build-init.XXXXXX")
    musl-gcc -static -Os -s -Wall -Wextra -Werror -o "$stage/init" "$here"/init/*.c
    cat > "$stage/list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
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
say "ready: $out/{vmlinux,bzImage,initramfs.cpio.gz}"
