// The source half of a migration: moves a running VM to a destination that DestinationSide prepared,
// and returns when this host holds none of it. The steps run in this order, each depending on the last
// (see Migration.swift for the whole sequence across both sides):
//   prepare  — capabilities; in enlightened mode the push order (device pages, the agent's classes) and
//              an engine connected and authenticated while the VM still runs, gated on STOP;
//   switch   — QMP migrate (+ migrate-start-postcopy), wait for STOP, fence: from STOP the RAM file is
//              final and the source QEMU never runs again, so the gate opens and the push starts;
//   drain    — QEMU's device stream completes, the bulk push is released, the engine finishes;
//   release  — the fenced QEMU is killed and its file removed: T_release, and the outcome.
// Before STOP nothing has moved, so a failure there leaves the source running, untouched.
// A QEMU that libvirt owns (`source.managed`) is moved the same way, except that libvirt's migration call
// (a ManagedStream) starts QEMU's stream instead of QMP migrate, says at the drain that the destination runs
// the guest, and stops the fenced QEMU itself; nothing is punched before that word, since libvirt resumes a
// source whose destination failed.

import CEpcopyLinux
import EpcopyProtocol
import Foundation
import Synchronization

public final class SourceSide {
    private let source: QEMUProcess
    private let mode: MigrationMode
    private let session: UInt64
    private let options: MigrationOptions
    private let regionPages: UInt64
    /// Who starts QEMU's stream when QEMU is not epcopy's (nil: QMP migrate).
    private let stream: ManagedStream?
    /// Set by prepare.
    private var counterBefore: Int?
    private var agent = HotReportAtSwitch()
    private var push: PushThread?
    /// Set by switch: the moment migrate was sent (T_release counts from here).
    private var switchStart: UInt64 = 0

    /// What drain hands to release.
    private struct Drained {
        var bytesWire: UInt64 = 0
        var sourceDigests: [UInt32]?
        var report: SourceReport?
        /// When the engine finished (it has released every page).
        var pushEnded: UInt64 = 0
    }

    private init(source: QEMUProcess, mode: MigrationMode, session: UInt64, options: MigrationOptions,
                 stream: ManagedStream?) {
        self.source = source
        self.stream = stream
        self.mode = mode
        self.session = session
        self.options = options
        regionPages = source.config.regionPages
    }

    /// Moves `source` to a destination prepared by DestinationSide. Returns when the source host holds
    /// none of the VM: the engine has released every page, the fenced QEMU is gone, its file removed.
    /// `progress` is called about every 250 ms from another thread with what has moved and the link's state.
    /// `stream` starts QEMU's stream of a managed QEMU (`destinationURI` is then unused).
    public static func migrate(source: QEMUProcess, mode: MigrationMode, session: UInt64, destinationURI: String,
                               engineEndpoint: Endpoint?, options: MigrationOptions, stream: ManagedStream? = nil,
                               cancel: MigrationCancel? = nil,
                               progress: (@Sendable (MigrationProgress) -> Void)? = nil,
                               fenced: ((_ stopTimestamp: Double, _ counterBefore: Int?) -> Void)? = nil,
                               engineStarted: ((SourceEngine) -> Void)? = nil) throws -> SourceOutcome {
        let side = SourceSide(source: source, mode: mode, session: session, options: options, stream: stream)
        try side.prepare(engineEndpoint: engineEndpoint)
        if let engine = side.push?.engine { engineStarted?(engine) }
        if let cancel, !cancel.beginSwitch() {
            // Nothing has moved and the VM never stopped: the engine tells the destination, and goes.
            side.push?.callOff()
            throw MigrationError.cancelled
        }
        let reporter = progress.map {
            ProgressReporter(source: source, engine: side.push?.engine, regionPages: side.regionPages, report: $0)
        }
        defer { reporter?.stop() }
        let stop = try side.switchOver(to: destinationURI)
        // From here the RAM file is the only copy of what has not moved: whoever must be able to finish the
        // migration after a crash records it now, before the push gets far.
        fenced?(stop.timestamp, side.counterBefore)
        let drained = try side.drain()
        return side.release(stop: stop, drained)
    }

    /// Prepare: everything that can happen while the VM still runs here.
    private func prepare(engineEndpoint: Endpoint?) throws {
        try QEMUMigration.setCapabilities(source.qmp, for: mode)
        counterBefore = GuestVerdict.lastCounter(source.serialLog)
        guard mode == .enlightened else { return }
        guard let engineEndpoint else { throw MigrationError.failed("enlightened mode needs the destination engine") }
        // Connect and authenticate while the VM still runs; push from STOP, device pages first, then the
        // agent's classes, believed-free pages last and only after the destination's free scan.
        var classes: [(PushClass, PageSet<PageIndex>)] = [(.device, DevicePages.query(source.qmp, regionPages: regionPages))]
        if options.useAgent {
            agent = HotReportAtSwitch.take(agentSocket: source.config.agentSocket, regionPages: regionPages,
                                           options: options)
            classes += agent.classes
        }
        var sourceOptions = options.sourceEngineOptions(session: session, vmName: source.config.name, classes: classes)
        sourceOptions.holdBulkUntilReleased = true
        sourceOptions.punchOnlyOnceAllowed = stream != nil
        sourceOptions.holdFreeUntilScan = classes.contains { $0.0 == .believedFree && !$0.1.isEmpty }
        let engine: SourceEngine
        do { engine = try SourceEngine(ramFile: source.config.ramFile, options: sourceOptions) } catch {
            throw MigrationError.step("source engine", error)
        }
        push = PushThread(engine: engine, destination: engineEndpoint)
    }

    /// Switch: QEMU stops the VM here and sends its device state; returns the STOP event.
    private func switchOver(to destinationURI: String) throws -> QMPEvent {
        switchStart = monotonicNanos()
        let stop: QMPEvent
        do {
            if let stream {
                stream.start()
            } else {
                _ = try source.qmp.execute("migrate", arguments: ["uri": .string(destinationURI)], timeout: .seconds(10))
                if mode == .postcopy { _ = try source.qmp.execute("migrate-start-postcopy", timeout: .seconds(10)) }
            }
            // QEMU's stream may fail before STOP (its connection to the destination refused, timed out or reset):
            // then STOP never comes, and the VM keeps running here.
            let event = try waitForStop()
            guard event.name == "STOP" else {
                let why = (try? source.qmp.execute("query-migrate", timeout: .seconds(5)))?["error-desc"]?.stringValue
                throw MigrationError.failed("QEMU's migration stream to the destination \(event.data["status"]?.stringValue ?? "ended") before STOP" + (why.map { ": \($0)" } ?? ""))
            }
            stop = event
        } catch {
            // Before STOP nothing has moved: the source keeps running (cancel in case QEMU started), and the
            // engine sends nothing of a VM that still runs. A manager's call cancels its own migration.
            if stream == nil { _ = try? source.qmp.execute("migrate_cancel", timeout: .seconds(5)) }
            push?.callOff()
            if let failure = stream?.failure { throw MigrationError.step("source: migrate", failure) }
            throw MigrationError.step("source: migrate", error)
        }
        fence()
        return stop
    }

    /// STOP, or the MIGRATION event that says QEMU's stream failed first; with a managed stream, also the
    /// manager's call failing before either.
    private func waitForStop() throws -> QMPEvent {
        let isEnd: (QMPEvent) -> Bool = {
            $0.name == "STOP" || ["failed", "cancelled"].contains($0.data["status"]?.stringValue ?? "")
        }
        guard let stream else {
            return try source.qmp.waitForEvent(among: ["STOP", "MIGRATION"], timeout: .seconds(600), after: switchStart,
                                               where: isEnd)
        }
        let deadline = switchStart + 600_000_000_000
        while true {
            let step = monotonicNanos() < deadline ? Duration.milliseconds(200) : .zero
            do {
                return try source.qmp.waitForEvent(among: ["STOP", "MIGRATION"], timeout: step, after: switchStart,
                                                   where: isEnd)
            } catch {
                guard case .timedOut = error, step > .zero else { throw error }
            }
            if let failure = stream.failure { throw failure }
        }
    }

    /// From STOP the source QEMU never runs again (it is never cont'ed): its RAM file is final, so the file
    /// outlives QEMU's teardown until release, and the push may start.
    private func fence() {
        guard mode == .enlightened else { return }
        source.keepRAMFile = true
        push?.openGate()
    }

    /// Drain: waits for QEMU's stream and, in enlightened mode, for the engine to have moved every page.
    private func drain() throws -> Drained {
        var drained = Drained()
        guard let push else {
            do {
                let end = try source.qmp.waitForEvent("MIGRATION", timeout: .seconds(1800), after: switchStart) {
                    let status = $0.data["status"]?.stringValue
                    return status == "completed" || status == "failed"
                }
                if end.data["status"]?.stringValue == "failed" { throw MigrationError.failed("QEMU reported failed") }
            } catch { throw MigrationError.step("source: waiting for the migration", error) }
            drained.bytesWire = QEMUMigration.streamBytes(source.qmp)
            return drained
        }
        // The destination resumes; the engine releases the bulk push then. Wait for QEMU's stream.
        _ = try? source.qmp.waitForEvent("MIGRATION", timeout: .seconds(60), after: switchStart) {
            $0.data["status"]?.stringValue == "completed"
        }
        push.engine.releaseBulk()
        if let stream {
            // The manager's call returns once its destination runs the guest (and it has stopped the fenced QEMU
            // here); until then the RAM file stays whole, since a failure there resumes the QEMU here.
            do { try stream.wait() } catch {
                throw MigrationError.step("source: libvirt's migration ended after STOP without the destination running the guest (nothing here was punched)", error)
            }
            push.engine.allowPunching()
        }
        let report: SourceReport
        do { (report, drained.pushEnded) = try push.finish() } catch {
            throw MigrationError.step("RAM transfer (source)", error)
        }
        if options.verify { drained.sourceDigests = try? PageDigests.ofFile(source.config.ramFile) }
        drained.bytesWire = report.bytesWire + QEMUMigration.streamBytes(source.qmp)
        drained.report = report
        return drained
    }

    /// Release: the fenced QEMU and its RAM file go; this host holds none of the VM.
    private func release(stop: QMPEvent, _ drained: Drained) -> SourceOutcome {
        source.kill()
        if !source.managed { source.waitForExit(timeout: .seconds(10)) }
        source.keepRAMFile = false
        source.teardown()
        // With `verify` the engine punches nothing (the digests need the whole file) and reading the file for them
        // is the test's cost, not the migration's: T_release is when the engine ended.
        let released = options.verify && mode == .enlightened ? drained.pushEnded : monotonicNanos()
        var outcome = SourceOutcome(stopTimestamp: stop.timestamp, tReleaseMillis: Double(released - switchStart) / 1e6,
                                    bytesWire: drained.bytesWire, counterBefore: counterBefore,
                                    sourceDigests: drained.sourceDigests)
        if mode == .enlightened {
            outcome.hotReport = agent.answered
            outcome.agentReportMillis = agent.millis
            outcome.agentReportAgeMillis = agent.ageMillis
            outcome.agentNotes = agent.notes
            outcome.pagesByClass = drained.report?.pagesByClass
            outcome.pagesSkippedFree = drained.report?.pagesFree
            outcome.freeHoldMillis = drained.report?.freeHoldMillis
            outcome.linkLosses = drained.report?.reconnects
            outcome.pausedMillis = drained.report?.pausedMillis
        }
        return outcome
    }
}

/// The source engine on its own thread: connected and authenticated during prepare, pushing from the moment the
/// gate opens (STOP), its report and end time kept for drain and release.
private final class PushThread: Sendable {
    let engine: SourceEngine
    private let gate: DispatchSemaphore
    private let calledOff = CalledOff()
    private let ended: ResultSlot<(SourceReport, UInt64), PeerError>
    private let thread: JoinableThread

    init(engine: SourceEngine, destination: Endpoint) {
        let (gate, ended) = (DispatchSemaphore(value: 0), ResultSlot<(SourceReport, UInt64), PeerError>())
        self.engine = engine
        self.gate = gate
        self.ended = ended
        let calledOff = self.calledOff
        thread = JoinableThread(name: "epcopy-src") {
            let result = Result<SourceReport, PeerError> { () throws(PeerError) in
                try engine.run(destination: destination, gate: {
                    gate.wait()
                    return !calledOff.flag.load(ordering: .acquiring)
                })
            }
            let at = monotonicNanos()
            ended.set(result.map { ($0, at) })
        }
    }

    /// Lets the engine start pushing. Call once (or `callOff`).
    func openGate() { gate.signal() }

    /// The migration is off before the switch: the engine sends nothing, tells the destination, and ends.
    func callOff() {
        calledOff.flag.store(true, ordering: .releasing)
        gate.signal()
        thread.join()
    }

    /// Waits for the engine to end, whatever its result.
    func join() { thread.join() }

    /// Waits for the engine; its report and when it ended.
    func finish() throws(PeerError) -> (SourceReport, UInt64) {
        thread.join()
        return try ended.get()
    }
}

/// Set when a migration is called off before its switch; read by the engine's gate.
private final class CalledOff: Sendable {
    let flag = Atomic<Bool>(false)
}

/// Calls `report` with what has moved about every 250 ms on its own thread until stopped: the engine's count
/// and link state in enlightened mode, QEMU's own count otherwise.
private final class ProgressReporter: @unchecked Sendable {
    // SAFETY (@unchecked): `thread` is set once in init and joined once, by the owner, in `stop`.
    private let finished = Atomic<Bool>(false)
    private var thread: JoinableThread?

    init(source: QEMUProcess, engine: SourceEngine?, regionPages: UInt64,
         report: @escaping @Sendable (MigrationProgress) -> Void) {
        thread = JoinableThread(name: "epcopy-progress") { [self] in
            while !finished.load(ordering: .acquiring) {
                if let engine {
                    report(MigrationProgress(bytesMoved: engine.pagesSent << PageGeometry.shift,
                                             bytesTotal: regionPages << PageGeometry.shift,
                                             linkDownMillis: engine.link.downFor.map { HypervisorTime.seconds($0) * 1000 },
                                             linkLosses: engine.link.losses))
                } else if let info = try? source.qmp.execute("query-migrate", timeout: .seconds(2)),
                          let total = info["ram"]?["total"]?.intValue {
                    report(MigrationProgress(bytesMoved: UInt64(info["ram"]?["transferred"]?.intValue ?? 0),
                                             bytesTotal: UInt64(total)))
                }
                usleep(250_000)
            }
        }
    }

    func stop() {
        finished.store(true, ordering: .releasing)
        thread?.join()
    }
}
