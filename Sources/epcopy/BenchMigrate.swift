// `epcopy bench migrate`: the workload harness (Workloads/bench/bench.py) with this binary as the epcopy it
// drives. The harness is a script because it orchestrates processes (namespaces, daemons, load generator,
// neighbour, gnuplot); all migration logic stays in the engine it calls through `epcopy migrate`.

import ArgumentParser
import Foundation

struct BenchMigrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Migrate a workload VM under contention in each mode; record throughput, events, results, plots.",
        discussion: """
            For each mode, on fresh hosts (two network namespaces + veth, one epcopy daemon each; host A on \
            CPU 0, host B on CPU 1): boot the benchmark image (make images), warm the workload up, run the \
            load generator, start a noisy neighbour on host A's CPU at --contention-at, migrate at \
            --migrate-at, keep measuring to --duration. Writes OUT/<workload>-<mode>/ (load.csv, \
            neighbour.csv, migrate.json, events.json), OUT/summary.{json,md} and OUT/throughput.{png,svg}. \
            Results: downtime, T_release, bytes on the wire, time to resolve contention, recovery time, \
            ops lost. Needs root. Workloads: memcached; mysql (MariaDB + sysbench oltp_read_write on the image's \
            dataset, read into the buffer pool first; needs sysbench and mariadb-client on the host); cassandra: not \
            installable here.
            """)
    @Option(help: "memcached, mysql or cassandra.") var workload = "memcached"
    @Option(help: "Comma-separated modes.") var modes = "enlightened,postcopy,precopy"
    @Option(help: "Guest RAM, e.g. 2GiB or 1024 (MiB).") var guestMem = "2GiB"
    @Option(help: "Link rate (tc tbf), e.g. 1gbit or 10gbit; default unshaped.") var rate: String?
    @Option(help: ArgumentHelp("The neighbour on host A: cpu (busy loops), membw (memcpy streams), net (bulk TCP to host B "
        + "over the migration's link; pair it with --rate) or none.")) var contention = "cpu"
    @Option(help: "Seconds of measured load.") var duration: Double = 60
    @Option(help: "Start the neighbour this many seconds into the load.") var contentionAt: Double = 10
    @Option(help: "Migrate this many seconds into the load.") var migrateAt: Double = 20
    @Option(help: "memcached fill, MiB (default: a quarter of guest RAM); mysql: set by the image.") var warmupMb: Int?
    @Option(help: ArgumentHelp("The guest writes and frees this much memory (MiB) at boot, before the workload "
        + "starts, so its free memory is dirty as in a guest that has run for a while (default 0: never touched).",
        valueName: "MiB")) var dirtyFreeMb = 0
    @Flag(help: "Verify memory (enlightened: every page against the source at STOP).") var verify = false
    @Option(help: "Output directory.") var out: String
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard let mib = Self.mebibytes(guestMem) else { throw ValidationError("--guest-mem: e.g. 2GiB, 512MiB or 1024") }
        let script = try Self.harness()
        var args = [script, "--workload", workload, "--modes", modes, "--guest-mem", String(mib),
                    "--contention", contention, "--duration", String(duration), "--contention-at", String(contentionAt),
                    "--migrate-at", String(migrateAt), "--out", out,
                    "--epcopy", URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path]
        if let rate { args += ["--rate", rate] }
        if let warmupMb { args += ["--warmup-mb", String(warmupMb)] }
        if dirtyFreeMb > 0 { args += ["--dirty-free-mb", String(dirtyFreeMb)] }
        if verify { args.append("--verify") }
        if output.json { args.append("--json") }
        try Self.runHarness(args)
    }

    /// Runs a harness script (and its arguments) with python3; its exit status is this command's.
    static func runHarness(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = arguments
        try process.run()
        process.waitUntilExit()
        if process.terminationStatus != 0 { throw ExitCode(process.terminationStatus) }
    }

    static func mebibytes(_ text: String) -> Int? {
        let t = text.lowercased()
        if t.hasSuffix("gib"), let n = Int(t.dropLast(3)) { return n * 1024 }
        if t.hasSuffix("mib"), let n = Int(t.dropLast(3)) { return n }
        return Int(t)
    }

    /// Workloads/bench/`name` of the source tree this binary was built from (EPCOPY_REPO overrides).
    static func harness(named name: String = "bench.py") throws -> String {
        var candidates: [URL] = []
        if let repo = ProcessInfo.processInfo.environment["EPCOPY_REPO"] { candidates.append(URL(fileURLWithPath: repo)) }
        var dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<5 {
            candidates.append(dir)
            dir = dir.deletingLastPathComponent()
        }
        for base in candidates {
            let script = base.appendingPathComponent("Workloads/bench/\(name)").path
            if FileManager.default.fileExists(atPath: script) { return script }
        }
        throw ValidationError("this bench needs the epcopy source tree (Workloads/bench/\(name)); set EPCOPY_REPO")
    }
}
