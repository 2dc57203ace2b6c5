#!/usr/bin/env python3
"""Tests for sysbench_load.py: merging oltp_intervals.lua's records into rows, and following a target.

    python3 -m unittest Workloads/loadgen/test_sysbench_load.py     (from the repo root)

MergeTest feeds Intervals hand-made records (two threads, split records, a late one, a connect, garbage).
FollowTest runs the real driver for 4 s against a fake sysbench (this file, run as a script) whose
behaviour depends on the port it is pointed at, and moves the target file twice:

    0 s   127.0.0.1:3  connects, completes transactions for 0.3 s, then hangs (a VM that stopped)
    1 s   127.0.0.1:1  refuses: exits at once (the driver restarts it with backoff, counting errors)
    2 s   127.0.0.1:2  completes a transaction per thread every 50 ms until killed

The fake logs every transaction it reports (interval and count) to a ledger; the CSV must agree with the
ledger interval by interval, and show the outage, the errors, the reconnects and the new target.
"""

import csv
import os
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sysbench_load  # noqa: E402

DRIVER = os.path.join(HERE, "sysbench_load.py")
HEADER = "t_s,ops,gets,sets,misses,errors,p50_us,p99_us,max_us,target,conns,reconnects,unix_s"


class MergeTest(unittest.TestCase):
    def test_records_merge_into_rows(self):
        ivs = sysbench_load.Intervals(origin=1000.0, interval_s=0.25, n_intervals=4)
        self.assertEqual(ivs.add_line("C 0 1000.01\n"), "C")
        self.assertEqual(ivs.add_line("C 1 1000.30\n"), "C")
        self.assertEqual(ivs.add_line("E 0 0 2 0 28 8 300,100\n"), "E")
        self.assertEqual(ivs.add_line("E 1 0 1 1 14 4 200\n"), "E")
        self.assertEqual(ivs.add_line("E 0 0 1 0 14 4 5000\n"), "E")  # the same interval again (a split record)
        self.assertEqual(ivs.add_line("E 1 2 0 3 0 0\n"), "E")  # errors only: no latency field
        self.assertIsNone(ivs.add_line("E 1 2 2 0 28 8 100\n"))  # 2 transactions, 1 latency: rejected
        self.assertIsNone(ivs.add_line("sysbench 1.0.20\n"))
        ivs.add_errors(1000.6)
        row, lat = ivs.seal(0, "h:1", 2)
        self.assertEqual(row[:12], ["0.250", 4, 56, 16, 0, 1, 200, 5000, 5000, "h:1", 2, 1])
        self.assertEqual(row[12], "1000.250")
        self.assertEqual(lat, [100, 200, 300, 5000])
        row, _ = ivs.seal(1, "h:1", 2)
        self.assertEqual(row[1:9] + row[10:12], [0, 0, 0, 0, 0, 0, 0, 0, 2, 1])  # the second connect
        self.assertEqual(ivs.add_line("E 0 1 5 0 70 20 1,2,3,4,5\n"), "E")  # interval 1 is written: late
        self.assertEqual(ivs.late, 5)
        row, _ = ivs.seal(2, "h:2", 0)
        self.assertEqual(row[:6], ["0.750", 0, 0, 0, 0, 4])  # 3 from the record, 1 from add_errors
        self.assertEqual(ivs.add_line("E 0 9 1 0 14 4 7\n"), "E")  # beyond the run: ignored
        row, _ = ivs.seal(3, "h:2", 0)
        self.assertEqual(row[1], 0)
        self.assertEqual(ivs.bad, 2)

    def test_target_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "t")
            with open(path, "w") as f:
                f.write("10.0.0.1:3306\n")
            t = sysbench_load.Target(path=path)
            self.assertEqual(t.text, "10.0.0.1:3306")
            self.assertFalse(t.reload())
            with open(path, "w") as f:
                f.write("garbage")
            self.assertFalse(t.reload())
            self.assertEqual(t.text, "10.0.0.1:3306")
            with open(path, "w") as f:
                f.write("10.0.0.2:3306\n")
            self.assertTrue(t.reload())
            self.assertEqual(t.text, "10.0.0.2:3306")


def fake_sysbench(argv):
    """Stands in for `sysbench oltp_intervals.lua ... run` (see the module docstring)."""
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    command = argv[-1]
    port = int(opts["mysql-port"])
    if port == 1:
        print("FATAL: unable to connect to MySQL server (fake)", flush=True)
        return 1
    if command != "run":
        return 0
    fd, threads = int(opts["epcopy-fd"]), int(opts["threads"])
    origin, iv = float(opts["epcopy-origin"]), float(opts["epcopy-interval-ms"]) / 1000
    ledger = open(os.environ["FAKE_LEDGER"], "a", buffering=1)
    for tid in range(threads):
        os.write(fd, f"C {tid} {time.time():.6f}\n".encode())
    start, end = time.time(), time.time() + int(opts["time"])
    while time.time() < end:
        if port == 3 and time.time() - start > 0.3:
            time.sleep(3600)  # hangs until killed
        time.sleep(0.05)
        for tid in range(threads):
            now = time.time()
            k = int((now - origin) // iv)
            ledger.write(f"{k} 1\n")
            os.write(fd, f"E {tid} {k} 1 0 14 4 {1000 + tid}\n".encode())
    return 0


class FollowTest(unittest.TestCase):
    def test_follows_the_target_through_a_hang_and_a_refusal(self):
        with tempfile.TemporaryDirectory(prefix="sysbench-load-test-") as d:
            target, out, ledger = (os.path.join(d, n) for n in ("target", "load.csv", "ledger"))
            fake = os.path.join(d, "sysbench")
            with open(fake, "w") as f:
                f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {HERE!r})\n"
                        "import test_sysbench_load\nsys.exit(test_sysbench_load.fake_sysbench(sys.argv[1:]))\n")
            os.chmod(fake, 0o755)

            def point(port):
                with open(target + ".tmp", "w") as f:
                    f.write(f"127.0.0.1:{port}\n")
                os.replace(target + ".tmp", target)

            point(3)
            env = dict(os.environ, FAKE_LEDGER=ledger)
            proc = subprocess.Popen([sys.executable, DRIVER, "--target-file", target, "--sysbench", fake,
                                     "--threads", "2", "--tables", "1", "--table-size", "10", "--duration", "4",
                                     "--out", out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            while not os.path.exists(out):
                if proc.poll() is not None:
                    self.fail(f"the driver exited: {proc.stdout.read()}")
                time.sleep(0.01)
            t0 = time.monotonic()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
            point(1)
            time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
            point(2)
            log, _ = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 0, log)

            with open(out) as f:
                self.assertEqual(f.readline().strip(), HEADER)
            with open(out) as f:
                rows = list(csv.DictReader(f))
            self.assertEqual(len(rows), 16, log)
            want = {}
            with open(ledger) as f:
                for line in f:
                    k, n = map(int, line.split())
                    want[k] = want.get(k, 0) + n
            got = {k: int(r["ops"]) for k, r in enumerate(rows)}
            self.assertEqual(got, {k: want.get(k, 0) for k in range(16)}, log)
            self.assertIn("late 0, bad records 0", log)

            targets = [r["target"] for r in rows]
            self.assertEqual(targets[0], "127.0.0.1:3")
            self.assertEqual(targets[-1], "127.0.0.1:2")
            self.assertEqual(targets[4:7].count("127.0.0.1:1") >= 1, True, targets)
            # The hang: no transaction completes from ~0.3 s until the healthy server (>= 2 s).
            self.assertTrue(all(got[k] == 0 for k in range(2, 8)), got)
            self.assertTrue(got[0] + got[1] > 0 and all(got[k] > 0 for k in range(10, 16)), got)
            # The refusals are errors; the hang and the switches are not.
            errors = [int(r["errors"]) for r in rows]
            self.assertGreater(sum(errors[4:9]), 0, errors)
            self.assertEqual(sum(errors[:4]) + sum(errors[10:]), 0, errors)
            self.assertEqual(sum(int(r["reconnects"]) for r in rows), 4, rows)  # 2 threads at :3, 2 at :2
            self.assertEqual(rows[-1]["conns"], "2")
            self.assertEqual([r["p99_us"] for r in rows[12:]], ["1001"] * 4)
            self.assertAlmostEqual(float(rows[-1]["unix_s"]) - float(rows[0]["unix_s"]), 3.75, places=3)


if __name__ == "__main__":
    unittest.main()
