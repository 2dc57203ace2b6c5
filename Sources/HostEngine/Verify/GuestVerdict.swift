// The guest's own word on a migration, read from the destination QEMU's serial console. Page digests
// check what the engine placed against the source at STOP, but they exist only in enlightened mode with
// `verify`, and they cannot see a page that was right on the wire and wrong in use. So the test guest
// runs a memory tester (`epcopy.memtest_mib`) that prints "epcopy-memtest iter=N" as it goes and
// "CORRUPT" when a checksum fails: a migration is OK only if the destination goes on counting past the
// source's last count. A guest without the tester (a workload image) still gets checked for a kernel
// crash on its console, the usual way a guest with wrong memory dies within a second.

import EpcopyProtocol
import Foundation
import Logging

/// What the destination guest said after the switch.
struct GuestVerdict: Sendable, Equatable {
    /// "OK", "CORRUPT", "CRASHED: <line>", "STALLED (QEMU <status>)", "NO OUTPUT (QEMU <status>)" or
    /// "no memory tester" (the `guest_verdict` of the result).
    var verdict: String
    /// The tester's last count on the destination, if it printed one.
    var counterAfter: Int?

    /// The memory tester's last iteration counter in a serial log.
    static func lastCounter(_ log: String) -> Int? {
        var last: Int?
        // The serial console ends lines with "\r\n", a single Character in Swift: split on isNewline.
        // Lines come through the kernel log, so they carry a "[   12.345678] " timestamp prefix.
        for line in log.split(whereSeparator: \.isNewline) {
            guard let marker = line.range(of: "epcopy-memtest iter=") else { continue }
            let value = line[marker.upperBound...].prefix { $0.isNumber }
            if let n = Int(value) { last = n }
        }
        return last
    }

    /// The first line of a guest kernel crash on the console (the destination's log holds only what the guest
    /// printed there), or nil.
    static func crash(_ log: String) -> String? {
        let markers = ["Kernel panic", "BUG: ", "Oops", "general protection fault", "kernel BUG at", "WARNING: CPU"]
        for line in log.split(whereSeparator: \.isNewline) where markers.contains(where: { line.contains($0) }) {
            return String(line.prefix(160))
        }
        return nil
    }

    /// OK when the destination's tester goes on counting past the source's last count (`before`) and never says
    /// CORRUPT; waits up to `settle` seconds (plus 20 for a slow guest) for two new lines.
    static func watch(_ destination: QEMUProcess, before: Int?, settle: Double) -> GuestVerdict {
        watch(log: { destination.serialLog }, state: { destination.runState.map { "QEMU \($0)" } }, before: before,
              settle: settle)
    }

    /// The same for a guest whose console is `log()` (e.g. a libvirt domain's serial log); `state()` names the VM's
    /// state for a verdict without progress.
    static func watch(log: () -> String, state: () -> String?, before: Int?, settle: Double) -> GuestVerdict {
        // A guest that never ran the memory tester (a workload image) has no verdict of its own; a crash
        // on its console still counts.
        if before == nil, lastCounter(log()) == nil {
            usleep(UInt32(min(max(settle, 0), 10) * 1_000_000))
            if let crash = crash(log()) { return GuestVerdict(verdict: "CRASHED: \(crash)") }
            return GuestVerdict(verdict: "no memory tester")
        }
        let deadline = Date().addingTimeInterval(max(settle, 1) + 20)
        var after: Int?
        while Date() < deadline {
            let text = log()
            if text.contains("CORRUPT") { return GuestVerdict(verdict: "CORRUPT", counterAfter: lastCounter(text)) }
            if let crash = crash(text) { return GuestVerdict(verdict: "CRASHED: \(crash)", counterAfter: lastCounter(text)) }
            after = lastCounter(text)
            if let after, let before, after >= before + 2 { return GuestVerdict(verdict: "OK", counterAfter: after) }
            if before == nil, after != nil { return GuestVerdict(verdict: "OK", counterAfter: after) }
            usleep(200_000)
        }
        let status = state() ?? "?"
        let tail = log().suffix(300).replacingOccurrences(of: "\r\n", with: " | ")
        Log.engine.trace("guest verdict: no progress; destination \(status), serial: \(tail)")
        return GuestVerdict(verdict: after == nil ? "NO OUTPUT (\(status))" : "STALLED (\(status))",
                            counterAfter: after)
    }
}
