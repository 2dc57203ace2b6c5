#!/usr/bin/env python3
"""Noisy neighbour for the source host, with its own per-interval throughput.

--kind cpu    each process runs a tight integer arithmetic loop;
              1 work unit = 10,000 loop iterations.
--kind membw  each process streams over its own --buffer-mb buffer (default
              256 MiB): memoryview copies of one half onto the other in 16 MiB
              chunks (memcpy: read + write, far larger than any cache);
              1 work unit = 1 MiB copied.
--kind net    each process keeps one TCP connection to --to HOST:PORT and
              sends 256 KiB writes as fast as the link takes them (a bulk
              transfer sharing the source host's link with the migration);
              1 work unit = 1 MiB handed to the kernel. The other end is
              `neighbour.py --kind sink --listen HOST:PORT`, which reads and
              discards (run it on the far host; it runs until killed).

--procs N processes (multiprocessing, so they contend for cores with QEMU and
the load generator). Each adds to its own slot of a shared counter array; the
parent samples the sum every --interval-ms and writes CSV rows

    t_s,work_units_per_s

(t_s = end of the interval, seconds since the workers were started,
time.monotonic). Buffers are allocated and touched before the clock starts.
Prints a one-line summary (mean units/s) at the end. SIGTERM/SIGINT end the
run early (the rows so far are kept).
"""

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time

CPU_UNIT = 10_000
CHUNK_MB = 16


def cpu_worker(slot, counts, stop, ready):
    ready.release()
    x = 1
    while not stop.is_set():
        for _ in range(10):
            for i in range(CPU_UNIT):
                x = (x * 1103515245 + i) & 0xFFFFFFFF
            counts[slot] += 1


def membw_worker(slot, counts, stop, ready, buffer_mb):
    half = max(CHUNK_MB, buffer_mb // 2) << 20
    buf = bytearray(2 * half)
    mv = memoryview(buf)
    # Touch everything (and make it non-zero) before the clock starts.
    pattern = bytes(range(256)) * 4096
    for off in range(0, 2 * half, len(pattern)):
        mv[off:off + len(pattern)] = pattern[:min(len(pattern), 2 * half - off)]
    ready.release()
    chunk = CHUNK_MB << 20
    src, dst = 0, half
    while not stop.is_set():
        for off in range(0, half, chunk):
            mv[dst + off:dst + off + chunk] = mv[src + off:src + off + chunk]
            counts[slot] += CHUNK_MB
            if stop.is_set():
                break
        src, dst = dst, src


NET_WRITE = 256 << 10


def net_worker(slot, counts, stop, ready, target):
    import socket
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(0.5)
    data = bytes(NET_WRITE)
    ready.release()
    sent = 0
    while not stop.is_set():
        try:
            sent += s.send(data)
        except socket.timeout:
            continue
        except OSError:
            break
        while sent >= 1 << 20:
            counts[slot] += 1
            sent -= 1 << 20
    s.close()


def sink(listen):
    import socket
    import threading
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)), reuse_port=False, backlog=16)
    print(f"neighbour: sink listening on {listen}", flush=True)

    def drain(conn):
        with conn:
            while conn.recv(1 << 20):
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["cpu", "membw", "net", "sink"], required=True)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--interval-ms", type=float, default=250.0)
    p.add_argument("--buffer-mb", type=int, default=256, help="membw: per-process buffer")
    p.add_argument("--to", help="net: HOST:PORT of a sink")
    p.add_argument("--listen", help="sink: HOST:PORT to accept neighbour connections on")
    p.add_argument("--out", help="CSV file")
    a = p.parse_args()
    if a.procs < 1 or a.interval_ms <= 0:
        p.error("bad --procs/--interval-ms")
    if a.kind == "sink":
        if not a.listen:
            p.error("--kind sink needs --listen HOST:PORT")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            sink(a.listen)
        except KeyboardInterrupt:
            return 0
    if a.kind == "net" and not a.to:
        p.error("--kind net needs --to HOST:PORT (a `--kind sink` on the far host)")

    ctx = mp.get_context("fork")
    counts = ctx.Array("q", a.procs, lock=False)  # one slot per worker: no lock needed
    stop = ctx.Event()
    ready = ctx.Semaphore(0)
    procs = []
    for i in range(a.procs):
        if a.kind == "cpu":
            pr = ctx.Process(target=cpu_worker, args=(i, counts, stop, ready), daemon=True)
        elif a.kind == "net":
            pr = ctx.Process(target=net_worker, args=(i, counts, stop, ready, a.to), daemon=True)
        else:
            pr = ctx.Process(target=membw_worker, args=(i, counts, stop, ready, a.buffer_mb), daemon=True)
        pr.start()
        procs.append(pr)

    ending = []
    signal.signal(signal.SIGTERM, lambda *_: ending.append(1))
    signal.signal(signal.SIGINT, lambda *_: ending.append(1))

    for _ in procs:
        while not ready.acquire(timeout=0.5):
            if ending or not all(pr.is_alive() for pr in procs):
                break
    out = open(a.out, "w", buffering=1) if a.out else None
    if out:
        out.write("t_s,work_units_per_s\n")
    iv = a.interval_ms / 1000.0
    n = max(1, round(a.duration / iv))
    t0 = time.monotonic()
    last, last_t = sum(counts), t0
    first = last
    done = 0
    for i in range(1, n + 1):
        deadline = t0 + i * iv
        while not ending:
            d = deadline - time.monotonic()
            if d <= 0:
                break
            time.sleep(min(d, 0.05))
        if ending:
            break
        now = time.monotonic()
        c = sum(counts)
        rate = (c - last) / (now - last_t)
        last, last_t = c, now
        done = i
        if out:
            out.write(f"{now - t0:.3f},{rate:.1f}\n")
    stop.set()
    for pr in procs:
        pr.join(timeout=5)
        if pr.is_alive():
            pr.kill()
    if out:
        out.close()
    el = last_t - t0
    unit = {"cpu": "10k-iteration loops", "membw": "MiB copied", "net": "MiB sent"}[a.kind]
    print(f"neighbour: {a.kind} x{a.procs}: {(last - first) / el if el > 0 else 0:.1f} units/s mean "
          f"({unit}) over {el:.1f} s, {done} intervals", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
