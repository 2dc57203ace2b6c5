// `epcopy bench faults`: the failure bench (Workloads/bench/faults.py) with this binary as the epcopy it
// drives. Each run is a real migration of a freshly booted guest between `make demo`'s two hosts with one
// failure injected (before STOP, right after it, or in the push), verified page by page; the harness is a script because it drives the
// demo's processes and namespaces, all recovery logic stays in the engines and daemons it exercises.

import ArgumentParser
import Foundation

struct BenchFaults: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "faults",
        abstract: "Inject link cuts and daemon kills into real migrations; count what recovered.",
        discussion: """
            Each run: fresh hosts (two network namespaces + veth shaped to --rate, one epcopy daemon each), the \
            512 MiB test guest booted on host A and migrated (enlightened, --verify) to host B, and one failure \
            at a random point (one in ten before STOP, one in ten right after it, the rest in the push): a black \
            hole (host A's veth down 0.2-10 s), a reset of every connection between the hosts, a black hole then \
            a reset during the recovery, or either host's daemon SIGKILLed and started again (half of the kills \
            during a black hole). A failure before the switch must leave the VM running on host A; it is then \
            migrated again (retried). Before them, \
            --baseline runs without a failure give the T_release that extra_ms is measured against. Prints \
            runs, recovered, vm_lost, mismatched_pages, guest_corrupt, extra_ms_p50, extra_ms_max, noticed and \
            per_run (--json: one object). --qemu-postcopy runs the same failures against QEMU's own postcopy. \
            About 20-30 s per run on 2 cores. Needs root and the test guest (make guest).
            """)
    @Option(help: "Link cuts (black holes, resets, and a black hole then a reset, at random).") var cuts = 4
    @Option(help: "Daemon kills (source, destination, each alone and during a black hole, in turn).") var kills = 4
    @Option(help: "Seed for the failure plan (default: random, printed).") var seed: Int?
    @Option(help: "Runs without a failure, for extra_ms.") var baseline = 2
    @Option(help: "Link rate (tc tbf).") var rate = "200mbit"
    @Flag(help: "Also run the same failures against QEMU's own postcopy.") var qemuPostcopy = false
    @Option(help: ArgumentHelp("Seconds after which a run counts as hung (its VM lost).",
                               discussion: "QEMU's postcopy pauses on a lost link until migrate-recover is issued by hand; epcopy's runs end by themselves."))
    var runTimeout = 300
    @OptionGroup var output: OutputOptions

    func validate() throws {
        guard cuts >= 0, kills >= 0, cuts + kills > 0 else { throw ValidationError("--cuts and --kills: at least one run") }
        guard (0...20).contains(baseline) else { throw ValidationError("--baseline: 0...20") }
        guard (30...3600).contains(runTimeout) else { throw ValidationError("--run-timeout: 30...3600 seconds") }
    }

    func run() throws {
        let script = try BenchMigrate.harness(named: "faults.py")
        var args = [script, "--cuts", String(cuts), "--kills", String(kills), "--baseline", String(baseline),
                    "--rate", rate, "--run-timeout", String(runTimeout), "--epcopy", URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path]
        if let seed { args += ["--seed", String(seed)] }
        if qemuPostcopy { args.append("--qemu-postcopy") }
        if output.json { args.append("--json") }
        try BenchMigrate.runHarness(args)
    }
}
