"""The noisy neighbour's kinds produce per-interval rates (python3 -m unittest Workloads/loadgen/test_neighbour.py).

Runs the real script for about a second per kind on loopback; asserts rows and positive rates, not speeds."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "neighbour.py")


def rows(path):
    lines = open(path).read().splitlines()
    assert lines[0] == "t_s,work_units_per_s", lines[:1]
    return [tuple(map(float, l.split(","))) for l in lines[1:] if l]


class NeighbourTest(unittest.TestCase):
    def run_kind(self, *args):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "n.csv")
            done = subprocess.run([sys.executable, SCRIPT, *args, "--duration", "1", "--interval-ms", "250",
                                   "--out", out], capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stderr)
            return rows(out), done.stdout

    def test_cpu(self):
        r, summary = self.run_kind("--kind", "cpu")
        self.assertEqual(len(r), 4)
        self.assertTrue(all(rate > 0 for _, rate in r), r)
        self.assertIn("units/s mean", summary)

    def test_net_against_a_sink(self):
        port = free_port()
        sink = subprocess.Popen([sys.executable, SCRIPT, "--kind", "sink", "--listen", f"127.0.0.1:{port}"],
                                stdout=subprocess.PIPE, text=True)
        try:
            self.assertIn("listening", sink.stdout.readline())
            r, summary = self.run_kind("--kind", "net", "--to", f"127.0.0.1:{port}")
            self.assertEqual(len(r), 4)
            # MiB handed to the kernel per second: loopback takes far more than 1 MiB/s.
            self.assertTrue(all(rate > 1 for _, rate in r[1:]), r)
            self.assertIn("MiB sent", summary)
        finally:
            sink.terminate()
            sink.wait(timeout=10)

    def test_net_needs_a_target(self):
        done = subprocess.run([sys.executable, SCRIPT, "--kind", "net", "--duration", "1"], capture_output=True,
                              text=True, timeout=30)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("--to", done.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    unittest.main()
