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

/*
 * CRC-32C with the SSE4.2 crc32 instruction. Same convention as the Swift CRC32C: seed 0 for a fresh CRC,
 * pre/post inversion inside, chainable: f(f(0, a), b) == f(0, a || b).
 *
 * The instruction has a latency of about three cycles but can start one per cycle, so a single dependent chain
 * uses a third of the hardware. epc_crc32c_hw runs three chains over three adjacent blocks and merges them:
 * on the raw (uninverted) register the CRC is linear, raw(c, A || B) = raw(c, zeros(|B|)) ^ raw(0, B), and
 * "advance the register over n zero bytes" is a fixed 32x32 GF(2) matrix, applied through four 256-entry tables.
 */
#define EPC_CRC32C_POLY 0x82F63B78u
#define EPC_CRC32C_LONG 8192 /* bytes per chain in the big-block loop; multiple of 8 */
#define EPC_CRC32C_SHORT 256 /* bytes per chain in the small-block loop; multiple of 8 */

/* A GF(2) 32x32 matrix as its 32 columns: m[k] is the image of bit k. */
static uint32_t epc_gf2_apply(const uint32_t m[32], uint32_t v) {
    uint32_t r = 0;
    for (int k = 0; v != 0; k++, v >>= 1)
        if (v & 1u) r ^= m[k];
    return r;
}

/* out = a after b (apply b first). out must not alias a or b. */
static void epc_gf2_compose(uint32_t out[32], const uint32_t a[32], const uint32_t b[32]) {
    for (int k = 0; k < 32; k++) out[k] = epc_gf2_apply(a, b[k]);
}

/* op = the operator advancing a raw CRC-32C register over n zero bytes, by square-and-multiply. */
static void epc_crc32c_zeros_operator(uint32_t op[32], size_t n) {
    uint32_t step[32], tmp[32];
    /* One zero bit: shift right, folding the polynomial in when bit 0 falls out. */
    step[0] = EPC_CRC32C_POLY;
    for (int k = 1; k < 32; k++) step[k] = 1u << (k - 1);
    /* Square three times: 2, 4, then 8 zero bits, i.e. one zero byte. */
    for (int i = 0; i < 3; i++) {
        epc_gf2_compose(tmp, step, step);
        memcpy(step, tmp, sizeof tmp);
    }
    for (int k = 0; k < 32; k++) op[k] = 1u << k;
    /* step is now the operator for 2^i zero bytes at bit i of n. */
    while (n != 0) {
        if (n & 1u) {
            epc_gf2_compose(tmp, step, op);
            memcpy(op, tmp, sizeof tmp);
        }
        n >>= 1;
        if (n != 0) {
            epc_gf2_compose(tmp, step, step);
            memcpy(step, tmp, sizeof tmp);
        }
    }
}

/* Shift tables: table[j][b] is the operator applied to byte b placed at byte j of the register. */
static uint32_t epc_crc32c_long_shift[4][256];
static uint32_t epc_crc32c_short_shift[4][256];
static pthread_once_t epc_crc32c_tables_once = PTHREAD_ONCE_INIT;

static void epc_crc32c_fill_shift_table(uint32_t table[4][256], size_t n) {
    uint32_t op[32];
    epc_crc32c_zeros_operator(op, n);
    for (int j = 0; j < 4; j++)
        for (uint32_t b = 0; b < 256; b++) table[j][b] = epc_gf2_apply(op, b << (8 * j));
}

static void epc_crc32c_build_tables(void) {
    epc_crc32c_fill_shift_table(epc_crc32c_long_shift, EPC_CRC32C_LONG);
    epc_crc32c_fill_shift_table(epc_crc32c_short_shift, EPC_CRC32C_SHORT);
}

/* The raw register c advanced over the table's number of zero bytes. */
static inline uint32_t epc_crc32c_shift(const uint32_t table[4][256], uint32_t c) {
    return table[0][c & 0xFF] ^ table[1][(c >> 8) & 0xFF] ^ table[2][(c >> 16) & 0xFF] ^ table[3][c >> 24];
}

__attribute__((target("sse4.2"))) static inline uint64_t epc_crc32c_word(uint64_t c, const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return _mm_crc32_u64(c, v);
}

/* The single-chain version, kept as the reference for benchmarks. */
__attribute__((target("sse4.2"))) uint32_t epc_crc32c_hw_serial(uint32_t crc, const void *data, size_t len) {
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

/* Three interleaved chains over adjacent blocks of `block` bytes each, merged with the block's shift table. */
#define EPC_CRC32C_THREE_WAY(block, table)                                                                    \
    while (len >= 3 * (size_t)(block)) {                                                                      \
        uint64_t c1 = 0, c2 = 0;                                                                              \
        const uint8_t *end = p + (block);                                                                     \
        do {                                                                                                  \
            c = epc_crc32c_word(c, p);                                                                        \
            c1 = epc_crc32c_word(c1, p + (block));                                                            \
            c2 = epc_crc32c_word(c2, p + 2 * (block));                                                        \
            p += 8;                                                                                           \
        } while (p < end);                                                                                    \
        c = epc_crc32c_shift(table, (uint32_t)c) ^ c1;                                                        \
        c = epc_crc32c_shift(table, (uint32_t)c) ^ c2;                                                        \
        p += 2 * (block);                                                                                     \
        len -= 3 * (size_t)(block);                                                                           \
    }

__attribute__((target("sse4.2"))) uint32_t epc_crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    uint64_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); len--; }
    if (len >= 3 * (size_t)EPC_CRC32C_SHORT) {
        pthread_once(&epc_crc32c_tables_once, epc_crc32c_build_tables);
        EPC_CRC32C_THREE_WAY(EPC_CRC32C_LONG, epc_crc32c_long_shift)
        EPC_CRC32C_THREE_WAY(EPC_CRC32C_SHORT, epc_crc32c_short_shift)
    }
    while (len >= 8) {
        c = epc_crc32c_word(c, p);
        p += 8;
        len -= 8;
    }
    while (len--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#undef EPC_CRC32C_THREE_WAY
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
uint32_t epc_crc32c_hw_serial(uint32_t crc, const void *data, size_t len) { return epc_crc32c_hw(crc, data, len); }
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
