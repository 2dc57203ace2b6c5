#!/usr/bin/env python3
"""Wait until a workload server answers at HOST:PORT, then print one line and exit 0.

Used by the harness to notice the moment a migrated guest serves on the destination host (the client is then
pointed there). One process for the whole wait — one connection attempt in flight at a time, each bounded by
--attempt-ms — instead of a process per probe: QEMU's user-networking port forward accepts one pending
connection at a time, and spawning an interpreter per probe costs more CPU than the probe.

  --kind memcached   send `version`, expect `VERSION`
  --kind mysql       expect the server's handshake packet (protocol 10) within the attempt
Exit 1 after --timeout-s without an answer.
"""

import argparse
import socket
import sys
import time


def answers(kind, host, port, attempt):
    try:
        with socket.create_connection((host, port), timeout=attempt) as s:
            s.settimeout(attempt)
            if kind == "memcached":
                s.sendall(b"version\r\n")
                return s.recv(64).startswith(b"VERSION")
            # MySQL/MariaDB: the server speaks first; payload byte 0 of the first packet is the protocol version.
            head = s.recv(5)
            return len(head) == 5 and head[4] == 10
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["memcached", "mysql"], required=True)
    p.add_argument("--to", required=True, help="HOST:PORT")
    p.add_argument("--attempt-ms", type=float, default=1000)
    p.add_argument("--pause-ms", type=float, default=20, help="between failed attempts")
    p.add_argument("--timeout-s", type=float, default=120)
    a = p.parse_args()
    host, port = a.to.rsplit(":", 1)
    deadline = time.time() + a.timeout_s
    while time.time() < deadline:
        if answers(a.kind, host, int(port), a.attempt_ms / 1000):
            print(f"probe: {a.kind} answers at {a.to} (unix {time.time():.3f})", flush=True)
            return 0
        time.sleep(a.pause_ms / 1000)
    print(f"probe: no answer from {a.kind} at {a.to} within {a.timeout_s} s", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
