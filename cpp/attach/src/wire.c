#define _GNU_SOURCE
#include "wire.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static _Thread_local char lma_error_text[512];

int64_t lma_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int lma_fail(int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(lma_error_text, sizeof lma_error_text, fmt, ap);
  va_end(ap);
  return -err;
}

const char *lma_last_error(void) { return lma_error_text; }

void lma_decode_header(const uint8_t *b, struct lma_header *h) {
  h->magic = lma_get32(b);
  h->version = lma_get16(b + 4);
  h->type = lma_get16(b + 6);
  h->tag = lma_get32(b + 8);
  h->length = lma_get32(b + 12);
}

/* Milliseconds left until `deadline_ms` (never negative); -1 for no deadline. */
static int remaining(int64_t deadline_ms) {
  if (deadline_ms < 0) return -1;
  int64_t left = deadline_ms - lma_now_ms();
  if (left < 0) left = 0;
  return left > 1000000 ? 1000000 : (int)left;
}

static int wait_for(int fd, short events, int64_t deadline_ms) {
  for (;;) {
    struct pollfd p = {.fd = fd, .events = events, .revents = 0};
    int n = poll(&p, 1, remaining(deadline_ms));
    if (n > 0) return 1;
    if (n == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int lma_wait_readable(int fd, int64_t deadline_ms) { return wait_for(fd, POLLIN, deadline_ms); }

int lma_send(int fd, uint16_t version, uint16_t type, uint32_t tag, const struct iovec *parts, int nparts,
             const int *fds, int nfds, int creds, int64_t deadline_ms) {
  uint8_t header[LIVEMIG_ATTACH_HEADER_SIZE];
  size_t body = 0;
  for (int i = 0; i < nparts; ++i) body += parts[i].iov_len;
  if (body > UINT32_MAX || nparts > 7 || nfds < 0 || (unsigned)nfds > LIVEMIG_ATTACH_HELLO_FDS)
    return lma_fail(EMSGSIZE, "send %s: %zu body bytes in %d parts", livemig_attach_type_name(type), body, nparts);
  lma_put32(header, LIVEMIG_ATTACH_MAGIC);
  lma_put16(header + 4, version);
  lma_put16(header + 6, type);
  lma_put32(header + 8, tag);
  lma_put32(header + 12, (uint32_t)body);

  struct iovec iov[8];
  iov[0].iov_base = header;
  iov[0].iov_len = sizeof header;
  for (int i = 0; i < nparts; ++i) iov[i + 1] = parts[i];
  struct iovec *cur = iov;
  int ncur = nparts + 1;

  /* Control data travels with the first sendmsg only (the kernel attaches it to those bytes). */
  union {
    char buf[CMSG_SPACE(sizeof(int) * LIVEMIG_ATTACH_HELLO_FDS) + CMSG_SPACE(sizeof(struct ucred))];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  size_t control_len = 0;
  if (nfds > 0 || creds) {
    struct msghdr probe = {.msg_control = control.buf, .msg_controllen = sizeof control.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&probe);
    if (nfds > 0) {
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
      memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
      control_len += CMSG_SPACE(sizeof(int) * (size_t)nfds);
      c = CMSG_NXTHDR(&probe, c);
    }
    if (creds) {
      struct ucred uc = {.pid = getpid(), .uid = getuid(), .gid = getgid()};
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_CREDENTIALS;
      c->cmsg_len = CMSG_LEN(sizeof uc);
      memcpy(CMSG_DATA(c), &uc, sizeof uc);
      control_len += CMSG_SPACE(sizeof uc);
    }
  }

  int first = 1;
  while (ncur > 0) {
    struct msghdr m = {.msg_iov = cur, .msg_iovlen = (size_t)ncur};
    if (first && control_len > 0) {
      m.msg_control = control.buf;
      m.msg_controllen = control_len;
    }
    ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        int w = wait_for(fd, POLLOUT, deadline_ms);
        if (w == 0) return lma_fail(ETIMEDOUT, "send %s: the peer did not read for the I/O timeout", livemig_attach_type_name(type));
        if (w < 0) return lma_fail(-w, "send %s: poll: %s", livemig_attach_type_name(type), strerror(-w));
        continue;
      }
      return lma_fail(errno, "send %s: %s", livemig_attach_type_name(type), strerror(errno));
    }
    first = 0;
    size_t done = (size_t)n;
    while (ncur > 0 && done >= cur->iov_len) {
      done -= cur->iov_len;
      ++cur;
      --ncur;
    }
    if (ncur > 0) {
      cur->iov_base = (char *)cur->iov_base + done;
      cur->iov_len -= done;
    }
  }
  return 0;
}

int lma_read_full(int fd, void *buf, size_t len, int64_t deadline_ms, size_t *got) {
  size_t have = 0;
  *got = 0;
  while (have < len) {
    ssize_t n = recv(fd, (char *)buf + have, len - have, MSG_DONTWAIT);
    if (n > 0) {
      have += (size_t)n;
      *got = have;
      continue;
    }
    if (n == 0) return lma_fail(ECONNRESET, "the peer closed the connection");
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return lma_fail(errno, "recv: %s", strerror(errno));
    int w = wait_for(fd, POLLIN, deadline_ms);
    if (w == 0) return lma_fail(ETIMEDOUT, "the peer sent %zu of %zu bytes within the I/O timeout", have, len);
    if (w < 0) return lma_fail(-w, "poll: %s", strerror(-w));
  }
  return 0;
}
