#!/usr/bin/env bash
# Builds the stock-kernel guest: Debian's own linux-image-amd64 kernel,
# unchanged, with an initramfs holding pmemvm's test init and the modules
# that kernel needs to reach a DAX mount on virtio-pmem (it builds them as
# modules, and has no virtio_mmio.device=: pmemvm boots it with --acpi).
# The .deb comes from `apt-get download`; everything is cached by the
# package version and the inputs' hash. Linked into OUT (default
# target/stock-kernel). Needs target/guest (guest-images/build.sh) for the
# init.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/stock-kernel}
guest=${GUEST_DIR:-$here/../../target/guest}
tag=stock-kernel
. "$here/../lib.sh"

# What a DAX mount of /dev/pmem0 needs, beyond what Debian builds in; the
# rest (libnvdimm, virtio, crc16, jbd2, ...) follows from modules.dep.
# crc32c_generic is a soft dependency (the crypto API's crc32c, which ext4
# metadata checksums and libcrc32c look up by name), so modules.dep omits it.
wanted="crc32c_generic virtio_mmio virtio_pmem nd_pmem ext4 xfs"

need_tool apt-get apt
need_tool dpkg-deb dpkg
need_tool depmod kmod
for f in init gen_init_cpio; do
    [ -x "$guest/$f" ] || die "missing $guest/$f: build the test guest first (guest-images/build.sh)"
done

sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    say "no package lists yet: apt-get update"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)
fi
[ -n "$pkg" ] || die "cannot find the kernel package behind linux-image-amd64"
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')

key=$( { echo "$pkg $ver $wanted"; hash_of "$here/build.sh" "$here/../lib.sh" "$guest/init"; } |
    sha256sum | cut -c1-16)
dir=$cache/stock-kernel-$key
if [ -f "$dir/initramfs.cpio.gz" ]; then
    say "cached in $dir ($pkg $ver)"
else
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build-stock.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    deb=$cache/debs/${pkg}_${ver}_amd64.deb
    if [ ! -f "$deb" ]; then
        say "downloading $pkg $ver"
        mkdir -p "$cache/debs"
        (cd "$work" && apt-get download "$pkg=$ver" >&2)
        mv "$work"/*.deb "$deb"
    fi
    dpkg-deb -x "$deb" "$work/root"
    kver=$(ls "$work/root/lib/modules")
    depmod -b "$work/root" "$kver"
    moddir=$work/root/lib/modules/$kver
    # Dependencies first: a depth-first walk of modules.dep.
    declare -A seen=()
    order=()
    visit() {
        local rel=$1 dep
        [ -n "${seen[$rel]:-}" ] && return
        seen[$rel]=1
        for dep in $(sed -n "s|^$rel: *||p" "$moddir/modules.dep"); do
            visit "$dep"
        done
        order+=("$rel")
    }
    for m in $wanted; do
        rel=$(sed -n "s|^\(.*/$m\.ko\):.*|\1|p" "$moddir/modules.dep" | head -n 1)
        [ -n "$rel" ] || die "$pkg has no module $m"
        visit "$rel"
    done
    stage=$work/out
    mkdir -p "$stage"
    cp "$work/root/boot/vmlinuz-$kver" "$stage/vmlinuz"
    {
        base_cpio_list
        cat <<LIST
dir /mnt 0755 0 0
dir /tmp 01777 0 0
dir /lib 0755 0 0
dir /lib/modules 0755 0 0
file /init $guest/init 0755 0 0
file /lib/modules/load $stage/load 0644 0 0
LIST
        for rel in "${order[@]}"; do
            echo "file /lib/modules/$(basename "$rel") $moddir/$rel 0644 0 0"
        done
    } > "$stage/list"
    for rel in "${order[@]}"; do echo "/lib/modules/$(basename "$rel")"; done > "$stage/load"
    "$guest/gen_init_cpio" "$stage/list" | gzip -9n > "$stage/initramfs.cpio.gz"
    echo "$pkg $ver ($kver)" > "$stage/version"
    rm -rf "$dir"
    mv "$stage" "$dir"
    rm -rf "$work"
    trap - EXIT
    say "done: $pkg $ver, ${#order[@]} modules ($(stat -c %s "$dir/initramfs.cpio.gz") bytes of initramfs)"
fi

mkdir -p "$out"
for f in vmlinuz initramfs.cpio.gz version load; do
    ln -sfn "$dir/$f" "$out/$f"
done
say "ready: $out/{vmlinuz,initramfs.cpio.gz}"
