// libvirt domains on two real libvirt daemons (scripts/libvirt-host: one per namespaced host, no systemd), through
// `make demo-libvirt` as an operator would run it: a domain without shared memory refused by check and by migrate
// with check's findings, prepare fixing its definition, a restart (virsh shutdown, start) making it migratable; then
// that domain moved in enlightened mode with every page verified against the fenced source, and libvirt's own
// post-copy and pre-copy of the same test guest as the baselines; after each, virsh on both hosts.

import EpcopyTestSupport
import Foundation
import Testing

/// Runs the program after it with no signal blocked and SIGPIPE and SIGCHLD at their defaults. A child of the test
/// process inherits its signal state (the Swift runtime ignores SIGPIPE, and threads here block signals); a bash
/// script that waits for its children, and a libvirtd that reaps QEMU, must not.
let withDefaultSignals = ["/usr/bin/python3", "-c", """
    import os, signal, sys
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for s in (signal.SIGPIPE, signal.SIGCHLD): signal.signal(s, signal.SIG_DFL)
    os.execv(sys.argv[1], sys.argv[1:])
    """]

@Suite(.serialized, .tier(.qemu), .requires(.testGuest), .requires(.namespaces), .requires(.libvirt))
struct LibvirtTests {
    /// Runs scripts/demo-libvirt with this build's epcopy and `environment`, expects it to succeed within `seconds`,
    /// and returns what it printed. The demo runs with the signal state of a shell (see `withDefaultSignals`):
    /// libvirtd and QEMU start under it.
    private func demoLibvirt(_ environment: [String: String], seconds: Double) throws -> String {
        let demo = try Spawned("demo-libvirt", "/bin/bash", ["\(Prerequisite.repository)/scripts/demo-libvirt"],
                               environment: environment.merging(
                                   ["EPCOPY_BIN": productsDirectory.appendingPathComponent("epcopy").path]) { a, _ in a },
                               prefix: withDefaultSignals)
        let status = demo.wait(seconds: seconds)
        #expect(status == 0, "demo-libvirt failed: \(demo.stdout)\n\(demo.stderr)")
        return demo.stdout
    }

    @Test func aLibvirtDomainIsCheckedPreparedAndMigratedInEachModeThenManagedWithVirshOnTheDestination() throws {
        let out = try demoLibvirt(["DEMO_LIBVIRT_CHECK": "1"], seconds: 900)
        // check and migrate refuse a domain with private memory, naming what is missing; prepare fixes it for the next boot.
        #expect(out.contains("MISSING memory in a shared file"), "\(out)")
        #expect(out.contains("epcopy migrate lvcheck --libvirt: Error: the libvirt domain lvcheck cannot be migrated in enlightened mode: it lacks memory in a shared file"), "\(out)")
        #expect(out.contains("virsh shutdown lvcheck: shut off (shutdown)"), "\(out)")
        #expect(out.contains("after a restart with the prepared definition, check passes"), "\(out)")
        // One JSON object per mode: verified, running on B, gone from A.
        let results = out.split(separator: "\n").filter { $0.hasPrefix("{") }.compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        let modes = results.compactMap { $0["mode"] as? String }
        #expect(modes == ["enlightened", "postcopy", "precopy"], "\(out)")
        for result in results {
            let mode = result["mode"] as? String ?? "?"
            #expect(result["mismatched_pages"] as? Int == 0, "\(mode): \(result)")
            #expect(result["guest_verdict"] as? String == "OK", "\(mode): \(result)")
            #expect(result["source_state"] as? String == "absent", "\(mode): \(result)")
            #expect(result["destination_state"] as? String == "running", "\(mode): \(result)")
            #expect((result["libvirt_version"] as? String)?.isEmpty == false, "\(mode): \(result)")
            #expect((result["downtime_ms"] as? Double ?? 0) > 0, "\(mode): \(result)")
        }
        // Enlightened mode compared every non-free page against the source at STOP.
        let row = out.split(separator: "\n").first { $0.hasPrefix("enlightened ") }.map(String.init) ?? ""
        #expect(row.contains("OK (digests)"), "\(out)")
        // ... and bound the guest's RAM to a NUMA node of host B before the first page landed: every page is there.
        let enlightened = results.first { $0["mode"] as? String == "enlightened" } ?? [:]
        #expect(enlightened["numa_node"] as? Int != nil, "\(enlightened)")
        #expect((enlightened["pages_on_node_fraction"] as? Double ?? 0) >= 0.99, "\(enlightened)")
        // B's persistent definition keeps the RAM on that node and the vCPUs on its CPUs from the next start on.
        let definition = out.split(separator: "\n").first { $0.hasPrefix("  enlightened: B's definition:") }.map(String.init) ?? ""
        #expect(definition.contains("<numatune> preferred node \(enlightened["numa_node"] as? Int ?? -1)"), "\(out)")
        #expect(definition.contains("<vcpupin> cpus "), "\(out)")
        // virsh on host B after each mode: listed, the console counting on, an orderly shutdown.
        for mode in ["enlightened", "postcopy", "precopy"] {
            let line = out.split(separator: "\n").first { $0.hasPrefix("  \(mode): virsh list:") }.map(String.init) ?? ""
            #expect(line.contains("host A does not list"), "\(mode): \(out)")
            #expect(line.contains("virsh shutdown on B: shut off (shutdown)"), "\(mode): \(out)")
        }
        // Nothing left: no namespace of the demo, no libvirt RAM directory, no held RAM link.
        #expect(!shOutput("ip netns list").contains("eplv"), "namespaces left")
        let shm = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
        #expect(!shm.contains { $0.hasPrefix("epcopy-libvirt-eplv") || $0.hasPrefix("epcopy-held-") }, "left in /dev/shm: \(shm)")
    }
    /// The source daemon is killed (SIGKILL) during an enlightened migration of a libvirt domain, as soon as libvirt
    /// has started the incoming QEMU (0 MiB: before the switch, as a rule) or with 64 MiB on host B (mid push, after
    /// it), on a 200 Mbit/s link. Its successor waits for libvirt to stop or move the domain, takes the push up from
    /// the held RAM file, and the domain ends on host B verified page by page, libvirt's on both hosts.
    @Test(arguments: [0, 64])
    func aLibvirtDomainsMigrationSurvivesTheDeathOfTheSourceDaemon(cutAtMiB: Int) throws {
        let out = try demoLibvirt(["DEMO_LIBVIRT_MODES": "enlightened", "KILL_DAEMON": "source", "RATE": "200mbit",
                                   "CUT_AT_MIB": "\(cutAtMiB)"], seconds: 600)
        #expect(out.contains("killing host A's daemon (SIGKILL"), "\(out)")
        #expect(out.contains("taking up the migration of the libvirt domain lvdemo-enlightened"), "\(out)")
        #expect(out.contains("its RAM here is final"), "\(out)")
        #expect(out.contains("resumed migration of lvdemo-enlightened finished"), "\(out)")
        let result = out.split(separator: "\n").first { $0.hasPrefix("{") }.flatMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        } ?? [:]
        #expect(result["mismatched_pages"] as? Int == 0, "\(result)")
        #expect(result["guest_verdict"] as? String == "OK", "\(result)")
        #expect(result["source_state"] as? String == "absent", "\(result)")
        #expect(result["destination_state"] as? String == "running", "\(result)")
        let row = out.split(separator: "\n").first { $0.hasPrefix("enlightened ") }.map(String.init) ?? ""
        #expect(row.contains("OK (digests)"), "\(out)")
        let line = out.split(separator: "\n").first { $0.hasPrefix("  enlightened: virsh list:") }.map(String.init) ?? ""
        #expect(line.contains("host A does not list"), "\(out)")
        #expect(line.contains("virsh shutdown on B: shut off (shutdown)"), "\(out)")
        let shm = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
        #expect(!shm.contains { $0.hasPrefix("epcopy-held-") }, "a held RAM link is left in /dev/shm: \(shm)")
    }
}
