#!/usr/bin/env python3
"""epcopy bench faults: failures injected into real migrations, each one verified.

Every run is `make demo`'s two hosts (network namespaces, one epcopy daemon each) migrating a freshly
booted 512 MiB test guest in one mode, with one failure injected after the switch at a random point of
the push (CUT_AT_MIB: how much has landed at the destination, 0 = the first page, right after STOP, during the device state and the
agent's free scan):
  blackhole  host A's veth down for a random 0.2-10 s (packets dropped, nobody told)
  reset      every connection between the hosts reset (ss -K: RST to both ends)
  kill       host A's daemon SIGKILLed (its QEMU dies with it), then started again
  kill+blackhole  a third of the kills: the daemon dies while the veth is down (a double failure)
Each run's result is the migration's own: every page the destination placed against the source at STOP
(--verify) and the guest's verdict. Before the faulted runs, --baseline runs without a failure give the
T_release that extra_ms is measured against (same invocation, same machine).

Prints one JSON object (--json) or a table: runs, recovered, vm_lost, mismatched_pages, guest_corrupt,
extra_ms_p50, extra_ms_max, noticed (runs where the engines saw the failure; a black hole shorter than
the keepalive timeout may pass unnoticed, TCP retransmits over it), and per_run. With --qemu-postcopy the
same failures (cuts and kills) are also run against QEMU's own postcopy, as qemu_postcopy.
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run_demo(epcopy, mode, rate, extra_env, timeout_s):
    """One demo run; returns (result dict or None, exit status or None on timeout, seconds, output tail)."""
    with tempfile.TemporaryDirectory(prefix="epcopy-faults.") as out:
        env = dict(os.environ, EPCOPY_BIN=epcopy, DEMO_MODES=mode, DEMO_JSON_DIR=out, RATE=rate)
        env.update(extra_env)
        start = time.monotonic()
        # Its own process group: on a timeout every process of the run (demo, daemons, their VMs) is asked
        # to end, and the demo's EXIT trap removes its namespaces.
        proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts/demo")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            status = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            status = None
        seconds = time.monotonic() - start
        path = os.path.join(out, mode + ".json")
        result = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, ValueError):
                result = None
        return result, status, seconds, output[-1500:]


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def plan(cuts, kills, rng, max_mib):
    runs = []
    for _ in range(cuts):
        if rng.random() < 0.5:
            runs.append({"kind": "blackhole", "seconds": round(rng.uniform(0.2, 10.0), 1)})
        else:
            runs.append({"kind": "reset"})
    for i in range(kills):
        if i % 3 == 2:
            runs.append({"kind": "kill+blackhole", "seconds": round(rng.uniform(0.2, 10.0), 1)})
        else:
            runs.append({"kind": "kill"})
    for run in runs:
        run["at_mib"] = rng.randint(0, max_mib)
    rng.shuffle(runs)
    return runs


def env_for(run):
    env = {"CUT_AT_MIB": str(run["at_mib"])}
    if run["kind"] == "blackhole":
        env["CUT_LINK"] = str(run["seconds"])
    elif run["kind"] == "reset":
        env["CUT_LINK"] = "reset"
    elif run["kind"] == "kill":
        env["KILL_DAEMON"] = "source"
    else:
        env["KILL_DAEMON"] = "source"
        env["CUT_LINK"] = str(run["seconds"])
    return env


def campaign(args, mode, runs, log):
    baseline = []
    for i in range(args.baseline):
        result, status, seconds, tail = run_demo(args.epcopy, mode, args.rate, {}, args.run_timeout)
        if result is None or status != 0:
            log(f"{mode} baseline {i + 1}: failed (status {status}): {tail}")
            continue
        baseline.append(result["t_release_ms"])
        log(f"{mode} baseline {i + 1}: T_release {result['t_release_ms']:.0f} ms ({seconds:.0f} s)")
    reference = statistics.median(baseline) if baseline else None
    per_run = []
    for i, run in enumerate(runs):
        result, status, seconds, tail = run_demo(args.epcopy, mode, args.rate, env_for(run), args.run_timeout)
        entry = dict(run)
        entry["status"] = status
        entry["wall_s"] = round(seconds, 1)
        if result is None:
            entry.update(result=False, recovered=False)
            entry["why"] = "timed out" if status is None else "no result"
            entry["output"] = tail[-600:]
        else:
            mismatched = int(result.get("mismatched_pages", 0))
            verdict = result.get("guest_verdict")
            entry.update(result=True, mismatched_pages=mismatched, guest_verdict=verdict,
                         verification=result.get("verification"), link_losses=result.get("link_losses") or 0,
                         t_release_ms=result.get("t_release_ms"))
            entry["recovered"] = status == 0 and mismatched == 0 and verdict == "OK"
            if reference is not None and result.get("t_release_ms") is not None:
                entry["extra_ms"] = round(result["t_release_ms"] - reference, 1)
        per_run.append(entry)
        what = run["kind"] + (f" {run['seconds']} s" if "seconds" in run else "")
        log(f"{mode} run {i + 1}/{len(runs)}: {what} at {run['at_mib']} MiB -> "
            + ("recovered" if entry["recovered"] else f"NOT recovered ({entry.get('why') or entry.get('guest_verdict')})")
            + (f", extra {entry['extra_ms']:.0f} ms" if "extra_ms" in entry else ""))
    extra = [r["extra_ms"] for r in per_run if "extra_ms" in r]
    return {
        "mode": mode,
        "runs": len(per_run),
        "cuts": sum(1 for r in per_run if r["kind"] in ("blackhole", "reset")),
        "kills": sum(1 for r in per_run if r["kind"].startswith("kill")),
        "recovered": sum(1 for r in per_run if r["recovered"]),
        "vm_lost": sum(1 for r in per_run if not r["result"]),
        "mismatched_pages": sum(r.get("mismatched_pages", 0) for r in per_run),
        "guest_corrupt": sum(1 for r in per_run if r["result"] and r.get("guest_verdict") != "OK"),
        "noticed": sum(1 for r in per_run if r.get("link_losses", 0) > 0),
        "extra_ms_p50": percentile(extra, 0.5),
        "extra_ms_max": max(extra) if extra else None,
        "baseline_t_release_ms": reference,
        "baseline_runs": len(baseline),
        "per_run": per_run,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, default=4)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--baseline", type=int, default=2, help="runs without a failure, for extra_ms")
    parser.add_argument("--rate", default="200mbit", help="tc tbf rate of the link (a slower link, a longer push)")
    parser.add_argument("--max-at-mib", type=int, default=160, help="latest injection point, MiB landed")
    parser.add_argument("--run-timeout", type=int, default=300, help="seconds before a run counts as hung")
    parser.add_argument("--qemu-postcopy", action="store_true", help="run the same failures against QEMU's postcopy")
    parser.add_argument("--epcopy", required=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cuts < 0 or args.kills < 0 or args.cuts + args.kills == 0:
        parser.error("--cuts and --kills: at least one run")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, tc)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    runs = plan(args.cuts, args.kills, random.Random(seed), args.max_at_mib)

    def log(text):
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    log(f"epcopy bench faults: seed {seed}, {args.cuts} cuts, {args.kills} kills, link {args.rate}")
    summary = campaign(args, "enlightened", runs, log)
    summary["seed"] = seed
    summary["rate"] = args.rate
    if args.qemu_postcopy:
        summary["qemu_postcopy"] = campaign(args, "postcopy", runs, log)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for s in [summary] + ([summary["qemu_postcopy"]] if args.qemu_postcopy else []):
            print(f"{s['mode']}: {s['runs']} runs ({s['cuts']} cuts, {s['kills']} kills): {s['recovered']} recovered, "
                  f"{s['vm_lost']} VM lost, {s['mismatched_pages']} mismatched pages, {s['guest_corrupt']} guest corrupt, "
                  f"{s['noticed']} noticed; extra ms p50 {s['extra_ms_p50']}, max {s['extra_ms_max']} "
                  f"(baseline T_release {s['baseline_t_release_ms']} ms over {s['baseline_runs']} runs)")


if __name__ == "__main__":
    main()
