/*
 * epcopy-memtest: memory-integrity workload for the epcopy test guest.
 *
 * Allocates an anonymous region, fills every 8-byte word with a value derived
 * from (seed, global word index, generation of the word's page), then loops:
 * each iteration rewrites ~dirty_pct% of the pages with a bumped generation
 * (and, with churn on, frees ~churn_pct% of the pages back to the kernel and
 * rewrites them into fresh pages) and verifies every page against the pattern
 * of its current generation, then prints exactly one line:
 *
 *   epcopy-memtest iter=N pages=P OK
 *   epcopy-memtest iter=N pages=P churn=C OK        (churn on: C pages so far)
 *   epcopy-memtest iter=N CORRUPT page=X word=Y
 *
 * to the serial console (through /dev/kmsg, else stdout) and to the
 * virtio-serial port named org.epcopy.log.0 when present. (The port
 * org.epcopy.agent.0 belongs to epcopy-agent, which speaks binary frames on
 * it; these text lines have a port of their own.) All state (the region, the
 * generation table, the PRNG, the iteration counter) lives in guest memory, so
 * it carries across a live migration and N keeps growing.
 *
 * Knobs (kernel command line, overridable by argv for host-side runs:
 * epcopy-memtest [MiB [seed]]):
 *   epcopy.memtest_mib=N        region size (default min(128, MemTotal/2))
 *   epcopy.seed=S               pattern/PRNG seed (default 1)
 *   epcopy.memtest_dirty_pct=D  % of pages rewritten per iteration (default 1)
 *   epcopy.memtest_period_ms=T  iteration period (default 1000)
 *   epcopy.memtest_inject_iter=K  flip one bit just before iteration K's
 *                               verification (self-test of the detector; 0=off)
 *   epcopy.memtest_churn_pct=C  % of pages freed (madvise MADV_DONTNEED: the
 *                               page goes back to the guest kernel's free
 *                               lists) and at once rewritten with their next
 *                               generation (a freshly allocated page) per
 *                               iteration (default 0 = off)
 *   epcopy.dirty_free_mib=N     at start, before the region is filled: map N
 *                               MiB, write non-zero data to every page, unmap
 *                               it, leaving N MiB free but dirty (default 0)
 *
 * Build: gcc -static -O2 -o epcopy-memtest memtest.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define LOG_PORT_NAME "org.epcopy.log.0"
#define WORD_STEP 0x9E3779B97F4A7C15ULL

static uint64_t g_seed = 1;
static size_t g_page_words;  /* 8-byte words per page */
static size_t g_npages;
static uint64_t *g_mem;      /* the tested region */
static uint32_t *g_gen;      /* generation of each page */
static uint64_t g_rng;       /* xorshift64* state, seeded from g_seed */
static int g_port_fd = -1;   /* virtio-serial log port, or -1 */
static char g_port_path[300];

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Value of word 0 of a page; word i holds key + (global word index) * WORD_STEP
 * (the page's first global index is folded into the key). */
static uint64_t page_key(size_t page, uint32_t gen)
{
    uint64_t k = splitmix64(g_seed ^ splitmix64(((uint64_t)page << 32) ^ gen));
    return k + (uint64_t)page * g_page_words * WORD_STEP;
}

static void fill_page(size_t page)
{
    uint64_t *w = g_mem + page * g_page_words;
    uint64_t v = page_key(page, g_gen[page]);
    for (size_t i = 0; i < g_page_words; i++, v += WORD_STEP)
        w[i] = v;
}

/* Returns the index of the first bad word, or -1. A plain scalar loop on
 * purpose: under QEMU TCG it verifies 128 MiB in ~50 ms, while a 16-byte
 * vector version was ~5x slower (TCG emulates SSE through helpers). */
static long check_page(size_t page)
{
    const volatile uint64_t *w = g_mem + page * g_page_words;
    uint64_t v = page_key(page, g_gen[page]);
    uint64_t diff = 0;
    for (size_t i = 0; i < g_page_words; i++, v += WORD_STEP)
        diff |= w[i] ^ v;
    if (!diff)
        return -1;
    v = page_key(page, g_gen[page]);
    for (size_t i = 0; i < g_page_words; i++, v += WORD_STEP)
        if (w[i] != v)
            return (long)i;
    return -1; /* changed under us (cannot happen single-threaded) */
}

static uint64_t rng_next(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1DULL;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* ---- virtio-serial log port --------------------------------------------- */

static int read_small_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = 0;
    return 0;
}

/* Find the port by name under /sys/class/virtio-ports and open its node,
 * creating it with mknod from the sysfs "dev" file if devtmpfs did not. */
static void port_try_open(void)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], buf[128];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_small_file(path, buf, sizeof buf) < 0 || strcmp(buf, LOG_PORT_NAME) != 0)
            continue;
        snprintf(g_port_path, sizeof g_port_path, "/dev/%s", e->d_name);
        struct stat st;
        if (stat(g_port_path, &st) < 0) {
            unsigned maj, min;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/dev", e->d_name);
            if (read_small_file(path, buf, sizeof buf) == 0 &&
                sscanf(buf, "%u:%u", &maj, &min) == 2)
                mknod(g_port_path, S_IFCHR | 0600, makedev(maj, min));
        }
        /* Non-blocking: a host side that is not connected (or slow) must never
         * stall the workload; such lines are dropped on the port only. */
        g_port_fd = open(g_port_path, O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        break;
    }
    closedir(d);
}

/*
 * The serial console is written through the kernel log (/dev/kmsg), not the tty: printk drives the
 * UART by polling, while tty output waits for the transmit interrupt. After a QEMU precopy migration
 * that interrupt was sometimes lost, the tty stalled, and this program blocked in write() (the
 * destination then showed no output at all). -1 until opened; falls back to stdout if unavailable.
 */
static int g_kmsg_fd = -2;

static void kmsg_open(void)
{
    g_kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (g_kmsg_fd < 0)
        return;
    /* Show notice-level messages on the console, and do not rate-limit our one line a second. */
    int fd = open("/proc/sys/kernel/printk", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) { write_all(fd, "7", 1); close(fd); }
    fd = open("/proc/sys/kernel/printk_devkmsg", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) { write_all(fd, "on\n", 3); close(fd); }
}

static void emit(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    if (g_kmsg_fd == -2)
        kmsg_open();
    if (g_kmsg_fd >= 0) {
        char record[272];
        int m = snprintf(record, sizeof record, "<5>%.*s", n, line);
        if (m > 0 && write(g_kmsg_fd, record, (size_t)m) < 0)
            write_all(STDOUT_FILENO, line, (size_t)n);
    } else {
        write_all(STDOUT_FILENO, line, (size_t)n);
    }
    if (g_port_fd < 0)
        port_try_open();
    if (g_port_fd >= 0) {
        ssize_t w = write(g_port_fd, line, (size_t)n);
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            close(g_port_fd); /* e.g. unplugged: rescan next time */
            g_port_fd = -1;
        }
    }
}

/* ---- configuration ------------------------------------------------------- */

static int cmdline_u64(const char *cmdline, const char *key, uint64_t *out)
{
    size_t klen = strlen(key);
    for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += klen) {
        if ((p == cmdline || p[-1] == ' ') && p[klen] == '=') {
            char *end;
            errno = 0;
            uint64_t v = strtoull(p + klen + 1, &end, 0);
            if (errno == 0 && end != p + klen + 1 && (*end == 0 || *end == ' ' || *end == '\n')) {
                *out = v;
                return 1;
            }
        }
    }
    return 0;
}

/* Map `mib` MiB, write non-zero pseudo-random words to all of it, unmap it: the
 * pages go back to the kernel's free lists still holding that data, as after a
 * burst of use. Returns 0, or -1 if the mapping failed. */
static int dirty_free(uint64_t mib)
{
    size_t len = (size_t)(mib * 1024 * 1024);
    uint64_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return -1;
    uint64_t x = splitmix64(g_seed ^ 0x6469727479ULL) | 1; /* "dirty" */
    for (size_t i = 0; i < len / sizeof *m; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        m[i] = x; /* xorshift64 never yields 0 */
    }
    munmap(m, len);
    return 0;
}

static uint64_t memtotal_kib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    uint64_t kib = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemTotal: %" SCNu64 " kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

int main(int argc, char **argv)
{
    char cmdline[4096] = "";
    uint64_t mib = 0, dirty_pct = 1, period_ms = 1000, inject_iter = 0, churn_pct = 0, dirty_free_mib = 0, v;

    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    read_small_file("/proc/cmdline", cmdline, sizeof cmdline);

    if (cmdline_u64(cmdline, "epcopy.memtest_mib", &v))
        mib = v;
    if (cmdline_u64(cmdline, "epcopy.seed", &v))
        g_seed = v;
    if (cmdline_u64(cmdline, "epcopy.memtest_dirty_pct", &v))
        dirty_pct = v;
    if (cmdline_u64(cmdline, "epcopy.memtest_period_ms", &v) && v > 0)
        period_ms = v;
    if (cmdline_u64(cmdline, "epcopy.memtest_inject_iter", &v))
        inject_iter = v;
    if (cmdline_u64(cmdline, "epcopy.memtest_churn_pct", &v))
        churn_pct = v;
    if (cmdline_u64(cmdline, "epcopy.dirty_free_mib", &v))
        dirty_free_mib = v;
    if (argc > 1)
        mib = strtoull(argv[1], NULL, 0);
    if (argc > 2)
        g_seed = strtoull(argv[2], NULL, 0);
    if (mib == 0) {
        uint64_t half = memtotal_kib() / 2 / 1024;
        mib = (half > 0 && half < 128) ? half : 128;
    }
    if (dirty_pct > 100)
        dirty_pct = 100;
    if (churn_pct > 100)
        churn_pct = 100;

    if (dirty_free_mib > 0) {
        int64_t t0 = now_ns();
        if (dirty_free(dirty_free_mib) == 0)
            emit("epcopy-memtest dirty_free mib=%" PRIu64 ": wrote non-zero data to every page and unmapped it "
                 "(%" PRIu64 " MiB free but dirty) in %" PRId64 " ms\n",
                 dirty_free_mib, dirty_free_mib, (now_ns() - t0) / 1000000);
        else
            emit("epcopy-memtest dirty_free mib=%" PRIu64 " FAILED mmap: %s\n", dirty_free_mib, strerror(errno));
    }

    long pagesz = sysconf(_SC_PAGESIZE);
    if (pagesz <= 0)
        pagesz = 4096;
    g_page_words = (size_t)pagesz / sizeof(uint64_t);
    g_npages = (size_t)(mib * 1024 * 1024 / (uint64_t)pagesz);
    if (g_npages == 0)
        g_npages = 1;

    g_mem = mmap(NULL, g_npages * (size_t)pagesz, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_gen = mmap(NULL, g_npages * sizeof *g_gen, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_mem == MAP_FAILED || g_gen == MAP_FAILED) {
        emit("epcopy-memtest FATAL mmap %" PRIu64 " MiB: %s\n", mib, strerror(errno));
        return 1;
    }
    madvise(g_mem, g_npages * (size_t)pagesz, MADV_NOHUGEPAGE);

    g_rng = splitmix64(g_seed ^ 0x6570636F7079ULL) | 1; /* "epcopy" */
    for (size_t p = 0; p < g_npages; p++)
        fill_page(p); /* touches every page */

    size_t per_iter = (size_t)((uint64_t)g_npages * dirty_pct / 100);
    if (per_iter == 0 && dirty_pct > 0)
        per_iter = 1;
    size_t churn_per_iter = (size_t)((uint64_t)g_npages * churn_pct / 100);
    if (churn_per_iter == 0 && churn_pct > 0)
        churn_per_iter = 1;
    uint64_t churned = 0;
    if (churn_per_iter > 0)
        emit("epcopy-memtest start mib=%" PRIu64 " seed=%" PRIu64 " pages=%zu dirty_per_iter=%zu churn_per_iter=%zu "
             "period_ms=%" PRIu64 "\n", mib, g_seed, g_npages, per_iter, churn_per_iter, period_ms);
    else
        emit("epcopy-memtest start mib=%" PRIu64 " seed=%" PRIu64 " pages=%zu dirty_per_iter=%zu period_ms=%" PRIu64 "\n",
             mib, g_seed, g_npages, per_iter, period_ms);

    const int64_t period_ns = (int64_t)period_ms * 1000000LL;
    int64_t deadline = now_ns();
    for (uint64_t iter = 1;; iter++) {
        for (size_t i = 0; i < per_iter; i++) {
            size_t p = (size_t)(rng_next() % g_npages);
            g_gen[p]++;
            fill_page(p);
        }
        /* Churn: give the page back to the kernel (it becomes a free page, and
         * reads as zeros until written), then write its next generation, which
         * faults in a newly allocated page. */
        for (size_t i = 0; i < churn_per_iter; i++) {
            size_t p = (size_t)(rng_next() % g_npages);
            madvise(g_mem + p * g_page_words, (size_t)pagesz, MADV_DONTNEED);
            g_gen[p]++;
            fill_page(p);
        }
        churned += churn_per_iter;
        if (iter == inject_iter) {
            size_t p = g_npages / 2;
            g_mem[p * g_page_words + 3] ^= 1ULL << 17;
        }
        long bad_page = -1, bad_word = -1;
        for (size_t p = 0; p < g_npages; p++) {
            long w = check_page(p);
            if (w >= 0) {
                bad_page = (long)p;
                bad_word = w;
                break;
            }
        }
        if (bad_page < 0 && churn_per_iter > 0)
            emit("epcopy-memtest iter=%" PRIu64 " pages=%zu churn=%" PRIu64 " OK\n", iter, g_npages, churned);
        else if (bad_page < 0)
            emit("epcopy-memtest iter=%" PRIu64 " pages=%zu OK\n", iter, g_npages);
        else
            emit("epcopy-memtest iter=%" PRIu64 " CORRUPT page=%ld word=%ld\n", iter, bad_page, bad_word);

        deadline += period_ns;
        int64_t now = now_ns();
        if (deadline < now - period_ns) /* far behind (slow host, paused VM): do not burst */
            deadline = now;
        if (deadline > now) {
            struct timespec ts = {(time_t)((deadline - now) / 1000000000LL), (long)((deadline - now) % 1000000000LL)};
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
        }
    }
}
