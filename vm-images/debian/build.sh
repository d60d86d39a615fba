#!/usr/bin/env bash
# Builds the idlecrypt Debian 12 test guest: a raw disk whose whole device is one ext4
# filesystem (root=/dev/vda, no partition table) with systemd, PostgreSQL 15 (cluster
# 15/main, unix socket only), fio, and the idlecrypt guest agent on a virtio-serial port;
# plus the kernel and initramfs to boot it with -kernel/-initrd. See README.md here.
#
#   Usage: vm-images/debian/build.sh [--force]
#
# The image is cached outside the clone, by recipe hash (this script, guest/, the kernel
# package), in $IDLECRYPT_IMAGE_CACHE (default /var/cache/idlecrypt)/debian-<hash>/, so a
# fresh clone on the same machine does not rebuild it; vm-images/out/debian links to it.
# A silent no-op when the cached image exists. Older debian-* caches are removed.
#   debian-<hash>/debian.raw     sparse raw image (IMAGE_SIZE virtual)
#   debian-<hash>/vmlinuz        the kernel package's own vmlinuz (the busybox guest's kernel)
#   debian-<hash>/initrd.img     initramfs-tools initrd built inside the image
#   debian-<hash>/cmdline        the kernel command line to boot with
#   debian-<hash>/manifest.txt   package versions, recipe hash, output sha256s (written last)
#
# Environment (all optional):
#   SOURCE_DATE_EPOCH  build timestamp (default: fixed constant below)
#   IMAGE_SIZE         virtual size of the raw image (default 2G)
#   MIRROR             Debian mirror (default http://deb.debian.org/debian)
#
# Reproducibility: with the same mirror content (same package versions, see manifest.txt)
# and the same inputs, the filesystem is byte-identical except for what initdb and
# PostgreSQL write with randomness of their own (pg_control's system identifier and
# auth nonce, hence the WAL headers): those live in /var/lib/postgresql only.
# Measures: SOURCE_DATE_EPOCH for mmdebstrap/dpkg/initramfs-tools, every mtime clamped to
# it, ctimes rewritten with debugfs, fixed fs UUID + hash seed + mkfs time, our own
# mke2fs.conf (the host's does not matter), fixed machine-id, no snakeoil key.
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename "${BASH_SOURCE[0]}")

# --- hooks, run by mmdebstrap as "$self" __hook NAME ROOTDIR -----------------------------

# Modules the initramfs loads to reach /dev/vda (ext4 and crc32c are built into the cloud
# kernel). virtio_console is loaded from the root fs (modules-load.d).
INITRD_MODULES="virtio_pci virtio_blk"

hook_setup() { # before any package is unpacked: config that package scripts read
  local r=$1
  mkdir -p "$r/etc/initramfs-tools/conf.d" "$r/etc/initramfs-tools/hooks"
  cat >"$r/etc/initramfs-tools/conf.d/idlecrypt.conf" <<EOF
# idlecrypt test guest: only the listed modules, no resume device probing.
MODULES=list
RESUME=none
COMPRESS=zstd
EOF
  cat >"$r/etc/initramfs-tools/hooks/idlecrypt" <<EOF
#!/bin/sh
case "\$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in $INITRD_MODULES; do force_load "\$m"; done
EOF
  chmod 755 "$r/etc/initramfs-tools/hooks/idlecrypt"
  # No fsck: the root is mounted rw by the kernel and checked by nobody (passno 0).
  printf '/dev/vda / ext4 rw,noatime,errors=remount-ro 0 0\n' >"$r/etc/fstab"
  echo idlecrypt-guest >"$r/etc/hostname"
}

hook_customize() { # after all packages are installed and configured
  local r=$1 out=$2 u
  # The guest agent.
  install -D -m 0755 "$here/guest/idlecrypt-guest-agent" "$r/usr/local/sbin/idlecrypt-guest-agent"
  install -D -m 0644 "$here/guest/idlecrypt-guest-agent.service" \
    "$r/etc/systemd/system/idlecrypt-guest-agent.service"
  mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
  ln -sf ../idlecrypt-guest-agent.service "$r/etc/systemd/system/multi-user.target.wants/"
  echo virtio_console >"$r/etc/modules-load.d/idlecrypt.conf"
  # Drivers udev would load for devices of QEMU's pc machine that the guest never uses
  # (the PIIX IDE controller, the CPU's svm/vmx flags under TCG, PS/2, fw_cfg, ...).
  printf 'blacklist %s\n' kvm kvm_amd kvm_intel ata_piix ata_generic pata_acpi floppy \
    evdev serio_raw pcspkr button qemu_fw_cfg joydev psmouse i2c_piix4 \
    >"$r/etc/modprobe.d/idlecrypt-blacklist.conf"
  install -D -m 0644 "$here/guest/postgresql-fast-start.conf" \
    "$r/etc/systemd/system/postgresql@15-main.service.d/idlecrypt-fast-start.conf"

  # Nothing slow, periodic or interactive at boot. Masking a unit that does not exist
  # is harmless, so the list does not depend on which packages came in.
  for u in getty@tty1.service serial-getty@ttyS0.service getty.target console-getty.service \
    apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
    dpkg-db-backup.timer dpkg-db-backup.service e2scrub_all.timer e2scrub_all.service \
    e2scrub_reap.service fstrim.timer fstrim.service man-db.timer man-db.service \
    logrotate.timer logrotate.service systemd-tmpfiles-clean.timer \
    systemd-networkd-wait-online.service networking.service systemd-networkd.service \
    systemd-timesyncd.service systemd-firstboot.service systemd-random-seed.service \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-pstore.service systemd-hwdb-update.service ldconfig.service \
    remote-fs.target cryptsetup.target veritysetup.target swap.target \
    sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount dev-mqueue.mount \
    sys-fs-fuse-connections.mount sys-kernel-config.mount \
    systemd-journal-catalog-update.service systemd-update-done.service systemd-sysusers.service \
    systemd-logind.service systemd-user-sessions.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
    modprobe@loop.service modprobe@dm_mod.service modprobe@drm.service \
    modprobe@efi_pstore.service modprobe@fuse.service modprobe@configfs.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$u"
  done
  # The journal in RAM only: no guest writes to the disk under test but the workload's.
  mkdir -p "$r/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' >"$r/etc/systemd/journald.conf.d/idlecrypt.conf"
  # Fixed machine-id: not a first boot, and the same id in every copy of the image.
  printf '%s\n' "$(printf idlecrypt-test-guest | md5sum | cut -c1-32)" >"$r/etc/machine-id"
  rm -f "$r/var/lib/dbus/machine-id"

  # PostgreSQL: the main cluster exists (created by postgresql-common at install);
  # unix socket only, no SSL (its snakeoil key would be random bytes in the image).
  [[ -f $r/var/lib/postgresql/15/main/PG_VERSION ]] || { echo "no 15/main cluster" >&2; exit 1; }
  cat >"$r/etc/postgresql/15/main/conf.d/idlecrypt.conf" <<'EOF'
# idlecrypt test guest
listen_addresses = ''
ssl = off
jit = off
EOF
  # amcheck in template1 and postgres, so `pg_amcheck --all` checks every database as is
  # (and databases created later inherit it). pg_amcheck has no /usr/bin wrapper link.
  chroot "$r" pg_ctlcluster 15 main start
  for db in template1 postgres; do
    chroot "$r" runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d "$db" -c 'CREATE EXTENSION IF NOT EXISTS amcheck'
  done
  chroot "$r" pg_ctlcluster 15 main stop -m fast
  # Caches and statistics that PostgreSQL rebuilds; they differ from build to build.
  rm -f "$r"/var/lib/postgresql/15/main/global/pg_internal.init \
    "$r"/var/lib/postgresql/15/main/base/*/pg_internal.init "$r"/var/lib/postgresql/15/main/pg_stat/*
  ln -sf /usr/share/postgresql-common/pg_wrapper "$r/usr/local/bin/pg_amcheck"
  # With jit = off nothing loads llvmjit.so, the only user of libLLVM (104 MB) and libz3
  # (23 MB): drop them, after checking that no other file links them.
  local users
  users=$(grep -rlE 'libLLVM-14\.so|libz3\.so' "$r/usr/bin" "$r/usr/sbin" "$r/usr/lib" 2>/dev/null |
    grep -vE '/(libLLVM-14\.so\.1|libz3\.so\.4|llvmjit\.so|llvmjit_types\.bc)$|/var/lib/dpkg/|/usr/lib/x86_64-linux-gnu/libLLVM-14\.so|libz3\.so' || true)
  [[ -z $users ]] || { echo "libLLVM/libz3 still used by: $users" >&2; exit 1; }
  rm -f "$r"/usr/lib/x86_64-linux-gnu/libLLVM-14.so* "$r"/usr/lib/x86_64-linux-gnu/libz3.so* \
    "$r"/usr/lib/postgresql/15/lib/llvmjit.so "$r"/usr/lib/postgresql/15/lib/llvmjit_types.bc
  rm -f "$r/etc/ssl/private/ssl-cert-snakeoil.key" "$r/etc/ssl/certs/ssl-cert-snakeoil.pem"
  find "$r/etc/ssl/certs" -xtype l -delete 2>/dev/null || true # hash link to the snakeoil cert
  # The cluster was stopped cleanly by the package scripts? (no postmaster.pid left)
  rm -f "$r/var/lib/postgresql/15/main/postmaster.pid" "$r/var/run/postgresql/"*.pid 2>/dev/null || true

  # Kernel and initramfs go next to the image; the guest boots with -kernel/-initrd.
  local krel
  krel=$(ls "$r/lib/modules")
  [[ $krel != *$'\n'* && -f $r/boot/initrd.img-$krel ]] || { echo "no initrd for '$krel'" >&2; exit 1; }
  cp "$r/boot/vmlinuz-$krel" "$out/vmlinuz.new"
  cp "$r/boot/initrd.img-$krel" "$out/initrd.img.new"
  rm -rf "${r:?}/boot/"* "$r/vmlinuz" "$r/vmlinuz.old" "$r/initrd.img" "$r/initrd.img.old"

  # Package list for the manifest.
  chroot "$r" dpkg-query -W -f '${Package} ${Version}\n' | sort >"$out/packages.new"

  # Caches and leftovers that differ between builds or are useless in the guest.
  rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/var/cache/debconf/*-old \
    "$r"/var/lib/dpkg/*-old "$r"/var/cache/man "$r"/var/log/* "$r"/etc/ssh/ssh_host_* \
    "$r"/var/lib/systemd/random-seed "$r"/var/lib/initramfs-tools/* "$r"/etc/resolv.conf \
    "$r"/usr/share/postgresql/15/man # kept at install only: psql's alternatives need them
  : >"$r/etc/resolv.conf"
}

if [[ ${1:-} == __hook ]]; then
  case $2 in
    setup) hook_setup "$3" ;;
    customize) hook_customize "$3" "$4" ;;
    *) echo "unknown hook $2" >&2; exit 2 ;;
  esac
  exit 0
fi

# --- main ---------------------------------------------------------------------------------

force=0
case ${1:-} in
  '') ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

# The kernel: the busybox guest's (vm-images/build.sh downloads it into vm-images/cache).
shopt -s nullglob
debs=("$here"/../cache/linux-image-*.deb)
shopt -u nullglob
((${#debs[@]} == 1)) || { echo "vm-images/debian: expected one kernel .deb in vm-images/cache (run vm-images/build.sh first), found ${#debs[@]}" >&2; exit 1; }
KERNEL_DEB=$(cd "$(dirname "${debs[0]}")" && pwd)/$(basename "${debs[0]}")
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600} # 2025-01-01T00:00:00Z
IMAGE_SIZE=${IMAGE_SIZE:-2G}
recipe=$( (cat "$self" "$here/guest/"*; echo "$SOURCE_DATE_EPOCH $IMAGE_SIZE"; sha256sum <"$KERNEL_DEB") | sha256sum | cut -c1-16)
cache_root=${IDLECRYPT_IMAGE_CACHE:-/var/cache/idlecrypt}
out=$cache_root/debian-$recipe
link=$here/../out/debian
if ((force == 0)) && [[ -f $out/manifest.txt ]]; then
  mkdir -p "$here/../out"
  [[ $(readlink "$link" 2>/dev/null) == "$out" ]] || ln -sfn "$out" "$link"
  exit 0
fi
(( EUID == 0 )) || { echo "vm-images/debian: run as root (mmdebstrap root mode, mkfs of a tree with device nodes)" >&2; exit 1; }
echo "vm-images/debian: building the Debian 12 test guest into $out (about 3 min)" >&2
mkdir -p "$out"
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Fixed identity of the filesystem.
FS_UUID=8f0c6a9e-1d2b-4c3a-9e5f-1d7c1a2b3c4d
FS_HASH_SEED=4b1d0c9a-7e6f-4a5b-8c9d-0e1f2a3b4c5d
CMDLINE="root=/dev/vda rootfstype=ext4 rw console=ttyS0 panic=1 systemd.show_status=1 loglevel=4"

PACKAGES=(
  systemd systemd-sysv udev kmod
  initramfs-tools zstd
  postgresql-15 postgresql-client-15
  fio libaio1
  procps
)

for cmd in mmdebstrap mkfs.ext4 debugfs dumpe2fs e2fsck dpkg-deb python3 sha256sum; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (apt-get install mmdebstrap e2fsprogs python3)" >&2; exit 1; }
done
[[ -f $KERNEL_DEB ]] || { echo "no kernel .deb at $KERNEL_DEB" >&2; exit 1; }

exec 9>"$out/.build.lock"
flock 9

work=$(mktemp -d "$out/.build.XXXXXX")
cleanup() {
  # A failed mmdebstrap can leave bind mounts (/dev, /proc, the .deb) under the tree:
  # unmount them first, and never let rm cross into another filesystem.
  findmnt -rn -o TARGET | awk -v w="$work/" 'index($0, w) == 1' | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
# mmdebstrap insists that the target directory be empty or absent.
root=$work/root
# The .deb under a path without spaces that the file-mirror-automount hook can copy in.
cp "$KERNEL_DEB" "$work/kernel.deb"

start=$(date +%s)
echo "== mmdebstrap (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)" >&2
LC_ALL=C.UTF-8 LANG=C.UTF-8 nice -n 10 mmdebstrap \
  --mode=root --variant=apt --format=directory \
  --aptopt='APT::Install-Recommends "false"' \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/i18n/locales/*' \
  --dpkgopt='path-exclude=/usr/share/i18n/charmaps/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/lib/postgresql/15/lib/bitcode/*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/JP*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/KR*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/CN*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/TW*' \
  --dpkgopt='path-exclude=/lib/firmware/*' \
  --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --include="$work/kernel.deb" \
  --hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount \
  --setup-hook="bash '$self' __hook setup \"\$1\"" \
  --customize-hook="bash '$self' __hook customize \"\$1\" '$work'" \
  bookworm "$root" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY_MIRROR bookworm-security main" >&2
t_debstrap=$(($(date +%s) - start))

# Every mtime clamped to SOURCE_DATE_EPOCH (files made by maintainer scripts have "now").
find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +

echo "== mkfs.ext4" >&2
cat >"$work/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
EOF
img=$work/debian.raw
truncate -s "$IMAGE_SIZE" "$img"
# E2FSPROGS_FAKE_TIME: superblock/group times and crtimes; mtimes come from the tree.
# On a file, mke2fs "discards" by punching holes, so inode tables count as zeroed
# (no ext4lazyinit writes in the guest) and the image stays sparse.
MKE2FS_CONFIG=$work/mke2fs.conf E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH \
  nice -n 10 mkfs.ext4 -q -t ext4 -L idlecrypt-root -U "$FS_UUID" -m 0 -N 131072 \
  -E "hash_seed=$FS_HASH_SEED,root_owner=0:0" -d "$root" "$img"
# mke2fs -d copies each file's ctime, which is the build's "now": rewrite them.
python3 - "$img" "$SOURCE_DATE_EPOCH" >"$work/ctime.cmds" <<'EOF'
import re, subprocess, sys
img, epoch = sys.argv[1], sys.argv[2]
out = subprocess.run(["dumpe2fs", img], capture_output=True, text=True, check=True).stdout
count = int(re.search(r"^Inode count:\s+(\d+)", out, re.M).group(1))
first = int(re.search(r"^First inode:\s+(\d+)", out, re.M).group(1))
free = bytearray(count + 1)
for m in re.finditer(r"^  Free inodes: (.*)$", out, re.M):
    for part in filter(None, (p.strip() for p in m.group(1).split(","))):
        a, _, b = part.partition("-")
        for i in range(int(a), int(b or a) + 1):
            free[i] = 1
for i in [2] + [i for i in range(first, count + 1) if not free[i]]:
    print(f"sif <{i}> ctime @{epoch}")
EOF
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$work/ctime.cmds" "$img" >/dev/null 2>"$work/debugfs.err" ||
  { cat "$work/debugfs.err" >&2; exit 1; }
if grep -v '^debugfs ' "$work/debugfs.err" | grep -q .; then cat "$work/debugfs.err" >&2; exit 1; fi
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH e2fsck -fn "$img" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; exit 1; }
# mke2fs zeroes the journal and inode tables with fallocate (unwritten extents): they read
# as zeros but count in du. A sparse copy leaves them out (same content, ~65 MB less).
cp --sparse=always "$img" "$img.sparse"
mv -f "$img.sparse" "$img"

# Outputs as a set, the manifest last.
rm -f "$out/manifest.txt"
mv -f "$img" "$out/debian.raw"
mv -f "$work/vmlinuz.new" "$out/vmlinuz"
mv -f "$work/initrd.img.new" "$out/initrd.img"
echo "$CMDLINE" >"$out/cmdline"
{
  echo "recipe=$recipe"
  echo "source_date_epoch=$SOURCE_DATE_EPOCH"
  echo "kernel_deb=$(basename "$KERNEL_DEB") $(sha256sum "$KERNEL_DEB" | cut -d' ' -f1)"
  echo "image_size=$IMAGE_SIZE fs_uuid=$FS_UUID"
  echo "cmdline=$CMDLINE"
  for f in debian.raw vmlinuz initrd.img; do echo "sha256 $f $(sha256sum "$out/$f" | cut -d' ' -f1)"; done
  echo "packages:"
  sed 's/^/  /' "$work/packages.new"
} >"$out/manifest.txt"
mkdir -p "$here/../out"
ln -sfn "$out" "$link"
# Older recipes' images (each about 0.5 GiB) are not used by this clone any more.
for old in "$cache_root"/debian-*; do
  [[ $old == "$out" || ! -d $old ]] || rm -rf --one-file-system "$old"
done
total=$(($(date +%s) - start))
echo "== done in ${total}s (mmdebstrap ${t_debstrap}s): $out/debian.raw" \
  "$(du -h --apparent-size "$out/debian.raw" | cut -f1) virtual, $(du -h "$out/debian.raw" | cut -f1) used" >&2
