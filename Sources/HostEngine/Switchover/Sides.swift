// The two halves of a migration, so that they can run on different hosts (one `epcopy serve` each).
// DestinationSide prepares a host to receive a VM and reports how the guest resumed; SourceSide moves
// a running VM away. Migration.local wires them together on one host; the daemon wires them over
// its control connection. See Migration.swift for the order of the steps and why.

import CEpcopyLinux
import EpcopyProtocol
import Foundation
import Synchronization

/// What a destination needs to recreate the VM: the same machine, memory and boot image.
public struct VMSpec: Codable, Sendable, Equatable {
    public var name: String
    public var memoryMiB: Int
    /// See QEMUConfig.ramPadKiB; the destination must have exactly the source's RAM size.
    public var ramPadKiB: Int?
    /// The VM's qcow2 disk on shared storage, if any (same path on both hosts).
    public var disk: String?
    /// Guest TCP ports forwarded from the address of the host the VM runs on.
    public var forwards: [UInt16]?
    public var vcpus: Int
    public var kernel: String?
    public var initrd: String?
    public var append: String?
    public var accel: String

    public init(name: String, memoryMiB: Int, vcpus: Int = 1, kernel: String?, initrd: String?, append: String?,
                accel: String = QEMUConfig.defaultAccel()) {
        self.name = name
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.accel = accel
    }

    public init(_ config: QEMUConfig) {
        self.init(name: config.name, memoryMiB: config.memoryMiB, vcpus: config.vcpus, kernel: config.kernel,
                  initrd: config.initrd, append: config.append, accel: config.accel)
        ramPadKiB = config.ramPadKiB
        disk = config.disk
        forwards = config.forwards.isEmpty ? nil : config.forwards
    }

    /// A QEMU configuration for this VM on this host under the name `name`.
    public func config(name: String, deadlineSeconds: Double = 3600) -> QEMUConfig {
        var config = QEMUConfig(name: name, memoryMiB: memoryMiB, vcpus: vcpus, accel: accel,
                                deadlineSeconds: deadlineSeconds)
        config.kernel = kernel
        config.initrd = initrd
        config.append = append
        if let ramPadKiB { config.ramPadKiB = ramPadKiB }
        config.disk = disk
        config.forwards = forwards ?? []
        return config
    }
}

/// What the destination saw.
public struct DestinationOutcome: Sendable {
    /// QMP timestamp of RESUME (seconds, the destination host's clock).
    public var resumeTimestamp: Double
    public var faultsBeforeResume: UInt64
    public var report: DestinationReport?
    /// The destination agent's post-resume free scan (enlightened mode).
    public var freeScan: FreeScanOutcome?
}

/// What the destination's agent said after RESUME.
public struct FreeScanOutcome: Sendable {
    public var answered: Bool
    /// From sending vmResumed to having the report (host clock).
    public var millis: Double
    /// The agent's own scan time.
    public var scanMillis: Double
    /// RAM-file pages the guest reported free (only these may differ from the source: they are free).
    public var free: PageSet<PageIndex>
    public var notes: [String]
}

/// What the source saw.
public struct SourceOutcome: Sendable, Codable {
    public var stopTimestamp: Double
    public var tReleaseMillis: Double
    public var bytesWire: UInt64
    public var counterBefore: Int?
    /// Page digests of the source RAM file at STOP (`verify`, enlightened mode).
    public var sourceDigests: [UInt32]?
    /// The source agent's hot report arrived (enlightened mode).
    public var hotReport: Bool? = nil
    /// From asking the source agent to having its hot report (what the switch waited for it).
    public var agentReportMillis: Double? = nil
    /// Age of a kept hot report at the switch (nil: the report was asked for at the switch).
    public var agentReportAgeMillis: Double? = nil
    public var agentNotes: [String]? = nil
    public var pagesByClass: [String: UInt64]? = nil
    /// Pages the destination's free scan removed from the push.
    public var pagesSkippedFree: UInt64? = nil
    /// Time the push waited for the destination's free scan.
    public var freeHoldMillis: Double? = nil
}

public final class DestinationSide: @unchecked Sendable {
    // SAFETY (@unchecked): built on one thread, then `finish` runs once; the engine thread owns its state.
    public let qemu: QEMUProcess
    public let engine: DestinationEngine?
    public let engineEndpoint: Endpoint?
    public let migrationURI: String
    public let mode: MigrationMode
    private let engineThread: JoinableThread?
    private let engineResult = ResultSlot<DestinationReport, PeerError>()
    private let start = monotonicNanos()
    /// RESUME and the fault count at that moment, recorded by a watcher thread as it happens.
    private let resumed = ResultSlot<(Double, UInt64), MigrationError>()
    private let freeScan = ResultSlot<FreeScanOutcome, MigrationError>()
    private var resumeWatcher: JoinableThread?

    /// Starts the destination QEMU (with the shim in enlightened mode), the engine, and migrate-incoming
    /// on `bindHost` (the address the source reaches this host at).
    public init(spec: VMSpec, name: String, mode: MigrationMode, session: UInt64, bindHost: String,
                options: MigrationOptions) throws {
        self.mode = mode
        var config = spec.config(name: name)
        config.forwardHost = bindHost
        let regionPages = config.regionPages
        config.incoming = true
        unlink(config.ramFile)
        let migrationPort = Self.freePort(host: bindHost)
        migrationURI = "tcp:\(bindHost):\(migrationPort)"
        var acceptThread: JoinableThread?
        let accepted = Mutex<Result<DestinationEngine, any Error>?>(nil)
        if mode == .enlightened {
            // The shim hands the RAM mapping over while QEMU starts; accept before QEMU serves QMP.
            let handoverPath = "/tmp/epcopy-\(name).handover"
            config.environment = ["LD_PRELOAD": options.preloadLibrary, "EPCOPY_SHIM_SOCKET": handoverPath,
                                  "EPCOPY_SHIM_PREFIX": config.ramFile]
            let listener: UffdHandoverListener
            do { listener = try UffdHandoverListener(path: handoverPath) } catch {
                throw MigrationError.step("destination: hand-over socket", error)
            }
            let (link, verify, key) = (options.link, options.verify, options.authKey)
            acceptThread = JoinableThread(name: "epcopy-handover") {
                let result = Result<DestinationEngine, any Error> {
                    let handover = try listener.accept(timeout: .seconds(60))
                    let memory = try DestinationMemory(handover: handover)
                    return DestinationEngine(memory: memory, options: DestinationOptions(
                        sessionID: session, link: link, recordDigests: verify, authKey: key))
                }
                accepted.withLock { $0 = result }
            }
        }
        do { qemu = try QEMUProcess.launch(config, connectTimeout: .seconds(60)) } catch {
            acceptThread?.join()
            throw MigrationError.step("destination: start QEMU", error)
        }
        if let acceptThread {
            acceptThread.join()
            let engine: DestinationEngine
            do { engine = try accepted.withLock { $0! }.get() } catch {
                qemu.teardown()
                throw MigrationError.step("destination: guest memory hand-over", error)
            }
            let listener: Listener
            do { listener = try TCP.listen(on: Endpoint(host: bindHost, port: 0)) } catch {
                qemu.teardown()
                throw MigrationError.step("destination: listen on \(bindHost)", error)
            }
            engineEndpoint = listener.endpoint
            let box = ListenerHolder(listener)
            let slot = engineResult
            engineThread = JoinableThread(name: "epcopy-dst") {
                let r = Result<DestinationReport, PeerError> { () throws(PeerError) in try engine.run(listener: box.listener) }
                slot.set(r)
            }
            self.engine = engine
        } else {
            engine = nil
            engineEndpoint = nil
            engineThread = nil
        }
        let capabilities = Migration.capabilities(for: mode)
        do {
            try Migration.setCapabilities(qemu.qmp, capabilities)
            _ = try qemu.qmp.execute("migrate-incoming", arguments: ["uri": .string(migrationURI)], timeout: .seconds(10))
        } catch {
            abandon()
            throw MigrationError.step("destination: migrate-incoming", error)
        }
        let (qmp, slot, since, engine, scanSlot) = (qemu.qmp, resumed, start, self.engine, freeScan)
        let (agentSocket, useAgent) = (qemu.config.agentSocket, mode == .enlightened && options.useAgent)
        // The switch does not wait for the free scan (the guest already runs here), so it may take longer than a
        // hot report: a large guest's first scan right after RESUME runs with a cold translation cache under TCG.
        let agentTimeout = max(options.agentTimeoutMillis, options.freeScanTimeoutMillis)
        resumeWatcher = JoinableThread(name: "epcopy-resume") {
            do {
                let event = try qmp.waitForEvent("RESUME", timeout: .seconds(600), after: since)
                slot.set(.success((event.timestamp, engine?.metrics.faults.load(ordering: .relaxed) ?? 0)))
            } catch {
                slot.set(.failure(.step("destination: waiting for RESUME", error)))
                engine?.finishFreeScan(agentAnswered: false, pagesReported: 0)
                return
            }
            guard let engine else { return }
            // The agent port is opened only now: the guest runs here, and whatever answers on the port is the
            // guest's (a connection made earlier would only sit idle).
            var link: AgentLink?
            var note: String?
            if useAgent {
                do { link = try AgentLink(socketPath: agentSocket, layout: GuestRAMLayout(regionPages: regionPages)) }
                catch { note = "destination: \(error)" }
            }
            scanSlot.set(.success(Self.freeScan(link: link, linkNote: note, engine: engine, session: session,
                                                timeoutMillis: agentTimeout)))
        }
    }

    /// After RESUME: the agent scans for free pages at once; each one not yet here is never fetched. Whatever
    /// happens, the source hears that the scan is over, so it stops holding the believed-free pages back.
    static func freeScan(link: AgentLink?, linkNote: String?, engine: DestinationEngine, session: UInt64,
                         timeoutMillis: UInt64) -> FreeScanOutcome {
        var outcome = FreeScanOutcome(answered: false, millis: 0, scanMillis: 0, free: PageSet(),
                                      notes: linkNote.map { [$0] } ?? [])
        guard let link else {
            engine.finishFreeScan(agentAnswered: false, pagesReported: 0)
            return outcome
        }
        let start = monotonicNanos()
        do {
            let (report, pages) = try link.freeAfterResume(sequence: session, timeoutMillis: timeoutMillis)
            engine.markFree(pages)
            engine.finishFreeScan(agentAnswered: true, pagesReported: pages.count)
            outcome.answered = true
            outcome.scanMillis = Double(report.scanMicros) / 1000
            outcome.free = pages
        } catch {
            engine.finishFreeScan(agentAnswered: false, pagesReported: 0)
            outcome.notes.append("destination: \(error)")
        }
        outcome.millis = Double(monotonicNanos() - start) / 1e6
        outcome.notes += link.complaints.map { "destination agent: \($0)" }
        return outcome
    }

    /// Waits for RESUME and, in enlightened mode, for every page to arrive.
    public func finish(timeout: Duration = .seconds(600)) throws -> DestinationOutcome {
        resumeWatcher?.join()
        let resumeTimestamp: Double
        let faultsAtWatcher: UInt64
        do { (resumeTimestamp, faultsAtWatcher) = try resumed.get() } catch {
            abandon()
            throw error
        }
        var report: DestinationReport?
        if let engineThread {
            engineThread.join()
            do { report = try engineResult.get() } catch {
                throw MigrationError.step("RAM transfer (destination)", error)
            }
        }
        // The watcher read the fault counter a moment after RESUME, while the guest already ran and faulted:
        // count by time instead, against QEMU's own RESUME timestamp (same host clock).
        let faultsBeforeResume = engine.map { $0.metrics.faults(before: resumeTimestamp) } ?? faultsAtWatcher
        var scan: FreeScanOutcome?
        if mode == .enlightened, engine != nil { scan = try? freeScan.get() }
        return DestinationOutcome(resumeTimestamp: resumeTimestamp, faultsBeforeResume: faultsBeforeResume,
                                  report: report, freeScan: scan)
    }

    /// Tears the destination down after a failure before the switch: nothing ran here yet.
    public func abandon() {
        qemu.kill()
        qemu.teardown()
    }

    static func freePort(host: String) -> UInt16 {
        guard let listener = try? TCP.listen(on: Endpoint(host: host, port: 0)) else { return 0 }
        return listener.endpoint.port
    }
}

public enum SourceSide {
    /// Moves `source` to a destination prepared by DestinationSide. Returns when the source host holds
    /// none of the VM: the engine has released every page, the fenced QEMU is gone, its file removed.
    /// `progress` is called about every 250 ms from another thread with (bytes moved, bytes to move).
    public static func migrate(source: QEMUProcess, mode: MigrationMode, session: UInt64, destinationURI: String,
                               engineEndpoint: Endpoint?, options: MigrationOptions,
                               progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) throws -> SourceOutcome {
        let regionPages = source.config.regionPages
        let capabilities = Migration.capabilities(for: mode)
        try Migration.setCapabilities(source.qmp, capabilities)
        let counterBefore = GuestVerdict.lastCounter(source.serialLog)

        var sourceEngine: SourceEngine?
        var sourceThread: JoinableThread?
        var agent = (hot: false, millis: nil as Double?, age: nil as Double?, notes: [String]())
        var engineReport: SourceReport?
        let sourceResult = Mutex<Result<SourceReport, PeerError>?>(nil)
        let sourceDone = Atomic<UInt64>(0)
        let stopped = DispatchSemaphore(value: 0)
        if mode == .enlightened {
            guard let engineEndpoint else { throw MigrationError.failed("enlightened mode needs the destination engine") }
            // Connect and authenticate while the VM still runs; push from STOP, device pages first, then the
            // agent's classes, believed-free pages last and only after the destination's free scan.
            let device = Migration.devicePages(source.qmp, regionPages: regionPages)
            var classes: [(PushClass, PageSet<PageIndex>)] = [(.device, device)]
            if options.useAgent {
                let hot = Self.hotReport(source: source, regionPages: regionPages, options: options)
                agent = hot.outcome
                classes += hot.classes
            }
            var sourceOptions = SourceOptions(
                sessionID: session, vmName: source.config.name, link: options.link, classes: classes,
                releaseMemory: !options.verify, authKey: options.authKey)
            sourceOptions.holdBulkUntilReleased = true
            sourceOptions.holdFreeUntilScan = classes.contains { $0.0 == .believedFree && !$0.1.isEmpty }
            // The destination always says when its scan is over (answered or not, at most freeScanTimeout after
            // RESUME); the source's own deadline is only for a destination that never says anything. A RESUME
            // that takes seconds (a starved destination) must not run it out.
            sourceOptions.freeHoldMillis = options.freeScanTimeoutMillis + 5000
            let engine: SourceEngine
            do { engine = try SourceEngine(ramFile: source.config.ramFile, options: sourceOptions) } catch {
                throw MigrationError.step("source engine", error)
            }
            sourceEngine = engine
            sourceThread = JoinableThread(name: "epcopy-src") {
                let r = Result<SourceReport, PeerError> { () throws(PeerError) in
                    try engine.run(destination: engineEndpoint, gate: { stopped.wait() })
                }
                sourceDone.store(monotonicNanos(), ordering: .releasing)
                sourceResult.withLock { $0 = r }
            }
        }

        let finished = Atomic<Bool>(false)
        let reporter = progress.map { report in
            JoinableThread(name: "epcopy-progress") { [sourceEngine] in
                while !finished.load(ordering: .acquiring) {
                    if let engine = sourceEngine {
                        report(engine.pagesSent << PageGeometry.shift, regionPages << PageGeometry.shift)
                    } else if let info = try? source.qmp.execute("query-migrate", timeout: .seconds(2)),
                              let total = info["ram"]?["total"]?.intValue {
                        report(UInt64(info["ram"]?["transferred"]?.intValue ?? 0), UInt64(total))
                    }
                    usleep(250_000)
                }
            }
        }
        defer {
            finished.store(true, ordering: .releasing)
            reporter?.join()
        }
        let start = monotonicNanos()
        let stop: QMPEvent
        do {
            _ = try source.qmp.execute("migrate", arguments: ["uri": .string(destinationURI)], timeout: .seconds(10))
            if mode == .postcopy { _ = try source.qmp.execute("migrate-start-postcopy", timeout: .seconds(10)) }
            stop = try source.qmp.waitForEvent("STOP", timeout: .seconds(600), after: start)
        } catch {
            stopped.signal()
            // Before STOP nothing has moved: the source keeps running (cancel in case QEMU started).
            _ = try? source.qmp.execute("migrate_cancel", timeout: .seconds(5))
            sourceThread?.join()
            throw MigrationError.step("source: migrate", error)
        }
        if mode == .enlightened {
            // Fenced: the source QEMU never runs again; its RAM file is final.
            source.keepRAMFile = true
            stopped.signal()
        }
        var sourceDigests: [UInt32]?
        var bytes: UInt64 = 0
        if let sourceThread {
            // The destination resumes; the engine releases the bulk push then. Wait for QEMU's stream.
            _ = try? source.qmp.waitForEvent("MIGRATION", timeout: .seconds(60), after: start) {
                $0.data["status"]?.stringValue == "completed"
            }
            sourceEngine?.releaseBulk()
            sourceThread.join()
            let report: SourceReport
            do { report = try sourceResult.withLock { $0! }.get() } catch {
                throw MigrationError.step("RAM transfer (source)", error)
            }
            if options.verify { sourceDigests = try? PageDigests.ofFile(source.config.ramFile) }
            bytes = report.bytesWire + Migration.migrationBytes(source.qmp)
            engineReport = report
        } else {
            do {
                let end = try source.qmp.waitForEvent("MIGRATION", timeout: .seconds(1800), after: start) {
                    let status = $0.data["status"]?.stringValue
                    return status == "completed" || status == "failed"
                }
                if end.data["status"]?.stringValue == "failed" { throw MigrationError.failed("QEMU reported failed") }
            } catch { throw MigrationError.step("source: waiting for the migration", error) }
            bytes = Migration.migrationBytes(source.qmp)
        }
        source.kill()
        source.waitForExit(timeout: .seconds(10))
        source.keepRAMFile = false
        source.teardown()
        let released = options.verify && mode == .enlightened ? sourceDone.load(ordering: .acquiring) : monotonicNanos()
        var outcome = SourceOutcome(stopTimestamp: stop.timestamp, tReleaseMillis: Double(released - start) / 1e6,
                                    bytesWire: bytes, counterBefore: counterBefore, sourceDigests: sourceDigests)
        if mode == .enlightened {
            outcome.hotReport = agent.hot
            outcome.agentReportMillis = agent.millis
            outcome.agentReportAgeMillis = agent.age
            outcome.agentNotes = agent.notes
            outcome.pagesByClass = engineReport?.pagesByClass
            outcome.pagesSkippedFree = engineReport?.pagesFree
            outcome.freeHoldMillis = engineReport?.freeHoldMillis
        }
        return outcome
    }

    /// The source agent's hot report: the one a keeper took in the background if it is fresh enough, else asked
    /// for now. Any failure — no agent installed, a silent or lying one — only means plain external post-copy:
    /// the classes are push order, never correctness.
    static func hotReport(source: QEMUProcess, regionPages: UInt64, options: MigrationOptions)
        -> (outcome: (hot: Bool, millis: Double?, age: Double?, notes: [String]),
            classes: [(PushClass, PageSet<PageIndex>)]) {
        let start = monotonicNanos()
        var notes: [String] = []
        var pages: [(PageClass, PageSet<PageIndex>)]?
        var age: Double?
        var kept = options.keptHotReport
        if let k = kept, k.ageMillis > Double(options.hotReportMaxAgeMillis) {
            notes.append("source: the kept hot report was \(Int(k.ageMillis)) ms old (limit \(options.hotReportMaxAgeMillis)); "
                         + "asked for a new one")
            kept = nil
        }
        // With a usable kept report, a fresh one is worth only a short wait.
        let budget = kept == nil ? options.agentTimeoutMillis : min(options.freshReportBudgetMillis, options.agentTimeoutMillis)
        if budget > 0 {
            do {
                let link = try AgentLink(socketPath: source.config.agentSocket,
                                         layout: GuestRAMLayout(regionPages: regionPages))
                defer { notes += link.complaints.map { "source agent: \($0)" } }
                let deadline = monotonicNanos() + budget * 1_000_000
                _ = try link.hello(timeoutMillis: min(budget, 1500))
                let left = max(deadline &- monotonicNanos(), 1_000_000) / 1_000_000
                pages = try link.hotReport(windowMillis: options.hotWindowMillis,
                                           timeoutMillis: kept == nil ? options.agentTimeoutMillis : left).pages
            } catch {
                notes.append(kept == nil ? "source: \(error)"
                             : "source: no fresh hot report within \(budget) ms (\(error)); used the kept one")
            }
        }
        if pages == nil, let k = kept {
            pages = k.pages
            age = k.ageMillis
            notes += k.complaints.map { "source agent: \($0)" }
        }
        var classes: [(PushClass, PageSet<PageIndex>)] = []
        for (pageClass, set) in pages ?? [] {
            let pushClass: PushClass = switch pageClass {
            case .kernel: .kernel
            case .recent: .recent
            case .inUse: .inUse
            case .believedFree: .believedFree
            }
            classes.append((pushClass, set))
        }
        let hot = pages != nil
        let millis = Double(monotonicNanos() - start) / 1e6
        return ((hot, hot ? millis : nil, age, notes), classes)
    }
}

/// A result handed from a thread to whoever joins it.
final class ResultSlot<Value: Sendable, Failure: Error>: Sendable {
    private let value = Mutex<Result<Value, Failure>?>(nil)
    func set(_ result: Result<Value, Failure>) { value.withLock { $0 = result } }
    func get() throws(Failure) -> Value {
        guard let result = value.withLock({ $0 }) else { preconditionFailure("result read before it was set") }
        return try result.get()
    }
}
