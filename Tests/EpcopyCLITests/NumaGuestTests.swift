// The engine's NUMA placement where the kernel has several nodes: this host has one, so the check runs inside a
// TCG test guest started with two (and three) NUMA nodes, each with its own RAM and CPU. The guest's init runs
// epcopy-numa-check (the engine's NumaBinding and NumaPlacement, built static) and powers off; the console says
// where each node's pages landed. A control run without the binding must fail, so the check can tell.

import EpcopyTestSupport
import Foundation
import Testing

@Suite(.serialized, .tier(.qemu), .requires(.numaCheckGuest))
struct NumaGuestTests {
    /// Boots the check in a guest with `nodes` nodes of 192 MiB and one vCPU each; returns its console lines.
    private func runCheck(nodes: Int, mode: String) throws -> (status: Int32?, lines: [String], all: String) {
        var arguments = ["120", ProcessInfo.processInfo.environment["EPCOPY_QEMU"] ?? "qemu-system-x86_64",
                         "-accel", "tcg", "-m", "\(192 * nodes)M", "-smp", "\(nodes)", "-nodefaults", "-nographic",
                         "-no-reboot", "-serial", "stdio", "-kernel", try #require(Prerequisite.testGuestKernel),
                         "-initrd", Prerequisite.testGuestNumaInitrd,
                         "-append", "console=ttyS0 quiet epcopy.agent=0 epcopy.numa_check=\(mode)"]
        for node in 0..<nodes {
            arguments += ["-object", "memory-backend-ram,id=m\(node),size=192M",
                          "-numa", "node,nodeid=\(node),cpus=\(node),memdev=m\(node)"]
        }
        let guest = try Spawned("numa-guest", "/usr/bin/timeout", arguments)
        let status = guest.wait(seconds: 150)
        if status == nil { guest.kill() }
        // The serial console ends lines with "\r\n", one Character in Swift: split on any newline.
        let lines = guest.stdout.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            .filter { $0.hasPrefix("epcopy-numa-check:") }
        return (status, lines, guest.stdout + guest.stderr)
    }

    @Test(arguments: [2, 3])
    func pagesPlacedWithUffdCopyLandOnTheBoundNodeOfAGuestWithSeveralNodes(nodes: Int) throws {
        let (status, lines, all) = try runCheck(nodes: nodes, mode: "1")
        #expect(status == 0, "the guest did not power off within 150 s: \(all)")
        #expect(lines.first?.contains("\(nodes) nodes:") == true, "\(all)")
        #expect(lines.contains("epcopy-numa-check: OK"), "\(all)")
        for node in 0..<nodes {
            #expect(lines.contains { $0.hasPrefix("epcopy-numa-check: bound to node \(node): 2048 pages placed")
                && $0.contains("N\(node)=2048") && $0.hasSuffix("fraction on node 1.0") }, "node \(node): \(all)")
        }
    }

    @Test func withoutTheBindingThePagesLandOnThePlacingNodeAndTheCheckFails() throws {
        let (status, lines, all) = try runCheck(nodes: 2, mode: "unbound")
        #expect(status == 0, "the guest did not power off within 150 s: \(all)")
        #expect(lines.contains("epcopy-numa-check: FAIL pages not on the bound node: node 1: N0=2048"), "\(all)")
        #expect(!lines.contains("epcopy-numa-check: OK"), "\(all)")
    }
}
