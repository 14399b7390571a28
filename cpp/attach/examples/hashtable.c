/* livemig-hashtable: an example workload process for livemig's attach protocol (docs/attach.md).
 *
 * It keeps a hash table of self-describing records in memfd memory and updates it from several
 * threads, frees and reuses slots, hints free slots through the balloon messages (keeping them
 * unused until DONE, like a balloon driver), answers pause/resume within a bounded time, and checks
 * its whole table on request. It runs as a migration source (its table is built at start) or as a
 * destination (an empty region filled by livemig, the table's bookkeeping arriving as device state).
 *
 * Region (one record per page, page size P):
 *   page 0                header: magic, geometry
 *   pages 1 .. B          bucket heads: nthreads x nbuckets u32 (slot + 1; 0 = empty)
 *   pages B+1 ..          slots; slot s is owned by thread s / slots_per_thread
 * Record (a slot's page): u64 key (0: free), u64 version, u32 slot, u32 next (slot + 1 in the bucket
 * chain), u64 checksum of key, version, slot and payload, then the payload, a function of key and
 * version. Thread t owns its slots, its buckets and the keys k with (k - 1) % nthreads == t, so the
 * writers never share memory; the balloon driver only moves free slots between lists.
 *
 * Bookkeeping outside the region (saved as device state): per thread the free-slot stack, counters,
 * the next version and a digest (XOR of a hash of (slot, key, version) over live records); the
 * balloon driver's held slots and last command id. The check walks every chain and compares with
 * the digest, so a stale page (an old version of a record, consistent in itself) fails it too.
 *
 * Usage: livemig-hashtable --connect PATH [--role source|destination] [--size BYTES[K|M|G]]
 *          [--threads N] [--rate OPS_PER_S] [--free FRACTION] [--hint-fraction FRACTION]
 *          [--seed N] [--pause-timeout-ms MS] [--status-fd FD] [--name NAME] [--no-hints] [--dispatch]
 * Status lines go to --status-fd (default stdout): "ready ...", "lost ...", "check ...", "exit ...".
 * SIGUSR1 runs the check; SIGTERM/SIGINT detach, check and exit (0 when the check passed).
 * Exit codes: 0 ok (or migrated away), 1 check failed, 2 usage or setup error, 3 a destination whose
 * migration failed before it ran, 4 a destination that lost livemig with pages missing and exited. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <livemig_attach.h>

#define TABLE_MAGIC 0x5448414dU /* "MAHT" */
#define STATE_MAGIC 0x5348414dU /* "MAHS" */
#define STATE_VERSION 1U
#define RECORD_HEADER 32

/* ---------------------------------------------------------------------------------------------- */
/* Hashing and record contents                                                                    */

static uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

static uint64_t payload_word(uint64_t key, uint64_t version, uint64_t i) {
  return mix64(key * 0xC2B2AE3D27D4EB4FULL ^ version * 0x165667B19E3779F9ULL ^ i);
}

/* Digest term of one live record. */
static uint64_t record_hash(uint32_t slot, uint64_t key, uint64_t version) {
  return mix64(mix64(key) ^ (version * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)slot << 40));
}

struct record {
  uint64_t key;
  uint64_t version;
  uint32_t slot;
  uint32_t next;
  uint64_t checksum;
  uint64_t payload[]; /* (page size - 32) / 8 words */
};

static uint64_t record_checksum(const struct record *r, size_t words) {
  uint64_t h = mix64(r->key) ^ mix64(r->version + 1) ^ mix64((uint64_t)r->slot + 7);
  for (size_t i = 0; i < words; ++i) h = mix64(h ^ r->payload[i]);
  return h;
}

/* ---------------------------------------------------------------------------------------------- */
/* The table                                                                                      */

struct writer {
  pthread_t thread;
  unsigned index;
  pthread_mutex_t free_mu; /* the free stack is shared with the balloon driver */
  uint32_t *free_slots;
  uint32_t free_count;
  /* Owned by the writer (read by check and save_state while it is parked). */
  uint64_t rng, next_version, live, digest, ops, inserts, updates, deletes, alloc_failures;
};

struct table {
  /* Geometry. */
  uint8_t *base;
  size_t page_size, npages, words;
  uint32_t nthreads, nslots, slots_per_thread, nbuckets, first_slot_page;
  uint64_t keys_per_thread;
  double rate, hint_fraction;
  int pause_timeout_ms;
  int hints;

  struct writer *w;
  livemig_attach *att;

  /* Parking: every writer and the driver park at an operation boundary while pause_req is set. */
  pthread_mutex_t mu;
  pthread_cond_t cond;        /* parked count changed, or pause_req / stop / balloon changed */
  int pause_req, stop, started, parked;
  unsigned participants;      /* threads that park: writers + driver */

  /* Balloon driver. */
  pthread_t driver;
  atomic_uint cmd_latest;     /* the id livemig shows */
  uint32_t cmd_seen;          /* the driver's last acted-on id */
  uint32_t *held;             /* hinted slots, unused until DONE */
  uint32_t held_count;
  atomic_ullong hints_sent, pages_hinted, rounds;

  /* Events for the main loop. */
  int event_fd;
  atomic_int lost, lost_exit;
  int lost_registered;        /* guarded by mu: what ops->lost reported */
  uint64_t lost_missing;
  FILE *status;
  pthread_mutex_t status_mu;
};

static void status(struct table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void status(struct table *t, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&t->status_mu);
  vfprintf(t->status, fmt, ap);
  fputc('\n', t->status);
  fflush(t->status);
  pthread_mutex_unlock(&t->status_mu);
  va_end(ap);
}

static struct record *slot_record(const struct table *t, uint32_t slot) {
  return (struct record *)(t->base + (size_t)(t->first_slot_page + slot) * t->page_size);
}
static uint32_t *buckets_of(const struct table *t, unsigned thread) {
  return (uint32_t *)(t->base + t->page_size) + (size_t)thread * t->nbuckets;
}
static uint32_t bucket_of(const struct table *t, uint64_t key) { return (uint32_t)(mix64(key ^ 0xABCDEFULL) % t->nbuckets); }

/* Geometry for a region of `npages` pages and `nthreads` writers. 0, or -1 when it does not fit. */
static int geometry(struct table *t, size_t npages, uint32_t nthreads) {
  t->npages = npages;
  t->nthreads = nthreads;
  t->words = (t->page_size - RECORD_HEADER) / 8;
  /* Each slot needs a page and about one bucket (4 bytes): B bucket pages for S slots. */
  size_t avail = npages - 1;
  size_t per_page = t->page_size / 4;
  size_t slots = avail * per_page / (per_page + 1);
  slots -= slots % nthreads;
  if (slots < nthreads * 4U) return -1;
  t->nslots = (uint32_t)slots;
  t->slots_per_thread = t->nslots / nthreads;
  t->nbuckets = t->slots_per_thread;
  size_t bucket_pages = ((size_t)nthreads * t->nbuckets * 4 + t->page_size - 1) / t->page_size;
  t->first_slot_page = (uint32_t)(1 + bucket_pages);
  if (t->first_slot_page + (size_t)t->nslots > npages) return -1;
  return 0;
}

static uint64_t rng_next(uint64_t *s) {
  *s += 0x9E3779B97F4A7C15ULL;
  return mix64(*s);
}

static void write_record(struct table *t, struct record *r, uint64_t key, uint64_t version, uint32_t slot,
                         uint32_t next) {
  r->key = key;
  r->version = version;
  r->slot = slot;
  r->next = next;
  for (size_t i = 0; i < t->words; ++i) r->payload[i] = payload_word(key, version, i);
  r->checksum = record_checksum(r, t->words);
}

/* One operation of writer `w` on a random key of its own. */
static void operate(struct table *t, struct writer *w) {
  const uint64_t key = (rng_next(&w->rng) % t->keys_per_thread) * t->nthreads + w->index + 1;
  uint32_t *link = &buckets_of(t, w->index)[bucket_of(t, key)];
  uint32_t s = *link;
  struct record *r = NULL;
  while (s != 0) {
    r = slot_record(t, s - 1);
    if (r->key == key) break;
    link = &r->next;
    s = r->next;
  }
  ++w->ops;
  if (s != 0) {
    if (rng_next(&w->rng) % 10 < 7) { /* update */
      w->digest ^= record_hash(s - 1, key, r->version);
      const uint64_t v = ++w->next_version;
      write_record(t, r, key, v, s - 1, r->next);
      w->digest ^= record_hash(s - 1, key, v);
      ++w->updates;
    } else { /* delete: unlink, mark free, give the slot back */
      w->digest ^= record_hash(s - 1, key, r->version);
      *link = r->next;
      r->key = 0;
      --w->live;
      ++w->deletes;
      pthread_mutex_lock(&w->free_mu);
      w->free_slots[w->free_count++] = s - 1;
      pthread_mutex_unlock(&w->free_mu);
    }
    return;
  }
  pthread_mutex_lock(&w->free_mu);
  const uint32_t slot = w->free_count > 0 ? w->free_slots[--w->free_count] : UINT32_MAX;
  pthread_mutex_unlock(&w->free_mu);
  if (slot == UINT32_MAX) {
    ++w->alloc_failures;
    return;
  }
  uint32_t *head = &buckets_of(t, w->index)[bucket_of(t, key)];
  const uint64_t v = ++w->next_version;
  write_record(t, slot_record(t, slot), key, v, slot, *head);
  *head = slot + 1;
  w->digest ^= record_hash(slot, key, v);
  ++w->live;
  ++w->inserts;
}

/* Parks the calling thread while a pause is requested; returns 0 when it should stop. Called with
 * t->mu held. */
static int park_locked(struct table *t) {
  if (t->pause_req) {
    ++t->parked;
    pthread_cond_broadcast(&t->cond);
    while (t->pause_req && !t->stop) pthread_cond_wait(&t->cond, &t->mu);
    --t->parked;
  }
  return !t->stop;
}

static struct timespec deadline_after_ns(int64_t ns) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += ns / 1000000000;
  ts.tv_nsec += ns % 1000000000;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec += 1;
    ts.tv_nsec -= 1000000000;
  }
  return ts;
}

struct writer_arg {
  struct table *t;
  struct writer *w;
};

static void *writer_thread(void *arg) {
  struct writer_arg *wa = arg;
  struct table *t = wa->t;
  struct writer *w = wa->w;
  free(wa);
  /* Paced in batches: `batch` operations, then a wait on the park condition (so a pause wakes it). */
  const double per_thread = t->rate / t->nthreads;
  const unsigned batch = per_thread >= 1000 ? 16 : 1;
  const int64_t gap_ns = per_thread > 0 ? (int64_t)(1e9 * batch / per_thread) : 0;
  pthread_mutex_lock(&t->mu);
  while (park_locked(t)) {
    pthread_mutex_unlock(&t->mu);
    for (unsigned i = 0; i < batch; ++i) operate(t, w);
    pthread_mutex_lock(&t->mu);
    if (gap_ns > 0 && !t->pause_req && !t->stop) {
      struct timespec until = deadline_after_ns(gap_ns);
      pthread_cond_timedwait(&t->cond, &t->mu, &until);
    }
  }
  pthread_mutex_unlock(&t->mu);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* The balloon driver                                                                             */

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x > y) - (x < y);
}

/* A new round: take a share of every writer's free slots, hold them, report them as page ranges. */
static void driver_round(struct table *t, uint32_t id) {
  uint32_t *taken = malloc(sizeof(uint32_t) * (t->nslots + 1U));
  struct livemig_attach_range *ranges = malloc(sizeof *ranges * (t->nslots + 1U));
  if (taken == NULL || ranges == NULL) {
    free(taken);
    free(ranges);
    return;
  }
  uint32_t n = 0;
  for (unsigned i = 0; i < t->nthreads; ++i) {
    struct writer *w = &t->w[i];
    pthread_mutex_lock(&w->free_mu);
    uint32_t k = (uint32_t)(w->free_count * t->hint_fraction);
    /* The oldest free slots (bottom of the stack) go; the writer keeps reusing the recent ones. */
    memcpy(taken + n, w->free_slots, sizeof(uint32_t) * k);
    memmove(w->free_slots, w->free_slots + k, sizeof(uint32_t) * (w->free_count - k));
    w->free_count -= k;
    pthread_mutex_unlock(&w->free_mu);
    n += k;
  }
  memcpy(t->held + t->held_count, taken, sizeof(uint32_t) * n);
  t->held_count += n;
  qsort(taken, n, sizeof(uint32_t), cmp_u32);
  size_t nr = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const uint64_t page = (uint64_t)t->first_slot_page + taken[i];
    if (nr > 0 && ranges[nr - 1].first + ranges[nr - 1].npages == page)
      ++ranges[nr - 1].npages;
    else
      ranges[nr++] = (struct livemig_attach_range){page, 1};
  }
  /* START acknowledges the round, STOP ends it: one call, batched by the library. A stale round
   * (livemig moved on) sends nothing; the slots stay held until DONE all the same. */
  if (livemig_attach_hints(t->att, id, LIVEMIG_ATTACH_HINT_START | LIVEMIG_ATTACH_HINT_STOP, ranges, nr) == 0) {
    atomic_fetch_add(&t->hints_sent, nr);
    atomic_fetch_add(&t->pages_hinted, n);
  }
  atomic_fetch_add(&t->rounds, 1);
  free(taken);
  free(ranges);
}

/* DONE: every held slot goes back to its owner's free stack. */
static void driver_done(struct table *t) {
  for (uint32_t i = 0; i < t->held_count; ++i) {
    const uint32_t s = t->held[i];
    struct writer *w = &t->w[s / t->slots_per_thread];
    pthread_mutex_lock(&w->free_mu);
    w->free_slots[w->free_count++] = s;
    pthread_mutex_unlock(&w->free_mu);
  }
  t->held_count = 0;
}

static void *driver_thread(void *arg) {
  struct table *t = arg;
  pthread_mutex_lock(&t->mu);
  while (park_locked(t)) {
    const uint32_t id = atomic_load(&t->cmd_latest);
    if (id == t->cmd_seen) {
      pthread_cond_wait(&t->cond, &t->mu);
      continue;
    }
    t->cmd_seen = id;
    pthread_mutex_unlock(&t->mu);
    if (id == LIVEMIG_ATTACH_CMD_DONE)
      driver_done(t);
    else if (id >= LIVEMIG_ATTACH_MIN_ROUND_ID)
      driver_round(t, id);
    pthread_mutex_lock(&t->mu);
  }
  pthread_mutex_unlock(&t->mu);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* Threads: start, pause, resume, stop                                                            */

static int start_threads(struct table *t) {
  t->participants = t->nthreads + (t->hints ? 1U : 0U);
  for (unsigned i = 0; i < t->nthreads; ++i) {
    struct writer_arg *wa = malloc(sizeof *wa);
    if (wa == NULL) return -ENOMEM;
    wa->t = t;
    wa->w = &t->w[i];
    int rc = pthread_create(&t->w[i].thread, NULL, writer_thread, wa);
    if (rc != 0) {
      free(wa);
      return -rc;
    }
  }
  if (t->hints && pthread_create(&t->driver, NULL, driver_thread, t) != 0) return -EAGAIN;
  t->started = 1;
  return 0;
}

/* Parks every writer and the driver within the pause timeout; -ETIMEDOUT (all running again)
 * otherwise. */
static int table_pause(struct table *t) {
  pthread_mutex_lock(&t->mu);
  t->pause_req = 1;
  pthread_cond_broadcast(&t->cond);
  struct timespec until = deadline_after_ns((int64_t)t->pause_timeout_ms * 1000000);
  int rc = 0;
  while (t->started && t->parked < (int)t->participants) {
    if (pthread_cond_timedwait(&t->cond, &t->mu, &until) == ETIMEDOUT && t->parked < (int)t->participants) {
      t->pause_req = 0;
      pthread_cond_broadcast(&t->cond);
      rc = -ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&t->mu);
  return rc;
}

static int table_resume(struct table *t) {
  pthread_mutex_lock(&t->mu);
  t->pause_req = 0;
  pthread_cond_broadcast(&t->cond);
  const int started = t->started;
  pthread_mutex_unlock(&t->mu);
  return started ? 0 : start_threads(t); /* a destination's first resume starts its threads */
}

static void table_stop(struct table *t) {
  pthread_mutex_lock(&t->mu);
  t->stop = 1;
  pthread_cond_broadcast(&t->cond);
  const int started = t->started;
  pthread_mutex_unlock(&t->mu);
  if (!started) return;
  for (unsigned i = 0; i < t->nthreads; ++i) pthread_join(t->w[i].thread, NULL);
  if (t->hints) pthread_join(t->driver, NULL);
  pthread_mutex_lock(&t->mu);
  t->started = 0;
  t->stop = 0;
  pthread_mutex_unlock(&t->mu);
}

/* ---------------------------------------------------------------------------------------------- */
/* The check                                                                                      */

struct check_result {
  uint64_t records, failures, free_slots, held, ops; /* ops: the writers' operations so far */
  char first[256];
};

static void fail(struct check_result *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct check_result *c, const char *fmt, ...) {
  if (c->failures++ == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->first, sizeof c->first, fmt, ap);
    va_end(ap);
  }
}

/* Checks the whole table; the threads must be parked or stopped. */
static void check_parked(struct table *t, struct check_result *c) {
  memset(c, 0, sizeof *c);
  for (unsigned i = 0; i < t->nthreads; ++i) c->ops += t->w[i].ops;
  const uint32_t *hdr = (const uint32_t *)t->base;
  if (hdr[0] != TABLE_MAGIC || hdr[1] != t->nthreads || hdr[2] != t->nslots || hdr[3] != t->nbuckets)
    fail(c, "header page: magic 0x%x threads %u slots %u buckets %u", hdr[0], hdr[1], hdr[2], hdr[3]);
  uint8_t *seen = calloc(t->nslots, 1); /* 1 reachable, 2 free, 3 held */
  if (seen == NULL) {
    fail(c, "out of memory");
    return;
  }
  for (unsigned i = 0; i < t->nthreads; ++i) {
    const struct writer *w = &t->w[i];
    uint64_t live = 0, digest = 0;
    const uint32_t *buckets = buckets_of(t, i);
    for (uint32_t b = 0; b < t->nbuckets; ++b) {
      for (uint32_t s = buckets[b]; s != 0;) {
        const uint32_t slot = s - 1;
        if (slot / t->slots_per_thread != i || slot >= t->nslots) {
          fail(c, "thread %u bucket %u links slot %u outside its slots", i, b, slot);
          break;
        }
        if (seen[slot] != 0) {
          fail(c, "slot %u reached twice (a cycle or a shared link)", slot);
          break;
        }
        seen[slot] = 1;
        const struct record *r = slot_record(t, slot);
        ++c->records;
        ++live;
        if (r->slot != slot) fail(c, "slot %u holds the record of slot %u (misplaced page)", slot, r->slot);
        if (r->key == 0 || (r->key - 1) % t->nthreads != i || bucket_of(t, r->key) != b)
          fail(c, "slot %u: key %" PRIu64 " does not belong to thread %u bucket %u", slot, r->key, i, b);
        if (r->version == 0 || r->version > w->next_version)
          fail(c, "slot %u: version %" PRIu64 " outside 1..%" PRIu64, slot, r->version, w->next_version);
        if (record_checksum(r, t->words) != r->checksum) fail(c, "slot %u: checksum mismatch (torn page)", slot);
        for (size_t k = 0; k < t->words; k += 61)
          if (r->payload[k] != payload_word(r->key, r->version, k)) {
            fail(c, "slot %u: payload word %zu is not the record's", slot, k);
            break;
          }
        digest ^= record_hash(slot, r->key, r->version);
        s = r->next;
      }
    }
    if (live != w->live) fail(c, "thread %u: %" PRIu64 " records reachable, %" PRIu64 " live", i, live, w->live);
    if (digest != w->digest) fail(c, "thread %u: digest mismatch (a stale or lost record)", i);
    for (uint32_t k = 0; k < w->free_count; ++k) {
      const uint32_t s = w->free_slots[k];
      if (s >= t->nslots || seen[s] != 0) fail(c, "free slot %u is also in use or listed twice", s);
      else seen[s] = 2;
      ++c->free_slots;
    }
  }
  for (uint32_t k = 0; k < t->held_count; ++k) {
    const uint32_t s = t->held[k];
    if (s >= t->nslots || seen[s] != 0) fail(c, "held slot %u is also in use or free", s);
    else seen[s] = 3;
    ++c->held;
  }
  for (uint32_t s = 0; s < t->nslots; ++s)
    if (seen[s] == 0) {
      fail(c, "slot %u is neither live, free nor held (leaked)", s);
      break;
    }
  free(seen);
}

static int table_check(struct table *t, struct check_result *c) {
  pthread_mutex_lock(&t->mu);
  const int was_running = t->started && !t->pause_req;
  pthread_mutex_unlock(&t->mu);
  if (was_running) {
    int rc = table_pause(t);
    if (rc != 0) return rc;
  }
  check_parked(t, c);
  if (was_running) table_resume(t);
  return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Device state                                                                                   */

struct buf {
  uint8_t *p;
  size_t len, cap;
};
static void put(struct buf *b, const void *src, size_t n) {
  if (b->p == NULL) return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap * 2 + n;
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
      free(b->p);
      b->p = NULL;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, src, n);
  b->len += n;
}
static void put32(struct buf *b, uint32_t v) { put(b, &v, 4); }
static void put64(struct buf *b, uint64_t v) { put(b, &v, 8); }

static int get(const uint8_t **p, const uint8_t *end, void *dst, size_t n) {
  if ((size_t)(end - *p) < n) return -1;
  memcpy(dst, *p, n);
  *p += n;
  return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Callbacks                                                                                      */

static int cb_pause(void *user) { return table_pause(user); }
static int cb_resume(void *user) { return table_resume(user); }

static int cb_save(void *user, void **state, size_t *len) {
  struct table *t = user;
  struct buf b = {malloc(4096), 0, 4096};
  put32(&b, STATE_MAGIC);
  put32(&b, STATE_VERSION);
  put32(&b, (uint32_t)t->page_size);
  put32(&b, t->nthreads);
  put64(&b, t->npages);
  put64(&b, t->keys_per_thread);
  put32(&b, t->cmd_seen);
  put32(&b, t->held_count);
  for (unsigned i = 0; i < t->nthreads; ++i) {
    const struct writer *w = &t->w[i];
    put64(&b, w->rng);
    put64(&b, w->next_version);
    put64(&b, w->live);
    put64(&b, w->digest);
    put64(&b, w->ops);
    put64(&b, w->inserts);
    put64(&b, w->updates);
    put64(&b, w->deletes);
    put64(&b, w->alloc_failures);
    put32(&b, w->free_count);
    put(&b, w->free_slots, sizeof(uint32_t) * w->free_count);
  }
  put(&b, t->held, sizeof(uint32_t) * t->held_count);
  if (b.p == NULL) return -ENOMEM;
  *state = b.p;
  *len = b.len;
  return 0;
}

static int cb_load(void *user, const void *state, size_t len) {
  struct table *t = user;
  const uint8_t *p = state, *end = p + len;
  uint32_t magic, version, page_size, nthreads, cmd_seen, held_count;
  uint64_t npages, keys;
  if (get(&p, end, &magic, 4) || get(&p, end, &version, 4) || get(&p, end, &page_size, 4) ||
      get(&p, end, &nthreads, 4) || get(&p, end, &npages, 8) || get(&p, end, &keys, 8) ||
      get(&p, end, &cmd_seen, 4) || get(&p, end, &held_count, 4))
    return -EINVAL;
  if (magic != STATE_MAGIC || version != STATE_VERSION || page_size != t->page_size || npages != t->npages ||
      nthreads != t->nthreads || keys != t->keys_per_thread)
    return -EINVAL;
  for (unsigned i = 0; i < t->nthreads; ++i) {
    struct writer *w = &t->w[i];
    uint32_t free_count;
    if (get(&p, end, &w->rng, 8) || get(&p, end, &w->next_version, 8) || get(&p, end, &w->live, 8) ||
        get(&p, end, &w->digest, 8) || get(&p, end, &w->ops, 8) || get(&p, end, &w->inserts, 8) ||
        get(&p, end, &w->updates, 8) || get(&p, end, &w->deletes, 8) || get(&p, end, &w->alloc_failures, 8) ||
        get(&p, end, &free_count, 4) || free_count > t->slots_per_thread ||
        get(&p, end, w->free_slots, sizeof(uint32_t) * free_count))
      return -EINVAL;
    w->free_count = free_count;
  }
  if (held_count > t->nslots || get(&p, end, t->held, sizeof(uint32_t) * held_count) || p != end) return -EINVAL;
  t->held_count = held_count;
  t->cmd_seen = cmd_seen;
  return 0;
}

static void cb_balloon(void *user, uint32_t id) {
  struct table *t = user;
  pthread_mutex_lock(&t->mu);
  atomic_store(&t->cmd_latest, id);
  pthread_cond_broadcast(&t->cond);
  pthread_mutex_unlock(&t->mu);
}

static int cb_check(void *user, uint64_t *items, uint64_t *failures, char *text, size_t size) {
  struct table *t = user;
  struct check_result c;
  int rc = table_check(t, &c);
  if (rc != 0) {
    snprintf(text, size, "could not pause for the check: %s", strerror(-rc));
    return rc;
  }
  *items = c.records;
  *failures = c.failures;
  snprintf(text, size, "records=%" PRIu64 " free=%" PRIu64 " held=%" PRIu64 " ops=%" PRIu64 " failures=%" PRIu64 "%s%s",
           c.records, c.free_slots, c.held, c.ops, c.failures, c.failures ? " first: " : "", c.first);
  return 0;
}

static void cb_lost(void *user, const struct livemig_attach_lost *l) {
  struct table *t = user;
  int exit_code = -1; /* keep running */
  if (l->role == LIVEMIG_ATTACH_SOURCE && l->handed_off) exit_code = 0;                   /* runs elsewhere */
  if (l->role == LIVEMIG_ATTACH_DESTINATION && !l->complete && !l->registered) exit_code = 3; /* never ran */
  pthread_mutex_lock(&t->mu);
  t->lost_registered = l->registered;
  t->lost_missing = l->missing_pages;
  pthread_mutex_unlock(&t->mu);
  status(t,
         "lost error=%d handed_off=%d resumed=%d paused=%d complete=%d registered=%d missing=%" PRIu64 " why=%s",
         l->error, l->handed_off, l->resumed, l->paused, l->complete, l->registered, l->missing_pages, l->why);
  atomic_store(&t->lost_exit, exit_code);
  atomic_store(&t->lost, 1);
  uint64_t one = 1;
  if (write(t->event_fd, &one, sizeof one) < 0) { /* cannot fail for an eventfd below its maximum */
  }
}

static const struct livemig_attach_ops kOps = {
    .pause = cb_pause,
    .resume = cb_resume,
    .save_state = cb_save,
    .load_state = cb_load,
    .balloon = cb_balloon,
    .check = cb_check,
    .lost = cb_lost,
};

/* ---------------------------------------------------------------------------------------------- */
/* main                                                                                           */

static int usage(const char *why) {
  fprintf(stderr,
          "livemig-hashtable: %s\nusage: livemig-hashtable --connect PATH [--role source|destination] "
          "[--size BYTES[K|M|G]] [--threads N] [--rate OPS_PER_S] [--free FRACTION] [--hint-fraction FRACTION] "
          "[--seed N] [--pause-timeout-ms MS] [--status-fd FD] [--name NAME] [--no-hints] [--dispatch]\n",
          why);
  return 2;
}

static int parse_size(const char *s, size_t *out) {
  char *end = NULL;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || end == s) return -1;
  if (*end == 'K' || *end == 'k') v <<= 10, ++end;
  else if (*end == 'M' || *end == 'm') v <<= 20, ++end;
  else if (*end == 'G' || *end == 'g') v <<= 30, ++end;
  if (*end != '\0') return -1;
  *out = (size_t)v;
  return 0;
}

int main(int argc, char **argv) {
  const char *path = NULL, *name = "livemig-hashtable";
  int role = LIVEMIG_ATTACH_SOURCE, status_fd = -1, hints = 1, dispatch = 0, pause_timeout_ms = 1000;
  size_t size = 16 << 20;
  unsigned threads = 2;
  double rate = 4000, free_fraction = 0.3, hint_fraction = 0.5;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--no-hints") == 0) { hints = 0; continue; }
    if (strcmp(a, "--dispatch") == 0) { dispatch = 1; continue; }
    if (v == NULL) return usage("an option lacks its value");
    ++i;
    if (strcmp(a, "--connect") == 0) path = v;
    else if (strcmp(a, "--role") == 0) {
      if (strcmp(v, "source") == 0) role = LIVEMIG_ATTACH_SOURCE;
      else if (strcmp(v, "destination") == 0) role = LIVEMIG_ATTACH_DESTINATION;
      else return usage("--role is source or destination");
    } else if (strcmp(a, "--size") == 0) {
      if (parse_size(v, &size) != 0) return usage("bad --size");
    } else if (strcmp(a, "--threads") == 0) threads = (unsigned)strtoul(v, NULL, 10);
    else if (strcmp(a, "--rate") == 0) rate = strtod(v, NULL);
    else if (strcmp(a, "--free") == 0) free_fraction = strtod(v, NULL);
    else if (strcmp(a, "--hint-fraction") == 0) hint_fraction = strtod(v, NULL);
    else if (strcmp(a, "--seed") == 0) seed = strtoull(v, NULL, 10);
    else if (strcmp(a, "--pause-timeout-ms") == 0) pause_timeout_ms = atoi(v);
    else if (strcmp(a, "--status-fd") == 0) status_fd = atoi(v);
    else if (strcmp(a, "--name") == 0) name = v;
    else return usage("unknown option");
  }
  if (path == NULL) return usage("--connect PATH is required");
  if (threads < 1 || threads > 64 || rate < 0 || free_fraction < 0 || free_fraction >= 1 || hint_fraction < 0 ||
      hint_fraction > 1 || pause_timeout_ms <= 0)
    return usage("--threads 1..64, --rate >= 0, --free in [0, 1), --hint-fraction in [0, 1], --pause-timeout-ms > 0");

  /* Signals are taken by the main loop only (every thread inherits this mask). */
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGUSR1);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);
  signal(SIGPIPE, SIG_IGN);

  static struct table tbl;
  struct table *t = &tbl;
  t->status = status_fd >= 0 ? fdopen(status_fd, "w") : stdout;
  if (t->status == NULL) return usage("--status-fd is not a writable descriptor");
  pthread_mutex_init(&t->status_mu, NULL);
  pthread_mutex_init(&t->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&t->cond, &ca);
  pthread_condattr_destroy(&ca);
  t->rate = rate;
  t->hint_fraction = hint_fraction;
  t->pause_timeout_ms = pause_timeout_ms;
  t->hints = hints;
  t->event_fd = eventfd(0, EFD_CLOEXEC);

  struct livemig_attach_config cfg;
  livemig_attach_config_init(&cfg);
  cfg.role = role;
  cfg.len = size;
  cfg.name = name;
  cfg.capabilities = LIVEMIG_ATTACH_CAP_CHECK | (hints ? LIVEMIG_ATTACH_CAP_HINTS : 0);
  cfg.ops = &kOps;
  cfg.user = t;
  if (livemig_attach_create(&cfg, &t->att) != 0) {
    fprintf(stderr, "livemig-hashtable: %s\n", livemig_attach_error(NULL));
    return 2;
  }
  t->base = livemig_attach_addr(t->att);
  t->page_size = livemig_attach_page_size(t->att);
  if (geometry(t, size / t->page_size, threads) != 0) {
    livemig_attach_destroy(t->att);
    return usage("--size too small for the threads");
  }
  t->keys_per_thread = (uint64_t)(t->slots_per_thread * (1.0 - free_fraction));
  if (t->keys_per_thread < 1) t->keys_per_thread = 1;
  t->w = calloc(t->nthreads, sizeof *t->w);
  t->held = calloc(t->nslots, sizeof(uint32_t));
  if (t->w == NULL || t->held == NULL) return 2;
  for (unsigned i = 0; i < t->nthreads; ++i) {
    struct writer *w = &t->w[i];
    w->index = i;
    pthread_mutex_init(&w->free_mu, NULL);
    w->free_slots = calloc(t->slots_per_thread, sizeof(uint32_t));
    if (w->free_slots == NULL) return 2;
    w->rng = seed * 0x100000001B3ULL + i;
  }
  if (role == LIVEMIG_ATTACH_SOURCE) {
    /* A fresh table: the header, empty buckets (the memfd reads as zero), every slot free; then
     * fill it to half its keys so there is something to migrate from the first round. */
    uint32_t *hdr = (uint32_t *)t->base;
    hdr[0] = TABLE_MAGIC;
    hdr[1] = t->nthreads;
    hdr[2] = t->nslots;
    hdr[3] = t->nbuckets;
    for (unsigned i = 0; i < t->nthreads; ++i) {
      struct writer *w = &t->w[i];
      for (uint32_t k = 0; k < t->slots_per_thread; ++k)
        w->free_slots[k] = (i + 1) * t->slots_per_thread - 1 - k; /* lowest slot on top */
      w->free_count = t->slots_per_thread;
      for (uint64_t k = 0; k < t->keys_per_thread / 2; ++k) operate(t, w);
    }
  }

  if (livemig_attach_connect(t->att, path) != 0) {
    fprintf(stderr, "livemig-hashtable: attach: %s\n", livemig_attach_error(t->att));
    livemig_attach_destroy(t->att);
    return 2;
  }
  if (role == LIVEMIG_ATTACH_SOURCE && start_threads(t) != 0) return 2;
  if (!dispatch && livemig_attach_start(t->att) != 0) {
    fprintf(stderr, "livemig-hashtable: %s\n", livemig_attach_error(t->att));
    return 2;
  }
  status(t, "ready pid=%d role=%s pages=%zu slots=%u first_slot_page=%u threads=%u caps=0x%" PRIx64, (int)getpid(),
         role == LIVEMIG_ATTACH_SOURCE ? "source" : "destination", t->npages, t->nslots, t->first_slot_page,
         t->nthreads, livemig_attach_capabilities(t->att));

  int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
  int exit_code = -1;
  while (exit_code < 0) {
    struct pollfd p[3] = {{.fd = sfd, .events = POLLIN, .revents = 0},
                          {.fd = t->event_fd, .events = POLLIN, .revents = 0},
                          {.fd = dispatch ? livemig_attach_fd(t->att) : -1, .events = POLLIN, .revents = 0}};
    int n = poll(p, 3, dispatch ? livemig_attach_timeout_ms(t->att) : -1);
    if (n < 0 && errno != EINTR) break;
    if (dispatch) (void)livemig_attach_dispatch(t->att, 0);
    if (atomic_load(&t->lost)) {
      atomic_store(&t->lost, 0);
      uint64_t v;
      if (read(t->event_fd, &v, sizeof v) < 0) { /* drained below by the next event anyway */
      }
      exit_code = atomic_load(&t->lost_exit);
    }
    if (n > 0 && (p[0].revents & POLLIN)) {
      struct signalfd_siginfo si;
      if (read(sfd, &si, sizeof si) != (ssize_t)sizeof si) continue;
      if (si.ssi_signo == SIGUSR1) {
        struct check_result c;
        int rc = table_check(t, &c);
        if (rc != 0)
          status(t, "check error=%s", strerror(-rc));
        else
          status(t, "check records=%" PRIu64 " free=%" PRIu64 " held=%" PRIu64 " ops=%" PRIu64 " failures=%" PRIu64 "%s%s",
                 c.records, c.free_slots, c.held, c.ops, c.failures, c.failures ? " first: " : "", c.first);
      } else {
        exit_code = 0;
      }
    }
  }
  if (exit_code == 3) {
    status(t, "exit code=3 the migration failed before this destination ran; its memory is incomplete");
    livemig_attach_destroy(t->att);
    return 3;
  }
  pthread_mutex_lock(&t->mu);
  const int lost_registered = t->lost_registered;
  const uint64_t lost_missing = t->lost_missing;
  pthread_mutex_unlock(&t->mu);
  if (lost_registered) {
    /* A destination that ran and lost livemig with pages still missing: its writers may wait on
     * them forever. Exiting, it accepts losing them: release (they read as zero), no check. */
    livemig_attach_release(t->att);
    table_stop(t);
    status(t, "exit code=4 memory incomplete (%" PRIu64 " pages never arrived); released", lost_missing);
    livemig_attach_destroy(t->att);
    return 4;
  }
  livemig_attach_detach(t->att); /* a no-op when livemig already ended the attachment */
  table_stop(t);
  const int code = exit_code;
  struct check_result c;
  check_parked(t, &c);
  status(t, "exit records=%" PRIu64 " ops=%" PRIu64 " failures=%" PRIu64 "%s%s", c.records, c.ops, c.failures,
         c.failures ? " first: " : "", c.first);
  livemig_attach_destroy(t->att);
  close(sfd);
  return c.failures == 0 ? code : 1;
}
