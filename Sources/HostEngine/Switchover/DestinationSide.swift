// The destination half of a migration: prepares this host to receive a VM and reports how the guest
// resumed. The steps, each depending on the last (see Migration.swift for both sides together):
//   prepare  — (init) the engine takes the guest memory over from the shim while QEMU starts with
//              -incoming defer, listens for the source engine; capabilities and migrate-incoming;
//   switch   — a watcher waits for RESUME (downtime ends), then has the agent scan for free pages;
//   drain    — (finish) the engine has placed every page and unregistered the uffd;
//   verify   — placed pages against the source's digests at STOP, and the guest's own verdict.
// There is nothing to release here: the VM now lives on this host. Before the switch, `abandon` undoes
// prepare. A survivable side (enlightened mode in a daemon) starts a QEMU that outlives this process and
// keeps a DestinationSuccession current, so that a restarted daemon can adopt it (`init(adopting:)`): the
// QEMU by PID, the shim's uffd by pidfd_getfd, the engine's port, and the switch as far as it got.
// A managed side (`init(managed:)`, a libvirt domain) starts no QEMU: libvirt starts the incoming QEMU, whose
// shim hands its memory over to a listener made beforehand; this side attaches to it through epcopy's own
// monitor, sets x-ignore-shared there, and libvirt runs the incoming migration itself.

import CEpcopyLinux
import EpcopyProtocol
import Foundation
import Synchronization

public final class DestinationSide: @unchecked Sendable {
    // SAFETY (@unchecked): built on one thread, then `finish` runs once; the engine thread owns its state.
    public let qemu: QEMUProcess
    public let engine: DestinationEngine?
    public let engineEndpoint: Endpoint?
    public private(set) var migrationURI: String
    private let bindHost: String
    public let mode: MigrationMode
    private let engineThread: JoinableThread?
    private let engineResult = ResultSlot<DestinationReport, PeerError>()
    private let start = monotonicNanos()
    /// QMP's RESUME timestamp, recorded by the switch watcher as it happens.
    private let resumed = ResultSlot<Double, MigrationError>()
    private let freeScan = ResultSlot<FreeScanOutcome, MigrationError>()
    private var switchWatcher: JoinableThread?
    /// What a successor would need (survivable sides only), and who is told each time it changes.
    private let succession: Mutex<DestinationSuccession?>
    private let checkpoint: @Sendable (DestinationSuccession) -> Void
    /// The NUMA node the guest's RAM was bound to (nil: none asked, or the binding failed: said in the log).
    public let numa: NumaChoice?
    /// QEMU's address of the guest RAM (its numa_maps line), in enlightened mode.
    private let ramAddress: UInt64?

    /// Makes a destination survivable: its QEMU outlives this process, the digests are kept in `digestsFile`,
    /// and `checkpoint` hears the succession each time it changes (RESUME, the free scan).
    public struct Survival: Sendable {
        public var digestsFile: String?
        public var checkpoint: @Sendable (DestinationSuccession) -> Void
        public init(digestsFile: String?, checkpoint: @escaping @Sendable (DestinationSuccession) -> Void) {
            self.digestsFile = digestsFile
            self.checkpoint = checkpoint
        }
    }

    /// Starts the destination QEMU (with the shim in enlightened mode), the engine, and migrate-incoming
    /// on `bindHost` (the address the source reaches this host at). With `survival` (enlightened mode only),
    /// the side can be adopted by a successor once this process dies (see `succession`).
    public init(spec: VMSpec, name: String, mode: MigrationMode, session: UInt64, bindHost: String,
                options: MigrationOptions, deadlineSeconds: Double = 3600, survival: Survival? = nil) throws {
        self.mode = mode
        let survival = mode == .enlightened ? survival : nil
        var config = Self.config(spec, name: name, bindHost: bindHost, deadlineSeconds: deadlineSeconds)
        config.outlivesEpcopy = survival != nil
        unlink(config.ramFile)
        self.bindHost = bindHost
        migrationURI = "tcp:\(bindHost):\(Self.freePort(host: bindHost))"
        let ignore: @Sendable (DestinationSuccession) -> Void = { _ in }
        checkpoint = survival?.checkpoint ?? ignore
        let handover = mode == .enlightened
            ? try MemoryHandover(config: &config, session: session, options: options, digestsFile: survival?.digestsFile)
            : nil
        qemu = try Self.launch(config, handover: handover)
        var takeover: DestinationState?
        if let handover {
            let (engine, state, listener) = try Self.engine(from: handover, bindHost: bindHost, qemu: qemu)
            numa = Self.place(state.path, offset: state.fileOffset, length: state.length, options: options)
            ramAddress = state.hostAddress
            engineEndpoint = Endpoint(host: bindHost, port: listener.listener.endpoint.port)
            engineThread = Self.run(engine, listener: listener, into: engineResult)
            self.engine = engine
            takeover = state
        } else {
            engine = nil
            engineEndpoint = nil
            engineThread = nil
            numa = nil
            ramAddress = nil
        }
        var initial: DestinationSuccession?
        if let survival, let takeover {
            initial = DestinationSuccession(session: session, spec: spec, qemuName: name, bindHost: bindHost,
                                            deadlineSeconds: deadlineSeconds, qemuPid: qemu.pid, takeover: takeover,
                                            engine: engineEndpoint.map { "\($0)" } ?? "", migrationURI: "",
                                            digestsFile: options.verify ? survival.digestsFile : nil)
        }
        succession = Mutex(initial)
        try prepareIncoming()
        succession.withLock { $0?.migrationURI = migrationURI }
        switchWatcher = watchSwitch(session: session, options: options, resumedAt: nil, free: nil)
    }

    /// Carries on a survivable side whose process died: adopts its QEMU (still running behind its keeper),
    /// takes the shim's userfaultfd back, learns which pages are present (mincore on the RAM file), and serves
    /// the source again on the same engine port. The switch goes on from where `state` says it got.
    public init(adopting state: DestinationSuccession, options: MigrationOptions,
                checkpoint: @escaping @Sendable (DestinationSuccession) -> Void) throws {
        mode = .enlightened
        bindHost = state.bindHost
        migrationURI = state.migrationURI
        self.checkpoint = checkpoint
        var config = Self.config(state.spec, name: state.qemuName, bindHost: state.bindHost,
                                 deadlineSeconds: state.deadlineSeconds)
        config.outlivesEpcopy = true
        guard let endpoint = Endpoint(state.engine), state.takeover.sessionID == state.session,
              state.takeover.pid == state.qemuPid else {
            throw MigrationError.step("destination: adopt", ControlError.remote("the record for session \(state.session) names no engine endpoint, or another QEMU than the one holding the userfaultfd"))
        }
        do { try QEMUProcess.checkAdoptable(config, qemuPid: state.qemuPid) } catch {
            throw MigrationError.step("destination: adopt QEMU \(state.qemuPid)", error)
        }
        // Faults first: since its engine died, the guest's vCPUs and QEMU's main loop (QMP with it) may be
        // blocked on pages nobody serves. The uffd is taken back and served before QMP is spoken to.
        var present = PageSet<PageIndex>()
        let memory: DestinationMemory
        do { memory = try DestinationMemory.takeOver(state.takeover, present: &present) } catch {
            throw MigrationError.step("destination: take the userfaultfd back from QEMU \(state.qemuPid)", error)
        }
        var digests: PageDigests?
        if let file = state.digestsFile {
            do { digests = try PageDigests(pageCount: memory.regionPages, file: file, fresh: false) } catch {
                throw MigrationError.step("destination: the digest table", error)
            }
        }
        var engineOptions = Self.engineOptions(session: state.session, options: options, digests: digests)
        engineOptions.initiallyPresent = present
        let engine = DestinationEngine(memory: memory, options: engineOptions)
        // Pages already here stay where they are; those still to come follow the binding.
        numa = Self.place(state.takeover.path, offset: state.takeover.fileOffset, length: state.takeover.length,
                          options: options)
        ramAddress = state.takeover.hostAddress
        let listener: ListenerHolder
        do { listener = ListenerHolder(try Self.listen(on: endpoint)) } catch {
            throw MigrationError.step("destination: listen on \(endpoint) again", error)
        }
        self.engine = engine
        engineEndpoint = endpoint
        engineThread = Self.run(engine, listener: listener, into: engineResult)
        // If QMP cannot be had, the engine goes on serving the guest on its own thread: the VM is not given up.
        do { qemu = try QEMUProcess.adopt(config, qemuPid: state.qemuPid, connectTimeout: .seconds(60)) } catch {
            throw MigrationError.step("destination: adopt QEMU \(state.qemuPid) (its engine still serves it)", error)
        }
        succession = Mutex(state)
        Log.engine.info("destination: adopted QEMU \(state.qemuPid) of session \(state.session): \(present.count) pages already here")
        // RESUME may have happened while nobody watched QMP: then the guest runs, and the time is taken as now.
        var resumedAt = state.resumeTimestamp
        if resumedAt == nil, qemu.runState == "running" {
            resumedAt = Date().timeIntervalSince1970
        }
        switchWatcher = watchSwitch(session: state.session, options: options, resumedAt: resumedAt, free: state.freePages)
    }

    /// Receives into a QEMU that another manager (libvirt) starts for an incoming migration: waits (up to
    /// `incoming.timeout`, or until `incoming.abandonIf` says so) for its shim to hand the guest memory over on
    /// `incoming.handover`, serves the source engine on `incoming.engineListener`, attaches to the QEMU through
    /// the monitor `incoming.describe` names, and sets x-ignore-shared there, so the manager's migration stream
    /// carries only device state. Not survivable: the QEMU is the manager's.
    init(managed incoming: ManagedIncoming, session: UInt64, options: MigrationOptions) throws {
        mode = .enlightened
        bindHost = Self.anyAddress
        migrationURI = ""
        checkpoint = { _ in }
        succession = Mutex(nil)
        let handover: UffdHandover
        do { handover = try incoming.waitForHandover() } catch {
            throw MigrationError.step("destination: the shim's hand-over from the QEMU libvirt started", error)
        }
        let (pid, path, length) = (handover.pid, handover.path, handover.length)
        let (engine, state) = try Self.engine(for: handover, session: session, options: options, digestsFile: nil)
        numa = Self.place(path, offset: state.fileOffset, length: length, options: options)
        ramAddress = state.hostAddress
        engineEndpoint = Endpoint(host: Self.anyAddress, port: incoming.enginePort)
        engineThread = Self.run(engine, listener: incoming.engineListener, into: engineResult)
        self.engine = engine
        // Faults are served from here on; QMP next (the QEMU's main loop may wait on a page until then).
        do {
            let config = try incoming.describe(pid, path, length)
            qemu = try QEMUProcess.attach(managed: config, qemuPid: pid, connectTimeout: .seconds(60))
            try QEMUMigration.setIgnoreShared(qemu.qmp, true)
        } catch {
            throw MigrationError.step("destination: epcopy's monitor of the incoming QEMU \(pid)", error)
        }
        switchWatcher = watchSwitch(session: session, options: options, resumedAt: nil, free: nil)
    }

    // MARK: prepare

    /// Binds the RAM file to the node `options.numa` asks for, before the first page is placed. A failure costs
    /// locality, not the migration: it is logged and the guest's pages go where the kernel puts them.
    private static func place(_ ramFile: String, offset: UInt64 = 0, length: UInt64, options: MigrationOptions) -> NumaChoice? {
        guard let request = options.numa else { return nil }
        do {
            let choice = try NumaPlacement.choose(request, topology: try NumaTopology.read(), guestBytes: length)
            try NumaBinding.prefer(node: choice.node, file: ramFile, offset: offset, length: length)
            Log.engine.info("destination: guest RAM on NUMA node \(choice.node): \(choice.reason)")
            return choice
        } catch {
            Log.engine.warning("destination: no NUMA binding (\(error)); the guest's pages go where the kernel puts them")
            return nil
        }
    }

    /// The vCPUs of an epcopy QEMU run on the CPUs of the RAM's node (libvirt's are pinned through libvirt, so
    /// that its XML says so: see DaemonLibvirtEnlightened). A failure costs locality only: it is logged.
    private func pinVCPUs() {
        guard let numa, !qemu.managed else { return }
        do {
            let count = try NumaBinding.pinVCPUs(qemu.qmp, to: numa.cpus)
            Log.engine.info("destination: \(count) vCPU threads on the CPUs of NUMA node \(numa.node)")
        } catch { Log.engine.warning("destination: vCPUs not pinned: \(error)") }
    }

    /// After the drain: the fraction of the guest's resident pages on the chosen node.
    private func pagesOnNodeFraction() -> Double? {
        guard let numa, let ramAddress, let pages = NumaBinding.pagesByNode(pid: qemu.pid, address: ramAddress) else { return nil }
        return NumaBinding.fraction(onNode: numa.node, of: pages)
    }

    private static func config(_ spec: VMSpec, name: String, bindHost: String, deadlineSeconds: Double) -> QEMUConfig {
        var config = spec.config(name: name, deadlineSeconds: deadlineSeconds)
        config.forwardHost = bindHost
        config.incoming = true
        return config
    }

    /// A first engine over memory the shim handed over, and what a takeover of that memory needs. With
    /// `digestsFile`, the digests go to a fresh table in that file (a successor reads it).
    fileprivate static func engine(for handover: consuming UffdHandover, session: UInt64, options: MigrationOptions,
                                   digestsFile: String?) throws -> (DestinationEngine, DestinationState) {
        let state = DestinationState(pid: handover.pid, remoteUffdFD: handover.remoteUffdFD,
                                     hostAddress: handover.hostVirtualAddress, length: handover.length,
                                     fileOffset: handover.fileOffset, path: handover.path, sessionID: session)
        let memory = try DestinationMemory(handover: handover)
        let digests = try digestsFile.map { try PageDigests(pageCount: memory.regionPages, file: $0, fresh: true) }
        let engineOptions = engineOptions(session: session, options: options, digests: digests)
        return (DestinationEngine(memory: memory, options: engineOptions), state)
    }

    /// The engine's options for this migration (a first engine, or one that adopts).
    fileprivate static func engineOptions(session: UInt64, options: MigrationOptions, digests: PageDigests?) -> DestinationOptions {
        var engine = DestinationOptions(sessionID: session, link: options.link, recordDigests: options.verify,
                                        authKey: options.authKey)
        engine.reconnectTimeoutMillis = options.reconnectTimeoutMillis
        engine.keepalive = options.keepalive
        engine.digests = digests
        return engine
    }

    /// The engine listens on every address of this host (at the port it tells the source, with `bindHost`), so a
    /// source that lost one path to it can come back on another (`migrate --resume --to`); the handshake's HMAC
    /// refuses whoever lacks the key.
    static let anyAddress = "0.0.0.0"

    /// Binds the engine's port again; a socket of the dead process may hold it for a moment.
    private static func listen(on endpoint: Endpoint) throws -> Listener {
        let deadline = monotonicNanos() + 10_000_000_000
        let any = Endpoint(host: anyAddress, port: endpoint.port)
        while true {
            do { return try TCP.listen(on: any) } catch {
                if monotonicNanos() > deadline { throw error }
                usleep(100_000)
            }
        }
    }

    /// What a successor would need, as it stands (nil for a side that is not survivable).
    public var currentSuccession: DestinationSuccession? { succession.withLock { $0 } }

    private func updateSuccession(_ change: (inout DestinationSuccession) -> Void) {
        guard let updated = succession.withLock({ s -> DestinationSuccession? in
            guard s != nil else { return nil }
            change(&s!)
            return s
        }) else { return }
        checkpoint(updated)
    }

    private static func launch(_ config: QEMUConfig, handover: MemoryHandover?) throws -> QEMUProcess {
        do { return try QEMUProcess.launch(config, connectTimeout: .seconds(60)) } catch {
            handover?.join()
            throw MigrationError.step("destination: start QEMU", error)
        }
    }

    /// The engine over the handed-over memory, what a takeover of it would need, and the listener the source
    /// engine connects to.
    private static func engine(from handover: MemoryHandover, bindHost: String,
                               qemu: QEMUProcess) throws -> (DestinationEngine, DestinationState, ListenerHolder) {
        let engine: DestinationEngine
        let state: DestinationState
        do { (engine, state) = try handover.engine() } catch {
            qemu.teardown()
            throw MigrationError.step("destination: guest memory hand-over", error)
        }
        do { return (engine, state, ListenerHolder(try TCP.listen(on: Endpoint(host: Self.anyAddress, port: 0)))) } catch {
            qemu.teardown()
            throw MigrationError.step("destination: listen on \(bindHost)", error)
        }
    }

    private static func run(_ engine: DestinationEngine, listener: ListenerHolder,
                            into slot: ResultSlot<DestinationReport, PeerError>) -> JoinableThread {
        JoinableThread(name: "epcopy-dst") {
            let result = Result<DestinationReport, PeerError> { () throws(PeerError) in
                try engine.run(listener: listener.listener)
            }
            // Said at once: a daemon hears it only at the finish, which may be long after (a source reconnecting).
            if case .failure(let error) = result { Log.engine.error("destination: the engine ended: \(error)") }
            slot.set(result)
        }
    }

    /// From here the source may switch: QEMU waits for its stream.
    private func prepareIncoming() throws {
        do {
            try QEMUMigration.setCapabilities(qemu.qmp, for: mode)
            // The port was free when it was picked, but another socket on this host (this migration's own engine
            // listener among them) may take it before QEMU binds it: pick another and try again.
            for attempt in 1...5 {
                let failure = Self.migrateIncoming(qemu.qmp, uri: migrationURI)
                guard let failure else { break }
                guard attempt < 5, "\(failure)".contains("already in use") else { throw failure }
                migrationURI = "tcp:\(bindHost):\(Self.freePort(host: bindHost))"
            }
        } catch {
            abandon()
            throw MigrationError.step("destination: migrate-incoming", error)
        }
    }

    // MARK: switch

    /// A thread that records RESUME as it happens (or takes `resumedAt`, when a previous process saw it), then
    /// (enlightened mode) runs the agent's free scan, unless a previous process's scan already answered (`free`).
    private func watchSwitch(session: UInt64, options: MigrationOptions, resumedAt: Double?,
                             free: PageSet<PageIndex>?) -> JoinableThread {
        let (qmp, slot, since, engine, scanSlot) = (qemu.qmp, resumed, start, self.engine, freeScan)
        let (agentSocket, useAgent) = (qemu.config.agentSocket, mode == .enlightened && options.useAgent)
        let regionPages = qemu.config.regionPages
        // The switch does not wait for the free scan (the guest already runs here), so it may take longer than a
        // hot report: a large guest's first scan right after RESUME runs with a cold translation cache under TCG.
        let agentTimeout = max(options.agentTimeoutMillis, options.freeScanTimeoutMillis)
        return JoinableThread(name: "epcopy-resume") { [self] in
            let timestamp: Double
            do {
                timestamp = try resumedAt ?? qmp.waitForEvent("RESUME", timeout: .seconds(600), after: since).timestamp
            } catch {
                slot.set(.failure(.step("destination: waiting for RESUME", error)))
                engine?.finishFreeScan(agentAnswered: false, pagesReported: 0)
                return
            }
            slot.set(.success(timestamp))
            if resumedAt == nil { updateSuccession { $0.resumeTimestamp = timestamp } }
            pinVCPUs()
            guard let engine else { return }
            if let free {
                engine.markFree(free)
                engine.finishFreeScan(agentAnswered: true, pagesReported: free.count)
                scanSlot.set(.success(FreeScanOutcome(answered: true, millis: 0, scanMillis: 0, free: free,
                                                      notes: ["destination: the free scan answered before the takeover"])))
                return
            }
            // The agent port is opened only now: the guest runs here, and whatever answers on the port is the
            // guest's (a connection made earlier would only sit idle).
            var link: AgentLink?
            var note: String?
            if useAgent {
                do { link = try AgentLink(socketPath: agentSocket, layout: GuestRAMLayout(regionPages: regionPages)) }
                catch { note = "destination: \(error)" }
            }
            // The free pages are on record before the engine acts on them: a successor marks them again.
            scanSlot.set(.success(Self.freeScan(link: link, linkNote: note, engine: engine, session: session,
                                                timeoutMillis: agentTimeout,
                                                beforeMarking: { pages in updateSuccession { $0.setFreePages(pages) } })))
        }
    }

    /// After RESUME: the agent scans for free pages at once; each one not yet here is never fetched. Whatever
    /// happens, the source hears that the scan is over, so it stops holding the believed-free pages back.
    private static func freeScan(link: AgentLink?, linkNote: String?, engine: DestinationEngine, session: UInt64,
                                 timeoutMillis: UInt64, beforeMarking: (PageSet<PageIndex>) -> Void) -> FreeScanOutcome {
        var outcome = FreeScanOutcome(answered: false, millis: 0, scanMillis: 0, free: PageSet(),
                                      notes: linkNote.map { [$0] } ?? [])
        guard let link else {
            engine.finishFreeScan(agentAnswered: false, pagesReported: 0)
            return outcome
        }
        let start = monotonicNanos()
        do {
            let (report, pages) = try link.freeAfterResume(sequence: session, timeoutMillis: timeoutMillis)
            beforeMarking(pages)
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

    /// Whether the guest runs here already (RESUME seen): from then on the VM must never be given up.
    public var hasResumed: Bool {
        if case .success = resumed.peek() { return true }
        return false
    }

    /// Whether `finish` would return at once: every page is here, or the engine has ended (in QEMU's own
    /// modes: the guest runs here). Never blocks.
    public var hasDrained: Bool {
        engineThread == nil ? hasResumed : engineResult.peek() != nil
    }

    // MARK: drain

    /// Waits for RESUME and, in enlightened mode, for every page to arrive.
    public func finish(timeout: Duration = .seconds(600)) throws -> DestinationOutcome {
        switchWatcher?.join()
        let resumeTimestamp: Double
        do { resumeTimestamp = try resumed.get() } catch {
            abandon()
            throw error
        }
        let report = try drain()
        // Counted by time against QEMU's own RESUME timestamp (same host clock): the guest already runs and
        // faults by the time anyone here hears of RESUME.
        let faultsBeforeResume = engine.map { $0.metrics.faults(before: resumeTimestamp) } ?? 0
        var scan: FreeScanOutcome?
        if mode == .enlightened, engine != nil { scan = try? freeScan.get() }
        return DestinationOutcome(resumeTimestamp: resumeTimestamp, faultsBeforeResume: faultsBeforeResume,
                                  report: report, freeScan: scan, numaNode: numa?.node,
                                  pagesOnNodeFraction: pagesOnNodeFraction())
    }

    /// The engine's report once it has placed every page (nil in QEMU's own modes).
    private func drain() throws -> DestinationReport? {
        guard let engineThread else { return nil }
        engineThread.join()
        do { return try engineResult.get() } catch {
            throw MigrationError.step("RAM transfer (destination)", error)
        }
    }

    // MARK: verify

    /// Every page placed here against the source as it was at STOP, except those the guest reported free after
    /// RESUME (they hold nothing the guest may read); then the guest's own verdict, watched for `settle` seconds.
    func verify(against source: SourceOutcome, free: PageSet<PageIndex>?, settle: Double) -> DestinationCheck {
        var memory = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        if let digests = engine?.digests, let sourceDigests = source.sourceDigests {
            memory = digests.compare(sourceDigests: sourceDigests, free: free ?? PageSet())
        }
        return DestinationCheck(memory: memory,
                                guest: GuestVerdict.watch(qemu, before: source.counterBefore, settle: settle))
    }

    /// Tears the destination down after a failure before the switch: nothing ran here yet.
    public func abandon() {
        qemu.kill()
        qemu.teardown()
    }

    /// QMP migrate-incoming; the error, if any.
    private static func migrateIncoming(_ qmp: QMPClient, uri: String) -> (any Error)? {
        do {
            _ = try qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)], timeout: .seconds(10))
            return nil
        } catch { return error }
    }

    private static func freePort(host: String) -> UInt16 {
        guard let listener = try? TCP.listen(on: Endpoint(host: host, port: 0)) else { return 0 }
        return listener.endpoint.port
    }
}

/// The shim's hand-over of the destination QEMU's guest memory. The shim hands the RAM mapping over while QEMU
/// starts, before QEMU serves QMP, so it is accepted on its own thread started before the launch.
private final class MemoryHandover: Sendable {
    private let accepted: ResultSlot<(DestinationEngine, DestinationState), any Error>
    private let thread: JoinableThread

    /// Points the shim (through `config`'s environment) at a fresh hand-over socket and starts accepting on it.
    /// With `digestsFile`, the digests go to a fresh table in that file (a successor reads it).
    init(config: inout QEMUConfig, session: UInt64, options: MigrationOptions, digestsFile: String?) throws {
        let handoverPath = "/tmp/epcopy-\(config.name).handover"
        config.environment = ["LD_PRELOAD": options.preloadLibrary, "EPCOPY_SHIM_SOCKET": handoverPath,
                              "EPCOPY_SHIM_PREFIX": config.ramFile]
        let listener: UffdHandoverListener
        do { listener = try UffdHandoverListener(path: handoverPath) } catch {
            throw MigrationError.step("destination: hand-over socket", error)
        }
        let accepted = ResultSlot<(DestinationEngine, DestinationState), any Error>()
        self.accepted = accepted
        let digestsFile = options.verify ? digestsFile : nil
        thread = JoinableThread(name: "epcopy-handover") {
            accepted.set(Result<(DestinationEngine, DestinationState), any Error> {
                try DestinationSide.engine(for: try listener.accept(timeout: .seconds(60)), session: session,
                                           options: options, digestsFile: digestsFile)
            })
        }
    }

    /// Waits for the accept to end, whatever its result.
    func join() { thread.join() }

    /// The engine over the handed-over memory, and what a takeover of that memory needs.
    func engine() throws -> (DestinationEngine, DestinationState) {
        thread.join()
        return try accepted.get()
    }
}

/// What a managed side (`DestinationSide.init(managed:)`) needs, made before the source hears of it: the shim's
/// hand-over socket (the path the domain's XML gives the shim), the engine's listener (its port goes to the
/// source), and how to describe the QEMU once it has handed over (`describe(pid, RAM file, RAM bytes)`: a config
/// whose `qmpSocket` is epcopy's monitor of it).
struct ManagedIncoming: Sendable {
    let handover: UffdHandoverListener
    let engineListener: ListenerHolder
    let describe: @Sendable (Int32, String, UInt64) throws -> QEMUConfig
    var timeout: Duration = .seconds(120)
    /// Asked about every 500 ms while waiting for the hand-over: true gives the wait up.
    var abandonIf: @Sendable () -> Bool = { false }

    init(handover: UffdHandoverListener, engineListener: consuming Listener,
         describe: @escaping @Sendable (Int32, String, UInt64) throws -> QEMUConfig) {
        self.handover = handover
        self.engineListener = ListenerHolder(engineListener)
        self.describe = describe
    }

    /// The port the engine listens on (every address of this host).
    var enginePort: UInt16 { engineListener.listener.endpoint.port }

    func waitForHandover() throws -> UffdHandover {
        let deadline = monotonicNanos() + HypervisorTime.nanoseconds(timeout)
        while try !handover.hasPendingConnection(within: .milliseconds(500)) {
            if abandonIf() { throw MigrationError.failed("the source called the migration off") }
            if monotonicNanos() > deadline {
                throw MigrationError.failed("no QEMU handed its memory over within \(timeout) (did libvirt start one?)")
            }
        }
        return try handover.accept(timeout: .seconds(10))
    }
}
