// The destination half of a migration: prepares this host to receive a VM and reports how the guest
// resumed. The steps, each depending on the last (see Migration.swift for both sides together):
//   prepare  — (init; DestinationPrepare.swift) the engine takes the guest memory over from the shim while
//              QEMU starts with -incoming defer, listens for the source engine; capabilities, migrate-incoming;
//   switch   — (DestinationSwitch.swift) a watcher waits for RESUME (downtime ends), then has the agent scan
//              for free pages;
//   drain    — (finish; DestinationDrain.swift) the engine has placed every page and unregistered the uffd;
//   verify   — (DestinationDrain.swift) placed pages against the source's digests at STOP, and the guest's
//              own verdict.
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
    public internal(set) var migrationURI: String
    let bindHost: String
    public let mode: MigrationMode
    let engineThread: JoinableThread?
    let engineResult = ResultSlot<DestinationReport, PeerError>()
    let start = monotonicNanos()
    /// QMP's RESUME timestamp, recorded by the switch watcher as it happens.
    let resumed = ResultSlot<Double, MigrationError>()
    let freeScan = ResultSlot<FreeScanOutcome, MigrationError>()
    var switchWatcher: JoinableThread?
    /// What a successor would need (survivable sides only), and who is told each time it changes.
    let succession: Mutex<DestinationSuccession?>
    let checkpoint: @Sendable (DestinationSuccession) -> Void
    /// The NUMA node the guest's RAM was bound to (nil: none asked, or the binding failed: said in the log).
    public let numa: NumaChoice?
    /// QEMU's address of the guest RAM (its numa_maps line), in enlightened mode.
    let ramAddress: UInt64?

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

    /// What a successor would need, as it stands (nil for a side that is not survivable).
    public var currentSuccession: DestinationSuccession? { succession.withLock { $0 } }

    func updateSuccession(_ change: (inout DestinationSuccession) -> Void) {
        guard let updated = succession.withLock({ s -> DestinationSuccession? in
            guard s != nil else { return nil }
            change(&s!)
            return s
        }) else { return }
        checkpoint(updated)
    }

    /// Tears the destination down after a failure before the switch: nothing ran here yet.
    public func abandon() {
        qemu.kill()
        qemu.teardown()
    }
}
