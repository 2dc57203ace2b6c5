#!/usr/bin/env python3
"""epcopy's migration benchmark harness (run as `epcopy bench migrate ...`, or directly).

For each mode, on fresh "hosts" — two network namespaces joined by a veth pair (optionally shaped with
tc tbf), one `epcopy serve` in each, host A pinned to CPU 0 and host B to CPU 1 — it:

  1. measures the noisy neighbour alone on host A's CPU (its uncontended rate),
  2. boots the benchmark image (Workloads/images) on host A from a fresh qcow2 overlay on shared storage,
     the workload's server (memcached, or MariaDB for mysql) forwarded from host A's address; with
     --dirty-free-mb the guest first writes and frees that much memory (dirty free memory, as in a guest
     that has been in service for a while),
  3. warms the workload up (memcached: --warmup-mb of values; mysql: the image's sysbench dataset read into
     the InnoDB buffer pool) and checks with the server that it holds the data, then runs the load generator
     (in host B's namespace, CPU 1) for --duration s, following the VM through a target file,
  4. starts the neighbour on host A's CPU at --contention-at s (the contention): cpu, membw, or net (bulk
     TCP from host A to a sink on host B over the migration's veth; use it with --rate),
  5. migrates the VM to host B at --migrate-at s with `epcopy migrate --json`, and points the client at
     host B the moment the guest answers there,
  6. keeps measuring until the end, then writes OUT/<workload>-<mode>/{load.csv, neighbour.csv,
     migrate.json, events.json} and finally runs report.py (summary.json, summary.md, throughput.png/svg).

Only loopback and namespaces this script creates carry traffic; every process it starts is ended by PID;
every QEMU is bounded by the daemons' --vm-deadline. Root is required (namespaces, tc).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
MODES = ("enlightened", "postcopy", "precopy")


def log(text):
    print(f"bench: {text}", file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


class Hosts:
    """Two namespaces + veth + one daemon each. Context manager: everything is removed on exit."""

    def __init__(self, epcopy, rate, work, hot_report_every=10):
        self.epcopy, self.rate, self.work = epcopy, rate, work
        self.hot_report_every = hot_report_every
        tag = f"epcb{os.getpid() % 100000}"
        self.ns = (f"{tag}-a", f"{tag}-b")
        net = 10 + os.getpid() % 200
        self.ip = (f"10.78.{net}.1", f"10.78.{net}.2")
        self.veth = (f"v{tag}a", f"v{tag}b")
        self.key = os.path.join(work, "key")
        self.daemons = []

    def __enter__(self):
        with open(self.key, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(self.key, 0o600)
        for ns in self.ns:
            run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1]])
        for i in (0, 1):
            run(["ip", "link", "set", self.veth[i], "netns", self.ns[i]])
            run(["ip", "-n", self.ns[i], "addr", "add", f"{self.ip[i]}/24", "dev", self.veth[i]])
            run(["ip", "-n", self.ns[i], "link", "set", "lo", "up"])
            run(["ip", "-n", self.ns[i], "link", "set", self.veth[i], "up"])
            if self.rate:
                run(["ip", "netns", "exec", self.ns[i], "tc", "qdisc", "add", "dev", self.veth[i], "root", "tbf",
                     "rate", self.rate, "burst", "1mb", "latency", "50ms"])
        for i in (0, 1):
            # Host A on CPU 0, host B on CPU 1: the daemon's QEMUs inherit the affinity.
            log_file = open(os.path.join(self.work, f"serve-{'ab'[i]}.log"), "w")
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[i], "taskset", "-c", str(i), self.epcopy, "serve",
                                  "--listen", f"{self.ip[i]}:7470", "--key-file", self.key, "--vm-deadline", "1500",
                                  "--max-lifetime", "1800", "--hot-report-every", str(self.hot_report_every)],
                                 stdout=log_file, stderr=log_file)
            self.daemons.append(p)
        time.sleep(1)
        return self

    def __exit__(self, *exc):
        for p in self.daemons:
            p.send_signal(signal.SIGTERM)
        for p in self.daemons:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self.ns:
            run(["ip", "netns", "del", ns], check=False)

    def exec(self, i, cmd):
        return ["ip", "netns", "exec", self.ns[i]] + cmd

    def cli(self, i, args):
        """An `epcopy` client command against host i's daemon."""
        return self.exec(i, [self.epcopy] + args + ["--daemon", f"{self.ip[i]}:7470", "--key-file", self.key])


NET_SINK_PORT = 7480


def neighbour_cmd(args, seconds, out, hosts):
    """The noisy neighbour on host A's CPU. `net`: a bulk TCP sender to a sink on host B over the same veth as the
    migration (the sink is started per mode by `net_sink`)."""
    cmd = ["taskset", "-c", "0", sys.executable, os.path.join(REPO, "Workloads/loadgen/neighbour.py"),
           "--kind", args.contention, "--procs", str(args.neighbour_procs), "--duration", str(seconds),
           "--interval-ms", str(args.interval_ms), "--out", out]
    if args.contention == "net":
        cmd += ["--to", f"{hosts.ip[1]}:{NET_SINK_PORT}"]
    return cmd


def net_sink(hosts, out):
    """The far end of the net neighbour: reads and discards, in host B's namespace on CPU 1."""
    log_file = open(os.path.join(out, "net-sink.log"), "w")
    p = subprocess.Popen(hosts.exec(1, ["taskset", "-c", "1", sys.executable,
                                        os.path.join(REPO, "Workloads/loadgen/neighbour.py"), "--kind", "sink",
                                        "--listen", f"{hosts.ip[1]}:{NET_SINK_PORT}"]),
                         stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while "listening" not in open(log_file.name).read():
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the net neighbour's sink did not start: {open(log_file.name).read()[-300:]}")
        time.sleep(0.05)
    return p


def mean_rate(csv_path):
    rows = [l.split(",") for l in open(csv_path).read().splitlines()[1:] if l]
    rates = [float(r[1]) for r in rows[1:]]  # the first interval includes process start-up
    return sum(rates) / len(rates) if rates else None


class Memcached:
    """Workloads/memcached: --warmup-mb MiB of values stored, then memcache_load.py (gets and sets)."""
    name, port, ready_line, probe_kind, connections = "memcached", 11211, "epcopy-bench: memcached up", "memcached", 8

    def configure(self, p, args):
        if args.warmup_mb is None:
            args.warmup_mb = args.guest_mem // 4
        args.memcached_mb = max(64, int(args.warmup_mb * 1.5))
        if args.memcached_mb > args.guest_mem * 0.8:
            p.error(f"--warmup-mb {args.warmup_mb} does not fit a {args.guest_mem} MiB guest")

    def kernel_args(self, args):
        return f"epcopy.memcached_mb={args.memcached_mb} epcopy.mariadb=0"

    def load_cmd(self, args, target, csv):
        return [sys.executable, os.path.join(REPO, "Workloads/loadgen/memcache_load.py"), "--target-file", target,
                "--connections", str(args.connections), "--warmup-mb", str(args.warmup_mb),
                "--duration", str(args.duration), "--interval-ms", str(args.interval_ms), "--timeout-ms", "500",
                "--out", csv]

    def check_warmup(self, args, hosts, mode, events, load_log):
        """The warm-up must really have filled memcached (a fill that silently lost data would make every
        number after it meaningless): ask memcached itself."""
        stats = run(hosts.exec(1, [sys.executable, "-c",
                                   "import socket\n"
                                   f"s=socket.create_connection(('{hosts.ip[0]}',{self.port}),timeout=5)\n"
                                   "s.sendall(b'stats\\r\\n'); d=b''\n"
                                   "while not d.endswith(b'END\\r\\n'): d+=s.recv(65536)\n"
                                   "print([l.split()[2] for l in d.decode().splitlines() if l.startswith('STAT bytes ')][0])"]),
                    check=False)
        try:
            held = int(stats.stdout.strip())
        except ValueError:
            raise RuntimeError(f"{mode}: cannot read memcached's stats after the warm-up: {stats.stderr[-300:]}")
        events["memcached_bytes_after_warmup"] = held
        if held < 0.9 * args.warmup_mb * (1 << 20):
            raise RuntimeError(f"{mode}: memcached holds {held} bytes after a {args.warmup_mb} MiB warm-up "
                               f"(load log: {open(load_log).read()[-400:]})")


class MySQL:
    """Workloads/mysql: MariaDB with the sysbench dataset the image was built with (out/dataset.txt), read into
    the InnoDB buffer pool, then sysbench oltp_read_write through sysbench_load.py (ops = transactions)."""
    name, port, ready_line, probe_kind, connections = "mysql", 3306, "epcopy-bench: mariadb up", "mysql", 4

    def configure(self, p, args):
        if args.warmup_mb is not None:
            p.error("--warmup-mb: the MySQL dataset is fixed when the image is built (EPCOPY_SYSBENCH_TABLES, "
                    "EPCOPY_SYSBENCH_TABLE_SIZE; see Workloads/mysql/README.md)")
        for tool, package in (("sysbench", "sysbench"), ("mariadb", "mariadb-client")):
            if not shutil.which(tool):
                p.error(f"--workload mysql needs {tool}: apt-get install {package} (or make deps)")
        path = os.path.join(os.path.dirname(os.path.abspath(args.image)), "dataset.txt")
        try:
            with open(path) as f:
                ds = dict(l.strip().split("=", 1) for l in f if "=" in l)
            args.dataset = {k: int(ds[k]) for k in ("tables", "table_size", "data_bytes")}
        except (OSError, KeyError, ValueError) as e:
            p.error(f"{path}: {e}: the image has no sysbench dataset; rebuild it (make images)")
        data_mib = args.dataset["data_bytes"] / (1 << 20)
        if args.innodb_mb is None:  # the dataset plus room for the pages the load's inserts add, 64 MiB steps
            args.innodb_mb = max(128, -(-int(data_mib * 1.25) // 64) * 64)
        if args.innodb_mb < data_mib:
            p.error(f"--innodb-mb {args.innodb_mb} cannot hold the {data_mib:.0f} MiB dataset")
        if args.innodb_mb > args.guest_mem - 384:
            p.error(f"--innodb-mb {args.innodb_mb} does not fit a {args.guest_mem} MiB guest (keep 384 MiB for the "
                    "rest)")

    def kernel_args(self, args):
        return f"epcopy.memcached=0 epcopy.innodb_mb={args.innodb_mb}"

    def load_cmd(self, args, target, csv):
        return [sys.executable, os.path.join(REPO, "Workloads/loadgen/sysbench_load.py"), "--target-file", target,
                "--threads", str(args.connections), "--tables", str(args.dataset["tables"]),
                "--table-size", str(args.dataset["table_size"]), "--warmup", "--duration", str(args.duration),
                "--interval-ms", str(args.interval_ms), "--out", csv]

    def check_warmup(self, args, hosts, mode, events, load_log):
        """The warm-up must really have read the dataset into the buffer pool: ask MariaDB for the pages it holds
        and the dataset's size in pages."""
        query = ("SELECT (SELECT variable_value FROM information_schema.global_status "
                 "WHERE variable_name = 'INNODB_BUFFER_POOL_PAGES_DATA'), "
                 "(SELECT SUM(data_length + index_length) DIV @@innodb_page_size FROM information_schema.tables "
                 "WHERE table_schema = 'sbtest')")
        res = run(hosts.exec(1, ["mariadb", "-h", hosts.ip[0], "-P", str(self.port), "-u", "sbtest", "-psbtest",
                                 "--connect-timeout=10", "-N", "-B", "-e", query, "sbtest"]), check=False)
        try:
            held, pages = (int(x) for x in res.stdout.split())
        except ValueError:
            raise RuntimeError(f"{mode}: cannot read MariaDB's buffer pool status after the warm-up: "
                               f"{res.stdout[-200:]} {res.stderr[-300:]}")
        events.update(innodb_mb=args.innodb_mb, dataset_bytes=args.dataset["data_bytes"], dataset_pages=pages,
                      innodb_pages_after_warmup=held)
        if held < 0.9 * pages:
            raise RuntimeError(f"{mode}: the InnoDB buffer pool holds {held} pages after the warm-up, the dataset has "
                               f"{pages} (load log: {open(load_log).read()[-400:]})")


WORKLOADS = {w.name: w for w in (Memcached(), MySQL())}


def run_mode(args, hosts, mode, out):
    wl = WORKLOADS[args.workload]
    port, ready_line = wl.port, wl.ready_line
    os.makedirs(out, exist_ok=True)
    # A previous run's files in OUT would be read as this run's (the harness waits for load.csv to grow).
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.unlink(path)
    events = {"workload": args.workload, "mode": mode, "guest_mem_mib": args.guest_mem, "rate": args.rate or "none",
              "contention": args.contention, "interval_ms": args.interval_ms, "neighbour_baseline": None,
              "contention_start_unix": None, "switch_unix": None, "stop_unix": None, "resume_unix": None,
              "connections": args.connections}

    # 1. The neighbour alone on host A's CPU.
    sink = net_sink(hosts, out) if args.contention == "net" else None
    if args.contention != "none":
        base = os.path.join(out, "neighbour-baseline.csv")
        run(hosts.exec(0, neighbour_cmd(args, 3, base, hosts)))
        events["neighbour_baseline"] = mean_rate(base)
        log(f"{mode}: neighbour alone: {events['neighbour_baseline']:.1f} units/s")

    # 2. Boot from a fresh overlay.
    overlay = f"/var/tmp/epcopy-bench-{os.getpid()}-{mode}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", args.image, overlay])
    vm = "bench"
    append = (f"console=ttyS0 quiet root=/dev/vda rw epcopy.ip=10.0.2.15/24 epcopy.gw=10.0.2.2 "
              f"{wl.kernel_args(args)} epcopy.dirty_free_mib={args.dirty_free_mb}")
    events["dirty_free_mib"] = args.dirty_free_mb
    load = neighbour = None
    try:
        run(hosts.cli(0, ["vm", "start", vm, "--memory", str(args.guest_mem), "--kernel", args.kernel,
                          "--initrd", args.initrd, "--append", append, "--disk", overlay, "--forward", str(port)]))
        deadline = time.time() + 180
        while time.time() < deadline:
            serial = run(hosts.cli(0, ["vm", "serial", vm]), check=False).stdout
            if ready_line in serial:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{mode}: the guest did not report '{ready_line}' within 180 s")

        # 3. Warm-up and load, from host B's namespace on CPU 1, following the target file.
        target = os.path.join(out, "target")
        with open(target + ".tmp", "w") as f:
            f.write(f"{hosts.ip[0]}:{port}\n")
        os.replace(target + ".tmp", target)
        load_csv = os.path.join(out, "load.csv")
        load_log = open(os.path.join(out, "load.log"), "w")
        load = subprocess.Popen(hosts.exec(1, ["taskset", "-c", "1"] + wl.load_cmd(args, target, load_csv)),
                                stdout=load_log, stderr=subprocess.STDOUT)
        while not (os.path.exists(load_csv) and len(open(load_csv).read().splitlines()) >= 2):
            if load.poll() is not None:
                raise RuntimeError(f"{mode}: the load generator exited: {open(load_log.name).read()[-800:]}")
            time.sleep(0.05)
        wl.check_warmup(args, hosts, mode, events, load_log.name)
        first = open(load_csv).read().splitlines()[1].split(",")
        t0 = float(first[-1]) - float(first[0])  # wall clock of the timed run's start
        events["load_start_unix"] = t0
        log(f"{mode}: load running")

        # 4. Contention.
        if args.contention != "none":
            time.sleep(max(0.0, t0 + args.contention_at - time.time()))
            events["contention_start_unix"] = time.time()
            neighbour = subprocess.Popen(hosts.exec(0, neighbour_cmd(
                args, max(1, args.duration - args.contention_at), os.path.join(out, "neighbour.csv"), hosts)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # 5. Migration, and the client follows the VM the moment it answers on host B.
        time.sleep(max(0.0, t0 + args.migrate_at - time.time()))
        events["migration_start_unix"] = time.time()
        done = threading.Event()

        def follow():
            # One probe process for the whole wait (probe.py): memcached answers `version`, MariaDB sends its
            # handshake packet. Short attempts: one that connected to host B's port forward before the guest ran
            # there waits for an answer that may never come on that connection (with probe.py's 1 s default a
            # mysql run switched 0.96 s after RESUME).
            probe = subprocess.Popen(hosts.exec(1, [
                sys.executable, os.path.join(HERE, "probe.py"), "--kind", wl.probe_kind, "--to",
                f"{hosts.ip[1]}:{port}", "--attempt-ms", "300", "--timeout-s", str(args.duration + 120)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while not done.is_set():
                    try:
                        rc = probe.wait(timeout=0.05)
                    except subprocess.TimeoutExpired:
                        continue
                    if rc == 0:
                        with open(target + ".tmp", "w") as f:
                            f.write(f"{hosts.ip[1]}:{port}\n")
                        os.replace(target + ".tmp", target)
                        events["switch_unix"] = time.time()
                    return
            finally:
                if probe.poll() is None:
                    probe.kill()
                probe.wait()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        migrate = run(hosts.cli(0, ["migrate", vm, "--to", f"{hosts.ip[1]}:7470", "--mode", mode, "--json"]
                                + (["--verify"] if args.verify else [])), check=False)
        events["migration_end_unix"] = time.time()
        follower.join(timeout=30)
        done.set()
        try:
            result = json.loads(migrate.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"{mode}: migrate failed: {migrate.stdout[-500:]} {migrate.stderr[-800:]}")
        with open(os.path.join(out, "migrate.json"), "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        events["stop_unix"] = result.get("stop_unix_s")
        events["resume_unix"] = result.get("resume_unix_s")
        log(f"{mode}: migrated: downtime {result['downtime_ms']:.1f} ms, T_release {result['t_release_ms']:.0f} ms, "
            f"{result['bytes_wire']:,} B, verdict {result['guest_verdict']}")

        # 6. Until the end of the load.
        load.wait(timeout=args.duration + 120)
        if neighbour:
            neighbour.wait(timeout=60)
        run(hosts.cli(1, ["vm", "stop", vm]), check=False)
    finally:
        for p in (load, neighbour, sink):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        run(hosts.cli(0, ["vm", "stop", vm]), check=False)
        run(hosts.cli(1, ["vm", "stop", vm]), check=False)
        if os.path.exists(overlay):
            os.unlink(overlay)
        with open(os.path.join(out, "events.json"), "w") as f:
            json.dump(events, f, indent=2, sort_keys=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="memcached", choices=["memcached", "mysql", "cassandra"])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--guest-mem", type=int, default=2048, help="guest RAM in MiB")
    p.add_argument("--rate", default=None, help="tc tbf rate of the link (e.g. 1gbit, 10gbit); default unshaped")
    p.add_argument("--contention", default="cpu", choices=["cpu", "membw", "net", "none"])
    p.add_argument("--neighbour-procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=60, help="seconds of measured load")
    p.add_argument("--contention-at", type=float, default=10)
    p.add_argument("--migrate-at", type=float, default=20)
    p.add_argument("--warmup-mb", type=int, default=None,
                   help="memcached fill (default: 25 %% of guest RAM); mysql: the image's dataset, not settable")
    p.add_argument("--connections", type=int, default=None,
                   help="client connections (memcached: 8; mysql: 4 sysbench threads)")
    p.add_argument("--innodb-mb", type=int, default=None,
                   help="mysql: InnoDB buffer pool, MiB (default: 1.25 x the dataset, in 64 MiB steps)")
    p.add_argument("--dirty-free-mb", type=int, default=0,
                   help="the guest writes and frees this much memory at boot, before the workload starts: its free "
                        "memory is then dirty, as in a guest that has run for a while (default 0: a fresh guest's "
                        "free memory, never touched)")
    p.add_argument("--interval-ms", type=int, default=250)
    p.add_argument("--verify", action="store_true", help="verify memory (enlightened: every page at STOP)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.add_argument("--epcopy", default=os.environ.get("EPCOPY_BIN", os.path.join(REPO, ".build/release/epcopy")))
    p.add_argument("--image", default=os.path.join(REPO, "Workloads/images/out/bench.img"))
    p.add_argument("--kernel", default=os.path.join(REPO, "Workloads/guest/out/vmlinux"))
    p.add_argument("--initrd", default=os.path.join(REPO, "Workloads/images/out/initrd.img"))
    args = p.parse_args()

    if args.workload == "cassandra":
        p.error("--workload cassandra: Cassandra is not installable on this machine (not in Debian; PyPI has "
                "only drivers); the profile is not built")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: {m} is not one of {', '.join(MODES)}")
    if not (0 <= args.contention_at <= args.migrate_at < args.duration):
        p.error("need 0 <= --contention-at <= --migrate-at < --duration")
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, tc)")
    for path, what in ((args.image, "make images"), (args.kernel, "make guest"), (args.initrd, "make images"),
                       (args.epcopy, "swift build -c release")):
        if not os.path.exists(path):
            p.error(f"{path} is missing: run `{what}`")
    if not 0 <= args.dirty_free_mb <= args.guest_mem - 384:
        p.error(f"--dirty-free-mb: 0 to the guest's memory less 384 MiB ({args.guest_mem - 384})")
    wl = WORKLOADS[args.workload]
    if args.connections is None:
        args.connections = wl.connections
    wl.configure(p, args)

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="epcopy-bench-")
    try:
        for mode in modes:
            # The daemons keep the guest agent's hot report fresh (a scan every 10 s) only where it is used: QEMU's
            # own modes run the same guest without that cost.
            with Hosts(args.epcopy, args.rate, work, hot_report_every=10 if mode == "enlightened" else 0) as hosts:
                log(f"{mode}: hosts {hosts.ip[0]} -> {hosts.ip[1]}, link {args.rate or 'unshaped'}")
                run_mode(args, hosts, mode, os.path.join(args.out, f"{args.workload}-{mode}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = os.path.join(HERE, "report.py")
    rc = subprocess.run([sys.executable, report, args.out] + (["--json"] if args.json else [])).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
