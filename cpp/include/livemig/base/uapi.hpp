// Kernel interfaces newer than the system headers (built against Linux 6.1 uapi, run on 6.18).
// Every definition below matches the kernel's uapi and is used only when the headers lack it.
// This is the one place such definitions live.
#pragma once

#include <linux/fs.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

// ---- userfaultfd (include/uapi/linux/userfaultfd.h) ----
#ifndef UFFD_FEATURE_WP_UNPOPULATED  // 6.4: write-protect applies to never-touched pages too
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON  // 6.6: UFFDIO_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC  // 6.7: write faults on WP ranges resolve in the kernel, recording "written"
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE  // 6.8: UFFDIO_MOVE remaps pages instead of copying them
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif

#ifndef UFFDIO_MOVE
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
  __u64 mode;
  __s64 move;  // out: bytes moved, or a negative errno
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#ifndef UFFDIO_POISON
struct uffdio_poison {
  struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
  __u64 mode;
  __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

// ---- PAGEMAP_SCAN on /proc/<pid>/pagemap (include/uapi/linux/fs.h, 6.7) ----
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)  // async write-protect is armed for the page
#define PAGE_IS_WRITTEN (1 << 1)    // written since it was last write-protected
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
  __u64 start;  // address of the first page
  __u64 end;    // address past the last page
  __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)    // write-protect the pages that match, in the same walk
#define PM_SCAN_CHECK_WPASYNC (1 << 1)  // fail if a page lacks async write-protect

struct pm_scan_arg {
  __u64 size;  // sizeof(struct pm_scan_arg)
  __u64 flags;
  __u64 start;
  __u64 end;
  __u64 walk_end;  // out: where the walk stopped (stale when vec was not filled: see MACHINE-FIGURES)
  __u64 vec;
  __u64 vec_len;
  __u64 max_pages;
  __u64 category_inverted;
  __u64 category_mask;
  __u64 category_anyof_mask;
  __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
