/* The attach protocol's constants (docs/attach.md): message header, types, limits, capabilities,
 * error codes. The one home of these numbers: the C client library (livemig_attach) and livemig's
 * side (livemig/attach/peer.hpp) both include this header. C11 and C++, no dependencies.
 *
 * Every message: a 16-byte header, then `length` bytes of body. All integers little-endian.
 *   offset 0  u32 magic    LIVEMIG_ATTACH_MAGIC, the bytes "LVMA"
 *   offset 4  u16 version  1
 *   offset 6  u16 type     LIVEMIG_ATTACH_MSG_*
 *   offset 8  u32 tag      a request's number (non-zero); its REPLY echoes it; 0 on one-way messages
 *   offset 12 u32 length   body bytes, at most the type's limit (checked before the body is read)
 */
#ifndef LIVEMIG_ATTACH_PROTOCOL_H
#define LIVEMIG_ATTACH_PROTOCOL_H

#include <stdint.h>

#define LIVEMIG_ATTACH_MAGIC 0x414D564CU /* "LVMA" read as a little-endian u32 */
#define LIVEMIG_ATTACH_VERSION 1         /* the version this header describes */
#define LIVEMIG_ATTACH_HEADER_SIZE 16U

/* Message types. P: the workload process, L: livemig. */
enum livemig_attach_msg_type {
  LIVEMIG_ATTACH_MSG_HELLO = 1,       /* P->L first message; carries memfd, uffd, pagemap (SCM_RIGHTS) */
  LIVEMIG_ATTACH_MSG_WELCOME = 2,     /* L->P the attachment is accepted */
  LIVEMIG_ATTACH_MSG_ERROR = 3,       /* both: fatal; the sender closes after it */
  LIVEMIG_ATTACH_MSG_REPLY = 4,       /* both: answers the request with the same tag */
  LIVEMIG_ATTACH_MSG_PAUSE = 16,      /* L->P request: park every writer (body: lease) */
  LIVEMIG_ATTACH_MSG_RESUME = 17,     /* L->P request: let the writers run */
  LIVEMIG_ATTACH_MSG_SAVE_STATE = 18, /* L->P request: the reply carries the device state */
  LIVEMIG_ATTACH_MSG_LOAD_STATE = 19, /* L->P request (destination): body is the device state */
  LIVEMIG_ATTACH_MSG_CHECK = 20,      /* L->P request (capability check): verify yourself */
  LIVEMIG_ATTACH_MSG_BALLOON = 21,    /* L->P one-way (capability hints): the balloon command id */
  LIVEMIG_ATTACH_MSG_HANDOFF = 22,    /* L->P request (source, paused): the workload may run elsewhere now */
  LIVEMIG_ATTACH_MSG_COMPLETE = 23,   /* L->P request (destination): every page is placed */
  LIVEMIG_ATTACH_MSG_DETACH = 24,     /* both, request: a clean end of the attachment */
  LIVEMIG_ATTACH_MSG_HINTS = 32,      /* P->L one-way (capability hints): free page ranges of a round */
  LIVEMIG_ATTACH_MSG_RESUMED = 33     /* P->L one-way: a pause lease expired, the process resumed itself */
};

/* Roles (HELLO). */
#define LIVEMIG_ATTACH_ROLE_SOURCE 1      /* memory to be migrated away: uffd WP-registered */
#define LIVEMIG_ATTACH_ROLE_DESTINATION 2 /* empty memory to be filled: uffd MISSING-registered */

/* Capability bits (HELLO, WELCOME); a capability is used only when both sides announce it. */
#define LIVEMIG_ATTACH_CAP_HINTS (UINT64_C(1) << 0) /* BALLOON and HINTS messages */
#define LIVEMIG_ATTACH_CAP_CHECK (UINT64_C(1) << 1) /* CHECK requests */

/* HINTS flags. */
#define LIVEMIG_ATTACH_HINT_START (1U << 0) /* acknowledges the round id before the ranges */
#define LIVEMIG_ATTACH_HINT_STOP (1U << 1)  /* ends the round after the ranges */

/* Balloon command ids (DESIGN.md "Free page hinting"). */
#define LIVEMIG_ATTACH_CMD_STOP 0U
#define LIVEMIG_ATTACH_CMD_DONE 1U
#define LIVEMIG_ATTACH_MIN_ROUND_ID 0x80000000U /* round ids are >= this */

/* ERROR codes. */
#define LIVEMIG_ATTACH_ERR_PROTOCOL 1    /* a malformed or unexpected message */
#define LIVEMIG_ATTACH_ERR_VERSION 2     /* no common protocol version */
#define LIVEMIG_ATTACH_ERR_DESCRIPTOR 3  /* a descriptor of the wrong kind, size, features or owner */
#define LIVEMIG_ATTACH_ERR_REFUSED 4     /* a valid attachment livemig will not take (layout, role, busy) */
#define LIVEMIG_ATTACH_ERR_TIMEOUT 5     /* the peer was silent past a bound */
#define LIVEMIG_ATTACH_ERR_INTERNAL 6    /* the sender failed on its own side */

/* Body sizes and limits (bytes). */
#define LIVEMIG_ATTACH_HELLO_FIXED 56U           /* HELLO body before the name */
#define LIVEMIG_ATTACH_MAX_NAME 255U             /* HELLO name bytes */
#define LIVEMIG_ATTACH_HELLO_FDS 3U              /* memfd, uffd, pagemap, in this order */
#define LIVEMIG_ATTACH_WELCOME_SIZE 16U
#define LIVEMIG_ATTACH_ERROR_FIXED 8U            /* u32 code, u32 reserved, then text */
#define LIVEMIG_ATTACH_MAX_ERROR_TEXT 4096U
#define LIVEMIG_ATTACH_REPLY_FIXED 16U           /* u16 type, u16 0, u32 status, u32 text length, u32 0 */
#define LIVEMIG_ATTACH_MAX_REPLY_TEXT 1024U
#define LIVEMIG_ATTACH_CHECK_RESULT_SIZE 16U     /* REPLY payload to CHECK: u64 items, u64 failures */
#define LIVEMIG_ATTACH_MAX_STATE (UINT32_C(128) << 20) /* SAVE_STATE reply payload, LOAD_STATE body */
#define LIVEMIG_ATTACH_PAUSE_SIZE 8U             /* u32 lease ms (0: none), u32 0 */
#define LIVEMIG_ATTACH_BALLOON_SIZE 8U           /* u32 command id, u32 0 */
#define LIVEMIG_ATTACH_HINTS_FIXED 16U           /* u32 id, u32 flags, u32 count, u32 0 */
#define LIVEMIG_ATTACH_MAX_HINT_RANGES 4096U     /* per HINTS message: u64 first page, u64 pages each */

/* The largest body a message of `type` may have; 0 for an unknown type (and for body-less types,
 * whose length must be 0). */
static inline uint32_t livemig_attach_max_body(uint16_t type) {
  switch (type) {
    case LIVEMIG_ATTACH_MSG_HELLO: return LIVEMIG_ATTACH_HELLO_FIXED + LIVEMIG_ATTACH_MAX_NAME;
    case LIVEMIG_ATTACH_MSG_WELCOME: return LIVEMIG_ATTACH_WELCOME_SIZE;
    case LIVEMIG_ATTACH_MSG_ERROR: return LIVEMIG_ATTACH_ERROR_FIXED + LIVEMIG_ATTACH_MAX_ERROR_TEXT;
    case LIVEMIG_ATTACH_MSG_REPLY:
      return LIVEMIG_ATTACH_REPLY_FIXED + LIVEMIG_ATTACH_MAX_REPLY_TEXT + LIVEMIG_ATTACH_MAX_STATE;
    case LIVEMIG_ATTACH_MSG_PAUSE: return LIVEMIG_ATTACH_PAUSE_SIZE;
    case LIVEMIG_ATTACH_MSG_LOAD_STATE: return LIVEMIG_ATTACH_MAX_STATE;
    case LIVEMIG_ATTACH_MSG_BALLOON: return LIVEMIG_ATTACH_BALLOON_SIZE;
    case LIVEMIG_ATTACH_MSG_HINTS: return LIVEMIG_ATTACH_HINTS_FIXED + 16U * LIVEMIG_ATTACH_MAX_HINT_RANGES;
    default: return 0;
  }
}

/* 1 when `type` is a message type of this version. */
static inline int livemig_attach_known_type(uint16_t type) {
  return (type >= LIVEMIG_ATTACH_MSG_HELLO && type <= LIVEMIG_ATTACH_MSG_REPLY) ||
         (type >= LIVEMIG_ATTACH_MSG_PAUSE && type <= LIVEMIG_ATTACH_MSG_DETACH) ||
         type == LIVEMIG_ATTACH_MSG_HINTS || type == LIVEMIG_ATTACH_MSG_RESUMED;
}

/* 1 when `type` is a request (answered by a REPLY with its tag). */
static inline int livemig_attach_is_request(uint16_t type) {
  return type >= LIVEMIG_ATTACH_MSG_PAUSE && type <= LIVEMIG_ATTACH_MSG_DETACH &&
         type != LIVEMIG_ATTACH_MSG_BALLOON;
}

/* A short name of a message type ("PAUSE"), "unknown" otherwise. */
static inline const char *livemig_attach_type_name(uint16_t type) {
  switch (type) {
    case LIVEMIG_ATTACH_MSG_HELLO: return "HELLO";
    case LIVEMIG_ATTACH_MSG_WELCOME: return "WELCOME";
    case LIVEMIG_ATTACH_MSG_ERROR: return "ERROR";
    case LIVEMIG_ATTACH_MSG_REPLY: return "REPLY";
    case LIVEMIG_ATTACH_MSG_PAUSE: return "PAUSE";
    case LIVEMIG_ATTACH_MSG_RESUME: return "RESUME";
    case LIVEMIG_ATTACH_MSG_SAVE_STATE: return "SAVE_STATE";
    case LIVEMIG_ATTACH_MSG_LOAD_STATE: return "LOAD_STATE";
    case LIVEMIG_ATTACH_MSG_CHECK: return "CHECK";
    case LIVEMIG_ATTACH_MSG_BALLOON: return "BALLOON";
    case LIVEMIG_ATTACH_MSG_HANDOFF: return "HANDOFF";
    case LIVEMIG_ATTACH_MSG_COMPLETE: return "COMPLETE";
    case LIVEMIG_ATTACH_MSG_DETACH: return "DETACH";
    case LIVEMIG_ATTACH_MSG_HINTS: return "HINTS";
    case LIVEMIG_ATTACH_MSG_RESUMED: return "RESUMED";
    default: return "unknown";
  }
}

#endif /* LIVEMIG_ATTACH_PROTOCOL_H */
