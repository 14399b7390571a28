/* The attach protocol's framing for the C library: little-endian fields, whole-message sends (with
 * descriptors and credentials) and bounded reads on a non-blocking stream socket. Private. */
#ifndef LIVEMIG_ATTACH_WIRE_H
#define LIVEMIG_ATTACH_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "livemig_attach_protocol.h"

struct lma_header {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t tag;
  uint32_t length;
};

static inline void lma_put16(uint8_t *p, uint16_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
}
static inline void lma_put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void lma_put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t lma_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t lma_get32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
static inline uint64_t lma_get64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

/* CLOCK_MONOTONIC in milliseconds. */
int64_t lma_now_ms(void);

/* Records the calling thread's error message (printf format) and returns -err (err > 0). */
int lma_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The calling thread's last error message. */
const char *lma_last_error(void);

/* Decodes a 16-byte header. */
void lma_decode_header(const uint8_t *b, struct lma_header *h);

/* Sends one message (header built here, body in `parts`) by `deadline_ms`, with `nfds`
 * descriptors (SCM_RIGHTS) and, when `creds`, this process's SCM_CREDENTIALS on its first bytes.
 * 0, or -ETIMEDOUT / -EPIPE / -errno with the error recorded. */
int lma_send(int fd, uint16_t version, uint16_t type, uint32_t tag, const struct iovec *parts, int nparts,
             const int *fds, int nfds, int creds, int64_t deadline_ms);

/* Reads exactly `len` bytes by `deadline_ms` into `buf`; *got says how many arrived. 0, -ECONNRESET
 * when the peer closed first (check *got: 0 means at a message boundary), -ETIMEDOUT, -errno. */
int lma_read_full(int fd, void *buf, size_t len, int64_t deadline_ms, size_t *got);

/* Waits until `fd` is readable or `deadline_ms` (-1: forever) passes: 1 readable, 0 timeout, -errno. */
int lma_wait_readable(int fd, int64_t deadline_ms);

#endif /* LIVEMIG_ATTACH_WIRE_H */
