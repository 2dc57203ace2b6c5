/*
 * epcopy-memtouch: the "non-QEMU program" of the tests. It maps a guest-RAM stand-in file the way QEMU
 * does (MAP_SHARED) so the LD_PRELOAD shim hands the mapping to an engine, then touches every page and
 * checks its content, so a test can prove that each fault was resolved with the right bytes (and that
 * no page was silently resolved with zeros).
 *
 *   epcopy-memtouch FILE SIZE_BYTES SEED [--verify-only]
 *
 * Content pattern (the engine tests fill source memory with it): in page p (0-based, of the mapping,
 * which starts at file offset 0), 64-bit little-endian word w (0..pagesize/8-1) holds
 *     splitmix64(SEED ^ (p << 20) ^ w)
 * where splitmix64(x) is the output function of the SplitMix64 generator applied to state x:
 *     z = x + 0x9E3779B97F4A7C15
 *     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
 *     z = (z ^ (z >> 27)) * 0x94D049BB133111EB
 *     return z ^ (z >> 31)
 * Pages listed in env MEMTOUCH_ZERO_PAGES ("3,10-20,99": indices and inclusive ranges) must read as
 * all zeros instead.
 *
 * Default mode: pages are visited in a pseudo-random order derived from SEED; the first access to
 * every other visited page is a write (a compare-and-swap of the expected value, which leaves the
 * content unchanged), so both read and write faults occur. --verify-only: pages are read in order and
 * never written.
 *
 * Other environment:
 *   MEMTOUCH_WAIT_STDIN=1  after mmap (i.e. after the hand-over) wait for one byte on stdin first.
 *   MEMTOUCH_MMAP64=1      map with mmap64 (what QEMU calls) instead of mmap.
 *
 * Output: "OK pages=N" and exit 0; "CORRUPT page=P word=W expected=X got=Y" for the first mismatch
 * and exit 1; "memtouch: ..." on stderr and exit 2 for usage or system errors (including a failed
 * mmap, which is how a refusing shim shows up).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t pattern(uint64_t seed, uint64_t page, uint64_t word) {
    return splitmix64(seed ^ (page << 20) ^ word);
}

/* Every exit flushes stdout first: the test reads our output through a pipe, which is fully buffered. */
__attribute__((noreturn, format(printf, 2, 3))) static void die(int status, const char *fmt, ...) {
    fflush(stdout);
    va_list ap;
    va_start(ap, fmt);
    fputs("memtouch: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(status);
}

static uint64_t parse_u64(const char *what, const char *text) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-') die(2, "%s '%s' is not a number", what, text);
    return (uint64_t)v;
}

/* Parses MEMTOUCH_ZERO_PAGES into `zero` (one byte per page). */
static void parse_zero_pages(const char *spec, unsigned char *zero, uint64_t pages) {
    char *copy = strdup(spec);
    if (copy == NULL) die(2, "out of memory");
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item != NULL; item = strtok_r(NULL, ",", &save)) {
        char *dash = strchr(item, '-');
        uint64_t first, last;
        if (dash != NULL) {
            *dash = '\0';
            first = parse_u64("MEMTOUCH_ZERO_PAGES start", item);
            last = parse_u64("MEMTOUCH_ZERO_PAGES end", dash + 1);
        } else {
            first = last = parse_u64("MEMTOUCH_ZERO_PAGES page", item);
        }
        if (first > last || last >= pages) {
            die(2, "MEMTOUCH_ZERO_PAGES range %" PRIu64 "-%" PRIu64 " is outside 0-%" PRIu64, first, last, pages - 1);
        }
        for (uint64_t p = first; p <= last; p++) zero[p] = 1;
    }
    free(copy);
}

/* Checks one page; `write_first` makes the first access a write so the fault is a write fault. */
static void check_page(volatile uint64_t *base, uint64_t p, size_t words, uint64_t seed, int zero, int write_first) {
    volatile uint64_t *w = base + p * words;
    for (size_t i = 0; i < words; i++) {
        uint64_t expected = zero ? 0 : pattern(seed, p, i);
        uint64_t got;
        if (i == 0 && write_first) {
            /* lock cmpxchg needs write access even when it fails, so this faults as a write; on a
             * mismatch it stores nothing and returns what the page held. */
            got = expected;
            __atomic_compare_exchange_n((uint64_t *)w, &got, expected, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        } else {
            got = w[i];
        }
        if (got != expected) {
            printf("CORRUPT page=%" PRIu64 " word=%zu expected=0x%016" PRIx64 " got=0x%016" PRIx64 "\n", p, i,
                   expected, got);
            fflush(stdout);
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    int verify_only = 0;
    if (argc == 5 && strcmp(argv[4], "--verify-only") == 0) {
        verify_only = 1;
    } else if (argc != 4) {
        die(2, "usage: epcopy-memtouch FILE SIZE_BYTES SEED [--verify-only]");
    }
    const char *file = argv[1];
    uint64_t size = parse_u64("SIZE_BYTES", argv[2]);
    uint64_t seed = parse_u64("SEED", argv[3]);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (size == 0 || size % page != 0) die(2, "SIZE_BYTES %" PRIu64 " is not a positive multiple of %zu", size, page);
    uint64_t pages = size / page;

    unsigned char *zero = calloc((size_t)pages, 1);
    if (zero == NULL) die(2, "out of memory");
    const char *zero_spec = getenv("MEMTOUCH_ZERO_PAGES");
    if (zero_spec != NULL && zero_spec[0] != '\0') parse_zero_pages(zero_spec, zero, pages);

    int fd = open(file, O_RDWR | O_CLOEXEC);
    if (fd < 0) die(2, "open %s: %s", file, strerror(errno));
    const char *use64 = getenv("MEMTOUCH_MMAP64");
    void *map = (use64 != NULL && strcmp(use64, "1") == 0)
                    ? mmap64(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                    : mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) die(2, "mmap %s (%" PRIu64 " bytes): %s", file, size, strerror(errno));

    const char *wait = getenv("MEMTOUCH_WAIT_STDIN");
    if (wait != NULL && strcmp(wait, "1") == 0) {
        char byte;
        ssize_t n;
        do {
            n = read(STDIN_FILENO, &byte, 1);
        } while (n < 0 && errno == EINTR);
        if (n != 1) die(2, "waiting for stdin: %s", n == 0 ? "end of file" : strerror(errno));
    }

    volatile uint64_t *base = map;
    size_t words = page / sizeof(uint64_t);
    if (verify_only) {
        for (uint64_t p = 0; p < pages; p++) check_page(base, p, words, seed, zero[p], 0);
    } else {
        /* Fisher-Yates with a SplitMix64 stream seeded by SEED: a reproducible, fault-unfriendly order. */
        uint64_t *order = malloc((size_t)pages * sizeof *order);
        if (order == NULL) die(2, "out of memory");
        for (uint64_t p = 0; p < pages; p++) order[p] = p;
        uint64_t state = seed;
        for (uint64_t i = pages - 1; i > 0; i--) {
            state += 0x9E3779B97F4A7C15ull;
            uint64_t j = splitmix64(state) % (i + 1);
            uint64_t t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        for (uint64_t i = 0; i < pages; i++) check_page(base, order[i], words, seed, zero[order[i]], (int)(i & 1));
        free(order);
    }

    printf("OK pages=%" PRIu64 "\n", pages);
    fflush(stdout);
    return 0;
}
