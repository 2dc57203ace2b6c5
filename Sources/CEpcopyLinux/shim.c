/*
 * Out-of-line parts of CEpcopyLinux: code that needs a target attribute (SSE4.2) and therefore must
 * not be compiled into every Swift caller through the header.
 */
#include "CEpcopyLinux.h"

#include <pthread.h>
#include <sys/eventfd.h>

int epc_eventfd(unsigned int initval, int nonblocking) {
    int fd = eventfd(initval, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0));
    return fd < 0 ? -errno : fd;
}

int epc_set_thread_name(const char *name) { return -pthread_setname_np(pthread_self(), name); }

#if defined(__x86_64__)
#include <nmmintrin.h>

int epc_cpu_has_sse42(void) { return __builtin_cpu_supports("sse4.2"); }

/* Same convention as the Swift CRC32C: seed 0, pre/post inversion inside, chainable. */
__attribute__((target("sse4.2"))) uint32_t epc_crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    uint64_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); len--; }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    while (len--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#else
int epc_cpu_has_sse42(void) { return 0; }
/* Bitwise fallback so the symbol is correct everywhere; callers prefer the Swift table version here. */
uint32_t epc_crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    uint32_t c = ~crc;
    while (len--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}
#endif

static inline uint64_t epc_splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void epc_pattern_fill(void *base, uint64_t first_page, uint64_t pages, uint64_t seed) {
    uint64_t *w = base;
    for (uint64_t p = 0; p < pages; p++)
        for (uint64_t i = 0; i < 512; i++) *w++ = epc_splitmix64(seed ^ ((first_page + p) << 20) ^ i);
}

int64_t epc_pattern_check(const void *base, uint64_t first_page, uint64_t pages, uint64_t seed) {
    const uint64_t *w = base;
    for (uint64_t p = 0; p < pages; p++)
        for (uint64_t i = 0; i < 512; i++)
            if (*w++ != epc_splitmix64(seed ^ ((first_page + p) << 20) ^ i)) return (int64_t)p;
    return -1;
}
