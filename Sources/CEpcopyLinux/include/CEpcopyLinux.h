/*
 * CEpcopyLinux: the only hand-written C that Swift calls.
 *
 * Swift cannot call variadic functions (syscall, ioctl), cannot evaluate _IOWR() macros and cannot
 * reach into unions such as struct uffd_msg. Everything here is a thin static inline wrapper that
 * returns the result or -errno, so the Swift syscall layer (HostEngine/Internals) sees one calling
 * convention. No policy lives here.
 */
#ifndef CEPCOPY_LINUX_H
#define CEPCOPY_LINUX_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>

#include "CEpcopyHandover.h"

/* Debian bookworm's UAPI headers are from Linux 6.1; these bits are newer but stable ABI. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

/* ioctl request numbers: _IOWR() is a macro expression Swift cannot import. */
static const unsigned long EPC_UFFDIO_API = UFFDIO_API;
static const unsigned long EPC_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long EPC_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long EPC_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long EPC_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long EPC_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long EPC_UFFDIO_WRITEPROTECT = UFFDIO_WRITEPROTECT;
static const unsigned long EPC_UFFDIO_CONTINUE = UFFDIO_CONTINUE;
static const unsigned long EPC_USERFAULTFD_IOC_NEW = USERFAULTFD_IOC_NEW;

static const uint64_t EPC_UFFD_API = UFFD_API;
/* Bit numbers of the ioctl mask UFFDIO_API/UFFDIO_REGISTER return (1 << _UFFDIO_x). */
static const int EPC_UFFDIO_BIT_REGISTER = _UFFDIO_REGISTER;
static const int EPC_UFFDIO_BIT_UNREGISTER = _UFFDIO_UNREGISTER;
static const int EPC_UFFDIO_BIT_WAKE = _UFFDIO_WAKE;
static const int EPC_UFFDIO_BIT_COPY = _UFFDIO_COPY;
static const int EPC_UFFDIO_BIT_ZEROPAGE = _UFFDIO_ZEROPAGE;
static const int EPC_UFFDIO_BIT_WRITEPROTECT = _UFFDIO_WRITEPROTECT;
static const int EPC_UFFDIO_BIT_CONTINUE = _UFFDIO_CONTINUE;
static const int EPC_UFFDIO_BIT_API = _UFFDIO_API;

static const uint64_t EPC_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t EPC_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP;
static const uint64_t EPC_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR;
static const uint64_t EPC_UFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const uint64_t EPC_UFFDIO_ZEROPAGE_MODE_DONTWAKE = UFFDIO_ZEROPAGE_MODE_DONTWAKE;
static const uint64_t EPC_UFFDIO_CONTINUE_MODE_DONTWAKE = UFFDIO_CONTINUE_MODE_DONTWAKE;

static const uint8_t EPC_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;
static const uint8_t EPC_UFFD_EVENT_FORK = UFFD_EVENT_FORK;
static const uint8_t EPC_UFFD_EVENT_REMAP = UFFD_EVENT_REMAP;
static const uint8_t EPC_UFFD_EVENT_REMOVE = UFFD_EVENT_REMOVE;
static const uint8_t EPC_UFFD_EVENT_UNMAP = UFFD_EVENT_UNMAP;
static const uint64_t EPC_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const uint64_t EPC_UFFD_PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP;
static const uint64_t EPC_UFFD_PAGEFAULT_FLAG_MINOR = UFFD_PAGEFAULT_FLAG_MINOR;

static const int EPC_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

static inline long epc_neg_errno(long rc) { return rc < 0 ? -(long)errno : rc; }

/* ---- raw calls: each returns its result or -errno ---- */

static inline long epc_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return epc_neg_errno(ioctl(fd, request, arg));
}

/* userfaultfd(2): the syscall path. Needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1. */
static inline int epc_userfaultfd(int flags) {
    return (int)epc_neg_errno(syscall(SYS_userfaultfd, flags));
}

/* /dev/userfaultfd: the device path (Linux 6.1+), governed by the device's file permissions. */
static inline int epc_userfaultfd_dev(int flags) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev);
    return fd < 0 ? -saved : fd;
}

/* sched_setaffinity(2) of thread `tid` to the `count` CPUs in `cpus` (each < CPU_SETSIZE). */
static inline int epc_set_affinity(int tid, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
    return (int)epc_neg_errno(sched_setaffinity(tid, sizeof set, &set));
}

/* mbind(2) on [addr, addr+len): a memory policy (MPOL_*) over the nodes in `nodemask` (`maxnode` bits). */
static inline long epc_mbind(uint64_t addr, uint64_t len, int mode, const unsigned long *nodemask,
                             unsigned long maxnode, unsigned int flags) {
    return epc_neg_errno(syscall(SYS_mbind, (void *)addr, (unsigned long)len, mode, nodemask, maxnode, flags));
}

static inline int epc_memfd_create(const char *name, unsigned int flags) {
    return (int)epc_neg_errno(syscall(SYS_memfd_create, name, flags));
}

static inline int epc_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return (int)epc_neg_errno(fallocate(fd, mode, (off_t)offset, (off_t)length));
}

static inline int epc_pidfd_open(int pid, unsigned int flags) {
    return (int)epc_neg_errno(syscall(SYS_pidfd_open, pid, flags));
}

static inline int epc_pidfd_getfd(int pidfd, int targetfd, unsigned int flags) {
    return (int)epc_neg_errno(syscall(SYS_pidfd_getfd, pidfd, targetfd, flags));
}

/* Signals the process a pidfd refers to (never a reused PID). */
static inline int epc_pidfd_send_signal(int pidfd, int sig) {
    return (int)epc_neg_errno(syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0));
}

/* ---- userfaultfd ioctls with their argument structs filled in C ---- */

static inline long epc_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls) {
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    long rc = epc_ioctl_ptr(fd, UFFDIO_API, &api);
    if (rc == 0) {
        if (out_features) *out_features = api.features;
        if (out_ioctls) *out_ioctls = api.ioctls;
    }
    return rc;
}

static inline long epc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls) {
    struct uffdio_register reg;
    memset(&reg, 0, sizeof reg);
    reg.range.start = start;
    reg.range.len = len;
    reg.mode = mode;
    long rc = epc_ioctl_ptr(fd, UFFDIO_REGISTER, &reg);
    if (rc == 0 && out_ioctls) *out_ioctls = reg.ioctls;
    return rc;
}

static inline long epc_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    return epc_ioctl_ptr(fd, UFFDIO_UNREGISTER, &range);
}

static inline long epc_uffd_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    return epc_ioctl_ptr(fd, UFFDIO_WAKE, &range);
}

/* On failure *done holds what the kernel placed before it stopped (or -errno): see ioctl_userfaultfd(2). */
static inline long epc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done) {
    struct uffdio_copy copy;
    memset(&copy, 0, sizeof copy);
    copy.dst = dst;
    copy.src = src;
    copy.len = len;
    copy.mode = mode;
    long rc = epc_ioctl_ptr(fd, UFFDIO_COPY, &copy);
    if (done) *done = copy.copy;
    return rc;
}

static inline long epc_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
    struct uffdio_zeropage zp;
    memset(&zp, 0, sizeof zp);
    zp.range.start = start;
    zp.range.len = len;
    zp.mode = mode;
    long rc = epc_ioctl_ptr(fd, UFFDIO_ZEROPAGE, &zp);
    if (done) *done = zp.zeropage;
    return rc;
}

static inline long epc_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done) {
    struct uffdio_continue c;
    memset(&c, 0, sizeof c);
    c.range.start = start;
    c.range.len = len;
    c.mode = mode;
    long rc = epc_ioctl_ptr(fd, UFFDIO_CONTINUE, &c);
    if (done) *done = c.mapped;
    return rc;
}

/* ---- struct uffd_msg accessors (a packed struct with a union Swift cannot reach) ---- */

static inline size_t epc_uffd_msg_size(void) { return sizeof(struct uffd_msg); }
static inline uint8_t epc_uffd_msg_event(const void *m) { return ((const struct uffd_msg *)m)->event; }
static inline uint64_t epc_uffd_msg_fault_address(const void *m) {
    return ((const struct uffd_msg *)m)->arg.pagefault.address;
}
static inline uint64_t epc_uffd_msg_fault_flags(const void *m) {
    return ((const struct uffd_msg *)m)->arg.pagefault.flags;
}
static inline uint32_t epc_uffd_msg_fault_tid(const void *m) {
    return ((const struct uffd_msg *)m)->arg.pagefault.feat.ptid;
}
static inline uint64_t epc_uffd_msg_remove_start(const void *m) {
    return ((const struct uffd_msg *)m)->arg.remove.start;
}
static inline uint64_t epc_uffd_msg_remove_end(const void *m) {
    return ((const struct uffd_msg *)m)->arg.remove.end;
}

/* ---- atomics on plain memory (page-state bitmaps shared by the fault, urgent and bulk threads) ---- */

static inline uint64_t epc_atomic_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t epc_atomic_fetch_or_u64(uint64_t *p, uint64_t v) {
    return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL);
}
static inline uint64_t epc_atomic_fetch_and_u64(uint64_t *p, uint64_t v) {
    return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL);
}

/* ---- small things Swift's Glibc module does not expose (GNU extensions); defined in shim.c ---- */
int epc_eventfd(unsigned int initval, int nonblocking);
int epc_set_thread_name(const char *name);
static inline int epc_gettid(void) { return (int)syscall(SYS_gettid); }

/* ---- the test pattern (shim.c): page p, word w = splitmix64(seed ^ (p << 20) ^ w), as in epcopy-memtouch.
 * In C because tests run debug builds, where filling 256 MiB in Swift would dominate the test. ---- */
void epc_pattern_fill(void *base, uint64_t first_page, uint64_t pages, uint64_t seed);
/* Returns the index (relative to base) of the first page that differs from the pattern, or -1. */
int64_t epc_pattern_check(const void *base, uint64_t first_page, uint64_t pages, uint64_t seed);

/* ---- CRC32C with the SSE4.2 instruction (shim.c); the pure-Swift table version is the fallback ---- */
int epc_cpu_has_sse42(void);
uint32_t epc_crc32c_hw(uint32_t crc, const void *data, size_t len);
/* The old single-chain version of epc_crc32c_hw (same results), kept for benchmark comparison. */
uint32_t epc_crc32c_hw_serial(uint32_t crc, const void *data, size_t len);

#endif
