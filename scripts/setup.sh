#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (as root) to the state `npm test` and `npm run demo`
# need: apt packages, npm packages (npm ci, from the lockfile), and the cached guest images.
# Idempotent and quiet when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A NEED=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [bpftrace]=bpftrace
  [busybox]=busybox-static
  [cpio]=cpio
  [depmod]=kmod
  [influxd]=influxdb
  [dpkg-deb]=dpkg
  [systemd-analyze]=systemd
  [libvirtd]=libvirt-daemon-system
  [virsh]=libvirt-clients
  [mmdebstrap]=mmdebstrap
  [mkfs.ext4]=e2fsprogs
  [gcc]=gcc
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
# The libvirt backend's helper runs on Debian's python3 with its libvirt module.
/usr/bin/python3 -c 'import libvirt' >/dev/null 2>&1 || missing+=(python3-libvirt)
# busybox must be the static build: it runs inside the guest's initramfs.
if command -v busybox >/dev/null 2>&1 && ! file -L "$(command -v busybox)" 2>/dev/null | grep -q static; then
  dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
fi
# The guest's icwriter (vm-images/guest/icwriter.c) is linked static: it needs libc.a.
[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "idlecrypt setup: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "idlecrypt setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" file >&2
fi

# tracefs is needed by bpftrace's tracepoints; a fresh machine may not have it mounted.
if [[ $(id -u) -eq 0 && ! -e /sys/kernel/tracing/trace_pipe && -d /sys/kernel/tracing ]]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# npm packages: reinstall when the lockfile changed since the last install.
stamp=node_modules/.idlecrypt-lock-stamp
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "idlecrypt setup: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
  echo "$want" >"$stamp"
fi

# The command's compiled JavaScript (dist/), rebuilt when a source changed.
bash scripts/build.sh

# The test guest (kernel + initramfs), built once and cached by recipe hash.
bash vm-images/build.sh >&2
# The Debian 12 test guest (PostgreSQL, fio): built once per machine (about 3 min, Debian's
# mirror), cached by recipe hash in /var/cache/idlecrypt, outside the clone.
bash vm-images/debian/build.sh >&2
