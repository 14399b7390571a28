/* livemig_attach: the workload-process side of livemig's attach protocol (docs/attach.md).
 *
 * A process that keeps its memory in a memfd (a VMM's guest RAM, a service's shared state) hands
 * livemig three descriptors over a Unix socket and answers a small control conversation; livemig
 * then migrates that memory (precopy, postcopy, free page hints) while the process keeps running.
 *
 *   struct livemig_attach_config cfg;
 *   livemig_attach_config_init(&cfg);
 *   cfg.role = LIVEMIG_ATTACH_SOURCE; cfg.len = 1 << 30; cfg.ops = &my_ops; cfg.user = vm;
 *   livemig_attach *a;
 *   if (livemig_attach_create(&cfg, &a) < 0) ...;          // memfd + MAP_SHARED mapping
 *   run_guest_on(livemig_attach_addr(a));
 *   if (livemig_attach_connect(a, "/run/livemig.sock") < 0) // uffd, pagemap, HELLO, WELCOME
 *     fprintf(stderr, "%s\n", livemig_attach_error(a));
 *   livemig_attach_start(a);                                // serves livemig from a library thread
 *   ...
 *   livemig_attach_destroy(a);
 *
 * Conventions: functions return 0 (or a documented non-negative value) on success and a negative
 * errno value on failure, with a message in livemig_attach_error() (per thread). Callbacks return 0 or a
 * negative errno value. Every wait on livemig is bounded by the configured I/O timeout, except the
 * idle wait for livemig's next request. Ownership of every descriptor is stated where it is passed;
 * the library never closes a descriptor it does not own. Build: `#include <livemig_attach.h>`,
 * link with `-llivemig_attach` (pkg-config: livemig_attach).
 */
#ifndef LIVEMIG_ATTACH_H
#define LIVEMIG_ATTACH_H

#include <stddef.h>
#include <stdint.h>

#include "livemig_attach_protocol.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define LIVEMIG_ATTACH_API __attribute__((visibility("default")))
#else
#define LIVEMIG_ATTACH_API
#endif

/* One attachment: a memory region, its descriptors and the conversation with livemig. */
typedef struct livemig_attach livemig_attach;

enum livemig_attach_role {
  LIVEMIG_ATTACH_SOURCE = LIVEMIG_ATTACH_ROLE_SOURCE,          /* memory livemig migrates away */
  LIVEMIG_ATTACH_DESTINATION = LIVEMIG_ATTACH_ROLE_DESTINATION /* empty memory livemig fills */
};

/* Pages [first, first + npages) of the region (page indices, not addresses). */
struct livemig_attach_range {
  uint64_t first;
  uint64_t npages;
};

/* What the library did when the attachment ended (ops->lost). */
struct livemig_attach_lost {
  int role;               /* LIVEMIG_ATTACH_SOURCE or LIVEMIG_ATTACH_DESTINATION */
  int error;              /* 0: a clean DETACH; else a positive errno (ECONNRESET, EPROTO, ETIMEDOUT) */
  const char *why;        /* what happened, for logs (valid during the callback) */
  int paused;             /* the workload is paused now */
  int handed_off;         /* source: livemig said the workload may run elsewhere: it stays paused */
  int resumed;            /* source: the library called ops->resume because the migration failed */
  int complete;           /* destination: every page had arrived (the memory is ordinary) */
  int registered;         /* destination: memory still registered; threads on missing pages wait */
  uint64_t missing_pages; /* destination, not complete: pages of the region not in the memfd */
};

/* What livemig asks of the workload. Called from the thread that serves the conversation (the
 * library's thread after livemig_attach_start, or the caller of livemig_attach_dispatch), one call
 * at a time. A null callback: pause/resume/check answer "not supported" (EOPNOTSUPP); a null
 * save_state saves an empty device state and a null load_state accepts only an empty one (a
 * workload whose whole state is in its region needs neither); balloon and lost are skipped. Each
 * must return within the pause/I/O bounds the host chose. */
struct livemig_attach_ops {
  /* Parks every thread that writes the region; returns once all are parked (0) or gives up within
   * a bounded time (negative errno, the workload left running). Called only when running. */
  int (*pause)(void *user);
  /* Lets the parked (or never started, on a destination) threads run. Called only when paused. */
  int (*resume)(void *user);
  /* The workload's device state, called paused: stores a malloc()ed buffer (the library free()s
   * it) of at most LIVEMIG_ATTACH_MAX_STATE bytes in *state and its size in *len. */
  int (*save_state)(void *user, void **state, size_t *len);
  /* Loads a device state (destination, before the first resume); `state` is valid during the call. */
  int (*load_state)(void *user, const void *state, size_t len);
  /* The balloon command id changed (capability hints): a round id (>= 0x80000000) starts a round
   * (answer with livemig_attach_hints), LIVEMIG_ATTACH_CMD_STOP, or LIVEMIG_ATTACH_CMD_DONE (free
   * every hinted page). Must not block; the driver acts on it from its own thread. */
  void (*balloon)(void *user, uint32_t cmd_id);
  /* Verifies the workload's memory (capability check): stores what was checked and how many
   * failed, and a line of text; returns 0 when the check ran (whatever it found). */
  int (*check)(void *user, uint64_t *items, uint64_t *failures, char *text, size_t text_size);
  /* The attachment ended (livemig detached, died, or broke the protocol) and the library has
   * restored what it could (see struct livemig_attach_lost and docs/attach.md). */
  void (*lost)(void *user, const struct livemig_attach_lost *info);
};

struct livemig_attach_config {
  size_t struct_size;     /* sizeof(struct livemig_attach_config): set by livemig_attach_config_init */
  int role;               /* enum livemig_attach_role */
  size_t len;             /* region bytes: a positive multiple of the page size */
  const char *name;       /* the memfd's name and the process's name in livemig's reports (<= 255 bytes) */
  int memfd;              /* -1: the library creates the memfd and mapping and owns both; else the
                             caller's memfd (not owned) whose MAP_SHARED mapping is at `addr` */
  void *addr;             /* with memfd >= 0: the caller's mapping of [memfd_offset, + len) */
  uint64_t memfd_offset;  /* with memfd >= 0: the region's offset in the memfd (page aligned) */
  uint64_t capabilities;  /* LIVEMIG_ATTACH_CAP_*: what the workload implements */
  uint32_t poison;        /* the value hinted pages may be filled with on the destination (0: none) */
  int io_timeout_ms;      /* bound on each message exchange and on the handshake; 0: 5000 */
  const struct livemig_attach_ops *ops; /* not copied: must outlive the attachment */
  void *user;             /* passed to every callback */
};

/* Fills `cfg` with defaults: memfd -1, role source, timeout 5000 ms, everything else 0. */
LIVEMIG_ATTACH_API void livemig_attach_config_init(struct livemig_attach_config *cfg);

/* Makes the region: a new memfd of cfg->len bytes mapped MAP_SHARED (or the caller's mapping),
 * not yet registered with userfaultfd and not connected. A source may use the memory at once; a
 * destination must not touch it (livemig refuses a destination memfd that holds data). On success
 * stores the handle in *out; on failure *out is NULL and nothing is left open. */
LIVEMIG_ATTACH_API int livemig_attach_create(const struct livemig_attach_config *cfg, livemig_attach **out);

/* The region's address in this process. */
LIVEMIG_ATTACH_API void *livemig_attach_addr(const livemig_attach *a);
/* The region's length in bytes. */
LIVEMIG_ATTACH_API size_t livemig_attach_len(const livemig_attach *a);
/* The region's page size (the system page size). */
LIVEMIG_ATTACH_API size_t livemig_attach_page_size(const livemig_attach *a);
/* The memfd (owned by the attachment when it created it: do not close). */
LIVEMIG_ATTACH_API int livemig_attach_memfd(const livemig_attach *a);

/* Attaches to livemig listening at the Unix socket `path`: creates the userfaultfd (source:
 * WP_ASYNC + WP_UNPOPULATED + WP_HUGETLBFS_SHMEM, registered write-protect; destination:
 * MISSING_SHMEM, registered missing), opens /proc/self/pagemap, connects, sends HELLO with the
 * three descriptors and waits (bounded) for WELCOME. On failure everything it set up is undone and
 * the error names the step (livemig's refusal text included). Callable again after the attachment
 * ended; -EISCONN while attached. */
LIVEMIG_ATTACH_API int livemig_attach_connect(livemig_attach *a, const char *path);
/* Like livemig_attach_connect over an already connected stream socket `sock`, which the attachment
 * owns from this call on (closed on failure too). */
LIVEMIG_ATTACH_API int livemig_attach_connect_fd(livemig_attach *a, int sock);
/* The capabilities both sides announced (valid after connect). */
LIVEMIG_ATTACH_API uint64_t livemig_attach_capabilities(const livemig_attach *a);

/* Serves the conversation from a library thread until the attachment ends (then ops->lost is
 * called on that thread). -EBUSY when already serving or when dispatch is used. */
LIVEMIG_ATTACH_API int livemig_attach_start(livemig_attach *a);

/* Poll-driven serving instead of livemig_attach_start: the descriptor to poll for POLLIN (the
 * socket), -1 when not attached. */
LIVEMIG_ATTACH_API int livemig_attach_fd(const livemig_attach *a);
/* Milliseconds until dispatch must run even without input (a pause lease), -1 for none. */
LIVEMIG_ATTACH_API int livemig_attach_timeout_ms(const livemig_attach *a);
/* Waits up to timeout_ms (0: not at all, -1: until input) for livemig, serves every whole message
 * that arrived (a message whose first byte arrived is read whole, bounded by the I/O timeout) and
 * an expired pause lease. Returns 1 while attached, 0 once the attachment ended (ops->lost was
 * called), -EBUSY when a serving thread runs. */
LIVEMIG_ATTACH_API int livemig_attach_dispatch(livemig_attach *a, int timeout_ms);

/* Reports free pages for balloon round `cmd_id` (capability hints; any thread): `n` ranges sent as
 * ceil(n / 4096) HINTS messages (at least one when flags are set), START on the first, STOP on the
 * last when asked. -ESTALE when cmd_id is not the round livemig shows (nothing sent: keep the pages
 * until DONE anyway), -EINVAL for an empty range or one past the region, -ENOTCONN when not
 * attached, -EOPNOTSUPP without the capability. */
LIVEMIG_ATTACH_API int livemig_attach_hints(livemig_attach *a, uint32_t cmd_id, unsigned flags,
                                            const struct livemig_attach_range *ranges, size_t n);

/* Ends the attachment politely (DETACH, reply awaited within the I/O timeout), stops the serving
 * thread and restores the memory as on a lost connection (ops->lost is called with error 0). A
 * no-op returning 0 when not attached. Not from a callback. */
LIVEMIG_ATTACH_API int livemig_attach_detach(livemig_attach *a);

/* A destination whose memory arrived whole (COMPLETE) and whose attachment ended becomes a source,
 * so the next livemig_attach_connect offers it for migration again (a chain of migrations). */
LIVEMIG_ATTACH_API int livemig_attach_become_source(livemig_attach *a);

/* Destination whose attachment ended before every page arrived: unregisters the region anyway, so
 * missing pages read as zero from now on (the host accepts losing them). 0 when nothing was
 * registered. */
LIVEMIG_ATTACH_API int livemig_attach_release(livemig_attach *a);

/* Detaches (as livemig_attach_detach), closes every descriptor the attachment owns, unmaps the
 * region it created and frees `a`. NULL is a no-op. Not from a callback. */
LIVEMIG_ATTACH_API void livemig_attach_destroy(livemig_attach *a);

/* The message of the last call on `a` that failed in the calling thread ("" when none); the
 * buffer is the thread's own and stays valid until its next failing call. */
LIVEMIG_ATTACH_API const char *livemig_attach_error(const livemig_attach *a);

/* The library's version, e.g. "0.1.0"; the protocol version is LIVEMIG_ATTACH_VERSION. */
LIVEMIG_ATTACH_API const char *livemig_attach_version(void);

#ifdef __cplusplus
}
#endif

#endif /* LIVEMIG_ATTACH_H */
