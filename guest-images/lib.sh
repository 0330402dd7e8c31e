# Shell functions shared by the image builds (build.sh, npt-host/build.sh).
# Source it after setting `tag` (the log prefix, e.g. "guest").

cache=${PMEMVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pmemvm}
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz
jobs=${JOBS:-$(nproc)}

say() { printf '[%s] %s\n' "$tag" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$tag" "$*" >&2; exit 1; }
need_tool() {
    command -v "$1" >/dev/null 2>&1 ||
        die "missing tool '$1': install the Debian package '$2' (make deps does this)"
}

# The tools and headers a kernel build from linux-source-6.1 needs.
need_kernel_tools() {
    for t in "gcc gcc" "make make" "flex flex" "bison bison" "bc bc" "xz xz-utils" \
             "patch patch" "gzip gzip" "sha256sum coreutils"; do
        need_tool $t
    done
    [ -f /usr/include/libelf.h ] || die "missing libelf headers: install the Debian package 'libelf-dev'"
    [ -f /usr/include/openssl/ssl.h ] || die "missing OpenSSL headers: install the Debian package 'libssl-dev'"
    [ -f "$src_tar" ] || die "missing $src_tar: install the Debian package '$src_pkg'"
}

src_ver() { dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null || echo unknown; }

# Contents only: sha256sum's own output names each file by its path, which
# would make every checkout (CI clones, worktrees) miss the cache.
hash_of() { for f in "$@"; do sha256sum < "$f"; done | sha256sum | cut -c1-16; }

# kernel_dir NAME BASE FRAGMENT "TARGETS" "OUTPUTS" [PATCH...]
# The cache directory of the kernel build_kernel makes from these
# arguments. Its key covers what decides that kernel (the source package,
# the arguments, the fragment's and patches' contents, build_kernel's own
# text), not the scripts around it, so editing them rebuilds no kernel.
kernel_dir() {
    local name=$1 base=$2 fragment=$3 targets=$4 outputs=$5
    shift 5
    local key
    key=$( { src_ver; echo "$base|$targets|$outputs"; hash_of "$fragment" "$@"; declare -f build_kernel; } |
        sha256sum | cut -c1-16)
    printf '%s/%s-%s' "$cache" "$name" "$key"
}

# The entries every initramfs here starts with, in gen_init_cpio's format.
base_cpio_list() {
    cat <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
LIST
}

# static_init OUT SRC...: a static init built with musl, warnings as errors.
static_init() {
    local out=$1
    shift
    musl-gcc -static -Os -s -Wall -Wextra -Werror -o "$out" "$@"
}

musl_ver() { dpkg-query -W -f='${Version}' musl-tools 2>/dev/null || echo unknown; }

# build_kernel DIR BASE FRAGMENT "TARGETS" "OUTPUTS" [PATCH...]
# Builds linux-source-6.1 configured as `make BASE` plus FRAGMENT, with the
# patches applied, and moves OUTPUTS (paths in the tree) into DIR, along
# with .config. DIR appears only once the build succeeded.
build_kernel() {
    local dir=$1 base=$2 fragment=$3 targets=$4 outputs=$5
    shift 5
    mkdir -p "$cache"
    local work
    work=$(mktemp -d "$cache/build-$tag.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    say "kernel: unpacking $src_tar"
    tar -C "$work" -xf "$src_tar"
    local ksrc=$work/linux-source-6.1 p
    for p in "$@"; do
        say "kernel: applying $(basename "$p")"
        patch -d "$ksrc" -p1 --quiet --forward < "$p"
    done
    local log=$work/build.log
    say "kernel: configuring ($base + ${fragment#"$here"/})"
    make -C "$ksrc" -s "$base" > "$log" 2>&1
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$fragment" >> "$log" 2>&1
    make -C "$ksrc" -s olddefconfig >> "$log" 2>&1
    # A fragment line that did not stick means a dependency is missing: fail
    # now rather than boot a kernel without the feature.
    local line sym
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$ksrc/.config" || die "kernel config: '$line' did not apply (check its dependencies)" ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$ksrc/.config" || die "kernel config: '$sym' is still set" ;;
        esac
    done < "$fragment"
    say "kernel: compiling with $jobs jobs (log: $log)"
    # shellcheck disable=SC2086
    make -C "$ksrc" -j"$jobs" $targets >> "$log" 2>&1 &
    local mk=$!
    while kill -0 "$mk" 2>/dev/null; do
        sleep 20
        kill -0 "$mk" 2>/dev/null || break
        say "kernel: $(grep -c '^  CC' "$log" || true) files compiled so far"
    done
    if ! wait "$mk"; then
        tail -n 40 "$log" >&2
        die "kernel build failed; full log above was in $log"
    fi
    local stage=$work/out
    mkdir -p "$stage"
    for p in $outputs .config; do
        cp "$ksrc/$p" "$stage/"
    done
    rm -rf "$dir"
    mv "$stage" "$dir"
    rm -rf "$work"
    trap - EXIT
}
