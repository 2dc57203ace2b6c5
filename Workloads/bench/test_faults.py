"""The failure bench's plan and summary arithmetic (the runs themselves are real migrations: see faults.py)."""
import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faults  # noqa: E402


class PlanTests(unittest.TestCase):
    def test_counts_kinds_and_ranges(self):
        runs = faults.plan(30, 12, random.Random(7), 160)
        self.assertEqual(len(runs), 42)
        for kind in faults.KILLS:
            self.assertEqual(sum(1 for r in runs if r["kind"] == kind), 3, kind)
        self.assertEqual(sum(1 for r in runs if r["kind"] in ("blackhole", "reset", "blackhole+reset")), 30)
        for r in runs:
            self.assertTrue(r["at_mib"] == -1 or 0 <= r["at_mib"] <= 160)
            self.assertEqual("seconds" in r, "blackhole" in r["kind"])
            if "blackhole" in r["kind"]:
                self.assertTrue(0.2 <= r["seconds"] <= 10.0)
        # Some strike before STOP and some right after it (seed 7 gives both).
        self.assertTrue(any(r["at_mib"] == -1 for r in runs) and any(r["at_mib"] == 0 for r in runs))

    def test_a_seed_gives_the_same_plan(self):
        self.assertEqual(faults.plan(5, 3, random.Random(11), 100), faults.plan(5, 3, random.Random(11), 100))

    def test_each_kind_becomes_the_demo_variables(self):
        self.assertEqual(faults.env_for({"kind": "blackhole", "seconds": 2.5, "at_mib": 9}),
                         {"CUT_AT_MIB": "9", "CUT_LINK": "2.5"})
        self.assertEqual(faults.env_for({"kind": "reset", "at_mib": 0}), {"CUT_AT_MIB": "0", "CUT_LINK": "reset"})
        self.assertEqual(faults.env_for({"kind": "blackhole+reset", "seconds": 1.5, "at_mib": -1}),
                         {"CUT_AT_MIB": "-1", "CUT_LINK": "1.5+reset"})
        self.assertEqual(faults.env_for({"kind": "kill-source", "at_mib": 3}), {"CUT_AT_MIB": "3", "KILL_DAEMON": "source"})
        self.assertEqual(faults.env_for({"kind": "kill-destination", "at_mib": 3}),
                         {"CUT_AT_MIB": "3", "KILL_DAEMON": "destination"})
        self.assertEqual(faults.env_for({"kind": "kill-destination+blackhole", "seconds": 4.0, "at_mib": 3}),
                         {"CUT_AT_MIB": "3", "KILL_DAEMON": "destination", "CUT_LINK": "4.0"})

    def test_percentile(self):
        self.assertIsNone(faults.percentile([], 0.5))
        self.assertEqual(faults.percentile([5, 1, 3], 0.5), 3)
        self.assertEqual(faults.percentile([1, 2, 3, 4], 1.0), 4)


if __name__ == "__main__":
    unittest.main()
