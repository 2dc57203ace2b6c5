// The daemons as an operator runs them: `make demo`'s script (two network namespaces, one daemon
// each, one migration per mode of the 512 MiB test guest), and a peer that refuses (wrong key): the
// migration must fail before the switch and leave the source VM running, untouched.

import EpcopyTestSupport
import Foundation
import Testing

@Suite(.serialized, .tier(.qemu), .requires(.testGuest), .requires(.namespaces)) struct DaemonTests {
    static let repository = Prerequisite.repository

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

    @Test func aPeerThatRefusesLeavesTheSourceVMRunning() throws {
        let key = "/tmp/epcopy-test-key-\(getpid())"
        let otherKey = "/tmp/epcopy-test-otherkey-\(getpid())"
        defer { unlink(key); unlink(otherKey) }
        try Data("0123456789abcdef0123456789abcdef".utf8).write(to: URL(fileURLWithPath: key))
        try Data("fedcba9876543210fedcba9876543210".utf8).write(to: URL(fileURLWithPath: otherKey))
        let epcopy = productsDirectory.appendingPathComponent("epcopy").path
        let (portA, portB) = (freePort(), freePort())
        let a = try Spawned("serve-a", epcopy, ["serve", "--listen", "127.0.0.1:\(portA)", "--key-file", key,
                                                "--vm-deadline", "300"])
        let b = try Spawned("serve-b", epcopy, ["serve", "--listen", "127.0.0.1:\(portB)", "--key-file", otherKey,
                                                "--vm-deadline", "300"])
        defer {
            a.kill(SIGTERM)
            b.kill(SIGTERM)
            a.wait(seconds: 10)
            b.wait(seconds: 10)
        }
        #expect(waitUntil(deadline: .seconds(30)) {
            a.stderr.contains("listening on") && b.stderr.contains("listening on")
        }, "the daemons did not start: \(a.stderr) \(b.stderr)")
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
