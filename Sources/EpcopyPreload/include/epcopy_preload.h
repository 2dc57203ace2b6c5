/*
 * libEpcopyPreload.so is an LD_PRELOAD library, not an API: programs never call it, it interposes
 * mmap/mmap64. This header exists because SwiftPM gives every C target a public-header directory;
 * it documents the environment the shim reads.
 *
 *   EPCOPY_SHIM_PREFIX      path prefix of the guest-RAM file(s), e.g. "/dev/shm/epcopy-". Unset or
 *                           empty: the shim does nothing at all.
 *   EPCOPY_SHIM_SOCKET      the engine's SOCK_SEQPACKET unix socket.
 *   EPCOPY_UFFD_MODE        "missing" (default) or "missing+minor".
 *   EPCOPY_SHIM_TIMEOUT_MS  how long to wait for the engine's reply; default 10000.
 *   EPCOPY_SHIM_OPTIONAL    "1": when nobody listens at EPCOPY_SHIM_SOCKET (no such socket, or refused), leave
 *                           the mapping ordinary memory instead of failing it. For a libvirt domain whose
 *                           definition always carries the shim: its boots and libvirt's own migrations have
 *                           no engine, and only an engine that took the uffd lets the destination skip RAM.
 *
 * The wire format is in CEpcopyHandover.h.
 */
#ifndef EPCOPY_PRELOAD_H
#define EPCOPY_PRELOAD_H
#endif
