/*
 * The hand-over of a userfaultfd from a process that owns guest memory (the LD_PRELOAD shim inside
 * the destination QEMU) to the epcopy engine: the wire struct both sides share, and SCM_RIGHTS
 * helpers (the CMSG_* macros cannot be used from Swift).
 *
 * Wire protocol, one SOCK_SEQPACKET connection per registered mapping (see man 7 unix):
 *   shim -> engine: one record, exactly sizeof(struct epc_handover_hello) bytes, with SCM_RIGHTS
 *                   carrying two descriptors in this order: [userfaultfd, RAM file].
 *   engine -> shim: one struct epc_handover_reply; status 0 = accepted, else a positive errno.
 * SOCK_SEQPACKET keeps record boundaries, so a short or oversized hello is detectable as such.
 *
 * Like the rest of CEpcopyLinux, every helper returns its result or -errno and holds no policy.
 */
#ifndef CEPCOPY_HANDOVER_H
#define CEPCOPY_HANDOVER_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#define EPC_HANDOVER_MAGIC 0x48535045u /* "EPSH" read as a little-endian uint32 */
#define EPC_HANDOVER_VERSION 1
#define EPC_HANDOVER_PATH_MAX 256
/* Descriptors a hello carries: [0] the userfaultfd, [1] the RAM file. */
#define EPC_HANDOVER_NFDS 2

/* Sent by the shim. Little-endian, fixed size, no implicit padding (checked below). */
struct epc_handover_hello {
    uint32_t magic;       /* EPC_HANDOVER_MAGIC */
    uint16_t version;     /* EPC_HANDOVER_VERSION */
    uint16_t flags;       /* 0; reserved for later versions */
    int32_t pid;          /* the process that owns the memory */
    int32_t uffd_fd;      /* the uffd's fd number in that process (for pidfd_getfd takeover) */
    int32_t mem_fd;       /* the RAM file's fd number in that process */
    uint32_t reg_mode;    /* UFFDIO_REGISTER_MODE_* bits used */
    uint64_t features;    /* UFFD features UFFDIO_API enabled */
    uint64_t hva;         /* start of the registered mapping in that process */
    uint64_t length;      /* bytes */
    uint64_t file_offset; /* offset of the mapping in the RAM file */
    uint64_t ioctls;      /* ioctl mask UFFDIO_REGISTER returned */
    char path[EPC_HANDOVER_PATH_MAX]; /* readlink of the RAM file, NUL-terminated */
};

/* Sent by the engine. */
struct epc_handover_reply {
    uint32_t magic;  /* EPC_HANDOVER_MAGIC */
    int32_t status;  /* 0 = accepted, else a positive errno */
};

/* Both sides compile this header; these make a layout drift a build error rather than a protocol bug. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the hand-over wire format is little-endian and read in place"
#endif
static_assert(sizeof(struct epc_handover_hello) == 320, "epc_handover_hello must be 320 bytes");
static_assert(offsetof(struct epc_handover_hello, features) == 24, "epc_handover_hello has padding");
static_assert(offsetof(struct epc_handover_hello, path) == 64, "epc_handover_hello has padding");
static_assert(sizeof(struct epc_handover_reply) == 8, "epc_handover_reply must be 8 bytes");

/* Largest number of descriptors the helpers pass in one message. */
#define EPC_HANDOVER_MAX_FDS 8

/*
 * Socket helpers, defined in handover.c: this header must not include <sys/socket.h>, because Swift
 * imports it next to SwiftGlibc and two modules defining fd_set cannot be merged (clean builds fail).
 * Each returns its result or -errno.
 */
long epc_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
long epc_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds_out);
struct sockaddr_un;
/* Fills a sockaddr_un for `path` (-ENAMETOOLONG if it does not fit); addrlen is a socklen_t. */
int epc_unix_address(const char *path, struct sockaddr_un *addr, unsigned int *addrlen);
int epc_unix_seqpacket_connect(const char *path);
int epc_unix_seqpacket_bind(const char *path);
int epc_listen(int fd, int backlog);
int epc_accept_cloexec(int fd);
int epc_peer_pid(int sock);

#endif
