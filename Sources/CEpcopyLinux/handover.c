/*
 * SCM_RIGHTS and unix-socket helpers for the uffd hand-over (declared in CEpcopyHandover.h). They live
 * out of line so the header Swift imports stays free of <sys/socket.h>.
 */
#define _GNU_SOURCE
#include "CEpcopyHandover.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/*
 * sendmsg(2) of one record with `nfds` descriptors as SCM_RIGHTS. MSG_NOSIGNAL: a peer that went away
 * must be an EPIPE return, never a SIGPIPE that kills QEMU or the engine. Returns bytes sent or -errno.
 */
long epc_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > EPC_HANDOVER_MAX_FDS) return -EINVAL;
    union {
        char bytes[CMSG_SPACE(sizeof(int) * EPC_HANDOVER_MAX_FDS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t rc;
    do {
        rc = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -(long)errno : (long)rc;
}

/*
 * recvmsg(2) of one record, collecting up to `maxfds` SCM_RIGHTS descriptors into `fds` (count in
 * *nfds_out). MSG_CMSG_CLOEXEC so a received uffd never leaks into a child the receiver spawns.
 * The kernel installs descriptors in the receiver as soon as the record is read (man 7 unix), so on
 * failure every descriptor that arrived is closed here before returning:
 *   - MSG_CTRUNC (more descriptors than `maxfds`; the excess were already closed by the kernel) and
 *     MSG_TRUNC (the record was longer than `len`; a SEQPACKET record's tail is discarded) -> -EMSGSIZE.
 * Returns the bytes received (0 = the peer closed the connection) or -errno. EINTR is not retried
 * here: the caller's syscall layer does that.
 */
long epc_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds_out) {
    if (nfds_out) *nfds_out = 0;
    if (maxfds < 0 || maxfds > EPC_HANDOVER_MAX_FDS) return -EINVAL;
    union {
        char bytes[CMSG_SPACE(sizeof(int) * EPC_HANDOVER_MAX_FDS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes;
    /* Room for exactly `maxfds`: anything more sets MSG_CTRUNC instead of being silently accepted. */
    msg.msg_controllen = maxfds > 0 ? CMSG_SPACE(sizeof(int) * (size_t)maxfds) : 0;
    if (maxfds == 0) msg.msg_control = NULL;
    ssize_t rc = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (rc < 0) return -(long)errno;

    int got = 0;
    int received[EPC_HANDOVER_MAX_FDS];
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (got < maxfds) received[got++] = fd;
            else close(fd); /* cannot happen with the controllen above; never leak if it does */
        }
    }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
        for (int i = 0; i < got; i++) close(received[i]);
        return -EMSGSIZE;
    }
    if (got > 0) memcpy(fds, received, sizeof(int) * (size_t)got);
    if (nfds_out) *nfds_out = got;
    return (long)rc;
}

/* Fills a sockaddr_un for a filesystem path; -ENAMETOOLONG if it does not fit sun_path with its NUL. */
int epc_unix_address(const char *path, struct sockaddr_un *addr, unsigned int *addrlen) {
    size_t n = strlen(path);
    if (n == 0) return -EINVAL;
    if (n >= sizeof addr->sun_path) return -ENAMETOOLONG;
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    memcpy(addr->sun_path, path, n + 1);
    *addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

/* A close-on-exec SOCK_SEQPACKET socket connected to `path`; the fd or -errno. */
int epc_unix_seqpacket_connect(const char *path) {
    struct sockaddr_un addr;
    socklen_t addrlen;
    int rc = epc_unix_address(path, &addr, &addrlen);
    if (rc < 0) return rc;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    do {
        rc = connect(fd, (struct sockaddr *)&addr, addrlen);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    return fd;
}

/*
 * A close-on-exec, non-blocking SOCK_SEQPACKET socket bound to `path` and listening; the fd or -errno.
 * bind(2) creates the socket file subject to the umask; callers that need a mode chmod it before any
 * peer can connect, i.e. before listen(2) — which is why listening is a separate step.
 */
int epc_unix_seqpacket_bind(const char *path) {
    struct sockaddr_un addr;
    socklen_t addrlen;
    int rc = epc_unix_address(path, &addr, &addrlen);
    if (rc < 0) return rc;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -errno;
    if (bind(fd, (struct sockaddr *)&addr, addrlen) < 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    return fd;
}

int epc_listen(int fd, int backlog) { return listen(fd, backlog) < 0 ? -errno : 0; }

int epc_accept_cloexec(int fd) {
    int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    return c < 0 ? -errno : c;
}

/* SO_PEERCRED: the pid of the process that connected (as seen from the caller's pid namespace). */
int epc_peer_pid(int sock) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
    return (int)cred.pid;
}
