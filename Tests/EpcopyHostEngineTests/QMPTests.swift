// QMPClient against a real QEMU paused with -S (SeaBIOS, no guest kernel): status queries, the
// RESUME/STOP events epcopy measures downtime with, error replies, and that every wait is bounded.
// QMPValue's JSON handling is checked without QEMU.

@testable import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Glibc
import Testing

@Suite(.serialized, .tier(.qemu)) struct QMPTests {
    @Test func valuesRoundTripThroughJSON() throws {
        let text = #"{"a":null,"b":true,"c":-42,"d":1.5,"e":"x/y","f":[1,"two",{"g":false}],"h":{}}"#
        let value = try QMPValue.parse(text)
        #expect(value["a"]?.isNull == true)
        #expect(value["b"]?.boolValue == true)
        #expect(value["c"]?.intValue == -42)
        #expect(value["c"]?.doubleValue == -42)
        #expect(value["d"]?.doubleValue == 1.5)
        #expect(value["d"]?.intValue == nil)
        #expect(value["e"]?.stringValue == "x/y")
        #expect(value["f"]?[1] == "two")
        #expect(value["f"]?[2]?["g"] == false)
        #expect(value["f"]?[3] == nil)
        #expect(value["h"]?.objectValue?.isEmpty == true)
        #expect(value.jsonText == text)
        #expect(try QMPValue.parse(value.jsonText) == value)
        let built: QMPValue = ["execute": "migrate", "arguments": ["uri": "unix:/tmp/m"], "id": 7]
        #expect(built.jsonText == #"{"arguments":{"uri":"unix:/tmp/m"},"execute":"migrate","id":7}"#)
    }

    @Test func connectGivesUpWhenNoMonitorAppears() {
        let path = "/tmp/epcopy-test-no-monitor-\(getpid())"
        let started = monotonicNanos()
        #expect {
            _ = try QMPClient.connect(path: path, timeout: .milliseconds(200))
        } throws: { error in
            guard case QMPError.connectFailed(path, let reason)? = error as? QMPError else { return false }
            return reason.contains("ENOENT")
        }
        #expect(monotonicNanos() - started < 2_000_000_000)
    }

    @Test(.requires(.qemu))
    func pausedVMReportsStatusAndRunStateEvents() throws {
        let config = QEMUTestSupport.config("qmp-events", extraArgs: ["-S"])
        let qemu = try QEMUTestSupport.launch(config)
        defer { qemu.teardown() }
        #expect(qemu.qmp.greeting["version"]?["qemu"]?["major"]?.intValue ?? 0 >= 7)

        let status = try qemu.qmp.execute("query-status", timeout: .seconds(5))
        #expect(status["status"] == "prelaunch")
        #expect(status["running"] == false)

        let beforeCont = monotonicNanos()
        _ = try qemu.qmp.execute("cont", timeout: .seconds(5))
        let resume = try qemu.qmp.waitForEvent("RESUME", timeout: .seconds(5), after: beforeCont)
        #expect(resume.receivedNanos > beforeCont)
        #expect(resume.seconds > 1_600_000_000)
        #expect((0..<1_000_000).contains(resume.microseconds))
        #expect(abs(resume.timestamp - Date().timeIntervalSince1970) < 60)
        #expect(try qemu.qmp.execute("query-status", timeout: .seconds(5))["status"] == "running")

        let beforeStop = monotonicNanos()
        _ = try qemu.qmp.execute("stop", timeout: .seconds(5))
        let stop = try qemu.qmp.waitForEvent("STOP", timeout: .seconds(5), after: beforeStop)
        #expect(stop.receivedNanos > resume.receivedNanos)
        #expect(stop.timestamp >= resume.timestamp)
        let paused = try qemu.qmp.execute("query-status", timeout: .seconds(5))
        #expect(paused["status"] == "paused")
        #expect(paused["running"] == false)

        #expect(qemu.qmp.events(named: "RESUME") == [resume])
        #expect(qemu.qmp.events(named: "STOP") == [stop])
        // Without `after`, stored events count: the RESUME is found again at once.
        #expect(try qemu.qmp.waitForEvent("RESUME", timeout: .milliseconds(1)) == resume)
    }

    @Test(.requires(.qemu))
    func unknownCommandFailsNamingIt() throws {
        let qemu = try QEMUTestSupport.launch(QEMUTestSupport.config("qmp-unknown", extraArgs: ["-S"]))
        defer { qemu.teardown() }
        do throws(QMPError) {
            _ = try qemu.qmp.execute("epcopy-no-such-command", arguments: ["x": 1], timeout: .seconds(5))
            Issue.record("QEMU accepted an unknown command")
        } catch {
            guard case .commandFailed(let command, let errorClass, let text) = error else {
                Issue.record("expected commandFailed, got \(error)")
                return
            }
            #expect(command == "epcopy-no-such-command")
            #expect(errorClass == "CommandNotFound")
            #expect(text.contains("epcopy-no-such-command"))
            #expect(error.description.hasPrefix("QMP epcopy-no-such-command: CommandNotFound: "))
        }
        // A failed command leaves the connection usable; a bad argument is a GenericError.
        #expect(throws: QMPError.self) {
            try qemu.qmp.execute("migrate-incoming", arguments: ["uri": "bogus:x"], timeout: .seconds(5))
        }
        #expect(try qemu.qmp.execute("query-status", timeout: .seconds(5))["status"] == "prelaunch")
    }

    @Test(.requires(.qemu))
    func everyWaitIsBounded() throws {
        let config = QEMUTestSupport.config("qmp-bounded", extraArgs: ["-S"])
        let qemu = try QEMUTestSupport.launch(config)
        defer { qemu.teardown() }

        var started = monotonicNanos()
        #expect(throws: QMPError.timedOut(step: "waiting for event EPCOPY_NEVER", seconds: 0.2)) {
            try qemu.qmp.waitForEvent("EPCOPY_NEVER", timeout: .milliseconds(200))
        }
        let waited = monotonicNanos() - started
        #expect(waited >= 200_000_000 && waited < 1_000_000_000)

        // QEMU dying wakes a waiter at once with .disconnected, long before its timeout.
        started = monotonicNanos()
        let killer = JoinableThread(name: "test-killer") { [pid = qemu.pid] in
            // Not a wait for an event: this only tends to place the kill after the wait below has begun.
            // Killed earlier, the wait sees .disconnected at once and the test checks the same thing.
            usleep(100_000)
            Glibc.kill(pid, SIGKILL)
        }
        defer { killer.join() }
        #expect {
            try qemu.qmp.waitForEvent("EPCOPY_NEVER", timeout: .seconds(20))
        } throws: { error in
            guard case QMPError.disconnected? = error as? QMPError else { return false }
            return true
        }
        #expect(monotonicNanos() - started < 5_000_000_000)
        #expect(qemu.waitForExit(timeout: .seconds(5)) == .signaled(SIGKILL))
        #expect(qemu.qmp.closedReason != nil)
    }
}
