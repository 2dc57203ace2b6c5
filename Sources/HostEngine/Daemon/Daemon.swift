// `epcopy serve`: the per-host engine daemon. It owns the VMs started through it, and on request plays
// either side of a migration: the source ("migrate", DaemonMigrateOut: prepare the peer, switch, push, release)
// or the destination ("incoming", DaemonIncoming: start QEMU under the shim, serve faults, report how the guest
// resumed). This file holds what the daemon is (its options, state, accept loop) and the dispatch of requests.
// Peers and clients authenticate with the host's shared key before anything else (ControlChannel);
// requests and replies are the typed ControlRequest/ControlReply. Each connection is served on its own
// thread, and a failing or malformed request ends that request, never the daemon.

import EpcopyProtocol
import Foundation
import Logging
import Synchronization

public struct DaemonOptions: Sendable {
    public var listen: Endpoint
    public var key: [UInt8]
    public var preloadLibrary: String
    /// Every VM this daemon starts is killed after this long (a bound, not a policy).
    public var vmDeadlineSeconds: Double
    /// Prefix for this daemon's files (/dev/shm, /tmp), so that two daemons can share one machine.
    public var instance: String
    public var link: LinkSpec
    /// Each VM's guest agent is asked for a hot report this often in the background, so a migration uses a
    /// recent one instead of waiting for a scan (0: ask only when migrating).
    public var hotReportEveryMillis: UInt64 = 10_000
    /// Where migrations past their switch are recorded (SessionStore), so a restarted daemon finishes them.
    public var stateDirectory: String
    /// The libvirt daemon whose domains this daemon migrates (`migrate --libvirt`) and receives; nil: none.
    public var libvirtURI: String?
    /// How a source host's libvirtd reaches this host's (peer to peer); nil: `qemu+tcp://<listen host>/system`.
    public var libvirtMigrateURI: String?
    /// Where libvirt's file-backed guest RAM is (a prefix of the files' paths: qemu.conf `memory_backing_dir` and a
    /// slash), which `epcopy libvirt check` expects as the shim's prefix.
    public var libvirtRAMPrefix = "/var/lib/libvirt/qemu/ram/"
    /// The NUMA node for the RAM of guests received here in enlightened mode, unless a migration names one
    /// (`migrate --numa-node`); nil: no binding.
    public var numa: NumaRequest? = .auto

    /// The default state directory of a daemon: one per instance under /var/lib/epcopy.
    public static func defaultStateDirectory(instance: String) -> String { "/var/lib/epcopy/\(instance)" }

    public init(listen: Endpoint, key: [UInt8], preloadLibrary: String, vmDeadlineSeconds: Double = 3600,
                instance: String? = nil, link: LinkSpec = .unshaped) {
        self.listen = listen
        self.key = key
        self.preloadLibrary = preloadLibrary
        self.vmDeadlineSeconds = vmDeadlineSeconds
        let instance = instance ?? "d\(listen.host.replacingOccurrences(of: ".", with: "-"))-\(listen.port)"
        self.instance = instance
        self.link = link
        stateDirectory = Self.defaultStateDirectory(instance: instance)
    }
}

public final class Daemon: @unchecked Sendable {
    // SAFETY (@unchecked): `vms` is behind a Mutex; options are immutable.
    public let options: DaemonOptions
    let vms = Mutex<[String: QEMUProcess]>([:])
    /// The record of each VM in `vms` that outlives the daemon (see DaemonVMs), by name.
    let vmRecords = Mutex<[String: UInt64]>([:])
    let busy = Mutex<Set<String>>([])
    /// The migrations this daemon is sending, by VM: what a cancel request acts on.
    let cancels = Mutex<[String: MigrationCancel]>([:])
    private let keepers = Mutex<[String: HotReportKeeper]>([:])
    /// The migrations this daemon receives (and the last few it received), by session: where a source whose
    /// control connection was lost delivers its finish or abort again (see ControlRejoin).
    let rejoins = Mutex<[UInt64: ControlRejoin]>([:])
    /// Migrations this daemon sends or took up again after a restart, by VM: what `migrate --resume` waits on.
    let resumptions = Mutex<[String: ControlRejoin]>([:])
    /// Where each migration this daemon sends reaches its destination (what `migrate --resume --to` changes).
    let routes = Mutex<[String: MigrationRoute]>([:])
    /// Migrations being received here and not finished yet, by session: torn down with the daemon.
    let incomingSides = Mutex<[UInt64: DestinationSide]>([:])
    var store: SessionStore { SessionStore(directory: options.stateDirectory) }
    /// `epcopy.daemon`, every line tagged with the address this daemon serves.
    let logger: Logger

    public init(options: DaemonOptions) {
        self.options = options
        var logger = Log.logger("daemon")
        logger[metadataKey: "listen"] = "\(options.listen)"
        self.logger = logger
    }

    /// Accepts connections until `shouldStop` returns true (checked every second).
    public func serve(listener: borrowing Listener, shouldStop: @escaping @Sendable () -> Bool = { false }) {
        resumeSwitchedMigrations()
        acceptLoop(listener, shouldStop: shouldStop)
        shutdown()
    }

    /// Accepts on another address of this host too (a second network path for peers and clients), on a thread
    /// of its own, until `shouldStop`. Call before `serve`.
    public func serveAlso(on endpoint: Endpoint, shouldStop: @escaping @Sendable () -> Bool) throws {
        let holder = ListenerHolder(try TCP.listen(on: endpoint))
        let thread = JoinableThread(name: "epcopy-listen") { [self] in acceptLoop(holder.listener, shouldStop: shouldStop) }
        _ = thread  // ends with `shouldStop`
    }

    private func acceptLoop(_ listener: borrowing Listener, shouldStop: @Sendable () -> Bool) {
        while !shouldStop() {
            guard let fd = try? TCP.accept(listener, timeoutMillis: 1000) else { continue }
            // The descriptor crosses to the connection's thread as a raw number, owned again there.
            let raw = fd.release()
            let thread = JoinableThread(name: "epcopy-serve") { [self] in handle(FileDescriptor(adopting: raw)) }
            _ = thread  // detached in effect: each connection ends on its own
        }
    }

    /// Kills every VM this daemon started.
    public func shutdown() {
        let all = vms.withLock { v -> [String: QEMUProcess] in
            defer { v.removeAll() }
            return v
        }
        for keeper in keepers.withLock({ k in defer { k.removeAll() }; return Array(k.values) }) { _ = keeper.stop() }
        // A migration still arriving has its QEMU and RAM file here too; they go with the daemon like its VMs.
        let arriving: [UInt64: DestinationSide] = incomingSides.withLock { i in
            defer { i.removeAll() }
            return i
        }
        for (session, side) in arriving {
            side.abandon()
            forget(session, side)  // its record and digest table
        }
        for (name, vm) in all {
            vm.kill()
            vm.teardown()
            forgetVM(name)
        }
    }

    /// Starts keeping VM `name`'s hot report fresh (see HotReportKeeper).
    func keepHotReport(_ name: String, _ vm: QEMUProcess) {
        guard options.hotReportEveryMillis > 0 else { return }
        let keeper = HotReportKeeper(socketPath: vm.config.agentSocket, regionPages: vm.config.regionPages,
                                     everyMillis: options.hotReportEveryMillis)
        if let old = keepers.withLock({ k -> HotReportKeeper? in defer { k[name] = keeper }; return k[name] }) {
            _ = old.stop()
        }
    }

    /// Stops keeping VM `name`'s hot report; returns the latest.
    func stopKeeping(_ name: String) -> KeptHotReport? {
        keepers.withLock { $0.removeValue(forKey: name) }?.stop()
    }

    private func handle(_ fd: consuming FileDescriptor) {
        let channel: ControlChannel
        do { channel = try ControlChannel.answer(fd, key: options.key) } catch {
            logger.warning("refused a connection: \(error)")
            return
        }
        while true {
            let request: ControlRequest
            do { request = try channel.receiveRequest(timeoutMillis: 3_600_000) } catch ControlError.protocolViolation(let text) {
                // A line that is not a request: say why, and keep serving this client.
                logger.warning("refused a request: \(text)")
                try? channel.send(ControlReply.error("not a request: \(text)"))
                continue
            } catch ControlError.refused(let text) {
                logger.warning("closed a connection: \(text)")
                try? channel.send(ControlReply.error(text))
                return
            } catch { return }
            let reply: ControlReply
            do { reply = try dispatch(request, channel: channel) } catch {
                logger.error("request \(request.name) failed: \(error)")
                try? channel.send(ControlReply.error("\(error)"))
                continue
            }
            do { try channel.send(reply) } catch {
                // The work is done (a rejoined source may have had the answer on its new connection already).
                logger.warning("could not answer \(request.name) on its connection: \(error)")
                return
            }
        }
    }

    private func dispatch(_ request: ControlRequest, channel: ControlChannel) throws -> ControlReply {
        switch request {
        case .vmStart(let name, let spec): return try startVM(name: name, spec: spec)
        case .vmList:
            return .vms(vms.withLock { $0.map { VMEntry(name: $0.key, pid: $0.value.pid, running: $0.value.isRunning,
                                                        memoryMiB: $0.value.config.memoryMiB) } })
        case .vmStop(let name):
            let name = try Self.validName(name)
            guard let vm = vms.withLock({ $0.removeValue(forKey: name) }) else { throw ControlError.remote("no VM \(name) here") }
            _ = stopKeeping(name)
            vm.kill()
            vm.teardown()
            forgetVM(name)
            return .ok
        case .vmSerial(let name):
            let name = try Self.validName(name)
            guard let vm = vms.withLock({ $0[name] }) else { throw ControlError.remote("no VM \(name) here") }
            return .serial(log: String(vm.serialLog.suffix(8192)))
        case .migrate(let migrate) where migrate.libvirt == true: return try migrateDomainOut(migrate, channel: channel)
        case .migrate(let migrate): return try migrateOut(migrate, channel: channel)
        case .cancel(let name):
            let name = try Self.validName(name)
            guard let cancel = cancels.withLock({ $0[name] }) else {
                throw ControlError.remote("no migration of \(name) is under way here")
            }
            guard cancel.request() else {
                throw ControlError.remote("\(name) has switched: the source is fenced and holds pages the destination "
                    + "still needs, so the migration cannot be undone; a lost link or peer is recovered instead, "
                    + "and it ends when every page has moved")
            }
            logger.info("cancel of the migration of \(name) requested")
            return .ok
        case .incoming(let incoming): return try self.incoming(incoming, channel: channel)
        case .incomingDomain(let incoming): return try incomingDomain(incoming, channel: channel)
        case .finish, .abort: throw ControlError.protocolViolation("\(request.name) outside a migration")
        case .resume(let name): return try awaitResumed(try Self.validName(name))
        case .redirect(let name, let to): return try redirect(try Self.validName(name), to: to)
        case .finishSession(let session, let source): return try rejoined(session, .finish(source))
        case .abortSession(let session): return try rejoined(session, .abort)
        }
    }

    // MARK: requests

    static func validName(_ name: String) throws -> String {
        guard (1...64).contains(name.utf8.count),
              name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A)
                  || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D })
        else { throw ControlError.remote("a VM name is 1-64 of A-Z a-z 0-9 . _ -") }
        return name
    }

    static func validSpec(_ spec: VMSpec) throws -> VMSpec {
        guard (64...262_144).contains(spec.memoryMiB), (1...64).contains(spec.vcpus) else {
            throw ControlError.remote("memory must be 64 MiB-256 GiB and vCPUs 1-64")
        }
        if let pad = spec.ramPadKiB, !(0...(1 << 20)).contains(pad) {
            throw ControlError.remote("ramPadKiB must be 0-1048576")
        }
        for path in [spec.kernel, spec.initrd, spec.disk].compactMap({ $0 }) where !FileManager.default.fileExists(atPath: path) {
            throw ControlError.remote("\(path) does not exist on this host")
        }
        return spec
    }

    private func startVM(name: String, spec: VMSpec) throws -> ControlReply {
        let name = try Self.validName(name)
        var spec = try Self.validSpec(spec)
        spec.name = name
        guard vms.withLock({ $0[name] == nil }) else { throw ControlError.remote("a VM named \(name) already runs here") }
        let config = vmConfig(spec, name: name)
        let vm: QEMUProcess
        do { vm = try QEMUProcess.launch(config, connectTimeout: .seconds(30)) } catch {
            throw ControlError.remote("start VM \(name): \(error)")
        }
        vms.withLock { $0[name] = vm }
        recordVM(name, vm)
        keepHotReport(name, vm)
        logger.info("started VM \(name) (pid \(vm.pid), \(spec.memoryMiB) MiB)")
        return .started(name: name, pid: vm.pid, ramFile: config.ramFile)
    }

    func migrationOptions(_ request: MigrationRequestOptions) throws -> MigrationOptions {
        var migration = MigrationOptions(mode: request.mode, verify: request.verify, link: options.link,
                                         preloadLibrary: options.preloadLibrary, authKey: options.key)
        migration.useAgent = request.agent
        guard (1...60_000).contains(request.agentTimeoutMillis) else {
            throw ControlError.remote("agentTimeoutMillis must be 1...60000")
        }
        migration.agentTimeoutMillis = UInt64(request.agentTimeoutMillis)
        if let reconnect = request.reconnectTimeoutMillis {
            guard (0...86_400_000).contains(reconnect) else {
                throw ControlError.remote("reconnectTimeoutMillis must be 0...86400000 (a day)")
            }
            migration.reconnectTimeoutMillis = Int32(reconnect)
        }
        if let failover = request.failoverAfterMillis {
            guard (100...600_000).contains(failover) else {
                throw ControlError.remote("failoverAfterMillis must be 100...600000")
            }
        }
        if let silence = request.keepaliveTimeoutMillis {
            guard (200...600_000).contains(silence) else {
                throw ControlError.remote("keepaliveTimeoutMillis must be 200...600000")
            }
            migration.keepalive = KeepaliveSpec(intervalMillis: UInt64(min(250, silence / 4)), timeoutMillis: UInt64(silence))
        }
        if let numa = request.numaNode {
            guard let parsed = NumaRequest(numa) else { throw ControlError.remote("numaNode must be auto or a node number") }
            migration.numa = parsed
        } else {
            migration.numa = options.numa
        }
        return migration
    }
}
