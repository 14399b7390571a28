/* Kernel interfaces newer than the system headers (built against Linux 6.1 uapi, run on 6.7+).
 * Each definition matches the kernel's uapi and is used only when the headers lack it. The C
 * library's counterpart of cpp/include/livemig/base/uapi.hpp; private to the library. */
#ifndef LIVEMIG_ATTACH_UAPI_H
#define LIVEMIG_ATTACH_UAPI_H

#include <linux/fs.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM /* 5.19: write-protect on shmem and hugetlbfs */
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED /* 6.4: write-protect applies to never-touched pages too */
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC /* 6.7: write faults resolve in the kernel, recording "written" */
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef USERFAULTFD_IOC /* 6.1: /dev/userfaultfd */
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#endif /* LIVEMIG_ATTACH_UAPI_H */
