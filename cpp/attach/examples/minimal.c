/* The smallest useful integration of livemig_attach (docs/attach.md, "A complete example"): one
 * worker thread counts in memfd memory that livemig can migrate. Build against an installed tree:
 *   cc minimal.c $(pkg-config --cflags --libs livemig_attach) -o minimal
 * Run: ./minimal /path/to/livemig.sock  (SIGINT to detach and exit). */
#define _GNU_SOURCE
#include <livemig_attach.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

static atomic_int paused, parked, stop;

static void *worker(void *mem) {
  volatile uint64_t *counters = mem;
  for (uint64_t i = 0; !atomic_load(&stop); ++i) {
    if (atomic_load(&paused)) { /* park at an operation boundary */
      atomic_store(&parked, 1);
      while (atomic_load(&paused) && !atomic_load(&stop)) usleep(100);
      atomic_store(&parked, 0);
      continue;
    }
    counters[(i * 512) % (64u << 17)] += 1; /* one word per page of a 64 MiB region */
    if (i % 1024 == 0) usleep(1000);
  }
  return NULL;
}

static int on_pause(void *user) {
  (void)user;
  atomic_store(&paused, 1);
  for (int i = 0; i < 20000 && !atomic_load(&parked); ++i) usleep(50); /* at most 1 s */
  if (atomic_load(&parked)) return 0;
  atomic_store(&paused, 0);
  return -110; /* -ETIMEDOUT: the workload runs on */
}
static int on_resume(void *user) {
  (void)user;
  atomic_store(&paused, 0);
  return 0;
}

int main(int argc, char **argv) {
  static const struct livemig_attach_ops ops = {.pause = on_pause, .resume = on_resume};
  sigset_t s; /* SIGINT/SIGTERM are taken by sigwait below, in no other thread */
  sigemptyset(&s);
  sigaddset(&s, SIGINT);
  sigaddset(&s, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &s, NULL);
  struct livemig_attach_config cfg;
  livemig_attach_config_init(&cfg);
  cfg.len = 64u << 20;
  cfg.name = "minimal";
  cfg.ops = &ops;
  livemig_attach *a;
  if (argc != 2 || livemig_attach_create(&cfg, &a) != 0) return 2;
  pthread_t t;
  pthread_create(&t, NULL, worker, livemig_attach_addr(a));
  if (livemig_attach_connect(a, argv[1]) != 0 || livemig_attach_start(a) != 0) {
    fprintf(stderr, "minimal: %s\n", livemig_attach_error(a));
    return 2;
  }
  int sig;
  sigwait(&s, &sig);
  atomic_store(&stop, 1);
  pthread_join(t, NULL);
  livemig_attach_destroy(a); /* DETACH, then the memory is unmapped */
  return 0;
}
