#!/usr/bin/env python3
"""Tests for report.py on a fabricated run directory with hand-computed results.

    python3 -m unittest Workloads/bench/test_report.py     (from the repo root)
    python3 Workloads/bench/test_report.py

Three modes, 250 ms intervals, load started at unix 1000.0:

enlightened  1000 ops/s; M = 1010.0, STOP 1010.5. Load intervals (end: ops):
             1010.75: 0, 1011.0: 0, 1011.25: 100, 1011.5: 230 (920/s, good),
             1011.75: 200 (bad), 1012.0 and on: 250 (good).
             -> pre 1000/s, recovery at 1011.75 = 1.75 s, outage 0.5 s,
                ops lost 1000*1.75 - (250+250+0+0+100+230+200) = 720.
             Neighbour (baseline 2000, starts 1002.0) 1000/s until 1011.0,
             then 1011.25: 1900, 1011.5: 1500, 1011.75: 1850, then 1950, 2000
             -> resolved at 1011.5 = 1.5 s.
postcopy     2000 ops/s, no neighbour; M = 1010.1 (straddles an interval).
             1010.25, 1010.5: 500; 1010.75..1011.25: 0 (3 rows); 1011.5: 300;
             1011.75: 460; 1012.0: 480; then 500.
             -> recovery at 1011.5 = 1.4 s; outage 0.75 s;
                ops lost 2000*1.4 - (500*0.6 + 500 + 0 + 0 + 0 + 300) = 1700.
precopy      pre window = 12 rows alternating 200/300 (1000/s); M = 1003.0;
             pre-copy phase: 4 rows of 150, then 8 rows of 250 (a recovery a
             naive rule would take, 1.0 s), STOP 1006.0, 4 rows of 0, then
             250/100 alternating to 1015.0 -> never recovers; outage 1.0 s;
             ops lost 12*1000 - (600 + 2000 + 0 + 16*250 + 16*100) = 3800.
             Neighbour (baseline 1000, starts 999.0, before the load): 500/s,
             990 at 1004.25 and 1004.5 (before STOP: ignored), 950 from 1006.25
             -> resolved at 1006.0 = 3.0 s.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "report.py")
LOAD_HDR = "t_s,ops,gets,sets,misses,errors,p50_us,p99_us,max_us,target,conns,reconnects,unix_s"
T0 = 1000.0
IV = 0.25


def write_load(path, ops):
    """ops[k] = ops in the interval ending at T0 + (k+1)*IV."""
    with open(path, "w") as f:
        f.write(LOAD_HDR + "\n")
        for k, n in enumerate(ops):
            t = (k + 1) * IV
            f.write(f"{t:.3f},{n},{n},0,0,0,100,200,300,127.0.0.1:11211,16,0,{T0 + t:.3f}\n")


def write_neighbour(path, start, rate_at_end):
    """rate_at_end(wall end of interval) -> units/s; rows to wall 1020."""
    with open(path, "w") as f:
        f.write("t_s,work_units_per_s\n")
        k = 1
        while start + k * IV <= 1020.0 + 1e-9:
            f.write(f"{k * IV:.3f},{rate_at_end(start + k * IV):.1f}\n")
            k += 1


def events(mode, **kw):
    ev = {"load_start_unix": T0, "contention_start_unix": None, "migration_start_unix": None,
          "switch_unix": None, "migration_end_unix": None, "stop_unix": None, "resume_unix": None,
          "neighbour_baseline": None, "interval_ms": 250, "workload": "memcached", "mode": mode,
          "guest_mem_mib": 2048, "rate": "10Gbit", "contention": "cpu"}
    ev.update(kw)
    return ev


def make_run(root):
    def mode_dir(mode, ev, mig, ops, nb=None):
        d = os.path.join(root, f"memcached-{mode}")
        os.makedirs(d)
        with open(os.path.join(d, "events.json"), "w") as f:
            json.dump(ev, f)
        with open(os.path.join(d, "migrate.json"), "w") as f:
            json.dump(mig, f)
        write_load(os.path.join(d, "load.csv"), ops)
        if nb:
            write_neighbour(os.path.join(d, "neighbour.csv"), *nb)

    # enlightened: rows k = 0..79 end at 1000.25 .. 1020.0
    ops = [250] * 80
    for end, n in [(1010.75, 0), (1011.0, 0), (1011.25, 100), (1011.5, 230), (1011.75, 200)]:
        ops[round((end - T0) / IV) - 1] = n

    def nb_e(end):
        table = {1011.25: 1900, 1011.5: 1500, 1011.75: 1850, 1012.0: 1950}
        if end <= 1011.0 + 1e-9:
            return 1000
        return table.get(round(end, 2), 2000)
    mode_dir("enlightened",
             events("enlightened", contention_start_unix=1002.0, migration_start_unix=1010.0,
                    stop_unix=1010.5, resume_unix=1010.55, switch_unix=1010.6,
                    migration_end_unix=1011.0, neighbour_baseline=2000.0),
             {"mode": "enlightened", "downtime_ms": 42.5, "t_release_ms": 812, "bytes_wire": 1234567890,
              "mismatched_pages": 0, "guest_verdict": "ok", "enlightened": True,
              "pages_skipped_free": 300000},
             ops, (1002.0, nb_e))

    # postcopy: no neighbour
    ops = [500] * 80
    for end, n in [(1010.75, 0), (1011.0, 0), (1011.25, 0), (1011.5, 300), (1011.75, 460), (1012.0, 480)]:
        ops[round((end - T0) / IV) - 1] = n
    mode_dir("postcopy",
             events("postcopy", contention="none", migration_start_unix=1010.1, stop_unix=1010.5,
                    resume_unix=1010.6, switch_unix=1010.7, migration_end_unix=1013.0),
             {"mode": "postcopy", "downtime_ms": 180, "t_release_ms": 2900, "bytes_wire": 2147483648,
              "mismatched_pages": 0, "guest_verdict": "ok"},
             ops)

    # precopy: rows end 1000.25 .. 1015.0 (60 rows)
    ops = [200 if k % 2 == 0 else 300 for k in range(12)]      # .. 1003.0
    ops += [150] * 4 + [250] * 8                                # .. 1006.0
    ops += [0] * 4                                              # .. 1007.0
    ops += [250 if k % 2 == 0 else 100 for k in range(32)]      # .. 1015.0

    def nb_p(end):
        e = round(end, 2)
        if e in (1004.25, 1004.5):
            return 990
        return 950 if e >= 1006.25 else 500
    mode_dir("precopy",
             events("precopy", contention_start_unix=999.0, migration_start_unix=1003.0,
                    stop_unix=1006.0, resume_unix=1006.2, switch_unix=1006.3,
                    migration_end_unix=1006.4, neighbour_baseline=1000.0),
             {"mode": "precopy", "downtime_ms": 1150, "t_release_ms": 3400, "bytes_wire": 3000000000,
              "mismatched_pages": 2, "guest_verdict": "mismatch"},
             ops, (999.0, nb_p))


class ReportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="report-test-")
        cls.out = cls.tmp.name
        make_run(cls.out)
        cls.proc = subprocess.run([sys.executable, REPORT, cls.out, "--json"],
                                  capture_output=True, text=True, timeout=120)
        cls.md_proc = subprocess.run([sys.executable, REPORT, cls.out],
                                     capture_output=True, text=True, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr)
        self.by_mode = {r["mode"]: r for r in json.loads(self.proc.stdout)}

    def check(self, mode, **want):
        r = self.by_mode[mode]
        for k, v in want.items():
            if v is None:
                self.assertIsNone(r[k], f"{mode}.{k}")
            else:
                self.assertIsNotNone(r[k], f"{mode}.{k}")
                self.assertAlmostEqual(r[k], v, places=2, msg=f"{mode}.{k}")

    def test_order_and_copied_fields(self):
        rows = json.loads(self.proc.stdout)
        self.assertEqual([r["mode"] for r in rows], ["enlightened", "postcopy", "precopy"])
        with open(os.path.join(self.out, "summary.json")) as f:
            self.assertEqual(json.load(f), rows)
        e = self.by_mode["enlightened"]
        self.assertEqual(e["workload"], "memcached")
        self.assertEqual(e["bytes_wire"], 1234567890)
        self.assertEqual(e["downtime_ms"], 42.5)
        self.assertEqual(e["t_release_ms"], 812)
        self.assertEqual(e["guest_verdict"], "ok")
        self.assertEqual(self.by_mode["precopy"]["mismatched_pages"], 2)

    def test_enlightened(self):
        self.check("enlightened", pre_rate_ops=1000, recovery_s=1.75, contention_resolved_s=1.5,
                   ops_lost=720, outage_s=0.5)

    def test_postcopy_no_neighbour(self):
        self.check("postcopy", pre_rate_ops=2000, recovery_s=1.4, contention_resolved_s=None,
                   ops_lost=1700, outage_s=0.75)

    def test_precopy_never_recovers(self):
        self.check("precopy", pre_rate_ops=1000, recovery_s=None, contention_resolved_s=3.0,
                   ops_lost=3800, outage_s=1.0)

    def test_markdown(self):
        self.assertEqual(self.md_proc.returncode, 0, self.md_proc.stderr)
        with open(os.path.join(self.out, "summary.md")) as f:
            md = f.read()
        self.assertEqual(self.md_proc.stdout, md)
        self.assertIn("| mode | downtime ms | T_release ms | bytes on wire | recovery s |", md)
        line = next(l for l in md.splitlines() if l.startswith("| enlightened "))
        self.assertIn("| 1.75 |", line)
        self.assertIn("| 1,234,567,890 |", line)
        self.assertIn("| 720 |", line)
        self.assertIn("Run settings", md)

    def test_plots(self):
        png = os.path.join(self.out, "throughput.png")
        svg = os.path.join(self.out, "throughput.svg")
        with open(png, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"\x89PNG\r\n\x1a\n"))
        self.assertGreater(len(data), 10_000)
        with open(svg) as f:
            text = f.read()
        self.assertIn("<svg", text)
        self.assertGreater(len(text), 10_000)
        self.assertTrue(os.path.isfile(os.path.join(self.out, "throughput.gp")))
        dats = os.listdir(os.path.join(self.out, "plotdata"))
        self.assertIn("memcached-postcopy-load.dat", dats)
        self.assertIn("memcached-enlightened-neighbour.dat", dats)
        self.assertNotIn("memcached-postcopy-neighbour.dat", dats)


class UnitTest(unittest.TestCase):
    """A mysql run: an op is a transaction, and the table and the plot say so."""

    def test_mysql_unit(self):
        with tempfile.TemporaryDirectory(prefix="report-test-") as out:
            d = os.path.join(out, "mysql-enlightened")
            os.makedirs(d)
            ev = events("enlightened", workload="mysql", contention="none", migration_start_unix=1010.0,
                        stop_unix=1010.5, resume_unix=1010.55, switch_unix=1010.6, migration_end_unix=1011.0)
            with open(os.path.join(d, "events.json"), "w") as f:
                json.dump(ev, f)
            write_load(os.path.join(d, "load.csv"), [4] * 80)  # 16 transactions/s
            proc = subprocess.run([sys.executable, REPORT, out], capture_output=True, text=True, timeout=120)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("- pre_rate (transactions/s): enlightened 16.0.", proc.stdout)
            self.assertIn("- mysql: an op is one sysbench oltp_read_write transaction", proc.stdout)
            with open(os.path.join(out, "throughput.gp")) as f:
                self.assertIn('set ylabel "workload transactions/s"', f.read())


if __name__ == "__main__":
    unittest.main()
