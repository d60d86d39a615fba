/*
 * icwriter: the writer workload (vm-images/guest/workloads.sh, workload_run_writer) as one
 * long-lived process, the way a database's log writer runs: it opens /dev/vda once with
 * O_DIRECT and, wps times a second, writes one 4 KiB block and (flush=1) fsyncs it.
 *
 * The shell loop forks printf's subshell, dd and usleep for every write: under TCG that
 * costs its vCPU about 16 ms a write, so a trickle of 15 a second is also a guest that
 * keeps a vCPU a quarter busy. This process makes a pwrite and an fsync a write and starts
 * no process (its CPU time under TCG was not measured; on a KVM host either writer costs
 * microseconds); idlecrypt.writer=proc selects it.
 *
 * Same blocks, offsets, pacing and serial lines as the shell's:
 *   block  "IDLECRYPT-BLOCK seq=N off=OFF\n" then the 0123456789abcdef pad, 4096 bytes
 *   offset writer_offset() in workloads.sh (a hash of seq; a few seqs repeat an earlier one)
 *   pace   write N+1 starts at start + (N+1)*1000/wps ms, deadlines absolute
 *   lines  WROTE seq=N off=OFF after each write; WRITER DONE count=N t=MS at the end
 *          (t and the deadlines on the guest's uptime clock, CLOCK_BOOTTIME)
 *
 * Usage: icwriter SLOTS WPS COUNT FLUSH   (COUNT 0: for ever)
 * Built static by vm-images/build.sh into the initramfs as /bin/icwriter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_until_ms(int64_t deadline) {
  struct timespec ts = {.tv_sec = deadline / 1000, .tv_nsec = (deadline % 1000) * 1000000};
  while (clock_nanosleep(CLOCK_BOOTTIME, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

/* writer_offset in workloads.sh, in the same integer steps. */
static uint64_t writer_offset(uint64_t t, uint64_t slots) {
  if (t % 4 == 3) {
    t /= 2;
    if (t % 4 == 3) t -= 1;
  }
  uint64_t h = ((t + 1) * 2654435761ULL) & 0xffffffffULL;
  h ^= h >> 16;
  return h % slots * BLOCK;
}

static int parse(const char *s, long long min, long long *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || *s == '\0' || *end != '\0' || v < min) return -1;
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  long long slots, wps, count, flush;
  if (argc != 5 || parse(argv[1], 1, &slots) || parse(argv[2], 0, &wps) ||
      parse(argv[3], 0, &count) || parse(argv[4], 0, &flush)) {
    fprintf(stderr, "usage: icwriter SLOTS WPS COUNT FLUSH\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  int fd = open("/dev/vda", O_WRONLY | O_DIRECT);
  if (fd < 0) {
    printf("ERROR workload=writer reason=open errno=%d\n", errno);
    return 1;
  }
  char *buf;
  if (posix_memalign((void **)&buf, BLOCK, BLOCK)) return 1;

  printf("CONFIG workload=writer wps=%lld count=%lld flush=%lld slots=%lld writer=proc\n", wps,
         count, flush, slots);
  int64_t start = now_ms();
  long long seq = 0;
  while (count == 0 || seq < count) {
    uint64_t off = writer_offset((uint64_t)seq, (uint64_t)slots);
    /* The shell's block: the header, then the pad from its first byte, cut at 4096. */
    char head[64];
    int n = snprintf(head, sizeof head, "IDLECRYPT-BLOCK seq=%lld off=%llu\n", seq,
                     (unsigned long long)off);
    memcpy(buf, head, (size_t)n);
    for (int i = n; i < BLOCK; i++) buf[i] = "0123456789abcdef"[(i - n) % 16];
    if (pwrite(fd, buf, BLOCK, (off_t)off) != BLOCK || (flush && fsync(fd) != 0)) {
      printf("ERROR workload=writer reason=write seq=%lld off=%llu errno=%d\n", seq,
             (unsigned long long)off, errno);
      for (;;) pause();
    }
    printf("WROTE seq=%lld off=%llu\n", seq, (unsigned long long)off);
    seq++;
    if (wps > 0) sleep_until_ms(start + seq * 1000 / wps);
  }
  printf("WRITER DONE count=%lld t=%lld\n", seq, (long long)now_ms());
  return 0;
}
