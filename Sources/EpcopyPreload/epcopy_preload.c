/*
 * libEpcopyPreload.so: the LD_PRELOAD shim that runs inside the destination QEMU of a post-copy
 * migration. QEMU maps its guest RAM from a shared file (/dev/shm, MAP_SHARED); when that mmap
 * happens the shim registers the mapping with a userfaultfd and hands the uffd, the RAM file and the
 * mapping's facts to the epcopy engine over a unix socket (wire format: CEpcopyHandover.h). From then
 * on the engine resolves every fault on guest memory.
 *
 * Two rules shape everything here:
 *   - Fail loudly, never silently. Guest memory handed to QEMU unregistered would read as zero pages
 *     and corrupt the guest, so every failure prints one "epcopy-preload: " line to stderr, unmaps
 *     what was mapped and returns MAP_FAILED with errno set.
 *   - The shim's own uffd descriptor is never closed after a successful hand-over. If the engine dies,
 *     faults then hang instead of being resolved with zeros (closing the last reference to a uffd
 *     unregisters its ranges, see man 2 userfaultfd), and a new engine can take the uffd over with
 *     pidfd_getfd(2) using the fd number the hello reported.
 *
 * Only mmap and mmap64 are interposed. Environment: see include/epcopy_preload.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include "CEpcopyLinux.h"
#include "epcopy_preload.h"

#define EXPORT __attribute__((visibility("default")))

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef void *(*mmap64_fn)(void *, size_t, int, int, int, off64_t);

/*
 * Set while the shim runs on this thread: dlsym, getenv-triggered allocations or stdio may call mmap,
 * and those inner calls must go straight to the kernel. initial-exec TLS: the library is loaded at
 * start-up by LD_PRELOAD, so its TLS is static and reading the flag never calls __tls_get_addr (which
 * could allocate and recurse).
 */
static __thread int in_shim __attribute__((tls_model("initial-exec")));

static mmap_fn real_mmap_fn;
static mmap64_fn real_mmap64_fn;

/* The kernel's mmap without libc: used while the real symbols are being looked up (recursion). */
static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    long rc = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    return rc == -1 ? MAP_FAILED : (void *)rc;
}

static mmap_fn lookup_mmap(void) {
    mmap_fn fn = __atomic_load_n(&real_mmap_fn, __ATOMIC_ACQUIRE);
    if (fn == NULL) {
        fn = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
        __atomic_store_n(&real_mmap_fn, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

static mmap64_fn lookup_mmap64(void) {
    mmap64_fn fn = __atomic_load_n(&real_mmap64_fn, __ATOMIC_ACQUIRE);
    if (fn == NULL) {
        fn = (mmap64_fn)dlsym(RTLD_NEXT, "mmap64");
        __atomic_store_n(&real_mmap64_fn, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

/* One line to stderr with a single write(2), so concurrent QEMU threads cannot interleave it. */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...) {
    char line[1024];
    /* One byte stays free for the newline; an over-long message is cut, never dropped. */
    int n = snprintf(line, sizeof line - 1, "epcopy-preload: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - 1 - (size_t)n, fmt, ap);
    va_end(ap);
    size_t len = strlen(line);
    line[len++] = '\n';
    ssize_t rc;
    do {
        rc = write(STDERR_FILENO, line, len);
    } while (rc < 0 && errno == EINTR);
}

static const char *errtext(int err, char *buf, size_t len) { return strerror_r(err, buf, len); }

/* Everything needed to undo a half-done hand-over. */
struct attempt {
    void *addr;
    size_t len;
    int uffd;
    int sock;
    int mem_dup;
};

/* Undoes `a`, sets errno = err and returns MAP_FAILED: the program must never see the memory. */
static void *fail(struct attempt *a, int err) {
    if (a->sock >= 0) close(a->sock);
    if (a->uffd >= 0) close(a->uffd); /* last reference: the kernel unregisters the range */
    if (a->mem_dup >= 0) close(a->mem_dup);
    munmap(a->addr, a->len);
    errno = err;
    return MAP_FAILED;
}

/*
 * Called after the real mmap succeeded with a shared file mapping. Returns `addr` (not guest RAM, or
 * handed over) or MAP_FAILED with errno set.
 */
static void *maybe_hand_over(void *addr, size_t len, int fd, off64_t off) {
    const char *prefix = getenv("EPCOPY_SHIM_PREFIX");
    if (prefix == NULL || prefix[0] == '\0') return addr; /* not configured: the shim does nothing */

    char ebuf[128];
    struct attempt a = { .addr = addr, .len = len, .uffd = -1, .sock = -1, .mem_dup = -1 };

    /* Identify and send one pinned reference: a concurrent close(fd) plus reuse of the number by another
     * thread after this point cannot make us check one file and hand over another. */
    a.mem_dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (a.mem_dup < 0) {
        int err = errno;
        say("cannot tell whether fd %d is guest RAM: fcntl(F_DUPFD_CLOEXEC): %s", fd, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }
    char proc[64];
    char file[PATH_MAX];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", a.mem_dup);
    ssize_t n = readlink(proc, file, sizeof file - 1);
    if (n < 0) {
        /* Without /proc we cannot tell guest RAM from other shared files; refusing is the safe side. */
        int err = errno;
        say("cannot tell whether fd %d is guest RAM: readlink(%s): %s", fd, proc, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }
    file[n] = '\0';
    if (strncmp(file, prefix, strlen(prefix)) != 0) {
        close(a.mem_dup);
        return addr;
    }

    /* From here on the mapping is guest RAM: it is handed over or the mmap fails. */
    if ((size_t)n >= EPC_HANDOVER_PATH_MAX) {
        say("cannot hand over %s: path is longer than %d bytes", file, EPC_HANDOVER_PATH_MAX - 1);
        return fail(&a, ENAMETOOLONG);
    }
    const char *sock_path = getenv("EPCOPY_SHIM_SOCKET");
    if (sock_path == NULL || sock_path[0] == '\0') {
        say("cannot hand over %s: EPCOPY_SHIM_SOCKET is not set", file);
        return fail(&a, EINVAL);
    }
    const char *mode_env = getenv("EPCOPY_UFFD_MODE");
    uint64_t mode = UFFDIO_REGISTER_MODE_MISSING;
    uint64_t features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID;
    if (mode_env != NULL && strcmp(mode_env, "missing+minor") == 0) {
        mode |= UFFDIO_REGISTER_MODE_MINOR;
        features |= UFFD_FEATURE_MINOR_SHMEM;
    } else if (mode_env != NULL && strcmp(mode_env, "missing") != 0) {
        say("cannot hand over %s: EPCOPY_UFFD_MODE=%s is neither 'missing' nor 'missing+minor'", file, mode_env);
        return fail(&a, EINVAL);
    }
    long timeout_ms = 10000;
    const char *timeout_env = getenv("EPCOPY_SHIM_TIMEOUT_MS");
    if (timeout_env != NULL) {
        char *end = NULL;
        errno = 0;
        timeout_ms = strtol(timeout_env, &end, 10);
        if (errno != 0 || end == timeout_env || *end != '\0' || timeout_ms <= 0) {
            say("cannot hand over %s: EPCOPY_SHIM_TIMEOUT_MS=%s is not a positive number", file, timeout_env);
            return fail(&a, EINVAL);
        }
    }

    /* UFFDIO_REGISTER needs a page-aligned length; mmap itself rounds the length up the same way. */
    long page = sysconf(_SC_PAGESIZE);
    uint64_t reg_len = ((uint64_t)len + (uint64_t)page - 1) & ~((uint64_t)page - 1);

    /* The device is governed by its file mode, the syscall by CAP_SYS_PTRACE or
     * vm.unprivileged_userfaultfd: try both before giving up (man 2 userfaultfd). */
    a.uffd = epc_userfaultfd_dev(O_CLOEXEC | O_NONBLOCK);
    if (a.uffd < 0) {
        int dev_err = -a.uffd;
        a.uffd = epc_userfaultfd(O_CLOEXEC | O_NONBLOCK);
        if (a.uffd < 0) {
            int err = -a.uffd;
            char ebuf2[128];
            say("cannot register %s: /dev/userfaultfd: %s; userfaultfd(2): %s", file,
                errtext(dev_err, ebuf2, sizeof ebuf2), errtext(err, ebuf, sizeof ebuf));
            return fail(&a, err);
        }
    }
    long rc = epc_uffd_api(a.uffd, features, NULL, NULL);
    if (rc < 0) {
        say("cannot register %s: UFFDIO_API (features 0x%llx): %s", file, (unsigned long long)features,
            errtext((int)-rc, ebuf, sizeof ebuf));
        return fail(&a, (int)-rc);
    }
    uint64_t ioctls = 0;
    rc = epc_uffd_register(a.uffd, (uint64_t)(uintptr_t)addr, reg_len, mode, &ioctls);
    if (rc < 0) {
        say("cannot register %s: UFFDIO_REGISTER (mode 0x%llx, %llu bytes): %s", file, (unsigned long long)mode,
            (unsigned long long)reg_len, errtext((int)-rc, ebuf, sizeof ebuf));
        return fail(&a, (int)-rc);
    }

    struct sockaddr_un sa;
    socklen_t salen;
    int arc = epc_unix_address(sock_path, &sa, &salen);
    if (arc < 0) {
        say("no engine at %s: socket path: %s", sock_path, errtext(-arc, ebuf, sizeof ebuf));
        return fail(&a, -arc);
    }
    a.sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (a.sock < 0) {
        int err = errno;
        say("no engine at %s: socket: %s", sock_path, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }
    /* SO_SNDTIMEO also bounds connect(2) when the engine's backlog is full, SO_RCVTIMEO the reply
     * (man 7 socket); both then fail with EAGAIN/EINPROGRESS. */
    struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    if (setsockopt(a.sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(a.sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) {
        int err = errno;
        say("no engine at %s: setsockopt(SO_RCVTIMEO): %s", sock_path, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }
    int crc;
    do {
        crc = connect(a.sock, (struct sockaddr *)&sa, salen);
    } while (crc < 0 && errno == EINTR);
    if (crc < 0) {
        int err = errno;
        const char *optional = getenv("EPCOPY_SHIM_OPTIONAL");
        if (optional != NULL && strcmp(optional, "1") == 0 && (err == ENOENT || err == ECONNREFUSED)) {
            /* No engine waits for this QEMU (a boot, or a migration QEMU's own stream carries): the mapping stays
             * ordinary memory. Safe only because the destination skips RAM (x-ignore-shared) solely when an
             * engine took the uffd, which never happened here. Closing the uffd unregisters the range. */
            say("no engine at %s (%s): %s stays ordinary memory (EPCOPY_SHIM_OPTIONAL)", sock_path,
                errtext(err, ebuf, sizeof ebuf), file);
            close(a.sock);
            close(a.uffd);
            close(a.mem_dup);
            return addr;
        }
        say("no engine at %s: connect: %s", sock_path, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }

    struct epc_handover_hello hello;
    memset(&hello, 0, sizeof hello);
    hello.magic = EPC_HANDOVER_MAGIC;
    hello.version = EPC_HANDOVER_VERSION;
    hello.flags = 0;
    hello.pid = (int32_t)getpid();
    hello.uffd_fd = a.uffd;
    hello.mem_fd = fd;
    hello.reg_mode = (uint32_t)mode;
    /* Not what UFFDIO_API wrote back: it reports every feature the kernel offers, but enables only the
     * requested ones (and fails with EINVAL if one is unknown), so what is enabled is what was asked. */
    hello.features = features;
    hello.hva = (uint64_t)(uintptr_t)addr;
    hello.length = reg_len;
    hello.file_offset = (uint64_t)off;
    hello.ioctls = ioctls;
    memcpy(hello.path, file, (size_t)n + 1);
    int fds[EPC_HANDOVER_NFDS] = { a.uffd, a.mem_dup };
    rc = epc_send_with_fds(a.sock, &hello, sizeof hello, fds, EPC_HANDOVER_NFDS);
    if (rc < 0) {
        say("engine at %s did not take %s: sendmsg: %s", sock_path, file, errtext((int)-rc, ebuf, sizeof ebuf));
        return fail(&a, (int)-rc);
    }

    struct epc_handover_reply reply;
    memset(&reply, 0, sizeof reply);
    ssize_t got;
    do {
        got = recv(a.sock, &reply, sizeof reply, 0);
    } while (got < 0 && errno == EINTR);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        say("no reply from engine at %s within %ld ms: recv: %s", sock_path, timeout_ms,
            errtext(ETIMEDOUT, ebuf, sizeof ebuf));
        return fail(&a, ETIMEDOUT);
    }
    if (got < 0) {
        int err = errno;
        say("no reply from engine at %s: recv: %s", sock_path, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }
    if (got != (ssize_t)sizeof reply || reply.magic != EPC_HANDOVER_MAGIC) {
        say("engine at %s sent a malformed reply (%zd bytes) for %s: %s", sock_path, got, file,
            errtext(EPROTO, ebuf, sizeof ebuf));
        return fail(&a, EPROTO);
    }
    if (reply.status != 0) {
        int err = reply.status > 0 ? reply.status : EPROTO;
        say("engine at %s rejected %s: %s", sock_path, file, errtext(err, ebuf, sizeof ebuf));
        return fail(&a, err);
    }

    /* Accepted. The uffd stays open for the life of the process (see the header comment). */
    close(a.sock);
    close(a.mem_dup);
    return addr;
}

static int is_shared(int flags) {
    int type = flags & MAP_TYPE;
    return type == MAP_SHARED || type == MAP_SHARED_VALIDATE;
}

static void *shim(void *addr, size_t len, int prot, int flags, int fd, off64_t off, int is64) {
    if (in_shim) return raw_mmap(addr, len, prot, flags, fd, off);
    in_shim = 1;
    void *p;
    if (is64) {
        mmap64_fn fn = lookup_mmap64();
        p = fn ? fn(addr, len, prot, flags, fd, off) : raw_mmap(addr, len, prot, flags, fd, off);
    } else {
        mmap_fn fn = lookup_mmap();
        p = fn ? fn(addr, len, prot, flags, fd, (off_t)off) : raw_mmap(addr, len, prot, flags, fd, off);
    }
    /* The kernel ignores fd for MAP_ANONYMOUS, so such a mapping is never the RAM file. */
    if (p != MAP_FAILED && fd >= 0 && is_shared(flags) && !(flags & MAP_ANONYMOUS)) {
        int saved = errno;
        p = maybe_hand_over(p, len, fd, off);
        if (p != MAP_FAILED) errno = saved; /* a successful mmap must not appear to change errno */
    }
    in_shim = 0;
    return p;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return shim(addr, len, prot, flags, fd, (off64_t)off, 0);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    return shim(addr, len, prot, flags, fd, off, 1);
}
