// The destination's prepare step: where the guest's RAM is bound (NUMA) and its vCPUs run, the QEMU that
// receives (started here, or described for a managed one), the shim's hand-over of its memory to the engine,
// the engine's listener and thread, and QMP migrate-incoming. DestinationSide's initialisers run these in order.

import CEpcopyLinux
import EpcopyProtocol
import Foundation

extension DestinationSide {
    /// Binds the RAM file to the node `options.numa` asks for, before the first page is placed. A failure costs
    /// locality, not the migration: it is logged and the guest's pages go where the kernel puts them.
    static func place(_ ramFile: String, offset: UInt64 = 0, length: UInt64, options: MigrationOptions) -> NumaChoice? {
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
    func pinVCPUs() {
        guard let numa, !qemu.managed else { return }
        do {
            let count = try NumaBinding.pinVCPUs(qemu.qmp, to: numa.cpus)
            Log.engine.info("destination: \(count) vCPU threads on the CPUs of NUMA node \(numa.node)")
        } catch { Log.engine.warning("destination: vCPUs not pinned: \(error)") }
    }

    /// After the drain: the fraction of the guest's resident pages on the chosen node.
    func pagesOnNodeFraction() -> Double? {
        guard let numa, let ramAddress, let pages = NumaBinding.pagesByNode(pid: qemu.pid, address: ramAddress) else { return nil }
        return NumaBinding.fraction(onNode: numa.node, of: pages)
    }

    static func config(_ spec: VMSpec, name: String, bindHost: String, deadlineSeconds: Double) -> QEMUConfig {
        var config = spec.config(name: name, deadlineSeconds: deadlineSeconds)
        config.forwardHost = bindHost
        config.incoming = true
        return config
    }

    /// A first engine over memory the shim handed over, and what a takeover of that memory needs. With
    /// `digestsFile`, the digests go to a fresh table in that file (a successor reads it).
    static func engine(for handover: consuming UffdHandover, session: UInt64, options: MigrationOptions,
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
    static func engineOptions(session: UInt64, options: MigrationOptions, digests: PageDigests?) -> DestinationOptions {
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
    static func listen(on endpoint: Endpoint) throws -> Listener {
        let deadline = monotonicNanos() + 10_000_000_000
        let any = Endpoint(host: anyAddress, port: endpoint.port)
        while true {
            do { return try TCP.listen(on: any) } catch {
                if monotonicNanos() > deadline { throw error }
                usleep(100_000)
            }
        }
    }

    static func launch(_ config: QEMUConfig, handover: MemoryHandover?) throws -> QEMUProcess {
        do { return try QEMUProcess.launch(config, connectTimeout: .seconds(60)) } catch {
            handover?.join()
            throw MigrationError.step("destination: start QEMU", error)
        }
    }

    /// The engine over the handed-over memory, what a takeover of it would need, and the listener the source
    /// engine connects to.
    static func engine(from handover: MemoryHandover, bindHost: String,
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

    static func run(_ engine: DestinationEngine, listener: ListenerHolder,
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
    func prepareIncoming() throws {
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

    /// QMP migrate-incoming; the error, if any.
    static func migrateIncoming(_ qmp: QMPClient, uri: String) -> (any Error)? {
        do {
            _ = try qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)], timeout: .seconds(10))
            return nil
        } catch { return error }
    }

    static func freePort(host: String) -> UInt16 {
        guard let listener = try? TCP.listen(on: Endpoint(host: host, port: 0)) else { return 0 }
        return listener.endpoint.port
    }
}


/// The shim's hand-over of the destination QEMU's guest memory. The shim hands the RAM mapping over while QEMU
/// starts, before QEMU serves QMP, so it is accepted on its own thread started before the launch.
final class MemoryHandover: Sendable {
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
