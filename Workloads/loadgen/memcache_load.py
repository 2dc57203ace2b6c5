#!/usr/bin/env python3
"""Closed-loop memcached load generator (text protocol, asyncio, stdlib only).

Each of --connections connections keeps exactly one request in flight: a `get`
with probability --get-ratio, else a `set` of --value-size bytes, on a key
drawn uniformly from --keys keys ("k<i>"). Every --interval-ms one CSV row is
written (counts are per interval, latencies in microseconds of the requests
that completed in it):

    t_s,ops,gets,sets,misses,errors,p50_us,p99_us,max_us,target,conns,reconnects,unix_s

t_s is the end of the interval in seconds since the start of the timed run
(time.monotonic); unix_s is the wall clock at the same moment (to line rows up
with a migration log). conns = connections established to the current target
at the end of the interval, reconnects = connections (re)established in it.
errors = failed or timed-out requests (--timeout-ms), protocol errors
(SERVER_ERROR...) and failed connection attempts; a request that is cut off
because the target changed is not an error.

Following a migrating VM: with --target-file F the file (one line HOST:PORT)
is re-read every interval and before every reconnect. When its content
changes, every connection is aborted and reopened to the new address. After
any error a connection reconnects with exponential backoff (10 ms .. 500 ms),
so the run survives the server vanishing for seconds.

--warmup-mb M first stores ceil(M MiB / value-size) keys k0.. (pipelined sets
over all connections), prints how long that took, and (unless --keys is
given) makes the timed run use exactly those keys, so gets should hit.
"""

import argparse
import asyncio
import bisect
import math
import os
import random
import sys
import time

INTERVAL_FIELDS = ["t_s", "ops", "gets", "sets", "misses", "errors",
                   "p50_us", "p99_us", "max_us", "target", "conns",
                   "reconnects", "unix_s"]


def parse_hostport(s):
    s = s.strip()
    if not s:
        raise ValueError("empty target")
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad target {s!r}, want HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class Hist:
    """Log-bucketed latency histogram (~1% resolution) for run totals."""
    BASE = math.log(1.01)

    def __init__(self):
        self.b = {}
        self.n = 0
        self.max = 0

    def add_many(self, xs):
        for x in xs:
            k = int(math.log(x) / self.BASE) if x > 1 else 0
            self.b[k] = self.b.get(k, 0) + 1
        self.n += len(xs)
        if xs:
            self.max = max(self.max, max(xs))

    def pct(self, p):
        if not self.n:
            return 0
        want = math.ceil(self.n * p)
        acc = 0
        for k in sorted(self.b):
            acc += self.b[k]
            if acc >= want:
                return int(math.exp((k + 0.5) * self.BASE))
        return self.max


def pct(sorted_xs, p):
    if not sorted_xs:
        return 0
    i = max(0, math.ceil(len(sorted_xs) * p) - 1)
    return sorted_xs[i]


class Target:
    """Where to connect: HOST:PORT, fixed or followed in --target-file (a half-written or invalid file keeps the
    old target). Also sysbench_load.py's."""

    def __init__(self, fixed=None, path=None):
        self.path = path
        self.text = fixed.strip() if fixed else None
        self.addr = parse_hostport(fixed) if fixed else None
        self.gen = 0
        self.conns = set()  # live Conn objects, aborted on change
        if path:
            self.reload()

    def reload(self):
        """Re-read the file; returns True if the target changed."""
        if not self.path:
            return False
        try:
            with open(self.path) as f:
                text = f.read().strip()
            addr = parse_hostport(text)
        except (OSError, ValueError):
            return False  # keep the old one (file being rewritten, etc.)
        if text == self.text:
            return False
        old = self.text
        self.text, self.addr = text, addr
        self.gen += 1
        if old is not None:
            for c in list(self.conns):
                c.abort()
        return old is not None


class Conn:
    def __init__(self, reader, writer, gen, text):
        self.reader, self.writer, self.gen, self.text = reader, writer, gen, text

    def abort(self):
        try:
            self.writer.transport.abort()
        except Exception:
            pass


class ProtoError(Exception):
    pass


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.ops = self.gets = self.sets = self.misses = self.errors = 0
        self.reconnects = 0
        self.lat = []


class Load:
    def __init__(self, a):
        self.a = a
        self.target = Target(fixed=a.target, path=a.target_file)
        self.cur = Stats()
        self.hist = Hist()
        self.total_ops = self.total_errors = self.total_misses = 0
        self.timeout = a.timeout_ms / 1000.0
        rnd = random.Random(a.seed)
        # Incompressible values: slices of a random buffer.
        self.blob = rnd.randbytes(max(1 << 20, 4 * a.value_size))
        self.rnd = rnd
        self.stop = False
        self.connect_lock = None  # made inside the event loop

    def value(self, key_i):
        off = (key_i * 7919 + self.rnd.randrange(64)) % (len(self.blob) - self.a.value_size)
        return self.blob[off:off + self.a.value_size]

    async def wait_target(self):
        while self.target.addr is None and not self.stop:
            self.target.reload()
            if self.target.addr is None:
                await asyncio.sleep(0.05)

    async def connect(self, stats=True):
        """Connect to the current target, retrying with backoff."""
        backoff = 0.01
        while not self.stop:
            self.target.reload()
            await self.wait_target()
            if self.stop:
                break
            gen, text, (host, port) = self.target.gen, self.target.text, self.target.addr
            try:
                # One connect at a time, each confirmed by a `version` round
                # trip: QEMU's user-networking hostfwd listens with a backlog
                # of 1 and accepts in its main loop, so a second SYN sent
                # before it has accepted the first is dropped (1 s retransmit).
                # An attempt still waiting when the target file changes is given up at once: after a
                # migration the old address (a paused QEMU) never answers, and waiting out the timeout
                # there would add seconds to every measured outage.
                async with self.connect_lock:
                    attempt = asyncio.ensure_future(self.handshake(host, port))
                    given_up = False
                    while not attempt.done():
                        await asyncio.wait({attempt}, timeout=0.05)
                        self.target.reload()
                        if not attempt.done() and (gen != self.target.gen or self.stop):
                            attempt.cancel()
                            given_up = True
                            break
                    if given_up:
                        try:
                            await attempt
                        except BaseException:
                            pass
                        continue
                    r, w = attempt.result()
                c = Conn(r, w, gen, text)
                if gen != self.target.gen:  # changed while connecting
                    c.abort()
                    continue
                self.target.conns.add(c)
                if stats:
                    self.cur.reconnects += 1
                return c
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                if stats:
                    self.cur.errors += 1
                if self.a.verbose:
                    print(f"memcache_load: connect {text}: {type(e).__name__} {e}", file=sys.stderr)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
        return None

    async def handshake(self, host, port):
        """Open a connection and confirm it with a `version` round trip."""
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), max(self.timeout, 3.0))
        try:
            w.write(b"version\r\n")
            line = await asyncio.wait_for(r.readline(), max(self.timeout, 3.0))
            if not line.startswith(b"VERSION"):
                raise ConnectionError(f"version: {line[:40]!r}")
        except BaseException:
            w.transport.abort()
            raise
        return r, w

    def drop(self, c):
        if c is not None:
            self.target.conns.discard(c)
            c.abort()

    @staticmethod
    async def read_get(r):
        line = await r.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("eof")
        if line == b"END\r\n":
            return False
        if not line.startswith(b"VALUE "):
            raise ProtoError(line[:80])
        n = int(line.split()[3])
        await r.readexactly(n + 2)
        if await r.readline() != b"END\r\n":
            raise ProtoError("no END")
        return True

    @staticmethod
    async def read_set(r):
        line = await r.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("eof")
        if line != b"STORED\r\n":
            raise ProtoError(line[:80])

    async def worker(self, idx):
        a = self.a
        rnd = random.Random((a.seed or 0) * 1000 + idx + 1)
        c = None
        backoff = 0.01
        ratio, nkeys, vsize = a.get_ratio, a.keys, a.value_size
        while not self.stop:
            if c is None or c.gen != self.target.gen:
                self.drop(c)
                c = await self.connect()
                if c is None:
                    break
            k = rnd.randrange(nkeys)
            is_get = rnd.random() < ratio
            if is_get:
                req = b"get k%d\r\n" % k
            else:
                req = b"set k%d 0 0 %d\r\n%s\r\n" % (k, vsize, self.value(k))
            t0 = time.perf_counter()
            try:
                c.writer.write(req)
                if is_get:
                    hit = await asyncio.wait_for(self.read_get(c.reader), self.timeout)
                else:
                    await asyncio.wait_for(self.read_set(c.reader), self.timeout)
                    hit = True
            except (OSError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError, ProtoError, ValueError, IndexError) as e:
                switched = c.gen != self.target.gen
                self.drop(c)
                c = None
                if not switched and not self.stop:
                    self.cur.errors += 1
                    if a.verbose:
                        print(f"memcache_load: conn {idx}: {type(e).__name__} {e}", file=sys.stderr)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 0.5)
                continue
            backoff = 0.01
            us = int((time.perf_counter() - t0) * 1e6)
            s = self.cur
            s.ops += 1
            s.lat.append(us)
            if is_get:
                s.gets += 1
                if not hit:
                    s.misses += 1
            else:
                s.sets += 1
        self.drop(c)

    async def ticker(self, out, t_start, n_intervals):
        iv = self.a.interval_ms / 1000.0
        for i in range(1, n_intervals + 1):
            deadline = t_start + i * iv
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            s, self.cur = self.cur, Stats()
            now = time.monotonic()
            lat = sorted(s.lat)
            self.hist.add_many(lat)
            self.total_ops += s.ops
            self.total_errors += s.errors
            self.total_misses += s.misses
            conns = sum(1 for c in self.target.conns if c.gen == self.target.gen)
            row = [f"{now - t_start:.3f}", s.ops, s.gets, s.sets, s.misses, s.errors,
                   pct(lat, 0.5), pct(lat, 0.99), lat[-1] if lat else 0,
                   self.target.text or "", conns, s.reconnects, f"{time.time():.3f}"]
            if out:
                out.write(",".join(map(str, row)) + "\n")
                out.flush()
            if self.a.verbose:
                print("memcache_load: " + " ".join(f"{k}={v}" for k, v in zip(INTERVAL_FIELDS, row)),
                      file=sys.stderr)
            # Follow the target file (aborts all connections on a change).
            if self.target.reload() and self.a.verbose:
                print(f"memcache_load: target -> {self.target.text}", file=sys.stderr)
        self.stop = True
        for c in list(self.target.conns):
            c.abort()

    async def warmup(self):
        a = self.a
        n = math.ceil(a.warmup_mb * (1 << 20) / a.value_size)
        batch = 32
        next_key = 0
        stored = 0
        errors = 0

        async def filler():
            nonlocal next_key, stored, errors
            c = None
            backoff = 0.01
            while next_key < n and not self.stop:
                lo = next_key
                hi = min(n, lo + batch)
                next_key = hi
                buf = b"".join(b"set k%d 0 0 %d\r\n%s\r\n" % (k, a.value_size, self.value(k))
                               for k in range(lo, hi))
                while True:  # until this batch is stored (sets are idempotent)
                    if c is None or c.gen != self.target.gen:
                        self.drop(c)
                        c = await self.connect(stats=False)
                        if c is None:
                            return
                    try:
                        c.writer.write(buf)
                        for _ in range(lo, hi):
                            await asyncio.wait_for(self.read_set(c.reader), max(self.timeout, 5.0))
                        stored += hi - lo
                        backoff = 0.01
                        break
                    except (OSError, ConnectionError, asyncio.IncompleteReadError,
                            asyncio.TimeoutError, ProtoError, ValueError) as e:
                        errors += 1
                        print(f"memcache_load: warm-up: {type(e).__name__} {e}", file=sys.stderr)
                        self.drop(c)
                        c = None
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 0.5)
            self.drop(c)

        t0 = time.monotonic()
        await asyncio.gather(*(filler() for _ in range(a.connections)))
        dt = time.monotonic() - t0
        mb = stored * a.value_size / (1 << 20)
        print(f"memcache_load: warm-up stored {stored} keys x {a.value_size} B = {mb:.1f} MiB "
              f"in {dt:.2f} s ({mb / dt if dt else 0:.1f} MiB/s, {stored / dt if dt else 0:.0f} sets/s, "
              f"{errors} errors)", flush=True)
        return n

    async def run(self):
        a = self.a
        self.connect_lock = asyncio.Lock()
        await self.wait_target()
        if a.warmup_mb:
            n = await self.warmup()
            if not a.keys_given:
                a.keys = n
        if a.duration <= 0:
            return
        out = None
        if a.out:
            out = open(a.out, "w", buffering=1)
            out.write(",".join(INTERVAL_FIELDS) + "\n")
        iv = a.interval_ms / 1000.0
        n_int = max(1, round(a.duration / iv))
        t_start = time.monotonic()
        t_wall = time.time()
        workers = [asyncio.ensure_future(self.worker(i)) for i in range(a.connections)]
        await self.ticker(out, t_start, n_int)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if out:
            out.close()
        el = n_int * iv
        print(f"memcache_load: {self.total_ops} ops in {el:.1f} s = {self.total_ops / el:.0f} ops/s mean, "
              f"p50 {self.hist.pct(0.5)} us, p99 {self.hist.pct(0.99)} us, max {self.hist.max} us, "
              f"misses {self.total_misses}, errors {self.total_errors}, {a.connections} conns, "
              f"target {self.target.text} (start unix {t_wall:.3f})", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", help="HOST:PORT")
    g.add_argument("--target-file", help="file holding HOST:PORT, re-read every interval")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--get-ratio", type=float, default=0.9)
    p.add_argument("--keys", type=int, default=None,
                   help="key space (default: the warm-up's keys, else 100000)")
    p.add_argument("--value-size", type=int, default=1024)
    p.add_argument("--duration", type=float, default=30.0, help="timed run, s (0: warm-up only)")
    p.add_argument("--interval-ms", type=float, default=250.0)
    p.add_argument("--warmup-mb", type=float, default=0.0)
    p.add_argument("--timeout-ms", type=float, default=1000.0,
                   help="a request or connect slower than this is an error (reconnect)")
    p.add_argument("--out", help="CSV file (per-interval rows)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    a.keys_given = a.keys is not None
    if a.keys is None:
        a.keys = 100000
    if a.connections < 1 or a.keys < 1 or a.value_size < 1 or not 0 <= a.get_ratio <= 1:
        p.error("bad --connections/--keys/--value-size/--get-ratio")
    load = Load(a)
    try:
        asyncio.run(load.run())
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
