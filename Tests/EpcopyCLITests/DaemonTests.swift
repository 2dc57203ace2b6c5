// The daemons as an operator runs them: `make demo`'s script (two network namespaces, one daemon
// each, one migration per mode of the 512 MiB test guest), the same hosts with the link cut in the middle
// of the push (black hole, reset), either daemon SIGKILLed mid push and started again, a failure before
// the switch (the VM must still run on its source and migrate again), a cancel, and a peer that refuses
// (wrong key): the migration must fail before the switch and leave the source VM running, untouched.

import EpcopyTestSupport
import Foundation
import Testing

@Suite(.serialized, .tier(.qemu), .requires(.testGuest), .requires(.namespaces)) struct DaemonTests {
    static let repository = Prerequisite.repository

    /// `scripts/demo` in enlightened mode over a 200 Mbit/s link with `variables` (the failure to inject), this build's
    /// epcopy, bounded to 10 minutes; it must exit 0.
    private func runDemo(_ label: String, _ variables: [String: String],
                         sourceLocation: SourceLocation = #_sourceLocation) throws -> Spawned {
        var environment = ["EPCOPY_BIN": productsDirectory.appendingPathComponent("epcopy").path,
                           "RATE": "200mbit", "DEMO_MODES": "enlightened"]
        environment.merge(variables) { _, new in new }
        let demo = try Spawned(label, "/bin/bash", ["\(Self.repository)/scripts/demo"], environment: environment)
        let status = demo.wait(seconds: 600)
        #expect(status == 0, "demo failed: \(demo.stdout)\n\(demo.stderr)", sourceLocation: sourceLocation)
        return demo
    }

    /// The demo table's enlightened row: 0 mismatched pages, and the guest's verdict OK with digests compared.
    private func expectVerifiedEnlightenedRow(_ stdout: String, sourceLocation: SourceLocation = #_sourceLocation) {
        let row = stdout.split(separator: "\n").first { $0.hasPrefix("enlightened") }.map(String.init) ?? ""
        let fields = row.split(separator: " ", omittingEmptySubsequences: true)
        #expect(fields.count >= 8 && fields[6] == "0", "mismatched pages in: \(stdout)", sourceLocation: sourceLocation)
        #expect(row.contains("OK (digests)"), "guest verdict in: \(stdout)", sourceLocation: sourceLocation)
    }

    @Test func theDemoMigratesTheGuestOnceInEachModeAcrossNamespaces() throws {
        let demo = try Spawned("demo", "/bin/bash", ["\(Self.repository)/scripts/demo"],
                               environment: ["EPCOPY_BIN": productsDirectory.appendingPathComponent("epcopy").path])
        let status = demo.wait(seconds: 600)
        #expect(status == 0, "demo failed: \(demo.stdout)\n\(demo.stderr)")
        let rows = demo.stdout.split(separator: "\n").filter {
            $0.hasPrefix("enlightened") || $0.hasPrefix("postcopy") || $0.hasPrefix("precopy")
        }
        #expect(rows.count == 3, "\(demo.stdout)")
        for row in rows {
            let fields = row.split(separator: " ", omittingEmptySubsequences: true)
            #expect(fields.count >= 8, "\(row)")
            #expect(fields.count >= 8 && fields[6] == "0", "mismatched pages in: \(row)")
            #expect(row.contains("OK ("), "guest verdict in: \(row)")
        }
        #expect(rows.first?.contains("OK (digests)") == true)
        // The guest agent answered on both sides: a hot report, and free pages that were never sent.
        let agent = demo.stdout.split(separator: "\n").first { $0.contains("agent: hot report") }
        #expect(agent?.contains("never sent") == true, "\(demo.stdout)")
        // Nothing left behind: no namespace, no QEMU of the demo, no RAM file.
        let namespaces = (try? String(contentsOfFile: "/proc/net/dev", encoding: .utf8)) != nil
            ? shOutput("ip netns list") : ""
        #expect(!namespaces.contains("epcd"), "namespaces left: \(namespaces)")
        #expect(!shOutput("pgrep -af qemu-system").contains("d10-77-"), "a demo QEMU is still running")
        let shm = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
        #expect(!shm.contains { $0.contains("d10-77-") }, "RAM files left: \(shm)")
    }

    /// `make demo`'s hosts, the enlightened migration only, over a 200 Mbit/s link that is cut in the middle of
    /// the push: host A's veth down for 3 s (a black hole), or every connection to host B reset (the engines'
    /// channels and the daemons' control link). The daemons must
    /// recover by themselves, and the guest's memory must match the source at STOP page for page.
    @Test(arguments: ["3", "reset"])
    func theLinkIsCutMidPushAndTheMigrationRecoversByItself(cut: String) throws {
        let demo = try Spawned("demo-cut", "/bin/bash", ["\(Self.repository)/scripts/demo"], environment: [
            "EPCOPY_BIN": productsDirectory.appendingPathComponent("epcopy").path,
            "RATE": "200mbit", "CUT_LINK": cut, "DEMO_MODES": "enlightened",
        ])
        let status = demo.wait(seconds: 600)
        #expect(status == 0, "demo failed: \(demo.stdout)\n\(demo.stderr)")
        expectVerifiedEnlightenedRow(demo.stdout)
        #expect(demo.stdout.contains(cut == "reset" ? "resetting every connection to host B" : "link up again"))
        #expect(demo.stdout.contains("recovered by itself"), "the link loss was not seen or not recovered: \(demo.stdout)")
        if cut == "reset" {
            // The reset took the daemons' control link too: the source asked again on a new connection.
            #expect(demo.stdout.contains("control link to") && demo.stdout.contains("recovered"), "\(demo.stdout)")
        }
    }

    /// `make demo`'s hosts, the enlightened migration only: host A's daemon is SIGKILLed in the middle of the push
    /// (its QEMU dies with it) and started again. It must find the migration in its state directory, send the
    /// destination the rest from the fenced RAM file, and `migrate --resume` must print a result with every page
    /// matching the source at STOP and the guest's verdict OK. With `outage`, the daemon dies while host A's veth is
    /// down for that many seconds (a double failure): its successor must wait for the link.
    @Test(arguments: ["", "3"])
    func aSourceDaemonKilledMidPushIsRestartedAndFinishesTheMigration(outage: String) throws {
        let demo = try runDemo("demo-kill", outage.isEmpty ? ["KILL_DAEMON": "source"]
                                                           : ["KILL_DAEMON": "source", "CUT_LINK": outage])
        #expect(demo.stdout.contains(outage.isEmpty ? "killing host A's daemon" : "killing host A's daemon during the outage"),
                "\(demo.stdout)")
        #expect(demo.stdout.contains("taking up the migration of demo-enlightened"), "\(demo.stdout)")
        expectVerifiedEnlightenedRow(demo.stdout)
    }

    /// Host B's daemon is SIGKILLed in the middle of the push, after the switch: the guest runs there and its QEMU
    /// lives on behind its keeper. The daemon started again must adopt it (QEMU by PID, the shim's userfaultfd,
    /// the engine's port, the digests the dead engine recorded), serve the source again, and the migration must
    /// end with every page matching the source at STOP and the guest's verdict OK.
    @Test func aDestinationDaemonKilledMidPushIsAdoptedAndFinishes() throws {
        let demo = try runDemo("demo-kill-b", ["KILL_DAEMON": "destination"])
        #expect(demo.stdout.contains("killing host B's daemon"), "\(demo.stdout)")
        #expect(demo.stdout.contains("adopted demo-enlightened: QEMU"), "\(demo.stdout)")
        expectVerifiedEnlightenedRow(demo.stdout)
    }

    /// Before STOP — as soon as the destination's QEMU exists — host A's daemon is SIGKILLed, or host A's veth goes
    /// down for 3 s. Either way the VM must still run on host A (its QEMU outlived the daemon; the successor took it
    /// back and called the destination off), its tester going on; migrated again, every page must match and the
    /// guest's verdict be OK. (A 3 s black hole may also be ridden out by TCP: then the first attempt succeeds.)
    @Test(arguments: [["KILL_DAEMON": "source"], ["CUT_LINK": "3"]])
    func aFailureBeforeTheSwitchLeavesTheVMRunningOnItsSource(failure: [String: String]) throws {
        let demo = try runDemo("demo-before-stop", failure.merging(["CUT_AT_MIB": "-1"]) { old, _ in old })
        #expect(demo.stdout.contains("striking with 0 MiB at the destination"), "\(demo.stdout)")
        if failure["KILL_DAEMON"] != nil {
            #expect(demo.stdout.contains("took back VM demo-enlightened"), "\(demo.stdout)")
            #expect(demo.stdout.contains("still runs on host A, its memory tester going on"), "\(demo.stdout)")
        }
        expectVerifiedEnlightenedRow(demo.stdout)
    }

    /// Two paths between the hosts. Mid push host A's first link goes down for good; 3 s later the operator sends the
    /// migration to host B's other address (`migrate NAME --resume --to`). The engines and the control link must
    /// move there and the migration end — seen by both the migrate command that started it and the one that
    /// redirected it — with every page matching and the guest's verdict OK.
    @Test func aPausedMigrationIsSentByHandToAnotherAddressOfItsDestination() throws {
        let demo = try runDemo("demo-reroute", ["REROUTE": "3"])
        #expect(demo.stdout.contains("the rerouted migration ended: 0 mismatched pages, guest OK"), "\(demo.stdout)")
        #expect(demo.stdout.contains("recovered by itself"), "\(demo.stdout)")
        expectVerifiedEnlightenedRow(demo.stdout)
    }

    /// The destination's second address given at migrate time (--also-to): the first path goes down for good mid
    /// push and the daemons move to the second by themselves; every page matches and the guest's verdict is OK.
    /// With a daemon SIGKILLed right after the cut (a double failure), its successor finds the second path: the
    /// source's from its record, the destination's because it listens on both.
    @Test(arguments: ["", "source", "destination"])
    func theFirstPathDiesAndTheMigrationMovesToTheDestinationsOtherAddressByItself(kill: String) throws {
        let demo = try runDemo("demo-reroute-auto\(kill)", kill.isEmpty ? ["REROUTE": "auto"]
                                                                          : ["REROUTE": "auto", "KILL_DAEMON": kill])
        #expect(demo.stdout.contains("trying the destination's other address"), "\(demo.stdout)")
        #expect(demo.stdout.contains("recovered by itself"), "\(demo.stdout)")
        expectVerifiedEnlightenedRow(demo.stdout)
    }

    /// A cancel before the switch (what Ctrl-C on `epcopy migrate` sends): the VM keeps running on the source,
    /// the destination holds nothing, and the migrate command fails with a message that says so.
    @Test func aCancelBeforeTheSwitchLeavesTheVMOnTheSource() throws {
        let daemons = try TwoDaemons(name: "cancel")
        let (key, portA, portB, epcopy) = (daemons.keyA, daemons.portA, daemons.portB, TwoDaemons.epcopy)
        let guest = Prerequisite.testGuestDirectory
        let start = try Spawned("vm-start", epcopy, [
            "vm", "start", "stays", "--daemon", "127.0.0.1:\(portA)", "--key-file", key,
            "--kernel", "\(guest)/vmlinux", "--initrd", "\(guest)/initrd.img"])
        #expect(start.wait(seconds: 60) == 0, "\(start.stderr)")
        let migrate = try Spawned("migrate", epcopy, [
            "migrate", "stays", "--to", "127.0.0.1:\(portB)", "--daemon", "127.0.0.1:\(portA)", "--key-file", key])
        // The destination's QEMU takes a while to start: the cancel lands while the source side prepares.
        var answer = ""
        let cancelled = waitUntil(deadline: .seconds(20), poll: .milliseconds(20)) {
            guard let cancel = try? Spawned("cancel", epcopy, ["migrate", "stays", "--cancel",
                                                              "--daemon", "127.0.0.1:\(portA)", "--key-file", key])
            else { return false }
            let status = cancel.wait(seconds: 30)
            answer = cancel.stdout + cancel.stderr
            return status == 0 || answer.contains("has switched")
        }
        #expect(cancelled && answer.contains("keeps running on its source host"), "cancel: \(answer)")
        #expect(migrate.wait(seconds: 120) != 0, "the migration went on after the cancel")
        #expect(migrate.stderr.contains("cancelled before the switch; it keeps running here"), "\(migrate.stderr)")
        let onA = try Spawned("list-a", epcopy, ["vm", "list", "--daemon", "127.0.0.1:\(portA)", "--key-file", key])
        let onB = try Spawned("list-b", epcopy, ["vm", "list", "--daemon", "127.0.0.1:\(portB)", "--key-file", key])
        #expect(onA.wait(seconds: 30) == 0 && onB.wait(seconds: 30) == 0)
        #expect(onA.stdout.contains("stays") && onA.stdout.contains("running"), "source: \(onA.stdout)")
        #expect(!onB.stdout.contains("stays"), "the destination kept a VM: \(onB.stdout)")
        // The guest never stopped: its memory tester is still counting on the source.
        let serial = try Spawned("serial", epcopy, ["vm", "serial", "stays", "--daemon", "127.0.0.1:\(portA)",
                                                    "--key-file", key])
        #expect(serial.wait(seconds: 30) == 0)
        #expect(!serial.stdout.contains("CORRUPT"), "\(serial.stdout)")
        withExtendedLifetime(daemons) {}
    }

    @Test func aPeerThatRefusesLeavesTheSourceVMRunning() throws {
        let daemons = try TwoDaemons(name: "refuse", sameKey: false)
        let (key, otherKey, portA, portB) = (daemons.keyA, daemons.keyB, daemons.portA, daemons.portB)
        let epcopy = TwoDaemons.epcopy
        let guest = Prerequisite.testGuestDirectory
        let start = try Spawned("vm-start", epcopy, [
            "vm", "start", "refused", "--daemon", "127.0.0.1:\(portA)", "--key-file", key,
            "--kernel", "\(guest)/vmlinux", "--initrd", "\(guest)/initrd.img"])
        #expect(start.wait(seconds: 60) == 0, "\(start.stderr)")

        // A client without the right key is refused by the daemon itself.
        let intruder = try Spawned("intruder", epcopy, ["vm", "list", "--daemon", "127.0.0.1:\(portA)",
                                                        "--key-file", otherKey])
        #expect(intruder.wait(seconds: 30) != 0)
        #expect(intruder.stderr.contains("key does not match") || intruder.stderr.contains("refused"),
                "\(intruder.stderr)")

        let migrate = try Spawned("migrate", epcopy, [
            "migrate", "refused", "--to", "127.0.0.1:\(portB)", "--mode", "enlightened",
            "--daemon", "127.0.0.1:\(portA)", "--key-file", key])
        #expect(migrate.wait(seconds: 120) != 0, "migration to a refusing peer succeeded")
        #expect(migrate.stderr.contains("key does not match"), "\(migrate.stderr)")

        let list = try Spawned("vm-list", epcopy, ["vm", "list", "--daemon", "127.0.0.1:\(portA)", "--key-file", key])
        #expect(list.wait(seconds: 30) == 0)
        #expect(list.stdout.contains("refused") && list.stdout.contains("running"), "\(list.stdout)")
        withExtendedLifetime(daemons) {}
    }
}

/// Two `epcopy serve` daemons on loopback, each with a key file (the same key, or two different ones), started
/// and waited for; stopped (SIGTERM, then waited for) and their key files removed when this goes away.
final class TwoDaemons {
    static let epcopy = productsDirectory.appendingPathComponent("epcopy").path
    let keyA: String
    let keyB: String
    let portA = freePort()
    let portB = freePort()
    private let a: Spawned
    private let b: Spawned

    init(name: String, sameKey: Bool = true) throws {
        keyA = "/tmp/epcopy-test-\(name)-a-\(getpid())"
        keyB = sameKey ? keyA : "/tmp/epcopy-test-\(name)-b-\(getpid())"
        try Data("0123456789abcdef0123456789abcdef".utf8).write(to: URL(fileURLWithPath: keyA))
        if !sameKey { try Data("fedcba9876543210fedcba9876543210".utf8).write(to: URL(fileURLWithPath: keyB)) }
        a = try Spawned("serve-a", Self.epcopy, ["serve", "--listen", "127.0.0.1:\(portA)", "--key-file", keyA,
                                                 "--vm-deadline", "300"])
        b = try Spawned("serve-b", Self.epcopy, ["serve", "--listen", "127.0.0.1:\(portB)", "--key-file", keyB,
                                                 "--vm-deadline", "300"])
        try #require(waitUntil(deadline: .seconds(30)) {
            a.stderr.contains("listening on") && b.stderr.contains("listening on")
        }, "the daemons did not start: \(a.stderr) \(b.stderr)")
    }

    deinit {
        a.kill(SIGTERM)
        b.kill(SIGTERM)
        a.wait(seconds: 10)
        b.wait(seconds: 10)
        unlink(keyA)
        unlink(keyB)
    }
}

func shOutput(_ command: String) -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sh")
    p.arguments = ["-c", command]
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = FileHandle.nullDevice
    try? p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return String(decoding: data, as: UTF8.self)
}
