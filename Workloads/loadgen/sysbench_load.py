#!/usr/bin/env python3
"""MySQL/MariaDB load for the migration benchmark: sysbench oltp_read_write at 250 ms granularity.

Runs Debian's sysbench (1.0.20) with oltp_intervals.lua (next to this file): the unchanged
oltp_read_write transactions, each timed in the client; the script writes per-thread, per-interval
records to a pipe and this driver merges them into the same CSV as memcache_load.py, one row per
--interval-ms:

    t_s,ops,gets,sets,misses,errors,p50_us,p99_us,max_us,target,conns,reconnects,unix_s

ops = transactions completed in the interval (by completion time); gets / sets = the read / write SQL
statements of those transactions (14 and 4 each with the defaults; BEGIN/COMMIT not counted);
misses = 0 (meaningless here); p50/p99/max = transaction latency, µs; errors = failed transactions
(one per thread when the connection is lost; deadlocks and lock wait timeouts, which sysbench retries)
plus sysbench runs that ended before the timed run did (lost connection, refused connection);
conns = sysbench threads connected to the current target at the end of the interval; reconnects =
threads that connected in the interval. t_s = (k + 1) * interval since the start of the timed run and
unix_s = start + t_s (the wall clock, to line rows up with a migration log). Every interval gets a row,
with ops 0 while nothing completes (an outage). A row is written --grace-ms after its interval ends
(records arrive as transactions complete); a record that arrives later still is counted as `late` in
the summary line and not in any row.

Following a migrating VM: with --target-file F (one line HOST:PORT) the file is re-read every 50 ms.
When it changes, the running sysbench is killed (its threads may hang in a query to a stopped VM; that
is not an error) and a new one is started against the new address for the rest of the timed run. A
sysbench that exits early is restarted with backoff (50 ms .. 1 s), against the same address, and one
whose threads have not all connected after --init-timeout s is killed and restarted.

A lost connection ends sysbench (FATAL, exit 1) and the driver starts a new one, instead of
--mysql-ignore-errors=all and sysbench's own reconnect: with Debian's sysbench 1.0.20 and libmariadb
that reconnect reuses a closed MYSQL handle (akopytov/sysbench#527) and sysbench died of SIGSEGV when
the source VM went away. --ignore-errors (sysbench's default list: deadlock, lock wait timeout,
record changed) are retried by sysbench as usual.

--warmup first runs oltp_intervals.lua's `warmup` command (a scan of each table's clustered and
secondary index, which loads the dataset into the InnoDB buffer pool) and prints how long it took;
--duration 0 stops after it. The dataset itself (sbtest1..N, --tables x --table-size rows) must exist:
the benchmark image prepares it at build time (Workloads/images/build.sh, Workloads/mysql/README.md).
"""

import argparse
import ctypes
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from memcache_load import INTERVAL_FIELDS, Hist, Target, parse_hostport, pct  # noqa: E402  (one CSV format, one target file)

LUA = os.path.join(HERE, "oltp_intervals.lua")
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """In the child before exec: SIGKILL when the driver dies, even by SIGKILL (no sysbench left behind)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Intervals:
    """Merges the threads' E/C records into per-interval rows. Thread-safe (readers add, the main loop seals)."""

    def __init__(self, origin, interval_s, n_intervals):
        self.origin, self.iv, self.n = origin, interval_s, n_intervals
        self.lock = threading.Lock()
        self.bins = {}  # k -> [ops, errors, reads, writes, [latencies]]
        self.reconnects = {}  # k -> threads connected in interval k
        self.sealed = 0  # intervals < sealed are written
        self.late = 0  # transactions whose interval was already written
        self.bad = 0  # unparseable records

    def _bin(self, k):
        b = self.bins.get(k)
        if b is None:
            b = self.bins[k] = [0, 0, 0, 0, []]
        return b

    def interval_of(self, unix_s):
        return math.floor((unix_s - self.origin) / self.iv)

    def add_line(self, line):
        """One record from oltp_intervals.lua. Returns 'C' for a connect, 'E' for results, None otherwise."""
        f = line.split()
        try:
            if f and f[0] == "E" and len(f) in (7, 8):
                k, n, err, reads, writes = (int(x) for x in f[2:7])
                lat = [int(x) for x in f[7].split(",")] if len(f) == 8 else []
                if len(lat) != n:
                    raise ValueError("latency count")
                with self.lock:
                    if k < 0 or k >= self.n:
                        return "E"
                    if k < self.sealed:
                        self.late += n
                        return "E"
                    b = self._bin(k)
                    b[0] += n
                    b[1] += err
                    b[2] += reads
                    b[3] += writes
                    b[4].extend(lat)
                return "E"
            if f and f[0] == "C" and len(f) == 3:
                k = self.interval_of(float(f[2]))
                with self.lock:
                    k = min(max(k, self.sealed), self.n - 1)
                    self.reconnects[k] = self.reconnects.get(k, 0) + 1
                return "C"
        except ValueError:
            pass
        with self.lock:
            self.bad += 1
        return None

    def add_errors(self, unix_s, count=1):
        k = self.interval_of(unix_s)
        with self.lock:
            k = min(max(k, self.sealed), self.n - 1)
            self._bin(k)[1] += count

    def seal(self, k, target, conns):
        """Interval k's CSV row (a list in INTERVAL_FIELDS order) and its sorted latencies."""
        with self.lock:
            assert k == self.sealed, (k, self.sealed)
            ops, errors, reads, writes, lat = self.bins.pop(k, [0, 0, 0, 0, []])
            reconnects = self.reconnects.pop(k, 0)
            self.sealed = k + 1
        lat.sort()
        t = (k + 1) * self.iv
        row = [f"{t:.3f}", ops, reads, writes, 0, errors, pct(lat, 0.5), pct(lat, 0.99), lat[-1] if lat else 0,
               target or "", conns, reconnects, f"{self.origin + t:.3f}"]
        return row, lat


class Sysbench:
    """One sysbench process against one target; a thread reads its records into an Intervals."""

    def __init__(self, a, target, command, seconds=None, intervals=None, origin=None, threads=None):
        self.target = target
        self.threads = threads or a.threads
        self.connected = 0
        self.announced = False
        self.started = time.time()
        host, port = parse_hostport(target)
        rfd, wfd = os.pipe()
        cmd = [a.sysbench, LUA, f"--mysql-host={host}", f"--mysql-port={port}", f"--mysql-user={a.user}",
               f"--mysql-password={a.password}", f"--mysql-db={a.db}", f"--tables={a.tables}",
               f"--table-size={a.table_size}", f"--threads={self.threads}",
               f"--mysql-ignore-errors={a.ignore_errors}", f"--rand-type={a.rand_type}", f"--epcopy-fd={wfd}",
               f"--epcopy-connect-lock={a.lock_file}", f"--epcopy-flush-ms={a.flush_ms}"]
        if command == "run":
            cmd += [f"--time={max(1, math.ceil(seconds))}", "--report-interval=0", "--events=0",
                    f"--epcopy-origin={origin:.6f}", f"--epcopy-interval-ms={a.interval_ms:g}"]
        cmd += a.sysbench_arg + [command]
        if a.verbose:
            print("sysbench_load: " + " ".join(cmd), file=sys.stderr, flush=True)
        try:
            # Its output (banner, final statistics, errors) goes to ours: the harness keeps it in load.log.
            self.proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        finally:
            os.close(wfd)
        self.reader = threading.Thread(target=self._read, args=(rfd, intervals), daemon=True)
        self.reader.start()

    def _read(self, rfd, intervals):
        with os.fdopen(rfd, "r", errors="replace") as f:
            for line in f:
                if intervals is None:
                    continue
                if intervals.add_line(line) == "C":
                    self.connected += 1

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(timeout=5)


class Load:
    def __init__(self, a):
        self.a = a
        self.target = Target(fixed=a.target, path=a.target_file)

    def wait_target(self):
        while self.target.text is None:
            self.target.reload()
            if self.target.text is None:
                time.sleep(0.05)

    def warmup(self):
        a = self.a
        t0 = time.monotonic()
        for attempt in range(1, 4):
            self.target.reload()
            sb = Sysbench(a, self.target.text, "warmup", threads=min(a.tables, a.warmup_threads))
            try:
                rc = sb.proc.wait(timeout=a.warmup_timeout)
            except subprocess.TimeoutExpired:
                rc = f"none: killed after {a.warmup_timeout:g} s"
            sb.kill()
            if rc == 0:
                dt = time.monotonic() - t0
                print(f"sysbench_load: warm-up read {a.tables} tables x {a.table_size} rows in {dt:.2f} s "
                      f"({attempt} attempt{'s' if attempt > 1 else ''}, target {self.target.text})", flush=True)
                return True
            print(f"sysbench_load: warm-up attempt {attempt} failed (sysbench exit {rc})", file=sys.stderr,
                  flush=True)
            time.sleep(1)
        return False

    def run(self):
        a = self.a
        self.wait_target()
        if a.warmup and not self.warmup():
            return 1
        if a.duration <= 0:
            return 0
        iv = a.interval_ms / 1000.0
        n = max(1, round(a.duration / iv))
        out = open(a.out, "w", buffering=1) if a.out else None
        if out:
            out.write(",".join(INTERVAL_FIELDS) + "\n")
        origin = time.time()
        end = origin + n * iv
        ivs = Intervals(origin, iv, n)
        hist = Hist()
        snap = {}  # k -> (target, conns) at the end of interval k, until its row is written
        snapped = 0  # intervals < snapped have a snapshot
        sb = None
        starts = 0
        next_start, backoff = origin, 0.05
        totals = {"ops": 0, "errors": 0}
        grace = a.grace_ms / 1000.0

        def note(text):  # what the client did and when (load.log), t from the start of the timed run
            print(f"sysbench_load: t={time.time() - origin:.3f} s: {text}", file=sys.stderr, flush=True)
        try:
            while ivs.sealed < n:
                now = time.time()
                # Follow the target; restart sysbench when it changed or ended early.
                if self.target.reload():
                    note(f"target -> {self.target.text}" + ("; sysbench killed" if sb is not None else ""))
                    if sb is not None:
                        sb.kill()
                        sb = None
                    next_start, backoff = now, 0.05
                # sysbench 1.0.20 waits 30 s for its threads to connect (not settable); do not wait that long.
                stuck = sb is not None and sb.connected < sb.threads and now - sb.started > a.init_timeout
                if sb is not None and (stuck or not sb.alive()) and now < end:
                    sb.kill()
                    note(f"sysbench {'did not connect' if stuck else f'exited ({sb.proc.returncode})'} after "
                         f"{now - sb.started:.2f} s; again in {backoff:.2f} s")
                    sb = None
                    ivs.add_errors(now)
                    next_start = now + backoff
                    backoff = min(1.0, backoff * 2)
                if sb is None and next_start <= now < end - 0.05:
                    sb = Sysbench(a, self.target.text, "run", seconds=end - now, intervals=ivs, origin=origin)
                    starts += 1
                    note(f"sysbench {starts} started against {sb.target}")
                elif sb is not None and sb.connected >= sb.threads and not sb.announced:
                    sb.announced = True
                    backoff = 0.05
                    note(f"sysbench {starts}: {sb.connected} threads connected in {now - sb.started:.2f} s")
                # Snapshot the state at each interval's end, write each row once its records are in.
                k_now = min(n, ivs.interval_of(now))
                conns = min(sb.connected, sb.threads) if sb is not None and sb.alive() else 0
                while snapped < k_now:
                    snap[snapped] = (self.target.text, conns)
                    snapped += 1
                while ivs.sealed < snapped and now >= origin + (ivs.sealed + 1) * iv + grace:
                    k = ivs.sealed
                    row, lat = ivs.seal(k, *snap.pop(k))
                    hist.add_many(lat)
                    totals["ops"] += row[1]
                    totals["errors"] += row[5]
                    if out:
                        out.write(",".join(map(str, row)) + "\n")
                    if a.verbose:
                        print("sysbench_load: " + " ".join(f"{f}={v}" for f, v in zip(INTERVAL_FIELDS, row)),
                              file=sys.stderr, flush=True)
                time.sleep(0.02)
        finally:
            if sb is not None:
                sb.kill()
            if out:
                out.close()
        el = n * iv
        print(f"sysbench_load: {totals['ops']} transactions in {el:.1f} s = {totals['ops'] / el:.1f} tps mean, "
              f"p50 {min(hist.pct(0.5), hist.max)} us, p99 {min(hist.pct(0.99), hist.max)} us, max {hist.max} us, "
              f"errors {totals['errors']}, "
              f"{starts} sysbench run{'s' if starts != 1 else ''}, {a.threads} threads, late {ivs.late}, "
              f"bad records {ivs.bad}, target {self.target.text} (start unix {origin:.3f})", flush=True)
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", help="HOST:PORT")
    g.add_argument("--target-file", help="file holding HOST:PORT, re-read every 50 ms")
    p.add_argument("--threads", type=int, default=8, help="sysbench threads (connections)")
    p.add_argument("--tables", type=int, required=True, help="sbtest tables in the dataset")
    p.add_argument("--table-size", type=int, required=True, help="rows per table")
    p.add_argument("--rand-type", default="uniform", help="sysbench --rand-type (uniform: every row is hot)")
    p.add_argument("--duration", type=float, default=30.0, help="timed run, s (0: warm-up only)")
    p.add_argument("--interval-ms", type=float, default=250.0)
    p.add_argument("--grace-ms", type=float, default=1000.0,
                   help="write an interval's row this long after it ends (records still arriving)")
    p.add_argument("--flush-ms", type=float, default=0.0,
                   help="oltp_intervals.lua --epcopy-flush-ms (0: a record after every transaction)")
    p.add_argument("--warmup", action="store_true", help="read the whole dataset into the buffer pool first")
    p.add_argument("--warmup-threads", type=int, default=4)
    p.add_argument("--warmup-timeout", type=float, default=600, help="s per warm-up attempt")
    p.add_argument("--init-timeout", type=float, default=10,
                   help="restart a sysbench whose threads have not all connected after this many s")
    p.add_argument("--ignore-errors", default="1213,1020,1205",
                   help="sysbench --mysql-ignore-errors (errors it retries; not 'all', see above)")
    p.add_argument("--user", default="sbtest")
    p.add_argument("--password", default="sbtest")
    p.add_argument("--db", default="sbtest")
    p.add_argument("--sysbench", default="sysbench", help="the sysbench executable")
    p.add_argument("--sysbench-arg", action="append", default=[], help="extra sysbench option (repeatable)")
    p.add_argument("--out", help="CSV file (per-interval rows)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    if a.threads < 1 or a.tables < 1 or a.table_size < 1 or a.interval_ms <= 0 or a.grace_ms < 0:
        p.error("bad --threads/--tables/--table-size/--interval-ms/--grace-ms")
    fd, a.lock_file = tempfile.mkstemp(prefix="sysbench-load-", suffix=".lock")
    os.close(fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return Load(a).run()
    except KeyboardInterrupt:
        return 130
    finally:
        os.unlink(a.lock_file)


if __name__ == "__main__":
    sys.exit(main())
