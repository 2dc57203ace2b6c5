#!/usr/bin/env python3
"""Turn one benchmark run directory into results, a summary table and plots.

    report.py OUT_DIR [--json]

Reads OUT_DIR/<workload>-<mode>/ (load.csv, neighbour.csv, migrate.json,
events.json; see the harness) for every mode that was run and writes

    OUT_DIR/summary.json      list of per-mode result objects (fields below)
    OUT_DIR/summary.md        markdown table + footnotes (definitions, settings)
    OUT_DIR/plotdata/*.dat    the data gnuplot plots (whitespace separated)
    OUT_DIR/throughput.gp     the gnuplot script (cd OUT_DIR && gnuplot throughput.gp)
    OUT_DIR/throughput.png    one panel per mode, stacked (gnuplot multiplot)
    OUT_DIR/throughput.svg

and prints the markdown table (or summary.json with --json) to stdout.
Stdlib only; the plots need gnuplot (Debian: gnuplot-nox).

Time base. Everything is lined up on the wall clock (unix seconds). A load.csv
row describes the interval (start, end] with end = unix_s and length = the
difference of consecutive t_s values (monotonic clock; for the first row t_s
itself, or interval_ms if that is not positive), start = end - length. Its
rate is ops / length (ops/s). A neighbour.csv row is the interval ending at
contention_start_unix + t_s (the neighbour's t_s counts from its start), of
the same kind of length, with the rate work_units_per_s as written.
"Migration start" M = migration_start_unix.

Definitions (per mode):

  downtime_ms, t_release_ms, bytes_wire, mismatched_pages, guest_verdict
      copied from migrate.json (null if absent).
  pre_rate_ops
      time-weighted mean workload ops/s (sum of ops / sum of lengths) over the
      load intervals that end at or before M and after M - 5 s; if fewer than
      2 intervals fall in that window, the last 2 intervals ending at or
      before M. Null if there are fewer than 2 such intervals at all.
  cutover C
      the point after which a recovery can count: stop_unix (QEMU STOP on
      the source: before it the VM still runs there, so neither the
      workload's outage nor the neighbour's contention can be over), else
      resume_unix, else switch_unix, else M.
  recovery_s
      threshold = 90 % of pre_rate_ops. If no load interval ending after M
      has a rate below the threshold, 0. Otherwise the recovery point R is the
      start of the first of 2 consecutive load intervals that both start at
      or after C and both have rate >= threshold; recovery_s = R - M (>= 0).
      Null if there is no such pair (never recovered) or no pre_rate_ops.
  contention_resolved_s
      the same rule applied to the neighbour's rate with threshold = 90 % of
      neighbour_baseline (events.json): 0 if no neighbour interval ending
      after M is below it, else start of the first of 2 consecutive neighbour
      intervals starting at or after C that both reach it, minus M. Null if
      there is no neighbour (no neighbour.csv, contention_start_unix or
      neighbour_baseline) or it never got back.
  ops_lost
      pre_rate_ops * (W_end - M) - (ops completed in [M, W_end]), clamped at
      0, rounded to an integer; W_end = R, or the end of the last load
      interval if never recovered. Intervals straddling M count
      proportionally to their overlap (ops assumed uniform in an interval).
  outage_s
      the longest run of consecutive load intervals with ops = 0 among those
      ending after M, as the sum of their lengths in seconds (0 if none).

Exit status: 0 on success, 1 if gnuplot failed or is missing (the summary
files are written anyway), 2 if OUT_DIR holds no mode directory.
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys

MODE_ORDER = ["enlightened", "postcopy", "precopy"]
PRE_WINDOW_S = 5.0
MIN_PRE_INTERVALS = 2
THRESHOLD = 0.9
CONSECUTIVE = 2
EPS = 1e-6

# What one "op" of a load.csv row is, where it is not a request (the plots' and the table's unit).
UNITS = {"mysql": ("transactions/s", "transactions",
                   "an op is one sysbench oltp_read_write transaction (18 SQL statements)")}

FIELDS = ["workload", "mode", "downtime_ms", "t_release_ms", "bytes_wire",
          "pre_rate_ops", "recovery_s", "contention_resolved_s", "ops_lost",
          "outage_s", "mismatched_pages", "guest_verdict"]


def unit(workload):
    return UNITS.get(workload, ("ops/s", None))[0]


def warn(msg):
    print(f"report.py: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- reading


def num(v):
    """float(v), or None for missing / empty / non-numeric / non-finite."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_json(path):
    try:
        with open(path) as f:
            v = json.load(f)
        return v if isinstance(v, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warn(f"{path}: {e}")
        return {}


def read_csv(path):
    try:
        with open(path, newline="") as f:
            return [{(k or "").strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return None
    except (OSError, csv.Error) as e:
        warn(f"{path}: {e}")
        return None


class Interval:
    __slots__ = ("start", "end", "value", "rate")

    def __init__(self, start, end, value, rate):
        self.start, self.end, self.value, self.rate = start, end, value, rate

    @property
    def length(self):
        return self.end - self.start


def intervals_from(rows, t_key, v_key, origin, nominal_s, value_is_rate):
    """Rows -> Intervals on the wall clock. origin: wall time of t_s = 0, or
    None to take each row's end from its unix_s column."""
    out = []
    prev_t = 0.0
    for row in rows or []:
        t = num(row.get(t_key))
        v = num(row.get(v_key))
        if t is None or v is None:
            continue
        length = t - prev_t
        prev_t = t
        if not length > 0:
            length = nominal_s
        end = origin + t if origin is not None else num(row.get("unix_s"))
        if end is None:
            continue
        if value_is_rate:
            out.append(Interval(end - length, end, v * length, v))
        else:
            out.append(Interval(end - length, end, v, v / length))
    out.sort(key=lambda iv: iv.end)
    return out


# ---------------------------------------------------------------- metrics


def pre_rate(load, m):
    before = [iv for iv in load if iv.end <= m + EPS]
    window = [iv for iv in before if iv.end > m - PRE_WINDOW_S + EPS]
    if len(window) < MIN_PRE_INTERVALS:
        window = before[-MIN_PRE_INTERVALS:]
    if len(window) < MIN_PRE_INTERVALS:
        return None
    secs = sum(iv.length for iv in window)
    return sum(iv.value for iv in window) / secs if secs > 0 else None


def recovery_point(ivs, m, cutover, threshold):
    """Wall time of recovery (see the module docstring), or None if never."""
    after = [iv for iv in ivs if iv.end > m + EPS]
    if not after:
        return None
    if all(iv.rate >= threshold for iv in after):
        return m
    cand = [iv for iv in ivs if iv.start >= cutover - EPS]
    run = 0
    for i, iv in enumerate(cand):
        # Consecutive = adjacent rows (no gap in the series between them).
        if iv.rate >= threshold and (run == 0 or abs(cand[i - 1].end - iv.start) < 0.5 * iv.length + EPS):
            run += 1
        else:
            run = 1 if iv.rate >= threshold else 0
        if run >= CONSECUTIVE:
            return max(m, cand[i - CONSECUTIVE + 1].start)
    return None


def ops_between(load, a, b):
    total = 0.0
    for iv in load:
        lo, hi = max(a, iv.start), min(b, iv.end)
        if hi > lo and iv.length > 0:
            total += iv.value * (hi - lo) / iv.length
    return total


def longest_zero_run(load, m):
    best = cur = 0.0
    for iv in load:
        if iv.end <= m + EPS:
            continue
        if iv.value == 0:
            cur += iv.length
            best = max(best, cur)
        else:
            cur = 0.0
    return best


def rnd(x, digits=3):
    return None if x is None else round(x, digits)


def analyse(d):
    """d: a loaded mode directory (see load_mode). Returns the result object."""
    ev, mig = d["events"], d["migrate"]
    load, nb = d["load"], d["neighbour"]
    m = num(ev.get("migration_start_unix"))
    res = {"workload": d["workload"], "mode": d["mode"],
           "downtime_ms": num(mig.get("downtime_ms")),
           "t_release_ms": num(mig.get("t_release_ms")),
           "bytes_wire": mig.get("bytes_wire"),
           "pre_rate_ops": None, "recovery_s": None, "contention_resolved_s": None,
           "ops_lost": None, "outage_s": None,
           "mismatched_pages": mig.get("mismatched_pages"),
           "guest_verdict": mig.get("guest_verdict")}
    if isinstance(res["bytes_wire"], float) and res["bytes_wire"].is_integer():
        res["bytes_wire"] = int(res["bytes_wire"])
    for k in ("pages_skipped_free", "enlightened"):
        if k in mig:
            res[k] = mig[k]
    res["neighbour_baseline"] = num(ev.get("neighbour_baseline"))
    if m is None:
        warn(f"{d['name']}: no migration_start_unix; only migrate.json values reported")
        return res
    cutover = m
    for k in ("stop_unix", "resume_unix", "switch_unix"):
        v = num(ev.get(k))
        if v is not None:
            cutover = max(m, v)
            break
    if load:
        pr = pre_rate(load, m)
        res["pre_rate_ops"] = rnd(pr, 1)
        res["outage_s"] = rnd(longest_zero_run(load, m))
        if pr is not None:
            r = recovery_point(load, m, cutover, THRESHOLD * pr)
            res["recovery_s"] = rnd(None if r is None else r - m)
            w_end = r if r is not None else load[-1].end
            if w_end >= m:
                res["ops_lost"] = int(round(max(0.0, pr * (w_end - m) - ops_between(load, m, w_end))))
            d["recovery_unix"] = r
    base = res["neighbour_baseline"]
    if nb and base is not None and base > 0:
        r = recovery_point(nb, m, cutover, THRESHOLD * base)
        res["contention_resolved_s"] = rnd(None if r is None else r - m)
    return res


# ---------------------------------------------------------------- loading


def mode_of(name, ev, mig):
    for v in (ev.get("mode"), mig.get("mode")):
        if isinstance(v, str) and v:
            return v
    return name.rsplit("-", 1)[-1] if "-" in name else name


def load_mode(path):
    name = os.path.basename(path)
    ev = read_json(os.path.join(path, "events.json"))
    mig = read_json(os.path.join(path, "migrate.json"))
    mode = mode_of(name, ev, mig)
    workload = ev.get("workload") or (name[: -len(mode) - 1] if name.endswith("-" + mode) else name)
    nominal = (num(ev.get("interval_ms")) or 250.0) / 1000.0
    load_rows = read_csv(os.path.join(path, "load.csv"))
    load = intervals_from(load_rows, "t_s", "ops", None, nominal, False)
    if load_rows is None:
        warn(f"{name}: no load.csv")
    nb_rows = read_csv(os.path.join(path, "neighbour.csv"))
    cstart = num(ev.get("contention_start_unix"))
    nb = []
    if nb_rows is not None:
        if cstart is None:
            warn(f"{name}: neighbour.csv but no contention_start_unix; neighbour ignored")
        else:
            nb = intervals_from(nb_rows, "t_s", "work_units_per_s", cstart, nominal, True)
    load_start = num(ev.get("load_start_unix"))
    if load_start is None and load_rows:
        for row in load_rows:
            u, t = num(row.get("unix_s")), num(row.get("t_s"))
            if u is not None and t is not None:
                load_start = u - t
                break
    return {"name": name, "path": path, "mode": mode, "workload": workload,
            "events": ev, "migrate": mig, "load": load, "neighbour": nb,
            "load_start": load_start, "recovery_unix": None}


def find_modes(out_dir):
    dirs = []
    for e in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, e)
        if e == "plotdata" or not os.path.isdir(p):
            continue
        if any(os.path.exists(os.path.join(p, f)) for f in ("load.csv", "migrate.json", "events.json")):
            dirs.append(p)
    mods = [load_mode(p) for p in dirs]

    def key(d):
        return (MODE_ORDER.index(d["mode"]) if d["mode"] in MODE_ORDER else len(MODE_ORDER),
                d["mode"], d["workload"])
    return sorted(mods, key=key)


# ---------------------------------------------------------------- markdown


def fmt(x, digits=0, unit=""):
    if x is None:
        return "—"
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int) or digits == 0:
        return f"{x:,.0f}{unit}"
    return f"{x:,.{digits}f}{unit}"


def fmt_ms(x):
    if x is None:
        return "—"
    return fmt(x, 1) if abs(x) < 10 else fmt(x, 0)


def markdown(results, mods):
    hdr = ["mode", "downtime ms", "T_release ms", "bytes on wire", "recovery s",
           "contention resolved s", "ops lost", "outage s", "mismatched", "guest"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results:
        mode = r["mode"] if len({x["workload"] for x in results}) <= 1 else f"{r['workload']} {r['mode']}"
        cells = [mode, fmt_ms(r["downtime_ms"]), fmt_ms(r["t_release_ms"]),
                 fmt(num(r["bytes_wire"])), fmt(r["recovery_s"], 2), fmt(r["contention_resolved_s"], 2),
                 fmt(r["ops_lost"]), fmt(r["outage_s"], 2), fmt(r["mismatched_pages"]),
                 fmt(r["guest_verdict"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        "Times are wall clock; M = migration start (`migration_start_unix`). A load interval's rate is its",
        "ops / its length; C (cutover) = QEMU STOP on the source (else RESUME, else client switch, else M).",
        "",
        "- downtime ms, T_release ms, bytes on wire, mismatched, guest: from `migrate.json`"
        " (`downtime_ms`, `t_release_ms`, `bytes_wire`, `mismatched_pages`, `guest_verdict`).",
        f"- pre_rate: time-weighted mean ops/s of the load intervals ending in (M − {PRE_WINDOW_S:g} s, M]"
        f" (at least the last {MIN_PRE_INTERVALS} intervals before M).",
        f"- recovery s: 0 if no interval ending after M falls below {THRESHOLD:.0%} of pre_rate; else from M to"
        f" the start of the first {CONSECUTIVE} consecutive intervals, starting at or after C, each at ≥"
        f" {THRESHOLD:.0%} of pre_rate. — = never.",
        f"- contention resolved s: the same rule for the neighbour's rate against {THRESHOLD:.0%} of its"
        " uncontended baseline (`neighbour_baseline`, measured alone). — = no neighbour, or never.",
        "- ops lost: pre_rate × (window length) − ops completed in the window, ≥ 0; window = M → recovery"
        " point (→ end of the load run if never recovered); intervals straddling M count pro rata.",
        "- outage s: longest run of consecutive intervals with 0 ops among those ending after M.",
    ]
    units = {unit(r["workload"]) for r in results}
    pr = [f"{r['mode']} {fmt(r['pre_rate_ops'], 1 if (r['pre_rate_ops'] or 0) < 100 else 0)}"
          + ("" if len(units) == 1 else f" {unit(r['workload'])}") for r in results]
    lines.append(f"- pre_rate ({units.pop() if len(units) == 1 else 'per workload'}): " + ", ".join(pr) + ".")
    for w in sorted({r["workload"] for r in results}):
        if w in UNITS:
            rate, count, note = UNITS[w]
            lines.append(f"- {w}: {note}; rates are {rate}, ops lost are {count}.")
    lines.append("")
    keys = ["workload", "guest_mem_mib", "dirty_free_mib", "rate", "contention", "interval_ms", "neighbour_baseline"]
    settings = {}
    for d in mods:
        for k in keys:
            v = d["events"].get(k)
            settings.setdefault(k, [])
            if v not in settings[k]:
                settings[k].append(v)
    parts = []
    for k in keys:
        vals = settings.get(k, [])
        if len(vals) <= 1:
            parts.append(f"{k} = {fmt_setting(vals[0] if vals else None)}")
        else:
            parts.append(f"{k} = " + ", ".join(f"{d['mode']}: {fmt_setting(d['events'].get(k))}" for d in mods))
    lines.append("Run settings: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def fmt_setting(v):
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:,.1f}" if not v.is_integer() else f"{v:,.0f}"
    return str(v)


# ---------------------------------------------------------------- plots

EVENTS = [  # key, label, colour, dash type
    ("contention_start_unix", "contention", "#7f7f7f", 3),
    ("migration_start_unix", "migrate", "#2ca02c", 2),
    ("stop_unix", "STOP", "#d62728", 1),
    ("resume_unix", "RESUME", "#9467bd", 1),
    ("switch_unix", "switch", "#8c564b", 4),
    ("migration_end_unix", "end", "#17becf", 2),
]


def safe(s):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def gp_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_steps(path, ivs, origin, values):
    """One row per interval start plus the last end, for `with steps`."""
    with open(path, "w") as f:
        f.write("# x_s_since_load_start value\n")
        for iv, v in zip(ivs, values):
            f.write(f"{iv.start - origin:.3f} {v:.3f}\n")
        if ivs:
            f.write(f"{ivs[-1].end - origin:.3f} {values[-1]:.3f}\n")


def make_plots(out_dir, mods, results):
    pd = os.path.join(out_dir, "plotdata")
    os.makedirs(pd, exist_ok=True)
    panels = []
    xs = []
    for d, r in zip(mods, results):
        origin = d["load_start"]
        if origin is None:
            origin = d["load"][0].start if d["load"] else num(d["events"].get("migration_start_unix")) or 0.0
        p = {"mode": d["mode"], "title": f"{d['workload']} {d['mode']}: downtime {fmt_ms(r['downtime_ms'])} ms,"
             f" T_release {fmt_ms(r['t_release_ms'])} ms", "load": None, "nb": None,
             "ymax": 0.0, "y2max": 0.0, "events": [], "pre": r["pre_rate_ops"], "unit": unit(d["workload"]),
             "base": r.get("neighbour_baseline")}
        tag = safe(d["name"])
        if d["load"]:
            fn = f"plotdata/{tag}-load.dat"
            write_steps(os.path.join(out_dir, fn), d["load"], origin, [iv.rate for iv in d["load"]])
            p["load"] = fn
            p["ymax"] = max(iv.rate for iv in d["load"])
            xs += [d["load"][0].start - origin, d["load"][-1].end - origin]
        if d["neighbour"]:
            fn = f"plotdata/{tag}-neighbour.dat"
            write_steps(os.path.join(out_dir, fn), d["neighbour"], origin, [iv.rate for iv in d["neighbour"]])
            p["nb"] = fn
            p["y2max"] = max(max(iv.rate for iv in d["neighbour"]), p["base"] or 0.0)
            xs += [d["neighbour"][0].start - origin, d["neighbour"][-1].end - origin]
        for key, label, colour, dt in EVENTS:
            t = num(d["events"].get(key))
            if t is not None:
                p["events"].append((t - origin, label, colour, dt))
                xs.append(t - origin)
        panels.append(p)
    xmin = min([0.0] + xs)
    xmax = max(xs) if xs else 1.0
    if xmax <= xmin:
        xmax = xmin + 1.0
    n = len(panels)
    height = 300 * n + 60
    L = ["# Workload throughput per mode, with the noisy neighbour on y2 and the migration events.",
         "# Written by Workloads/bench/report.py; regenerate with: cd OUT_DIR && gnuplot throughput.gp",
         "# Data: plotdata/<dir>-load.dat (ops/s per load interval, x = s since load start, drawn as steps",
         "# over each interval) and plotdata/<dir>-neighbour.dat (neighbour work units/s).",
         "set encoding utf8",
         "do for [fmt in \"png svg\"] {",
         "  if (fmt eq \"png\") {",
         f"    set terminal pngcairo noenhanced size 1200,{height} font \"sans,10\"",
         "    set output \"throughput.png\"",
         "  } else {",
         f"    set terminal svg noenhanced size 1200,{height} dynamic font \"sans,10\" background rgb \"white\"",
         "    set output \"throughput.svg\"",
         "  }",
         f"  set multiplot layout {n},1",
         f"  set xrange [{xmin:.3f}:{xmax:.3f}]",
         "  set grid xtics ytics lc rgb \"#dddddd\"",
         "  set xlabel \"s since load start\"",
         "  set key bottom left opaque box samplen 2 font \",8\"",
         "  set tics out",
         "  set border 11",
         ]
    for p in panels:
        ymax = p["ymax"] * 1.5 if p["ymax"] > 0 else 1.0
        L += ["  unset arrow", "  unset label",
              f"  set title {gp_str(p['title'])}",
              f"  set yrange [0:{ymax:.3f}]",
              f"  set ylabel \"workload {p['unit']}\""]
        if p["nb"]:
            y2max = p["y2max"] * 1.5 if p["y2max"] > 0 else 1.0
            L += [f"  set y2range [0:{y2max:.3f}]", "  set y2tics", "  set ytics nomirror",
                  "  set y2label \"neighbour units/s\"", "  set border 15"]
        else:
            L += ["  unset y2tics", "  set ytics mirror", "  unset y2label", "  set border 11"]
        for i, (x, label, colour, dt) in enumerate(p["events"]):
            ly = 0.97 - 0.06 * i
            L += [f"  set arrow from {x:.3f}, graph 0 to {x:.3f}, graph 1 nohead lc rgb \"{colour}\" dt {dt} lw 1.2 front",
                  f"  set label {gp_str(label)} at {x:.3f}, graph {ly:.2f} left offset char 0.3,0 "
                  f"tc rgb \"{colour}\" font \",8\" front"]
        if p["pre"]:
            L.append(f"  set arrow from graph 0, first {THRESHOLD * p['pre']:.3f} to graph 1, first "
                     f"{THRESHOLD * p['pre']:.3f} nohead lc rgb \"#1f77b4\" dt 3 lw 0.8 back")
        if p["nb"] and p["base"]:
            L.append(f"  set arrow from graph 0, second {THRESHOLD * p['base']:.3f} to graph 1, second "
                     f"{THRESHOLD * p['base']:.3f} nohead lc rgb \"#ff7f0e\" dt 3 lw 0.8 back")
        plots = []
        if p["load"]:
            plots.append(f"{gp_str(p['load'])} using 1:2 with steps lw 2 lc rgb \"#1f77b4\" "
                         f"title \"workload {p['unit']}\"")
        if p["nb"]:
            plots.append(f"{gp_str(p['nb'])} using 1:2 axes x1y2 with steps lw 1 lc rgb \"#ff7f0e\" "
                         "title \"neighbour units/s\"")
        if not plots:
            L.append("  set label \"no data\" at graph 0.5, graph 0.5 center")
            plots.append("0 with lines lc rgb \"white\" notitle")
        L.append("  plot " + ", \\\n       ".join(plots))
        L.append("  unset y2label")
    L += ["  unset multiplot", "  unset output", "}", ""]
    gp = os.path.join(out_dir, "throughput.gp")
    with open(gp, "w") as f:
        f.write("\n".join(L))
    exe = shutil.which("gnuplot")
    if not exe:
        warn("gnuplot not found (apt-get install gnuplot-nox); wrote throughput.gp and plotdata/ only")
        return False
    pr = subprocess.run([exe, "throughput.gp"], cwd=out_dir, capture_output=True, text=True)
    if pr.returncode != 0:
        warn("gnuplot failed:\n" + pr.stderr)
        return False
    if pr.stderr.strip():
        warn("gnuplot: " + pr.stderr.strip())
    return True


# ---------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description="Summarise one benchmark run directory (see the module docstring).")
    ap.add_argument("out_dir")
    ap.add_argument("--json", action="store_true", help="print summary.json instead of the markdown table")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.out_dir):
        warn(f"{a.out_dir}: not a directory")
        return 2
    mods = find_modes(a.out_dir)
    if not mods:
        warn(f"{a.out_dir}: no <workload>-<mode>/ directories")
        return 2
    results = [analyse(d) for d in mods]
    js = json.dumps(results, indent=2) + "\n"
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        f.write(js)
    md = markdown(results, mods)
    with open(os.path.join(a.out_dir, "summary.md"), "w") as f:
        f.write(md)
    ok = make_plots(a.out_dir, mods, results)
    sys.stdout.write(js if a.json else md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
