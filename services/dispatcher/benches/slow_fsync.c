/* A slower disk for the dispatcher benchmark: preloaded, every fsync and
 * fdatasync of the process sleeps FSYNC_DELAY_US microseconds (default 1000)
 * before it syncs, as on a disk whose flush takes that long. Only the calling
 * thread waits, as with a real flush.
 *
 *   cc -O2 -shared -fPIC -o target/slow_fsync.so \
 *      services/dispatcher/benches/slow_fsync.c -ldl
 *   LD_PRELOAD=$PWD/target/slow_fsync.so FSYNC_DELAY_US=2000 \
 *      target/release/deps/dispatch-<hash> --bench
 *
 * (Run the benchmark binary itself: preloaded into cargo, every build step
 * would be slowed too.) See BENCHMARKS.md, "Dispatcher". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void slow(void) {
  const char *s = getenv("FSYNC_DELAY_US");
  long us = s ? atol(s) : 1000;
  if (us <= 0) return;
  struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
  nanosleep(&ts, NULL);
}

int fsync(int fd) {
  static int (*real)(int);
  if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
  slow();
  return real(fd);
}

int fdatasync(int fd) {
  static int (*real)(int);
  if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
  slow();
  return real(fd);
}
