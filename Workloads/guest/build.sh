#!/usr/bin/env bash
# Builds the epcopy test guest into Workloads/guest/out/ (see README.md):
#   out/vmlinux     uncompressed PVH kernel (Debian 6.1), boots with qemu -kernel
#   out/bzImage     the package's compressed kernel, as shipped
#   out/initrd.img  busybox + virtio modules + /init + /bin/epcopy-memtest
#                   + /bin/epcopy-agent (cpio.gz)
#   out/memtest     the static memory-integrity program (same as in the initrd)
#   out/initrd-numa.img  initrd.img with /bin/epcopy-numa-check appended (a second
#                   cpio.gz: the kernel unpacks both), for the NUMA placement check
#                   in a two-node guest (`epcopy.numa_check=1`); only with EPCOPY_NUMA_CHECK
#   out/kernel.txt  which kernel package/release the above came from
# Cached: each output is rebuilt only when its inputs change, so a second run
# prints nothing and takes well under a second. Set EPCOPY_GUEST_KERNEL to a
# package name (linux-image-6.1.0-NN-amd64) to pin the kernel.
# EPCOPY_AGENT (required) is the static epcopy-agent binary to put in the
# initrd (`make guest` passes the one `make agent` built). EPCOPY_NUMA_CHECK
# (optional) is the static epcopy-numa-check binary (`make numa-check`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
AGENT=${EPCOPY_AGENT:-}
if [[ -z "$AGENT" ]]; then
    echo "guest: EPCOPY_AGENT is not set: point it at the static epcopy-agent binary (make guest does: make agent, then EPCOPY_AGENT=.build/static/release/epcopy-agent)" >&2
    exit 2
fi
if [[ ! -f "$AGENT" || ! -x "$AGENT" ]]; then
    echo "guest: EPCOPY_AGENT=$AGENT is not an executable file (run make agent first)" >&2
    exit 2
fi
AGENT=$(realpath "$AGENT")
NUMA_CHECK=${EPCOPY_NUMA_CHECK:-}
if [[ -n "$NUMA_CHECK" ]]; then
    [[ -x "$NUMA_CHECK" ]] || { echo "guest: EPCOPY_NUMA_CHECK=$NUMA_CHECK is not an executable file (run make numa-check first)" >&2; exit 2; }
    NUMA_CHECK=$(realpath "$NUMA_CHECK")
fi
OUT="$HERE/out"
CACHE="$OUT/.cache"
LOG="$CACHE/build.log"
mkdir -p "$CACHE"
[[ ! -f "$LOG" || $(stat -c %s "$LOG") -lt 262144 ]] || : >"$LOG"
exec 9>"$CACHE/lock"
flock 9

# Modules the guest needs; their dependencies are added automatically.
WANT_MODULES=(virtio_pci virtio_console virtio_balloon button evdev)
BUILD_PKGS=(busybox-static xz-utils zstd cpio gcc libc6-dev binutils)

START=$SECONDS
BUILT=()
TMPDIRS=()
on_exit() {
    local rc=$? d
    for d in "${TMPDIRS[@]}"; do rm -rf "$d"; done
    if ((rc)); then
        echo "guest: build failed (rc=$rc); last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
    fi
}
trap on_exit EXIT

# log, hash_of, hash_str, key_matches, key_store, mktmp, apt_update_once, need_pkgs
source "$HERE/../lib/build-common.sh"

# ---- which kernel -----------------------------------------------------------
# The newest linux-image-6.1.0-NN-amd64 known to apt. The answer is cached
# against the apt lists' names/sizes/mtimes, so no-op runs skip apt-cache.
pick_kernel() {
    if [[ -n "${EPCOPY_GUEST_KERNEL:-}" ]]; then
        printf '%s' "$EPCOPY_GUEST_KERNEL"
        return
    fi
    local lists_key pkg=""
    lists_key=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-64)
    if [[ -f "$CACHE/kernel-pick" && "$(sed -n 1p "$CACHE/kernel-pick")" == "$lists_key" ]]; then
        sed -n 2p "$CACHE/kernel-pick"
        return
    fi
    search() { apt-cache search --names-only '^linux-image-6.1.0-[0-9]+-amd64$' 2>/dev/null | cut -d' ' -f1 | sort -V | tail -n 1; }
    pkg=$(search)
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg=$(search)
        lists_key=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-64)
    fi
    [[ -n "$pkg" ]] || { echo "guest: no linux-image-6.1.0-NN-amd64 package in apt" >&2; return 1; }
    printf '%s\n%s\n' "$lists_key" "$pkg" >"$CACHE/kernel-pick.tmp"
    mv -f "$CACHE/kernel-pick.tmp" "$CACHE/kernel-pick"
    printf '%s' "$pkg"
}

# ---- extract-vmlinux ----------------------------------------------------------
# Like the kernel's scripts/extract-vmlinux: find a compressed payload by its
# magic inside the bzImage, decompress it, and keep the first result that is an
# ELF file.
extract_vmlinux() {
    local img=$1 dst=$2 magic tool off
    for spec in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
        tool=${spec%%:*}
        magic=${spec#*:}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1 || true); do
            # Trailing data after the payload makes zstd/gzip complain: judge by the output.
            case $tool in
            xz) xz -dcq --single-stream <(tail -c +$((off + 1)) "$img") >"$dst" 2>/dev/null || continue ;;
            zstd) zstd -dcq <(tail -c +$((off + 1)) "$img") >"$dst" 2>/dev/null || true ;;
            gzip) gzip -dcq <(tail -c +$((off + 1)) "$img") >"$dst" 2>/dev/null || true ;;
            esac
            if [[ "$(head -c 4 "$dst" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; then
                log "extract-vmlinux: $tool payload at offset $off"
                return 0
            fi
        done
    done
    return 1
}

# True if the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (18), the PVH entry point
# that QEMU's -kernel needs to boot an uncompressed vmlinux.
has_pvh_note() {
    readelf -n "$1" 2>/dev/null | grep -Eq '\(0x00000012\)|PHYS32_ENTRY'
}

# Module dependencies as listed in the module's .modinfo (like modinfo -F depends).
mod_depends() {
    local ko=$1
    case $ko in
    *.ko.xz) xz -dc "$ko" ;;
    *.ko.zst) zstd -dcq "$ko" ;;
    *.ko.gz) gzip -dc "$ko" ;;
    *) cat "$ko" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

build_kernel() {
    local pkg=$1 dl x mroot img
    dl="$CACHE/deb"
    mkdir -p "$dl"
    if ! compgen -G "$dl/${pkg}_*.deb" >/dev/null; then
        log "apt-get download $pkg"
        rm -f "$dl"/*.deb "$dl"/*.deb.part
        local t
        mktmp t
        chmod 755 "$t"
        if ! (cd "$t" && apt-get download -qq "$pkg" >>"$LOG" 2>&1); then
            apt_update_once
            (cd "$t" && apt-get download -qq "$pkg" >>"$LOG" 2>&1)
        fi
        mv -f "$t"/*.deb "$dl/"
    fi
    local deb
    deb=$(compgen -G "$dl/${pkg}_*.deb" | head -n 1)
    mktmp x
    log "dpkg -x $(basename "$deb")"
    dpkg -x "$deb" "$x"
    img=$(compgen -G "$x/boot/vmlinuz-*" | head -n 1)
    mroot=$(compgen -G "$x/lib/modules/*" | head -n 1)
    [[ -f "$img" && -d "$mroot" ]] || { echo "guest: $pkg has no vmlinuz or modules" >&2; return 1; }

    # vmlinux: uncompressed PVH ELF if possible, else the bzImage itself.
    if extract_vmlinux "$img" "$x/vmlinux" && has_pvh_note "$x/vmlinux"; then
        :
    else
        echo "guest: warning: no bootable PVH vmlinux in $pkg; out/vmlinux is the bzImage" >&2
        cp "$img" "$x/vmlinux"
    fi

    # Modules: resolve dependencies, order them (deps first), decompress if needed.
    declare -A path=() seen=()
    local ko name order=()
    while IFS= read -r ko; do
        name=${ko##*/}
        name=${name%%.ko*}
        path[${name//-/_}]=$ko
    done < <(find "$mroot/kernel" -name '*.ko*')
    visit() {
        local m=${1//-/_} d
        [[ -n "${seen[$m]:-}" ]] && return 0
        seen[$m]=1
        [[ -n "${path[$m]:-}" ]] || { echo "guest: module $m not found in $pkg" >&2; return 1; }
        for d in $(mod_depends "${path[$m]}"); do visit "$d"; done
        order+=("$m")
    }
    local m
    for m in "${WANT_MODULES[@]}"; do visit "$m"; done
    local mods="$x/modules"
    mkdir -p "$mods"
    for m in "${order[@]}"; do
        ko=${path[$m]}
        case $ko in
        *.ko.xz) xz -dc "$ko" >"$mods/$m.ko" ;;
        *.ko.zst) zstd -dcq "$ko" >"$mods/$m.ko" ;;
        *.ko.gz) gzip -dc "$ko" >"$mods/$m.ko" ;;
        *) cp "$ko" "$mods/$m.ko" ;;
        esac
        echo "$m.ko" >>"$mods/load-order"
    done
    log "modules: ${order[*]}"

    {
        echo "package=$pkg"
        echo "version=$(dpkg-deb -f "$deb" Version)"
        echo "release=$(basename "$mroot")"
        echo "vmlinux=$(if has_pvh_note "$x/vmlinux"; then echo pvh-elf; else echo bzimage; fi)"
        echo "modules=${order[*]}"
    } >"$x/kernel.txt"

    # Publish: each file by rename; the key last, so a crash means a rebuild.
    rm -rf "$CACHE/modules.old"
    [[ -d "$CACHE/modules" ]] && mv "$CACHE/modules" "$CACHE/modules.old"
    mv "$mods" "$CACHE/modules"
    rm -rf "$CACHE/modules.old"
    cp "$img" "$OUT/.bzImage.tmp" && mv -f "$OUT/.bzImage.tmp" "$OUT/bzImage"
    mv -f "$x/vmlinux" "$OUT/vmlinux"
    mv -f "$x/kernel.txt" "$OUT/kernel.txt"
    rm -rf "$x"
}

build_memtest() {
    log "gcc memtest.c"
    gcc -static -O2 -Wall -Wextra -o "$OUT/.memtest.tmp" "$HERE/memtest.c" >>"$LOG" 2>&1
    strip "$OUT/.memtest.tmp"
    mv -f "$OUT/.memtest.tmp" "$OUT/memtest"
}

build_initrd() {
    local r bb a
    mktmp r
    chmod 755 "$r"
    mkdir -p "$r"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules}
    bb=$(command -v busybox || true)
    [[ -x /bin/busybox ]] && bb=/bin/busybox
    cp "$bb" "$r/bin/busybox"
    for a in $("$r/bin/busybox" --list); do
        [[ -e "$r/bin/$a" ]] || ln -s busybox "$r/bin/$a"
    done
    cp "$OUT/memtest" "$r/bin/epcopy-memtest"
    # Without debug info and symbols: 11 MB -> 7 MB, ~1 MB less to gunzip at boot.
    strip -o "$r/bin/epcopy-agent" "$AGENT" 2>>"$LOG"
    cp "$HERE/init.sh" "$r/init"
    chmod 755 "$r/init" "$r/bin/epcopy-memtest" "$r/bin/epcopy-agent"
    cp "$CACHE/modules/"* "$r/lib/modules/"
    # The kernel opens /dev/console before /init runs; /init copes without it.
    mknod -m 600 "$r/dev/console" c 5 1 2>/dev/null || true
    find "$r" -exec touch -h -d @0 {} +
    (cd "$r" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$OUT/.initrd.img.tmp"
    mv -f "$OUT/.initrd.img.tmp" "$OUT/initrd.img"
}

# initrd.img and a second archive holding only /bin/epcopy-numa-check: the kernel unpacks one after the other, so
# the everyday initrd stays as small as it was.
build_initrd_numa() {
    local r
    mktmp r
    mkdir -p "$r/bin"
    strip -o "$r/bin/epcopy-numa-check" "$NUMA_CHECK" 2>>"$LOG"
    chmod 755 "$r/bin/epcopy-numa-check"
    find "$r" -exec touch -h -d @0 {} +
    { cat "$OUT/initrd.img"
      (cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n
    } >"$OUT/.initrd-numa.img.tmp"
    mv -f "$OUT/.initrd-numa.img.tmp" "$OUT/initrd-numa.img"
}

# ---- main -------------------------------------------------------------------
need_pkgs "${BUILD_PKGS[@]}"

SCRIPT_HASH=$(hash_of "$HERE/build.sh")
KERNEL_PKG=$(pick_kernel)
KERNEL_KEY="$KERNEL_PKG $SCRIPT_HASH"
if ! key_matches kernel "$KERNEL_KEY" || [[ ! -f "$OUT/vmlinux" || ! -f "$CACHE/modules/load-order" ]]; then
    build_kernel "$KERNEL_PKG"
    key_store kernel "$KERNEL_KEY"
    BUILT+=(vmlinux bzImage)
fi

MEMTEST_KEY="$(hash_of "$HERE/memtest.c") $(gcc -dumpfullversion) $(dpkg-query -W -f='${Version}' libc6-dev) $SCRIPT_HASH"
if ! key_matches memtest "$MEMTEST_KEY" || [[ ! -f "$OUT/memtest" ]]; then
    build_memtest
    key_store memtest "$MEMTEST_KEY"
    BUILT+=(memtest)
fi

INITRD_KEY="$(hash_of "$OUT/memtest" "$AGENT" "$HERE/init.sh" "$CACHE/modules/"*) $(dpkg-query -W -f='${Version}' busybox-static) $SCRIPT_HASH"
if ! key_matches initrd "$INITRD_KEY" || [[ ! -f "$OUT/initrd.img" ]]; then
    build_initrd
    key_store initrd "$INITRD_KEY"
    BUILT+=(initrd.img)
fi

if [[ -n "$NUMA_CHECK" ]]; then
    NUMA_KEY="$(hash_of "$OUT/initrd.img" "$NUMA_CHECK") $SCRIPT_HASH"
    if ! key_matches initrd-numa "$NUMA_KEY" || [[ ! -f "$OUT/initrd-numa.img" ]]; then
        build_initrd_numa
        key_store initrd-numa "$NUMA_KEY"
        BUILT+=(initrd-numa.img)
    fi
fi

if ((${#BUILT[@]})); then
    sizes=$(cd "$OUT" && du -h --apparent-size vmlinux initrd.img | awk '{ printf "%s%s %s", sep, $2, $1; sep = ", " }')
    echo "guest: built ${BUILT[*]} from $KERNEL_PKG in $((SECONDS - START))s ($sizes)"
fi
