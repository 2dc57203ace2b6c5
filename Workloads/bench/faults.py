#!/usr/bin/env python3
"""epcopy bench faults: failures injected into real migrations, each one verified.

Every run is `make demo`'s two hosts (network namespaces, one epcopy daemon each) migrating a freshly
booted 512 MiB test guest in one mode, with one failure injected at a random point (CUT_AT_MIB: how much
has landed at the destination; -1 = before STOP, as soon as the destination QEMU exists; 0 = the first
page, right after STOP, during the device state and the agent's free scan; else a point of the push):
  blackhole          host A's veth down for a random 0.2-10 s (packets dropped, nobody told)
  reset              every connection between the hosts reset (ss -K: RST to both ends)
  blackhole+reset    a black hole, then a reset right as the link comes back: a cut during the recovery
  kill-source        host A's daemon SIGKILLed, then started again (it takes its VM back, or the push up)
  kill-destination   host B's daemon SIGKILLed, then started again (it adopts the QEMU it was receiving)
  kill-*+blackhole   the daemon dies while the veth is down (a double failure)
Each run's result is the migration's own: every page the destination placed against the source at STOP
(--verify) and the guest's verdict. A failure before the switch leaves the VM on host A; the run then
checks that it still runs there (its memory tester going on) and migrates it again (retried; such a run
has no extra_ms: its migration is the second attempt). Before the faulted runs, --baseline runs without a failure give the
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
        env = dict(os.environ, EPCOPY_BIN=epcopy, DEMO_MODES=mode, DEMO_JSON_DIR=out, DEMO_LOG_DIR=out, RATE=rate)
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
        # The daemons' last words, for a run that did not recover.
        for host in ("a", "b"):
            log = os.path.join(out, f"serve-{host}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    output += f"\n--- daemon {host}:\n" + "".join(f.readlines()[-8:])
        return result, status, seconds, output


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


KILLS = ["kill-source", "kill-destination", "kill-source+blackhole", "kill-destination+blackhole"]


def plan(cuts, kills, rng, max_mib):
    runs = []
    for _ in range(cuts):
        roll = rng.random()
        if roll < 0.4:
            runs.append({"kind": "blackhole"})
        elif roll < 0.8:
            runs.append({"kind": "reset"})
        else:
            runs.append({"kind": "blackhole+reset"})
    for i in range(kills):
        runs.append({"kind": KILLS[i % len(KILLS)]})
    for run in runs:
        if "blackhole" in run["kind"]:
            run["seconds"] = round(rng.uniform(0.2, 10.0), 1)
        # One in ten before STOP, one in ten right after it (device state, free scan), the rest in the push.
        roll = rng.random()
        run["at_mib"] = -1 if roll < 0.1 else 0 if roll < 0.2 else rng.randint(1, max_mib)
    rng.shuffle(runs)
    return runs


def env_for(run):
    env = {"CUT_AT_MIB": str(run["at_mib"])}
    kind = run["kind"]
    if kind == "reset":
        env["CUT_LINK"] = "reset"
    elif kind == "blackhole+reset":
        env["CUT_LINK"] = f"{run['seconds']}+reset"
    elif "blackhole" in kind:
        env["CUT_LINK"] = str(run["seconds"])
    if kind.startswith("kill-"):
        env["KILL_DAEMON"] = "source" if kind.startswith("kill-source") else "destination"
    return env


def campaign(args, mode, runs, log):
    baseline = []
    for i in range(args.baseline):
        result, status, seconds, output = run_demo(args.epcopy, mode, args.rate, {}, args.run_timeout)
        tail = output[-1500:]
        if result is None or status != 0:
            log(f"{mode} baseline {i + 1}: failed (status {status}): {tail}")
            continue
        baseline.append(result["t_release_ms"])
        log(f"{mode} baseline {i + 1}: T_release {result['t_release_ms']:.0f} ms ({seconds:.0f} s)")
    reference = statistics.median(baseline) if baseline else None
    per_run = []
    for i, run in enumerate(runs):
        result, status, seconds, output = run_demo(args.epcopy, mode, args.rate, env_for(run), args.run_timeout)
        tail = output[-1500:]
        entry = dict(run)
        entry["status"] = status
        entry["wall_s"] = round(seconds, 1)
        # The failure came before the switch: the VM was found running on host A and migrated again.
        entry["retried"] = "migrating it again" in output
        if result is None:
            entry.update(result=False, recovered=False)
            entry["why"] = "timed out" if status is None else "no result"
            entry["output"] = tail
        else:
            mismatched = int(result.get("mismatched_pages", 0))
            verdict = result.get("guest_verdict")
            entry.update(result=True, mismatched_pages=mismatched, guest_verdict=verdict,
                         verification=result.get("verification"), link_losses=result.get("link_losses") or 0,
                         t_release_ms=result.get("t_release_ms"))
            entry["recovered"] = status == 0 and mismatched == 0 and verdict == "OK"
            if reference is not None and result.get("t_release_ms") is not None and not entry["retried"]:
                entry["extra_ms"] = round(result["t_release_ms"] - reference, 1)
        per_run.append(entry)
        what = run["kind"] + (f" {run['seconds']} s" if "seconds" in run else "") + (" (retried)" if entry["retried"] else "")
        log(f"{mode} run {i + 1}/{len(runs)}: {what} at {run['at_mib']} MiB -> "
            + ("recovered" if entry["recovered"] else f"NOT recovered ({entry.get('why') or entry.get('guest_verdict')})")
            + (f", extra {entry['extra_ms']:.0f} ms" if "extra_ms" in entry else ""))
    extra = [r["extra_ms"] for r in per_run if "extra_ms" in r]
    return {
        "mode": mode,
        "runs": len(per_run),
        "cuts": sum(1 for r in per_run if not r["kind"].startswith("kill")),
        "kills": sum(1 for r in per_run if r["kind"].startswith("kill")),
        "retried": sum(1 for r in per_run if r["retried"]),
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
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--baseline", type=int, default=2, help="runs without a failure, for extra_ms")
    parser.add_argument("--rate", default="200mbit", help="tc tbf rate of the link (a slower link, a longer push)")
    parser.add_argument("--max-at-mib", type=int, default=160, help="latest injection point in the push, MiB landed")
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
                  f"{s['retried']} retried after a failure before the switch, "
                  f"{s['noticed']} noticed; extra ms p50 {s['extra_ms_p50']}, max {s['extra_ms_max']} "
                  f"(baseline T_release {s['baseline_t_release_ms']} ms over {s['baseline_runs']} runs)")


if __name__ == "__main__":
    main()
