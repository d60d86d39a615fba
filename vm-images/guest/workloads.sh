# Workloads of the idlecrypt test guest. Sourced by /init (busybox ash); see
# vm-images/README.md for the parameters and the exact serial line formats.
#
# Every line printed here is one record: a capitalised word, then key=value pairs, written
# with a single echo (one write(2), so lines never interleave).
#
# Disk I/O goes straight to the virtual disk: every dd uses O_DIRECT (busybox dd's
# iflag=direct / oflag=direct), so no request is absorbed by the guest's page cache and
# the host sees each one as a virtio-blk request. The writer also fsyncs each block
# (conv=fsync), which reaches QEMU as a virtio-blk flush: the block is durable in the
# image (qcow2 metadata included) before WROTE is printed.

# --- time ------------------------------------------------------------------------------

# now_ms: sets NOW to the guest's uptime in milliseconds.
# busybox 1.35's `date` has no %N, and /proc/uptime has centiseconds, so NOW moves in
# 10 ms steps. `read` is a shell builtin: this costs no fork (a fork+exec costs a few
# milliseconds under TCG, and the disk loop calls this after every dd).
now_ms() {
  read -r _up _ </proc/uptime
  _cs=${_up#*.}
  _cs=${_cs#0} # "05" would be read as octal
  NOW=$((${_up%.*} * 1000 + _cs * 10))
}

# sleep_until MS: sleeps until uptime MS (returns at once if it is already past).
# Deadlines are absolute so that phase and rate schedules do not drift.
sleep_until() {
  now_ms
  [ "$NOW" -lt "$1" ] && usleep $((($1 - NOW) * 1000))
  return 0
}

idle_forever() {
  while :; do sleep 3600; done
}

# --- parameters ------------------------------------------------------------------------

# int_param NAME DEFAULT MIN: sets $NAME from idlecrypt.NAME= (or DEFAULT), a decimal
# integer >= MIN. On error sets SETUP_ERROR and returns 1.
int_param() {
  eval "_v=\${P_$1:-$2}"
  case $_v in
  '' | *[!0-9]*)
    SETUP_ERROR="key=$1 value=$_v"
    return 1
    ;;
  esac
  while :; do case $_v in 0?*) _v=${_v#0} ;; *) break ;; esac; done # no octal surprises
  if [ "$_v" -lt "$3" ]; then
    SETUP_ERROR="key=$1 value=$_v min=$3"
    return 1
  fi
  eval "$1=\$_v"
}

# --- idle ------------------------------------------------------------------------------

# Nothing at all: no disk requests, and (tickless kernel) hardly any interrupts.
workload_setup_idle() { :; }
workload_run_idle() { idle_forever; }

# --- disk: a steady read/write loop over one region -----------------------------------

# Parameters
#   region_off_mb  start of the region (default 0)
#   region_mb      size of the region (default 64; clamped to the end of the disk)
#   bs_kb          size of each request (default 1024; a multiple of 4 for O_DIRECT)
#   chunk_kb       bytes per dd process (default 4096): larger chunks spend less of the
#                  vCPU on fork/exec and more on I/O
# Each dd reads a chunk of the region and writes the same bytes back in place, so the
# device sees equal reads and writes while the disk's contents never change (a pattern
# image stays a pattern image). Nothing outside [region_off, region_off + region) is
# touched.
workload_setup_disk() {
  int_param region_off_mb 0 0 && int_param region_mb 64 1 &&
    int_param bs_kb 1024 4 && int_param chunk_kb 4096 4 || return 1
  if [ $((bs_kb % 4)) -ne 0 ]; then
    SETUP_ERROR="key=bs_kb value=$bs_kb multiple_of=4"
    return 1
  fi
  BS=$((bs_kb * 1024))
  REGION_OFF=$((region_off_mb * 1048576))
  REGION_BYTES=$((region_mb * 1048576))
  if [ $((REGION_OFF + REGION_BYTES)) -gt "$DISK_BYTES" ]; then
    REGION_BYTES=$((DISK_BYTES - REGION_OFF))
  fi
  REGION_BLOCKS=$((REGION_BYTES / BS)) # a tail shorter than one request is left alone
  REGION_BYTES=$((REGION_BLOCKS * BS))
  if [ "$REGION_BLOCKS" -lt 1 ]; then
    SETUP_ERROR="key=region_off_mb value=$region_off_mb disk_bytes=$DISK_BYTES bs=$BS"
    return 1
  fi
  CHUNK_BLOCKS=$((chunk_kb * 1024 / BS))
  [ "$CHUNK_BLOCKS" -lt 1 ] && CHUNK_BLOCKS=1
  DISK_POS=0 # next block of the region; kept across bursty phases
}

disk_config_line() {
  echo "CONFIG workload=$WORKLOAD region_off=$REGION_OFF region_bytes=$REGION_BYTES bs=$BS chunk=$((CHUNK_BLOCKS * BS))"
}

# disk_loop END_MS: runs the read/write loop until uptime END_MS (0: for ever), printing
#   IO t=<uptime ms> rd=<bytes> wr=<bytes> ms=<ms>
# about once a second, bytes counted since the previous IO line, ms the time they took.
# When the loop ends at END_MS it prints the last, shorter interval too, so the IO lines
# of a phase account for every byte it moved.
disk_loop() {
  now_ms
  _last=$NOW
  _rd=0
  _wr=0
  while :; do
    _n=$CHUNK_BLOCKS
    [ "$_n" -gt $((REGION_BLOCKS - DISK_POS)) ] && _n=$((REGION_BLOCKS - DISK_POS))
    _off=$((REGION_OFF + DISK_POS * BS))
    if ! dd if=/dev/vda of=/dev/vda bs="$BS" count="$_n" skip="$_off" seek="$_off" \
      iflag=direct,skip_bytes oflag=direct,seek_bytes conv=notrunc status=none; then
      echo "ERROR workload=$WORKLOAD reason=dd off=$_off bytes=$((_n * BS))"
      idle_forever
    fi
    _rd=$((_rd + _n * BS))
    _wr=$((_wr + _n * BS))
    DISK_POS=$(((DISK_POS + _n) % REGION_BLOCKS))
    now_ms
    if [ $((NOW - _last)) -ge 1000 ]; then
      echo "IO t=$NOW rd=$_rd wr=$_wr ms=$((NOW - _last))"
      _last=$NOW
      _rd=0
      _wr=0
    fi
    if [ "$1" -gt 0 ] && [ "$NOW" -ge "$1" ]; then
      [ "$_rd" -gt 0 ] && echo "IO t=$NOW rd=$_rd wr=$_wr ms=$((NOW - _last))"
      return 0
    fi
  done
}

workload_run_disk() {
  disk_config_line
  disk_loop 0
}

# --- bursty: idle and busy phases ----------------------------------------------------

# Parameters: idle (s, default 8), busy (s, default 8), cycles (default 0 = for ever), and
# those of disk for the busy phases. Prints `PHASE idle t=<ms>` and `PHASE busy t=<ms>` as
# each phase starts, IO lines during busy phases, and `BURSTY DONE cycles=<n> t=<ms>`
# after the last cycle (then stays idle). Phases follow an absolute schedule from the first
# one, so a dd that overruns a busy phase shortens the next idle phase instead of shifting
# every later phase.
workload_setup_bursty() {
  int_param idle 8 0 && int_param busy 8 1 && int_param cycles 0 0 || return 1
  workload_setup_disk
}

workload_run_bursty() {
  disk_config_line
  now_ms
  _start=$NOW
  _cycle=0
  while [ "$cycles" -eq 0 ] || [ "$_cycle" -lt "$cycles" ]; do
    _at=$((_start + _cycle * (idle + busy) * 1000))
    if [ "$idle" -gt 0 ]; then
      now_ms
      echo "PHASE idle t=$NOW"
      sleep_until $((_at + idle * 1000))
    fi
    now_ms
    echo "PHASE busy t=$NOW"
    disk_loop $((_at + (idle + busy) * 1000))
    _cycle=$((_cycle + 1))
  done
  now_ms
  echo "BURSTY DONE cycles=$_cycle t=$NOW"
}

# --- writer: verifiable 4 KiB blocks ---------------------------------------------------

# Parameters: wps (blocks per second, default 20; 0 = as fast as it can), count (default
# 0 = for ever), flush (default 1: fsync each block; 0: O_DIRECT only).
#
# Block seq n (n = 0, 1, 2, ...) goes to byte offset off(n) in 4 KiB slots spread over
# the whole disk:
#   t = n, except when n % 4 == 3: t = n / 2, minus 1 if that is itself % 4 == 3
#       (so every fourth block rewrites the slot of an earlier block, reaching back half
#       the sequence: blocks written before a copy are overwritten during and after it)
#   h = ((t + 1) * 2654435761) mod 2^32;  h = h xor (h >> 16)
#   off(n) = (h mod (disk_bytes / 4096)) * 4096
# Its 4096 bytes are the line "IDLECRYPT-BLOCK seq=<n> off=<off>\n" followed by the
# 16 bytes "0123456789abcdef" repeated, cut at 4096. After the block is on the disk the
# guest prints `WROTE seq=<n> off=<off>`; after `count` blocks, `WRITER DONE count=<n>
# t=<ms>`. vm-images/launch.ts has the same functions (writerOffset, writerBlock).
workload_setup_writer() {
  int_param wps 20 0 && int_param count 0 0 && int_param flush 1 0 || return 1
  # writer=shell (default): the loop below, a dd process per block. writer=proc: the same
  # blocks, offsets, pacing and lines from one long-lived process (/bin/icwriter,
  # vm-images/guest/icwriter.c), as a database's log writer: no fork per block, which
  # under TCG costs the vCPU about 16 ms a block.
  WRITER=${P_writer:-shell}
  case $WRITER in
  shell) ;;
  proc) [ -x /bin/icwriter ] || { SETUP_ERROR="key=writer value=proc reason=no-icwriter"; return 1; } ;;
  *)
    SETUP_ERROR="key=writer value=$WRITER"
    return 1
    ;;
  esac
  SLOTS=$((DISK_BYTES / 4096))
  if [ "$SLOTS" -lt 1 ]; then
    SETUP_ERROR="disk_bytes=$DISK_BYTES"
    return 1
  fi
  WRITER_CONV=notrunc
  [ "$flush" -ne 0 ] && WRITER_CONV=notrunc,fsync
  PAD=0123456789abcdef
  _i=0
  while [ $_i -lt 8 ]; do PAD=$PAD$PAD; _i=$((_i + 1)); done # 16 * 2^8 = 4096 bytes
}

# writer_offset N: sets OFF to off(N) as described above.
writer_offset() {
  _t=$1
  if [ $((_t % 4)) -eq 3 ]; then
    _t=$((_t / 2))
    [ $((_t % 4)) -eq 3 ] && _t=$((_t - 1))
  fi
  _h=$((((_t + 1) * 2654435761) & 0xffffffff))
  _h=$((_h ^ (_h >> 16)))
  OFF=$((_h % SLOTS * 4096))
}

workload_run_writer() {
  if [ "$WRITER" = proc ]; then
    /bin/icwriter "$SLOTS" "$wps" "$count" "$flush" && return 0
    echo "ERROR workload=writer reason=icwriter"
    idle_forever
  fi
  echo "CONFIG workload=writer wps=$wps count=$count flush=$flush slots=$SLOTS"
  now_ms
  _start=$NOW
  _seq=0
  while [ "$count" -eq 0 ] || [ "$_seq" -lt "$count" ]; do
    writer_offset $_seq
    # printf emits the header and the pad; dd takes exactly the first 4096 bytes
    # (fullblock: a pipe may hand them over in pieces) and writes them as one request.
    if ! printf 'IDLECRYPT-BLOCK seq=%d off=%d\n%s' "$_seq" "$OFF" "$PAD" 2>/dev/null |
      dd of=/dev/vda bs=4096 count=1 seek=$((OFF / 4096)) iflag=fullblock oflag=direct \
        conv=$WRITER_CONV status=none; then
      echo "ERROR workload=writer reason=dd seq=$_seq off=$OFF"
      idle_forever
    fi
    echo "WROTE seq=$_seq off=$OFF"
    _seq=$((_seq + 1))
    [ "$wps" -gt 0 ] && sleep_until $((_start + _seq * 1000 / wps))
  done
  now_ms
  echo "WRITER DONE count=$_seq t=$NOW"
}

# --- trickle: small synchronous writes all the time, with bursty phases on top ---------

# Parameters: those of writer (wps: the trickle's rate, default 20; flush) and of bursty.
# A database's pattern: its log writes one small block and flushes it, a dozen times a
# second, busy or not; its busy phases add the bursty loop. The writer runs in the
# background and prints its WROTE lines throughout; the phases print as for bursty.
workload_setup_trickle() {
  workload_setup_writer && workload_setup_bursty
}

workload_run_trickle() {
  workload_run_writer &
  workload_run_bursty
}
