/* The workload-process side of the attach protocol (docs/attach.md, livemig_attach.h).
 *
 * Threads: the serving thread (the library's, or the caller of dispatch) reads the socket, calls
 * the host's callbacks and owns the conversation state (paused, handed_off, ...). Any host thread
 * may call livemig_attach_hints, which writes the socket. `mu` guards what both touch: the socket's
 * writes and its closing, the negotiated capabilities and the balloon command id. Callbacks are
 * never called with `mu` held (a callback may call livemig_attach_hints).
 *
 * Descriptors: the attachment owns `sock`, `uffd` and, when it created them, `memfd` and the
 * mapping; the pagemap descriptor is opened for HELLO and closed right after it was sent (livemig
 * holds its own copy). Every error path closes what that step opened. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "livemig_attach.h"
#include "uapi.h"
#include "wire.h"

#ifndef LIVEMIG_ATTACH_LIB_VERSION
#define LIVEMIG_ATTACH_LIB_VERSION "0.0.0+dev"
#endif

/* Features the uffd of each role needs (docs/attach.md "Descriptors"). */
#define SOURCE_FEATURES \
  ((uint64_t)(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
#define DESTINATION_FEATURES ((uint64_t)UFFD_FEATURE_MISSING_SHMEM)

enum serving_mode { SERVING_NONE = 0, SERVING_THREAD = 1, SERVING_DISPATCH = 2 };

struct livemig_attach {
  /* Fixed at create. */
  int role;
  uint8_t *addr;
  size_t len;
  size_t page_size;
  int memfd;
  uint64_t memfd_offset;
  int own_memfd;
  int own_map;
  char name[LIVEMIG_ATTACH_MAX_NAME + 1];
  uint64_t offered_caps;
  uint32_t poison;
  int io_timeout_ms;
  const struct livemig_attach_ops *ops;
  void *user;

  /* Guarded by mu (read by livemig_attach_hints on any thread). */
  pthread_mutex_t mu;
  int sock;        /* -1 when not attached */
  uint64_t caps;   /* negotiated */
  uint16_t version;
  uint32_t cmd_id; /* the balloon command id livemig shows */

  /* The serving thread's (or, when nothing serves, the host's). */
  int uffd;        /* -1 when none */
  int registered;  /* the region is registered on uffd */
  uint64_t uffd_features;
  int paused;      /* source: paused by PAUSE; destination: not running (never resumed, or paused) */
  int ever_resumed;
  int handed_off;
  int complete;
  int64_t lease_deadline_ms; /* 0: no lease */
  uint32_t next_tag;

  int serving;     /* enum serving_mode */
  pthread_t thread;
  int thread_joinable;
  int stop_fd;     /* eventfd that stops the serving thread; -1 when none */
  atomic_int stopping;
};

/* ---------------------------------------------------------------------------------------------- */
/* Small helpers                                                                                  */

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static const char *role_name(int role) { return role == LIVEMIG_ATTACH_SOURCE ? "source" : "destination"; }

/* Opens a userfaultfd with no API negotiated: /dev/userfaultfd first, then the syscall (also in
 * user-mode-only form). -errno with the error recorded. */
static int open_uffd(void) {
  int dev_err = 0;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    /* USERFAULTFD_IOC_NEW: a new userfaultfd whose permission check was the open() above. */
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    dev_err = errno;
    close(dev);
    if (fd >= 0) return fd;
  } else {
    dev_err = errno;
  }
  long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0 && (errno == EPERM || errno == EACCES))
    fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (fd >= 0) return (int)fd;
  int err = errno;
  return lma_fail(err,
                  "userfaultfd: cannot open one (/dev/userfaultfd: %s; userfaultfd(2): %s): give this user "
                  "access to /dev/userfaultfd or set vm.unprivileged_userfaultfd=1",
                  strerror(dev_err), strerror(err));
}

/* Features the running kernel's userfaultfd supports (probed on a throwaway fd), 0 when unknown. */
static uint64_t supported_features(void) {
  int fd = open_uffd();
  if (fd < 0) return 0;
  struct uffdio_api api = {.api = UFFD_API, .features = 0};
  /* UFFDIO_API with no features asked reports every feature the kernel has. */
  uint64_t out = ioctl(fd, UFFDIO_API, &api) == 0 ? (uint64_t)api.features : 0;
  close(fd);
  return out;
}

/* Pages of the region that are holes in the memfd (what a MISSING fault would ask for). */
static uint64_t missing_pages(const livemig_attach *a) {
  uint64_t holes = 0;
  off_t pos = (off_t)a->memfd_offset;
  const off_t end = (off_t)(a->memfd_offset + a->len);
  while (pos < end) {
    off_t hole = lseek(a->memfd, pos, SEEK_HOLE);
    if (hole < 0 || hole >= end) break;
    off_t data = lseek(a->memfd, hole, SEEK_DATA);
    if (data < 0 || data > end) data = end;
    holes += (uint64_t)(data - hole) / a->page_size;
    pos = data;
  }
  return holes;
}

/* ---------------------------------------------------------------------------------------------- */
/* Creation                                                                                       */

void livemig_attach_config_init(struct livemig_attach_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->role = LIVEMIG_ATTACH_SOURCE;
  cfg->memfd = -1;
  cfg->io_timeout_ms = 5000;
}

int livemig_attach_create(const struct livemig_attach_config *cfg, livemig_attach **out) {
  if (out == NULL) return lma_fail(EINVAL, "create: out is NULL");
  *out = NULL;
  if (cfg == NULL || cfg->struct_size < sizeof(struct livemig_attach_config))
    return lma_fail(EINVAL, "create: config not initialised with livemig_attach_config_init");
  const long ps = sysconf(_SC_PAGESIZE);
  if (cfg->role != LIVEMIG_ATTACH_SOURCE && cfg->role != LIVEMIG_ATTACH_DESTINATION)
    return lma_fail(EINVAL, "create: role %d is neither source (1) nor destination (2)", cfg->role);
  if (cfg->len == 0 || cfg->len % (size_t)ps != 0)
    return lma_fail(EINVAL, "create: length %zu is not a positive multiple of the page size %ld", cfg->len, ps);
  const char *name = cfg->name != NULL ? cfg->name : "livemig-attach";
  if (strlen(name) > LIVEMIG_ATTACH_MAX_NAME)
    return lma_fail(EINVAL, "create: name longer than %d bytes", LIVEMIG_ATTACH_MAX_NAME);
  if (cfg->memfd >= 0 && (cfg->addr == NULL || (uintptr_t)cfg->addr % (uintptr_t)ps != 0 ||
                          cfg->memfd_offset % (uint64_t)ps != 0))
    return lma_fail(EINVAL, "create: with a caller's memfd, addr and memfd_offset must be page aligned");
  if (cfg->io_timeout_ms < 0) return lma_fail(EINVAL, "create: negative I/O timeout");

  livemig_attach *a = calloc(1, sizeof *a);
  if (a == NULL) return lma_fail(ENOMEM, "create: out of memory");
  a->role = cfg->role;
  a->len = cfg->len;
  a->page_size = (size_t)ps;
  snprintf(a->name, sizeof a->name, "%s", name);
  a->offered_caps = cfg->capabilities & (LIVEMIG_ATTACH_CAP_HINTS | LIVEMIG_ATTACH_CAP_CHECK);
  a->poison = cfg->poison;
  a->io_timeout_ms = cfg->io_timeout_ms > 0 ? cfg->io_timeout_ms : 5000;
  a->ops = cfg->ops;
  a->user = cfg->user;
  a->sock = -1;
  a->uffd = -1;
  a->stop_fd = -1;
  a->memfd = -1;
  a->cmd_id = LIVEMIG_ATTACH_CMD_STOP;
  atomic_init(&a->stopping, 0);
  if (pthread_mutex_init(&a->mu, NULL) != 0) {
    free(a);
    return lma_fail(ENOMEM, "create: pthread_mutex_init failed");
  }

  if (cfg->memfd >= 0) {
    a->memfd = cfg->memfd;
    a->addr = cfg->addr;
    a->memfd_offset = cfg->memfd_offset;
  } else {
    a->memfd = memfd_create(a->name, MFD_CLOEXEC);
    if (a->memfd < 0) {
      int err = errno;
      livemig_attach_destroy(a);
      return lma_fail(err, "create: memfd_create: %s", strerror(err));
    }
    a->own_memfd = 1;
    if (ftruncate(a->memfd, (off_t)a->len) != 0) {
      int err = errno;
      livemig_attach_destroy(a);
      return lma_fail(err, "create: ftruncate of the memfd to %zu bytes: %s", cfg->len, strerror(err));
    }
    void *p = mmap(NULL, a->len, PROT_READ | PROT_WRITE, MAP_SHARED, a->memfd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      livemig_attach_destroy(a);
      return lma_fail(err, "create: mmap of %zu bytes: %s", cfg->len, strerror(err));
    }
    a->addr = p;
    a->own_map = 1;
  }
  *out = a;
  return 0;
}

void *livemig_attach_addr(const livemig_attach *a) { return a->addr; }
size_t livemig_attach_len(const livemig_attach *a) { return a->len; }
size_t livemig_attach_page_size(const livemig_attach *a) { return a->page_size; }
int livemig_attach_memfd(const livemig_attach *a) { return a->memfd; }
const char *livemig_attach_error(const livemig_attach *a) {
  (void)a;
  return lma_last_error();
}
const char *livemig_attach_version(void) { return LIVEMIG_ATTACH_LIB_VERSION; }

uint64_t livemig_attach_capabilities(const livemig_attach *a) {
  livemig_attach *m = (livemig_attach *)a;
  pthread_mutex_lock(&m->mu);
  uint64_t caps = m->caps;
  pthread_mutex_unlock(&m->mu);
  return caps;
}

/* ---------------------------------------------------------------------------------------------- */
/* Arming: the userfaultfd and its registration                                                   */

/* Source: makes every page of the region ordinary again: not write-protected (UFFDIO_WRITEPROTECT
 * mode 0), not registered. Destination: unregisters. Closes the uffd. Returns 0 or -errno (the
 * uffd is closed either way, which unregisters what is left). */
static int disarm(livemig_attach *a) {
  int rc = 0;
  if (a->uffd >= 0 && a->registered) {
    struct uffdio_range range = {.start = (uintptr_t)a->addr, .len = a->len};
    if (a->role == LIVEMIG_ATTACH_SOURCE) {
      struct uffdio_writeprotect wp = {.range = range, .mode = 0};
      /* UFFDIO_WRITEPROTECT mode 0: drop the write protection livemig armed on the whole range. */
      if (ioctl(a->uffd, UFFDIO_WRITEPROTECT, &wp) != 0)
        rc = lma_fail(errno, "unprotect %zu bytes at %p: %s", a->len, (void *)a->addr, strerror(errno));
    }
    /* UFFDIO_UNREGISTER: the range is ordinary memory again; the kernel wakes any waiter. */
    if (ioctl(a->uffd, UFFDIO_UNREGISTER, &range) != 0 && rc == 0)
      rc = lma_fail(errno, "unregister %zu bytes at %p: %s", a->len, (void *)a->addr, strerror(errno));
    a->registered = 0;
  }
  close_fd(&a->uffd);
  return rc;
}

/* Creates the uffd for the role, negotiates its features and registers the region. */
static int arm(livemig_attach *a) {
  const uint64_t want = a->role == LIVEMIG_ATTACH_SOURCE ? SOURCE_FEATURES : DESTINATION_FEATURES;
  if (a->role == LIVEMIG_ATTACH_DESTINATION) {
    /* Empty: no page at all when the region is the whole file (st_blocks also counts fallocated
     * pages, which SEEK_DATA calls holes); else no data inside the region. */
    struct stat st;
    if (fstat(a->memfd, &st) != 0) return lma_fail(errno, "fstat of the memfd: %s", strerror(errno));
    const int whole = a->memfd_offset == 0 && (uint64_t)st.st_size <= a->len;
    const off_t data = whole ? 0 : lseek(a->memfd, (off_t)a->memfd_offset, SEEK_DATA);
    if (whole ? st.st_blocks != 0 : (data >= 0 && (uint64_t)data < a->memfd_offset + a->len))
      return lma_fail(EINVAL,
                      "the destination memfd already holds data in the region: a destination starts with empty "
                      "memory that only livemig fills");
  }
  int fd = open_uffd();
  if (fd < 0) return fd;
  struct uffdio_api api = {.api = UFFD_API, .features = want};
  /* UFFDIO_API: enable exactly the features this role needs (fails when the kernel lacks one). */
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    int err = errno;
    close(fd);
    uint64_t have = supported_features();
    return lma_fail(err == EINVAL ? EOPNOTSUPP : err,
                    "userfaultfd features 0x%llx for a %s: %s (the kernel supports 0x%llx; a source needs "
                    "WP_ASYNC, WP_UNPOPULATED and WP_HUGETLBFS_SHMEM, Linux 6.7; a destination MISSING_SHMEM)",
                    (unsigned long long)want, role_name(a->role), strerror(err), (unsigned long long)have);
  }
  struct uffdio_register reg = {
      .range = {.start = (uintptr_t)a->addr, .len = a->len},
      .mode = a->role == LIVEMIG_ATTACH_SOURCE ? UFFDIO_REGISTER_MODE_WP : UFFDIO_REGISTER_MODE_MISSING};
  /* UFFDIO_REGISTER: write faults (source, resolved by the kernel: WP_ASYNC) or missing-page
   * faults (destination, served by livemig through this fd) of the region come to this uffd. */
  if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
    int err = errno;
    close(fd);
    return lma_fail(err, "register %zu bytes at %p in %s mode: %s (the region must be a MAP_SHARED memfd mapping)",
                    a->len, (void *)a->addr, a->role == LIVEMIG_ATTACH_SOURCE ? "write-protect" : "missing",
                    strerror(err));
  }
  a->uffd = fd;
  a->registered = 1;
  a->uffd_features = want; /* UFFDIO_API writes back every feature the kernel has, not those enabled */
  return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Sending                                                                                        */

/* Sends one message under mu (so it never interleaves with a hints batch). */
static int send_msg(livemig_attach *a, uint16_t type, uint32_t tag, const struct iovec *parts, int nparts) {
  pthread_mutex_lock(&a->mu);
  int rc = a->sock < 0 ? lma_fail(ENOTCONN, "send %s: not attached", livemig_attach_type_name(type))
                       : lma_send(a->sock, a->version, type, tag, parts, nparts, NULL, 0, 0,
                                  lma_now_ms() + a->io_timeout_ms);
  pthread_mutex_unlock(&a->mu);
  return rc;
}

/* REPLY to request `type` with `tag`: status 0 or a positive errno, a line of text, a payload. */
static int send_reply(livemig_attach *a, uint16_t type, uint32_t tag, int status, const char *text,
                      const void *payload, size_t payload_len) {
  uint8_t fixed[LIVEMIG_ATTACH_REPLY_FIXED] = {0};
  size_t tlen = text != NULL ? strnlen(text, LIVEMIG_ATTACH_MAX_REPLY_TEXT) : 0;
  lma_put16(fixed, type);
  lma_put32(fixed + 4, (uint32_t)status);
  lma_put32(fixed + 8, (uint32_t)tlen);
  struct iovec parts[3] = {{fixed, sizeof fixed}, {(void *)text, tlen}, {(void *)payload, payload_len}};
  return send_msg(a, LIVEMIG_ATTACH_MSG_REPLY, tag, parts, 3);
}

/* ERROR, best effort, bounded by a short deadline: the connection ends after it anyway. */
static void send_error(livemig_attach *a, uint32_t code, const char *text) {
  uint8_t fixed[LIVEMIG_ATTACH_ERROR_FIXED] = {0};
  size_t tlen = strnlen(text, LIVEMIG_ATTACH_MAX_ERROR_TEXT);
  lma_put32(fixed, code);
  struct iovec parts[2] = {{fixed, sizeof fixed}, {(void *)text, tlen}};
  pthread_mutex_lock(&a->mu);
  if (a->sock >= 0)
    (void)lma_send(a->sock, a->version ? a->version : LIVEMIG_ATTACH_VERSION, LIVEMIG_ATTACH_MSG_ERROR, 0, parts,
                   2, NULL, 0, 0, lma_now_ms() + 200);
  pthread_mutex_unlock(&a->mu);
}

/* ---------------------------------------------------------------------------------------------- */
/* The end of an attachment                                                                       */

/* The attachment ended (`err` 0: a clean DETACH). Closes the socket and gives the workload back its
 * memory as docs/attach.md "When a side dies" says, then tells the host. */
static void lost(livemig_attach *a, int err, const char *why) {
  char text[600];
  snprintf(text, sizeof text, "%s", why);
  pthread_mutex_lock(&a->mu);
  if (a->sock >= 0) {
    shutdown(a->sock, SHUT_RDWR);
    close_fd(&a->sock);
  }
  const int had_hints = (a->caps & LIVEMIG_ATTACH_CAP_HINTS) != 0;
  const int give_done = had_hints && a->cmd_id != LIVEMIG_ATTACH_CMD_DONE;
  a->cmd_id = LIVEMIG_ATTACH_CMD_DONE;
  pthread_mutex_unlock(&a->mu);

  struct livemig_attach_lost info;
  memset(&info, 0, sizeof info);
  info.role = a->role;
  info.error = err;
  info.why = text;
  a->lease_deadline_ms = 0;
  if (a->role == LIVEMIG_ATTACH_SOURCE) {
    if (disarm(a) != 0) {
      size_t n = strlen(text);
      snprintf(text + n, sizeof text - n, "; restoring memory: %s", lma_last_error());
    }
    /* A migration that failed before the workload could run elsewhere: run here again (rule 8). */
    if (a->paused && !a->handed_off && a->ops != NULL && a->ops->resume != NULL) {
      if (a->ops->resume(a->user) == 0) {
        a->paused = 0;
        info.resumed = 1;
      }
    }
    info.handed_off = a->handed_off;
  } else {
    if (!a->complete) {
      /* Never resumed: the memory is incomplete and unused; hand it back as ordinary memory (the host
       * must not run it). Resumed: missing pages exist only on the source; never zero-fill them. */
      if (!a->ever_resumed) (void)disarm(a);
      info.missing_pages = missing_pages(a);
    }
    /* A destination that ran is the live copy (its source handed off): it runs on if paused. */
    if (a->ever_resumed && a->paused && a->ops != NULL && a->ops->resume != NULL && a->ops->resume(a->user) == 0) {
      a->paused = 0;
      info.resumed = 1;
    }
    info.complete = a->complete;
    info.registered = a->registered;
  }
  info.paused = a->paused;
  if (give_done && a->ops != NULL && a->ops->balloon != NULL) a->ops->balloon(a->user, LIVEMIG_ATTACH_CMD_DONE);
  if (a->ops != NULL && a->ops->lost != NULL) a->ops->lost(a->user, &info);
}

/* A malformed or unexpected message: ERROR to livemig, then the end of the attachment. */
static int protocol_error(livemig_attach *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int protocol_error(livemig_attach *a, const char *fmt, ...) {
  char text[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  send_error(a, LIVEMIG_ATTACH_ERR_PROTOCOL, text);
  char why[600];
  snprintf(why, sizeof why, "protocol error: %s", text);
  lost(a, EPROTO, why);
  return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Serving                                                                                        */

/* Receives one message whose first byte is available: header checks, then the body into *body
 * (malloc()ed when longer than `small`). 1 and the message, 0 when the attachment ended. */
static int receive(livemig_attach *a, struct lma_header *h, uint8_t *small, size_t small_len, uint8_t **body) {
  uint8_t hb[LIVEMIG_ATTACH_HEADER_SIZE];
  size_t got = 0;
  const int64_t deadline = lma_now_ms() + a->io_timeout_ms;
  int rc = lma_read_full(a->sock, hb, sizeof hb, deadline, &got);
  if (rc != 0) {
    char why[600];
    if (rc == -ECONNRESET && got == 0)
      snprintf(why, sizeof why, "livemig closed the connection");
    else
      snprintf(why, sizeof why, "reading a message header: %s", lma_last_error());
    lost(a, rc == -ECONNRESET || rc == -ETIMEDOUT ? -rc : EIO, why);
    return 0;
  }
  lma_decode_header(hb, h);
  if (h->magic != LIVEMIG_ATTACH_MAGIC) return protocol_error(a, "bad magic 0x%08x", h->magic);
  if (h->version != a->version)
    return protocol_error(a, "protocol version %u in a conversation of version %u", h->version, a->version);
  if (!livemig_attach_known_type(h->type)) return protocol_error(a, "unknown message type %u", h->type);
  switch (h->type) {
    case LIVEMIG_ATTACH_MSG_HELLO:
    case LIVEMIG_ATTACH_MSG_HINTS:
    case LIVEMIG_ATTACH_MSG_RESUMED:
      return protocol_error(a, "%s is sent by the process, not to it", livemig_attach_type_name(h->type));
    default:
      break;
  }
  if (h->length > livemig_attach_max_body(h->type))
    return protocol_error(a, "%s with a %u-byte body (at most %u)", livemig_attach_type_name(h->type), h->length,
                          livemig_attach_max_body(h->type));
  if (livemig_attach_is_request(h->type) ? h->tag == 0
                                         : (h->tag != 0 && h->type != LIVEMIG_ATTACH_MSG_REPLY))
    return protocol_error(a, "%s with tag %u", livemig_attach_type_name(h->type), h->tag);
  *body = small;
  if (h->length > small_len) {
    *body = malloc(h->length);
    if (*body == NULL) {
      send_error(a, LIVEMIG_ATTACH_ERR_INTERNAL, "out of memory for a message body");
      lost(a, ENOMEM, "out of memory for a message body");
      return 0;
    }
  }
  rc = lma_read_full(a->sock, *body, h->length, deadline, &got);
  if (rc != 0) {
    char why[600];
    snprintf(why, sizeof why, "in the middle of a %s message (%zu of %u body bytes): %s",
             livemig_attach_type_name(h->type), got, h->length, lma_last_error());
    if (*body != small) free(*body);
    *body = NULL;
    lost(a, -rc, why);
    return 0;
  }
  return 1;
}

/* Replies to a request whose callback is missing. */
static int unsupported(livemig_attach *a, const struct lma_header *h) {
  return send_reply(a, h->type, h->tag, EOPNOTSUPP, "the process does not implement this", NULL, 0);
}

/* The end of a request's handling: a failed reply send ends the attachment. */
static int replied(livemig_attach *a, int rc) {
  if (rc == 0) return 1;
  char why[600];
  snprintf(why, sizeof why, "replying to livemig: %s", lma_last_error());
  lost(a, -rc, why);
  return 0;
}

static int handle_pause(livemig_attach *a, const struct lma_header *h, const uint8_t *body) {
  if (h->length != LIVEMIG_ATTACH_PAUSE_SIZE || lma_get32(body + 4) != 0)
    return protocol_error(a, "PAUSE with a %u-byte body or reserved bits set", h->length);
  const uint32_t lease_ms = lma_get32(body);
  if (!a->paused) {
    if (a->ops == NULL || a->ops->pause == NULL) return replied(a, unsupported(a, h));
    int rc = a->ops->pause(a->user);
    if (rc != 0) return replied(a, send_reply(a, h->type, h->tag, -rc, "the workload did not pause", NULL, 0));
    a->paused = 1;
  }
  /* A PAUSE while paused renews (or drops) the lease. A handed-off pause has none, nor has a
   * destination that never ran (it must not start by itself). */
  const int leased = lease_ms != 0 && !a->handed_off && (a->role == LIVEMIG_ATTACH_SOURCE || a->ever_resumed);
  a->lease_deadline_ms = leased ? lma_now_ms() + lease_ms : 0;
  return replied(a, send_reply(a, h->type, h->tag, 0, NULL, NULL, 0));
}

static int handle_resume(livemig_attach *a, const struct lma_header *h) {
  if (h->length != 0) return protocol_error(a, "RESUME with a %u-byte body", h->length);
  if (a->paused) {
    if (a->ops == NULL || a->ops->resume == NULL) return replied(a, unsupported(a, h));
    int rc = a->ops->resume(a->user);
    if (rc != 0) return replied(a, send_reply(a, h->type, h->tag, -rc, "the workload did not resume", NULL, 0));
    a->paused = 0;
    a->handed_off = 0;
    a->ever_resumed = 1;
    a->lease_deadline_ms = 0;
  }
  return replied(a, send_reply(a, h->type, h->tag, 0, NULL, NULL, 0));
}

static int handle_save(livemig_attach *a, const struct lma_header *h) {
  if (h->length != 0) return protocol_error(a, "SAVE_STATE with a %u-byte body", h->length);
  if (!a->paused) return replied(a, send_reply(a, h->type, h->tag, EBUSY, "not paused", NULL, 0));
  /* No save_state: the workload keeps all its state in the region; its device state is empty. */
  if (a->ops == NULL || a->ops->save_state == NULL)
    return replied(a, send_reply(a, h->type, h->tag, 0, NULL, NULL, 0));
  void *state = NULL;
  size_t len = 0;
  int rc = a->ops->save_state(a->user, &state, &len);
  if (rc != 0) {
    free(state);
    return replied(a, send_reply(a, h->type, h->tag, -rc, "the workload could not save its state", NULL, 0));
  }
  if (len > LIVEMIG_ATTACH_MAX_STATE) {
    free(state);
    return replied(a, send_reply(a, h->type, h->tag, EFBIG, "device state past 128 MiB", NULL, 0));
  }
  rc = send_reply(a, h->type, h->tag, 0, NULL, state, len);
  free(state);
  return replied(a, rc);
}

static int handle_load(livemig_attach *a, const struct lma_header *h, const uint8_t *body) {
  if (a->role != LIVEMIG_ATTACH_DESTINATION) return protocol_error(a, "LOAD_STATE sent to a source");
  if (a->ever_resumed)
    return replied(a, send_reply(a, h->type, h->tag, EBUSY, "the workload already runs", NULL, 0));
  if (a->ops == NULL || a->ops->load_state == NULL) /* an empty state needs no loading */
    return replied(a, h->length == 0 ? send_reply(a, h->type, h->tag, 0, NULL, NULL, 0) : unsupported(a, h));
  int rc = a->ops->load_state(a->user, body, h->length);
  return replied(a, send_reply(a, h->type, h->tag, rc != 0 ? -rc : 0,
                               rc != 0 ? "the workload refused the state" : NULL, NULL, 0));
}

static int handle_check(livemig_attach *a, const struct lma_header *h) {
  if (h->length != 0) return protocol_error(a, "CHECK with a %u-byte body", h->length);
  if ((a->caps & LIVEMIG_ATTACH_CAP_CHECK) == 0) return protocol_error(a, "CHECK without the check capability");
  if (a->ops == NULL || a->ops->check == NULL) return replied(a, unsupported(a, h));
  uint64_t items = 0, failures = 0;
  char text[LIVEMIG_ATTACH_MAX_REPLY_TEXT + 1] = {0};
  int rc = a->ops->check(a->user, &items, &failures, text, sizeof text);
  if (rc != 0) return replied(a, send_reply(a, h->type, h->tag, -rc, text[0] ? text : "the check did not run", NULL, 0));
  uint8_t result[LIVEMIG_ATTACH_CHECK_RESULT_SIZE];
  lma_put64(result, items);
  lma_put64(result + 8, failures);
  return replied(a, send_reply(a, h->type, h->tag, 0, text, result, sizeof result));
}

static int handle_balloon(livemig_attach *a, const struct lma_header *h, const uint8_t *body) {
  if ((a->caps & LIVEMIG_ATTACH_CAP_HINTS) == 0) return protocol_error(a, "BALLOON without the hints capability");
  if (h->length != LIVEMIG_ATTACH_BALLOON_SIZE || lma_get32(body + 4) != 0)
    return protocol_error(a, "BALLOON with a %u-byte body or reserved bits set", h->length);
  const uint32_t id = lma_get32(body);
  if (id != LIVEMIG_ATTACH_CMD_STOP && id != LIVEMIG_ATTACH_CMD_DONE && id < LIVEMIG_ATTACH_MIN_ROUND_ID)
    return protocol_error(a, "BALLOON command id %u is neither STOP, DONE nor a round id", id);
  pthread_mutex_lock(&a->mu);
  const int changed = a->cmd_id != id;
  a->cmd_id = id;
  pthread_mutex_unlock(&a->mu);
  if (changed && a->ops != NULL && a->ops->balloon != NULL) a->ops->balloon(a->user, id);
  return 1;
}

static int handle_handoff(livemig_attach *a, const struct lma_header *h) {
  if (h->length != 0) return protocol_error(a, "HANDOFF with a %u-byte body", h->length);
  if (a->role != LIVEMIG_ATTACH_SOURCE) return protocol_error(a, "HANDOFF sent to a destination");
  if (!a->paused) return replied(a, send_reply(a, h->type, h->tag, EINVAL, "not paused", NULL, 0));
  a->handed_off = 1;
  a->lease_deadline_ms = 0;
  return replied(a, send_reply(a, h->type, h->tag, 0, NULL, NULL, 0));
}

static int handle_complete(livemig_attach *a, const struct lma_header *h) {
  if (h->length != 0) return protocol_error(a, "COMPLETE with a %u-byte body", h->length);
  if (a->role != LIVEMIG_ATTACH_DESTINATION) return protocol_error(a, "COMPLETE sent to a source");
  if (!a->complete) {
    if (disarm(a) != 0) return replied(a, send_reply(a, h->type, h->tag, EIO, lma_last_error(), NULL, 0));
    a->complete = 1;
  }
  return replied(a, send_reply(a, h->type, h->tag, 0, NULL, NULL, 0));
}

/* Serves one message whose first byte is available. 1: still attached; 0: the attachment ended. */
static int serve_one(livemig_attach *a) {
  struct lma_header h;
  uint8_t small[256];
  uint8_t *body = NULL;
  if (!receive(a, &h, small, sizeof small, &body)) return 0;
  int r;
  switch (h.type) {
    case LIVEMIG_ATTACH_MSG_PAUSE: r = handle_pause(a, &h, body); break;
    case LIVEMIG_ATTACH_MSG_RESUME: r = handle_resume(a, &h); break;
    case LIVEMIG_ATTACH_MSG_SAVE_STATE: r = handle_save(a, &h); break;
    case LIVEMIG_ATTACH_MSG_LOAD_STATE: r = handle_load(a, &h, body); break;
    case LIVEMIG_ATTACH_MSG_CHECK: r = handle_check(a, &h); break;
    case LIVEMIG_ATTACH_MSG_BALLOON: r = handle_balloon(a, &h, body); break;
    case LIVEMIG_ATTACH_MSG_HANDOFF: r = handle_handoff(a, &h); break;
    case LIVEMIG_ATTACH_MSG_COMPLETE: r = handle_complete(a, &h); break;
    case LIVEMIG_ATTACH_MSG_DETACH:
      if (h.length != 0) {
        r = protocol_error(a, "DETACH with a %u-byte body", h.length);
        break;
      }
      (void)send_reply(a, h.type, h.tag, 0, NULL, NULL, 0);
      lost(a, 0, "livemig detached");
      r = 0;
      break;
    case LIVEMIG_ATTACH_MSG_ERROR: {
      char why[LIVEMIG_ATTACH_MAX_ERROR_TEXT + 64];
      uint32_t code = h.length >= LIVEMIG_ATTACH_ERROR_FIXED ? lma_get32(body) : 0;
      int tlen = h.length >= LIVEMIG_ATTACH_ERROR_FIXED ? (int)(h.length - LIVEMIG_ATTACH_ERROR_FIXED) : 0;
      snprintf(why, sizeof why, "livemig reported error %u: %.*s", code, tlen, (const char *)body + 8);
      lost(a, code == LIVEMIG_ATTACH_ERR_TIMEOUT ? ETIMEDOUT : code == LIVEMIG_ATTACH_ERR_PROTOCOL ? EPROTO : ECONNABORTED,
           why);
      r = 0;
      break;
    }
    default: /* WELCOME, or a REPLY to nothing this process asked */
      r = protocol_error(a, "unexpected %s (tag %u)", livemig_attach_type_name(h.type), h.tag);
      break;
  }
  if (body != small) free(body);
  return r;
}

/* A pause whose lease expired without a HANDOFF: the process resumes itself and says so. */
static int check_lease(livemig_attach *a) {
  if (!a->paused || a->lease_deadline_ms == 0 || lma_now_ms() < a->lease_deadline_ms) return 1;
  a->lease_deadline_ms = 0;
  if (a->ops == NULL || a->ops->resume == NULL || a->ops->resume(a->user) != 0) return 1;
  a->paused = 0;
  if (a->role == LIVEMIG_ATTACH_DESTINATION) a->ever_resumed = 1;
  int rc = send_msg(a, LIVEMIG_ATTACH_MSG_RESUMED, 0, NULL, 0);
  return replied(a, rc);
}

static int next_timeout_ms(const livemig_attach *a) {
  if (!a->paused || a->lease_deadline_ms == 0) return -1;
  int64_t left = a->lease_deadline_ms - lma_now_ms();
  return left < 0 ? 0 : (left > INT_MAX ? INT_MAX : (int)left);
}

static void *serve_thread(void *arg) {
  livemig_attach *a = arg;
  for (;;) {
    struct pollfd p[2] = {{.fd = a->sock, .events = POLLIN, .revents = 0},
                          {.fd = a->stop_fd, .events = POLLIN, .revents = 0}};
    int n = poll(p, 2, next_timeout_ms(a));
    if (atomic_load(&a->stopping)) break;
    if (n < 0 && errno != EINTR) {
      char why[128];
      snprintf(why, sizeof why, "poll: %s", strerror(errno));
      lost(a, errno, why);
      break;
    }
    if (!check_lease(a)) break;
    if (n > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR)) && !serve_one(a)) break;
  }
  return NULL;
}

/* Stops and joins the serving thread (if one was started). */
static void join_thread(livemig_attach *a) {
  if (a->thread_joinable) {
    atomic_store(&a->stopping, 1);
    uint64_t one = 1;
    if (write(a->stop_fd, &one, sizeof one) < 0) { /* the eventfd cannot be full: nothing to do */
    }
    pthread_join(a->thread, NULL);
    a->thread_joinable = 0;
  }
  close_fd(&a->stop_fd);
  atomic_store(&a->stopping, 0);
  a->serving = SERVING_NONE;
}

int livemig_attach_start(livemig_attach *a) {
  if (a->sock < 0) return lma_fail(ENOTCONN, "start: not attached");
  if (a->serving != SERVING_NONE) return lma_fail(EBUSY, "start: already served");
  a->stop_fd = eventfd(0, EFD_CLOEXEC);
  if (a->stop_fd < 0) return lma_fail(errno, "start: eventfd: %s", strerror(errno));
  int rc = pthread_create(&a->thread, NULL, serve_thread, a);
  if (rc != 0) {
    close_fd(&a->stop_fd);
    return lma_fail(rc, "start: pthread_create: %s", strerror(rc));
  }
  a->thread_joinable = 1;
  a->serving = SERVING_THREAD;
  return 0;
}

int livemig_attach_fd(const livemig_attach *a) { return a->sock; }
int livemig_attach_timeout_ms(const livemig_attach *a) { return next_timeout_ms(a); }

int livemig_attach_dispatch(livemig_attach *a, int timeout_ms) {
  if (a->serving == SERVING_THREAD) return lma_fail(EBUSY, "dispatch: a serving thread runs");
  if (a->sock < 0) return 0;
  a->serving = SERVING_DISPATCH;
  int lease = next_timeout_ms(a);
  if (lease >= 0 && (timeout_ms < 0 || lease < timeout_ms)) timeout_ms = lease;
  for (int wait_ms = timeout_ms;; wait_ms = 0) {
    struct pollfd p = {.fd = a->sock, .events = POLLIN, .revents = 0};
    int n = poll(&p, 1, wait_ms);
    if (n < 0 && errno != EINTR) {
      char why[128];
      snprintf(why, sizeof why, "poll: %s", strerror(errno));
      lost(a, errno, why);
      return 0;
    }
    if (!check_lease(a)) return 0;
    if (n <= 0) return 1;
    if (!serve_one(a)) return 0;
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Attaching                                                                                      */

/* Waits for livemig's answer to HELLO: WELCOME (1) or a refusal / failure (negative). */
static int await_welcome(livemig_attach *a, int sock, int64_t deadline) {
  uint8_t hb[LIVEMIG_ATTACH_HEADER_SIZE];
  size_t got = 0;
  int rc = lma_read_full(sock, hb, sizeof hb, deadline, &got);
  if (rc == -ECONNRESET && got == 0) return lma_fail(ECONNREFUSED, "livemig closed the connection after HELLO");
  if (rc == -ETIMEDOUT) return lma_fail(ETIMEDOUT, "no answer to HELLO within %d ms", a->io_timeout_ms);
  if (rc != 0) return rc;
  struct lma_header h;
  lma_decode_header(hb, &h);
  if (h.magic != LIVEMIG_ATTACH_MAGIC) return lma_fail(EPROTO, "answer to HELLO: bad magic 0x%08x", h.magic);
  if (h.type == LIVEMIG_ATTACH_MSG_ERROR && h.length >= LIVEMIG_ATTACH_ERROR_FIXED &&
      h.length <= livemig_attach_max_body(LIVEMIG_ATTACH_MSG_ERROR)) {
    uint8_t body[LIVEMIG_ATTACH_ERROR_FIXED + LIVEMIG_ATTACH_MAX_ERROR_TEXT];
    rc = lma_read_full(sock, body, h.length, deadline, &got);
    if (rc != 0) return lma_fail(ECONNREFUSED, "livemig refused the attachment (its reason was cut off)");
    return lma_fail(ECONNREFUSED, "livemig refused the attachment (error %u): %.*s", lma_get32(body),
                    (int)(h.length - LIVEMIG_ATTACH_ERROR_FIXED), (const char *)body + LIVEMIG_ATTACH_ERROR_FIXED);
  }
  if (h.type != LIVEMIG_ATTACH_MSG_WELCOME || h.length != LIVEMIG_ATTACH_WELCOME_SIZE || h.tag != 0)
    return lma_fail(EPROTO, "answer to HELLO: %s with %u bytes, not WELCOME", livemig_attach_type_name(h.type),
                    h.length);
  if (h.version != LIVEMIG_ATTACH_VERSION)
    return lma_fail(EPROTO, "livemig chose protocol version %u; this library speaks %d", h.version,
                    LIVEMIG_ATTACH_VERSION);
  uint8_t body[LIVEMIG_ATTACH_WELCOME_SIZE];
  rc = lma_read_full(sock, body, sizeof body, deadline, &got);
  if (rc != 0) return rc;
  const uint64_t caps = lma_get64(body);
  if ((caps & ~a->offered_caps) != 0 || lma_get64(body + 8) != 0)
    return lma_fail(EPROTO, "WELCOME names capabilities 0x%llx beyond the offered 0x%llx, or reserved bits",
                    (unsigned long long)caps, (unsigned long long)a->offered_caps);
  pthread_mutex_lock(&a->mu);
  a->caps = caps;
  a->version = h.version;
  pthread_mutex_unlock(&a->mu);
  return 1;
}

int livemig_attach_connect_fd(livemig_attach *a, int sock) {
  if (sock < 0) return lma_fail(EBADF, "connect: no socket");
  if (a->sock >= 0) {
    close(sock);
    return lma_fail(EISCONN, "connect: already attached");
  }
  join_thread(a); /* a serving thread that ended with the last attachment */
  if (a->role == LIVEMIG_ATTACH_DESTINATION && a->registered) {
    close(sock);
    return lma_fail(EBUSY, "connect: this destination ran with pages missing; release it first");
  }
  int fl = fcntl(sock, F_GETFL);
  if (fl < 0 || fcntl(sock, F_SETFL, fl | O_NONBLOCK) != 0 || fcntl(sock, F_SETFD, FD_CLOEXEC) != 0) {
    int err = errno;
    close(sock);
    return lma_fail(err, "connect: setting the socket non-blocking: %s", strerror(err));
  }
  int rc = arm(a);
  if (rc != 0) {
    close(sock);
    return rc;
  }
  int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pagemap < 0) {
    int err = errno;
    (void)disarm(a);
    close(sock);
    return lma_fail(err, "connect: open /proc/self/pagemap: %s", strerror(err));
  }

  uint8_t hello[LIVEMIG_ATTACH_HELLO_FIXED] = {0};
  const size_t name_len = strlen(a->name);
  lma_put16(hello, LIVEMIG_ATTACH_VERSION); /* the lowest version this library speaks */
  hello[2] = (uint8_t)a->role;
  hello[3] = LIVEMIG_ATTACH_HELLO_FDS;
  lma_put32(hello + 4, (uint32_t)a->page_size);
  lma_put64(hello + 8, (uintptr_t)a->addr);
  lma_put64(hello + 16, a->len);
  lma_put64(hello + 24, a->memfd_offset);
  lma_put64(hello + 32, a->offered_caps);
  lma_put64(hello + 40, a->uffd_features);
  lma_put32(hello + 48, a->poison);
  lma_put16(hello + 52, (uint16_t)name_len);
  struct iovec parts[2] = {{hello, sizeof hello}, {a->name, name_len}};
  const int fds[LIVEMIG_ATTACH_HELLO_FDS] = {a->memfd, a->uffd, pagemap};
  const int64_t deadline = lma_now_ms() + a->io_timeout_ms;
  rc = lma_send(sock, LIVEMIG_ATTACH_VERSION, LIVEMIG_ATTACH_MSG_HELLO, 0, parts, 2, fds, LIVEMIG_ATTACH_HELLO_FDS, 1,
                deadline);
  close(pagemap); /* livemig holds its own copy now (or never will) */
  if (rc == 0) rc = await_welcome(a, sock, deadline);
  if (rc < 0) {
    char saved[512];
    snprintf(saved, sizeof saved, "%s", lma_last_error());
    (void)disarm(a);
    close(sock);
    return lma_fail(-rc, "%s", saved);
  }
  pthread_mutex_lock(&a->mu);
  a->sock = sock;
  a->cmd_id = LIVEMIG_ATTACH_CMD_STOP;
  pthread_mutex_unlock(&a->mu);
  a->paused = a->role == LIVEMIG_ATTACH_DESTINATION;
  a->ever_resumed = 0;
  a->handed_off = 0;
  a->complete = 0;
  a->lease_deadline_ms = 0;
  a->next_tag = 1;
  return 0;
}

int livemig_attach_connect(livemig_attach *a, const char *path) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (path == NULL || strlen(path) >= sizeof addr.sun_path)
    return lma_fail(EINVAL, "connect: socket path missing or longer than %zu bytes", sizeof addr.sun_path - 1);
  memcpy(addr.sun_path, path, strlen(path) + 1);
  int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0) return lma_fail(errno, "connect: socket: %s", strerror(errno));
  if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
    int err = errno;
    close(sock);
    return lma_fail(err, "connect to %s: %s", path, strerror(err));
  }
  return livemig_attach_connect_fd(a, sock);
}

/* ---------------------------------------------------------------------------------------------- */
/* Hints, detach, release, destroy                                                                */

int livemig_attach_hints(livemig_attach *a, uint32_t cmd_id, unsigned flags, const struct livemig_attach_range *ranges,
                         size_t n) {
  if ((flags & ~(LIVEMIG_ATTACH_HINT_START | LIVEMIG_ATTACH_HINT_STOP)) != 0)
    return lma_fail(EINVAL, "hints: unknown flags 0x%x", flags);
  const uint64_t pages = a->len / a->page_size;
  for (size_t i = 0; i < n; ++i)
    if (ranges[i].npages == 0 || ranges[i].first >= pages || ranges[i].npages > pages - ranges[i].first)
      return lma_fail(EINVAL, "hints: range %zu (%llu + %llu pages) is empty or past the region's %llu pages", i,
                      (unsigned long long)ranges[i].first, (unsigned long long)ranges[i].npages,
                      (unsigned long long)pages);
  pthread_mutex_lock(&a->mu);
  int rc = 0;
  if (a->sock < 0)
    rc = lma_fail(ENOTCONN, "hints: not attached");
  else if ((a->caps & LIVEMIG_ATTACH_CAP_HINTS) == 0)
    rc = lma_fail(EOPNOTSUPP, "hints: the hints capability was not negotiated");
  else if (cmd_id != a->cmd_id || cmd_id < LIVEMIG_ATTACH_MIN_ROUND_ID)
    rc = lma_fail(ESTALE, "hints: round 0x%x is not the one livemig shows (0x%x)", cmd_id, a->cmd_id);
  const int64_t deadline = lma_now_ms() + a->io_timeout_ms;
  size_t done = 0;
  int first = 1;
  while (rc == 0 && (done < n || first)) {
    size_t count = n - done;
    if (count > LIVEMIG_ATTACH_MAX_HINT_RANGES) count = LIVEMIG_ATTACH_MAX_HINT_RANGES;
    const int last = done + count == n;
    if (count == 0 && flags == 0) break; /* nothing to say */
    unsigned f = (first ? (flags & LIVEMIG_ATTACH_HINT_START) : 0U) | (last ? (flags & LIVEMIG_ATTACH_HINT_STOP) : 0U);
    uint8_t fixed[LIVEMIG_ATTACH_HINTS_FIXED] = {0};
    lma_put32(fixed, cmd_id);
    lma_put32(fixed + 4, f);
    lma_put32(fixed + 8, (uint32_t)count);
    uint8_t buf[16 * 256]; /* small batches need no allocation */
    uint8_t *enc = count <= 256 ? buf : malloc(16 * count);
    if (enc == NULL) {
      rc = lma_fail(ENOMEM, "hints: out of memory");
      break;
    }
    for (size_t i = 0; i < count; ++i) {
      lma_put64(enc + 16 * i, ranges[done + i].first);
      lma_put64(enc + 16 * i + 8, ranges[done + i].npages);
    }
    struct iovec parts[2] = {{fixed, sizeof fixed}, {enc, 16 * count}};
    rc = lma_send(a->sock, a->version, LIVEMIG_ATTACH_MSG_HINTS, 0, parts, 2, NULL, 0, 0, deadline);
    if (enc != buf) free(enc);
    done += count;
    first = 0;
  }
  pthread_mutex_unlock(&a->mu);
  return rc;
}

int livemig_attach_detach(livemig_attach *a) {
  join_thread(a);
  if (a->sock < 0) return 0;
  const uint32_t tag = a->next_tag++;
  int rc = send_msg(a, LIVEMIG_ATTACH_MSG_DETACH, tag, NULL, 0);
  const int64_t deadline = lma_now_ms() + a->io_timeout_ms;
  /* Wait for the REPLY with our tag; anything livemig sent before it is dropped (it sees DETACH). */
  while (rc == 0) {
    uint8_t hb[LIVEMIG_ATTACH_HEADER_SIZE];
    size_t got = 0;
    rc = lma_read_full(a->sock, hb, sizeof hb, deadline, &got);
    if (rc != 0) break;
    struct lma_header h;
    lma_decode_header(hb, &h);
    if (h.magic != LIVEMIG_ATTACH_MAGIC || h.length > livemig_attach_max_body(h.type)) {
      rc = lma_fail(EPROTO, "detach: a malformed message while waiting for the reply");
      break;
    }
    uint8_t *skip = malloc(h.length ? h.length : 1);
    if (skip == NULL) {
      rc = lma_fail(ENOMEM, "detach: out of memory");
      break;
    }
    rc = lma_read_full(a->sock, skip, h.length, deadline, &got);
    free(skip);
    if (rc == 0 && h.type == LIVEMIG_ATTACH_MSG_REPLY && h.tag == tag) break;
    if (rc == 0 && h.type == LIVEMIG_ATTACH_MSG_ERROR) rc = lma_fail(ECONNABORTED, "detach: livemig sent ERROR");
  }
  char why[600];
  snprintf(why, sizeof why, "detached by the process%s%s", rc == 0 ? "" : " (", rc == 0 ? "" : lma_last_error());
  if (rc != 0) strncat(why, ")", sizeof why - strlen(why) - 1);
  lost(a, 0, why);
  a->serving = SERVING_NONE;
  return rc;
}

int livemig_attach_become_source(livemig_attach *a) {
  if (a->sock >= 0) return lma_fail(EISCONN, "become_source: still attached");
  if (a->role != LIVEMIG_ATTACH_DESTINATION || !a->complete)
    return lma_fail(EINVAL, "become_source: only a destination whose memory arrived whole can be migrated on");
  join_thread(a);
  a->role = LIVEMIG_ATTACH_SOURCE;
  a->paused = 0;
  a->ever_resumed = 0;
  a->complete = 0;
  return 0;
}

int livemig_attach_release(livemig_attach *a) {
  if (a->sock >= 0) return lma_fail(EISCONN, "release: still attached");
  join_thread(a);
  int rc = disarm(a);
  if (a->role == LIVEMIG_ATTACH_DESTINATION) {
    a->ever_resumed = 0;
    a->complete = 0;
  }
  return rc;
}

void livemig_attach_destroy(livemig_attach *a) {
  if (a == NULL) return;
  (void)livemig_attach_detach(a);
  join_thread(a);
  (void)disarm(a);
  if (a->own_map && a->addr != NULL) munmap(a->addr, a->len);
  if (a->own_memfd) close_fd(&a->memfd);
  pthread_mutex_destroy(&a->mu);
  free(a);
}
