#!/usr/bin/env bash
# Builds the idlecrypt test guest: vm-images/out/vmlinuz and vm-images/out/initrd.img.
#
#   kernel     Debian's linux-image-cloud-amd64 (the smallest Debian kernel that boots under
#              QEMU), fetched with `apt-get download` and cached in vm-images/cache/.
#   initramfs  busybox-static, the guest scripts in vm-images/guest/, icwriter (guest/icwriter.c,
#              built static with the host's gcc), and only the kernel
#              modules the guest needs (virtio-pci, virtio-blk, virtio-input and their
#              dependencies), packed reproducibly (fixed order, owner and mtimes, gzip -n).
#
# scripts/setup.sh runs this on every `npm test` / `npm run demo`, so the common case must
# be silent and fast: when out/stamp records the hash of the current recipe, it exits at
# once without touching the network. Any change to this file, to vm-images/guest/ or to
# the host's busybox binary changes the hash and rebuilds. The kernel .deb stays cached,
# so a rebuild reuses the same kernel (offline, byte-identical output); to move to a newer
# kernel, delete vm-images/cache/ (and out/).
#
# Usage: bash vm-images/build.sh [--force]
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
cache=$here/cache
guest=$here/guest

# The Debian metapackage that names the current cloud kernel, and the modules the guest
# loads (their dependencies are resolved from the kernel's own modules.dep).
KERNEL_META=linux-image-cloud-amd64
MODULES=(virtio_pci virtio_blk virtio_input)
# Every file and directory in the initramfs gets this mtime, so the archive does not
# depend on when or where it was built.
EPOCH=0

force=0
[[ ${1:-} == --force ]] && force=1

busybox_bin=$(command -v busybox || true)

recipe_hash() {
  (
    cd "$here"
    sha256sum build.sh
    find guest -type f | sort | xargs -r sha256sum
    # The busybox binary is copied into the image: a different build is a different image.
    if [[ -n $busybox_bin ]]; then sha256sum "$busybox_bin" | cut -d' ' -f1; fi
    # So is the compiler icwriter is built with.
    gcc --version 2>/dev/null | head -1
  ) | sha256sum | cut -d' ' -f1
}

stamp_current() {
  [[ -f $out/vmlinuz && -f $out/initrd.img && -f $out/stamp ]] &&
    grep -qx "recipe=$1" "$out/stamp"
}

want=$(recipe_hash)
if ((force == 0)) && stamp_current "$want"; then
  exit 0 # the fast path: nothing to do, nothing printed
fi

die() { echo "vm-images/build.sh: $*" >&2; exit 1; }

for cmd in dpkg-deb cpio depmod modprobe gzip sha256sum apt-get apt-cache gcc; do
  command -v "$cmd" >/dev/null 2>&1 || die "missing command '$cmd' (run scripts/setup.sh as root)"
done
[[ -n $busybox_bin ]] || die "busybox not found (apt-get install busybox-static)"
# A dynamically linked busybox would need its libc inside the initramfs.
ldd_out=$(ldd "$busybox_bin" 2>&1 || true)
if [[ $ldd_out != *"not a dynamic executable"* && $ldd_out != *"statically linked"* ]]; then
  die "$busybox_bin is not statically linked (apt-get install busybox-static)"
fi

mkdir -p "$out" "$cache"
# Two concurrent setups (say, a test run and the demo) must not build over each other.
exec 9>"$cache/.build.lock"
flock 9
if ((force == 0)) && stamp_current "$want"; then exit 0; fi # the other one built it

echo "vm-images: building the test guest image" >&2

# --- kernel package ---------------------------------------------------------------------

# Resolves the versioned package behind the metapackage, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel_pkg() {
  apt-cache depends "$KERNEL_META" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64(-unsigned)?$/ { print $2; exit }'
}

# Resolves and downloads the kernel package into the cache.
try_fetch_kernel_deb() {
  local pkg
  pkg=$(resolve_kernel_pkg || true)
  [[ -n $pkg ]] || return 1
  # Sandbox user root: otherwise apt warns that _apt cannot write into the cache directory.
  (cd "$cache" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2)
}

fetch_kernel_deb() {
  try_fetch_kernel_deb && return 0
  # A fresh machine has no package lists; old lists may name a version the mirror no
  # longer has. Either way: update, resolve again, download again.
  echo "vm-images: apt-get update (could not resolve or download $KERNEL_META)" >&2
  apt-get update -qq >&2 || die "apt-get update failed (need root and network)"
  try_fetch_kernel_deb || die "could not download the kernel package behind $KERNEL_META"
}

shopt -s nullglob
debs=("$cache"/linux-image-*-cloud-amd64*_*.deb)
shopt -u nullglob
if ((${#debs[@]} == 0)); then
  fetch_kernel_deb
  shopt -s nullglob
  debs=("$cache"/linux-image-*-cloud-amd64*_*.deb)
  shopt -u nullglob
fi
((${#debs[@]} == 1)) || die "expected one kernel .deb in $cache, found ${#debs[@]}: remove the extras"
deb=${debs[0]}
kpkg=$(dpkg-deb -f "$deb" Package)
kver=$(dpkg-deb -f "$deb" Version)

# --- unpack and assemble ---------------------------------------------------------------

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/kernel"
krel=$(ls "$work/kernel/lib/modules")
[[ $krel != *$'\n'* && -f $work/kernel/boot/vmlinuz-$krel ]] || die "unexpected layout in $deb"
depmod -b "$work/kernel" "$krel"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/idlecrypt,proc,sys,dev,tmp,lib/modules/"$krel"}

# busybox and one symlink per applet, at the paths busybox itself names (bin/sh, sbin/insmod, ...).
install -m 0755 "$busybox_bin" "$root/bin/busybox"
while read -r applet; do
  [[ $applet == linuxrc ]] && continue # /init is ours
  [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox_bin" --list-full | sort)

install -m 0755 "$guest/init" "$root/init"
# The writer workload's long-lived process (idlecrypt.writer=proc): static, as busybox is.
gcc -static -O2 -Wall -Werror -s -o "$root/bin/icwriter" "$guest/icwriter.c" ||
  die "could not build icwriter (apt-get install gcc libc6-dev)"
install -m 0644 "$guest/workloads.sh" "$root/etc/idlecrypt/workloads.sh"

# Only the modules we load and what they depend on, at their usual paths, then a
# modules.dep for just those, so busybox modprobe in the guest loads them in order.
for m in "${MODULES[@]}"; do
  modprobe -d "$work/kernel" -S "$krel" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
  rel=${ko#"$work/kernel/"}
  install -D -m 0644 "$ko" "$root/$rel"
  echo "${rel#lib/modules/"$krel"/}" >>"$root/lib/modules/$krel/modules.order"
done
# modules.builtin lets modprobe treat built-in drivers as loaded; the (large) modinfo of
# built-ins is not needed, an empty one keeps depmod quiet.
cp "$work/kernel/lib/modules/$krel/modules.builtin" "$root/lib/modules/$krel/"
: >"$root/lib/modules/$krel/modules.builtin.modinfo"
depmod -b "$root" "$krel"

echo "$kpkg $kver" >"$root/etc/idlecrypt/kernel"

# Fixed mtimes, owner and order; --reproducible also zeroes device and inode numbers.
find "$root" -exec touch -h -d "@$EPOCH" {} +
(cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
  gzip -n -9 >"$work/initrd.img"
cp "$work/kernel/boot/vmlinuz-$krel" "$work/vmlinuz"

# Replace the outputs as a set, the stamp last: a half-finished build never looks current.
rm -f "$out/stamp"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.img" "$out/initrd.img"
{
  echo "recipe=$want"
  echo "kernel=$kpkg $kver"
  echo "kernel_release=$krel"
  echo "modules=$(cd "$root" && find lib/modules -name '*.ko' -printf '%f\n' | sort | tr '\n' ' ' | sed 's/ $//')"
  echo "vmlinuz_sha256=$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)"
  echo "initrd_sha256=$(sha256sum "$out/initrd.img" | cut -d' ' -f1)"
} >"$out/stamp.tmp"
mv -f "$out/stamp.tmp" "$out/stamp"

echo "vm-images: built $kpkg $kver, initrd $(stat -c %s "$out/initrd.img") bytes" >&2
