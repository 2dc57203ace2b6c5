// `epcopy serve`: the per-host engine daemon. It owns the VMs started through it, and on request plays
// either side of a migration: the source ("migrate": prepare the peer, switch, push, release) or the
// destination ("incoming": start QEMU under the shim, serve faults, report how the guest resumed).
// Peers and clients authenticate with the host's shared key before anything else; each connection is
// served on its own thread, and a failing request ends that request, never the daemon.

import EpcopyProtocol
import Foundation
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

    public init(listen: Endpoint, key: [UInt8], preloadLibrary: String, vmDeadlineSeconds: Double = 3600,
                instance: String? = nil, link: LinkSpec = .unshaped) {
        self.listen = listen
        self.key = key
        self.preloadLibrary = preloadLibrary
        self.vmDeadlineSeconds = vmDeadlineSeconds
        self.instance = instance ?? "d\(listen.host.replacingOccurrences(of: ".", with: "-"))-\(listen.port)"
        self.link = link
    }
}

public final class Daemon: @unchecked Sendable {
    // SAFETY (@unchecked): `vms` is behind a Mutex; options are immutable.
    public let options: DaemonOptions
    private let vms = Mutex<[String: QEMUProcess]>([:])
    private let busy = Mutex<Set<String>>([])
    private let keepers = Mutex<[String: HotReportKeeper]>([:])

    public init(options: DaemonOptions) { self.options = options }

    /// Accepts connections until `shouldStop` returns true (checked every second).
    public func serve(listener: borrowing Listener, shouldStop: @escaping @Sendable () -> Bool = { false }) {
        while !shouldStop() {
            guard let fd = try? TCP.accept(listener, timeoutMillis: 1000) else { continue }
            let channel = ControlChannel(descriptor: fd)
            let thread = JoinableThread(name: "epcopy-serve") { [self] in handle(channel) }
            _ = thread  // detached in effect: each connection ends on its own
        }
        shutdown()
    }

    /// Kills every VM this daemon started.
    public func shutdown() {
        let all = vms.withLock { v -> [QEMUProcess] in
            defer { v.removeAll() }
            return Array(v.values)
        }
        for keeper in keepers.withLock({ k in defer { k.removeAll() }; return Array(k.values) }) { _ = keeper.stop() }
        for vm in all { vm.kill(); vm.teardown() }
    }

    /// Starts keeping VM `name`'s hot report fresh (see HotReportKeeper).
    private func keepHotReport(_ name: String, _ vm: QEMUProcess) {
        guard options.hotReportEveryMillis > 0 else { return }
        let keeper = HotReportKeeper(socketPath: vm.config.agentSocket, regionPages: vm.config.regionPages,
                                     everyMillis: options.hotReportEveryMillis)
        if let old = keepers.withLock({ k -> HotReportKeeper? in defer { k[name] = keeper }; return k[name] }) {
            _ = old.stop()
        }
    }

    /// Stops keeping VM `name`'s hot report; returns the latest.
    private func stopKeeping(_ name: String) -> KeptHotReport? {
        keepers.withLock { $0.removeValue(forKey: name) }?.stop()
    }

    func log(_ text: String) {
        FileHandle.standardError.write(Data("epcopy serve (\(options.listen)): \(text)\n".utf8))
    }

    private func handle(_ channel: ControlChannel) {
        do {
            try channel.authenticateAsServer(key: options.key)
        } catch {
            log("\(error)")
            return
        }
        while true {
            let request: [String: Any]
            do { request = try channel.receive(timeoutMillis: 3_600_000) } catch { return }
            do {
                let reply = try dispatch(request, channel: channel)
                try channel.send(reply)
            } catch {
                log("request \(request["op"] as? String ?? "?") failed: \(error)")
                try? channel.send(["error": "\(error)"])
            }
        }
    }

    private func dispatch(_ request: [String: Any], channel: ControlChannel) throws -> [String: Any] {
        switch request["op"] as? String {
        case "vm.start": return try startVM(request)
        case "vm.list":
            return ["vms": vms.withLock { $0.map { ["name": $0.key, "pid": Int($0.value.pid), "running": $0.value.isRunning,
                                                     "memory_mib": $0.value.config.memoryMiB] as [String: Any] } }]
        case "vm.stop":
            let name = try Self.name(request)
            guard let vm = vms.withLock({ $0.removeValue(forKey: name) }) else { throw ControlError.remote("no VM \(name) here") }
            _ = stopKeeping(name)
            vm.kill()
            vm.teardown()
            return ["ok": true]
        case "vm.serial":
            let name = try Self.name(request)
            guard let vm = vms.withLock({ $0[name] }) else { throw ControlError.remote("no VM \(name) here") }
            return ["log": String(vm.serialLog.suffix(8192))]
        case "migrate": return try migrateOut(request, channel: channel)
        case "incoming": return try incoming(request, channel: channel)
        case let op: throw ControlError.protocolViolation("unknown request \(op ?? "(none)")")
        }
    }

    // MARK: requests

    static func name(_ request: [String: Any]) throws -> String {
        guard let name = request["name"] as? String, (1...64).contains(name.utf8.count),
              name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A)
                  || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D })
        else { throw ControlError.remote("a VM name is 1-64 of A-Z a-z 0-9 . _ -") }
        return name
    }

    static func spec(_ object: Any?) throws -> VMSpec {
        guard let object, let data = try? JSONSerialization.data(withJSONObject: object),
              let spec = try? JSONDecoder().decode(VMSpec.self, from: data)
        else { throw ControlError.protocolViolation("a VM spec that does not decode") }
        guard (64...262_144).contains(spec.memoryMiB), (1...64).contains(spec.vcpus) else {
            throw ControlError.remote("memory must be 64 MiB-256 GiB and vCPUs 1-64")
        }
        for path in [spec.kernel, spec.initrd, spec.disk].compactMap({ $0 }) where !FileManager.default.fileExists(atPath: path) {
            throw ControlError.remote("\(path) does not exist on this host")
        }
        return spec
    }

    private func startVM(_ request: [String: Any]) throws -> [String: Any] {
        let name = try Self.name(request)
        var spec = try Self.spec(request["spec"])
        spec.name = name
        guard vms.withLock({ $0[name] == nil }) else { throw ControlError.remote("a VM named \(name) already runs here") }
        var config = spec.config(name: "\(options.instance)-\(name)", deadlineSeconds: options.vmDeadlineSeconds)
        config.forwardHost = options.listen.host
        let vm: QEMUProcess
        do { vm = try QEMUProcess.launch(config, connectTimeout: .seconds(30)) } catch {
            throw ControlError.remote("start VM \(name): \(error)")
        }
        vms.withLock { $0[name] = vm }
        keepHotReport(name, vm)
        log("started VM \(name) (pid \(vm.pid), \(spec.memoryMiB) MiB)")
        return ["ok": true, "name": name, "pid": Int(vm.pid), "ram_file": config.ramFile]
    }

    private func migrationOptions(_ request: [String: Any]) throws -> MigrationOptions {
        guard let modeText = request["mode"] as? String, let mode = MigrationMode(rawValue: modeText) else {
            throw ControlError.remote("mode must be one of enlightened, postcopy, precopy")
        }
        var migration = MigrationOptions(mode: mode, verify: request["verify"] as? Bool ?? false, link: options.link,
                                         preloadLibrary: options.preloadLibrary, authKey: options.key)
        migration.useAgent = request["agent"] as? Bool ?? true
        if let ms = request["agent_timeout_ms"] as? Int {
            guard (1...60_000).contains(ms) else { throw ControlError.remote("agent_timeout_ms must be 1...60000") }
            migration.agentTimeoutMillis = UInt64(ms)
        }
        return migration
    }

    /// Source role: move VM `name` to the daemon at `to`.
    private func migrateOut(_ request: [String: Any], channel: ControlChannel) throws -> [String: Any] {
        let name = try Self.name(request)
        guard let toText = request["to"] as? String, let to = Endpoint(toText) else {
            throw ControlError.remote("to must be IPv4-ADDRESS:PORT")
        }
        var migration = try migrationOptions(request)
        guard let vm = vms.withLock({ $0[name] }), vm.isRunning else { throw ControlError.remote("no running VM \(name) here") }
        guard busy.withLock({ $0.insert(name).inserted }) else { throw ControlError.remote("\(name) is already migrating") }
        defer { _ = busy.withLock { $0.remove(name) } }
        // The agent port is the migration's from here on; the latest background report goes with it.
        let kept = stopKeeping(name)
        if migration.mode == .enlightened, migration.useAgent { migration.keptHotReport = kept }
        var switched = false
        defer { if !switched, vm.isRunning { keepHotReport(name, vm) } }

        // Prepare the destination first: if it cannot start, nothing happens here.
        let peer = try ControlChannel.connect(to)
        try peer.authenticateAsClient(key: options.key)
        let session = UInt64.random(in: 1...UInt64.max)
        var spec = VMSpec(vm.config)
        spec.name = name
        let specObject = try JSONSerialization.jsonObject(with: JSONEncoder().encode(spec))
        try peer.send(["op": "incoming", "spec": specObject, "mode": migration.mode.rawValue,
                       "session": String(session), "verify": migration.verify, "agent": migration.useAgent,
                       "agent_timeout_ms": Int(migration.agentTimeoutMillis)])
        let prepared = try peer.receive(timeoutMillis: 120_000)
        guard let uri = prepared["migration_uri"] as? String, uri.hasPrefix("tcp:") else {
            throw ControlError.protocolViolation("incoming reply without a migration URI")
        }
        var engine: Endpoint?
        if let host = prepared["engine_host"] as? String, let port = prepared["engine_port"] as? Int,
           let endpoint = Endpoint("\(host):\(port)") { engine = endpoint }
        log("migrating \(name) to \(to) (\(migration.mode.rawValue)), QEMU stream \(uri)")

        let outcome: SourceOutcome
        do {
            // Progress lines go to the client while the migration runs; the result line ends the request.
            let client = channel
            outcome = try SourceSide.migrate(source: vm, mode: migration.mode, session: session, destinationURI: uri,
                                             engineEndpoint: engine, options: migration) { moved, total in
                try? client.send(["progress": ["bytes": Int(moved), "total": Int(total)]])
            }
        } catch {
            try? peer.send(["op": "abort"])
            if vm.isRunning, (try? vm.qmp.execute("query-status", timeout: .seconds(5)))?["status"]?.stringValue == "running" {
                throw ControlError.remote("migration of \(name) failed before the switch; it keeps running here: \(error)")
            }
            throw ControlError.remote("migration of \(name) failed: \(error)")
        }
        switched = true
        vms.withLock { _ = $0.removeValue(forKey: name) }
        let outcomeObject = try JSONSerialization.jsonObject(with: JSONEncoder().encode(outcome))
        try peer.send(["op": "finish", "source": outcomeObject])
        let finished = try peer.receive(timeoutMillis: 600_000)
        guard let result = finished["result"] else { throw ControlError.protocolViolation("finish reply without a result") }
        return ["result": result]
    }

    /// Destination role: start the VM here and receive it.
    private func incoming(_ request: [String: Any], channel: ControlChannel) throws -> [String: Any] {
        let spec = try Self.spec(request["spec"])
        let name = try Self.name(["name": spec.name])
        let migration = try migrationOptions(request)
        guard let sessionText = request["session"] as? String, let session = UInt64(sessionText) else {
            throw ControlError.protocolViolation("incoming without a session")
        }
        guard vms.withLock({ $0[name] == nil }) else { throw ControlError.remote("a VM named \(name) already runs here") }
        let destination = try DestinationSide(spec: spec, name: "\(options.instance)-\(name)", mode: migration.mode,
                                              session: session, bindHost: options.listen.host, options: migration)
        var reply: [String: Any] = ["migration_uri": destination.migrationURI]
        if let endpoint = destination.engineEndpoint {
            reply["engine_host"] = endpoint.host
            reply["engine_port"] = Int(endpoint.port)
        }
        try channel.send(reply)
        let next = try channel.receive(timeoutMillis: 3_600_000)
        guard next["op"] as? String == "finish", let sourceObject = next["source"],
              let sourceData = try? JSONSerialization.data(withJSONObject: sourceObject),
              let source = try? JSONDecoder().decode(SourceOutcome.self, from: sourceData)
        else {
            destination.abandon()
            throw ControlError.remote("the source abandoned the migration of \(name) before the switch")
        }
        let outcome = try destination.finish()
        let result = Migration.combine(source: source, destination: outcome, destinationSide: destination,
                                       options: migration)
        vms.withLock { $0[name] = destination.qemu }
        keepHotReport(name, destination.qemu)
        log("received \(name): downtime \(String(format: "%.1f", result.downtimeMillis)) ms, "
            + "\(result.mismatchedPages) mismatched pages, guest \(result.guestVerdict)")
        return ["result": try JSONSerialization.jsonObject(with: JSONEncoder().encode(result))]
    }
}
