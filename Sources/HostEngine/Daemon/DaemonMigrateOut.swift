// The daemon's source role: `migrate` moves one of its VMs to the daemon at another host — prepare the peer,
// put the migration on record (SessionStore) so a successor can finish or call it off, keep the route to the
// destination's addresses current, run SourceSide, and hand the outcome to the peer's finish. Also
// `migrate --resume --to` (redirect) for a migration already under way.

import EpcopyProtocol
import Foundation

extension Daemon {
    /// Source role: move VM `name` to the daemon at `to`. `migrate NAME --resume` elsewhere hears the same result.
    func migrateOut(_ request: MigrateRequest, channel: ControlChannel) throws -> ControlReply {
        let name = try Self.validName(request.name)
        guard let to = Endpoint(request.to) else { throw ControlError.remote("to must be IPv4-ADDRESS:PORT") }
        let migration = try migrationOptions(request.options)
        let paths = try Self.paths(to, alsoTo: request.alsoTo, mode: migration.mode)
        guard let vm = vms.withLock({ $0[name] }), vm.isRunning else { throw ControlError.remote("no running VM \(name) here") }
        guard busy.withLock({ $0.insert(name).inserted }) else { throw ControlError.remote("\(name) is already migrating") }
        defer { _ = busy.withLock { $0.remove(name) } }
        let watcher = ControlRejoin()
        resumptions.withLock { $0[name] = watcher }
        do {
            let reply = try send(vm, name: name, to: paths, request: request, migration: migration, channel: channel)
            if case .result(let result) = reply { watcher.finish(.success(result)) }
            return reply
        } catch {
            watcher.finish(.failure(error as? ControlError ?? .remote("\(error)")))
            throw error
        }
    }

    /// `paths`: the destination daemon's address, then its others.
    func send(_ vm: QEMUProcess, name: String, to paths: [Endpoint], request: MigrateRequest,
                      migration: MigrationOptions, channel: ControlChannel) throws -> ControlReply {
        let to = paths[0]
        var migration = migration
        let cancel = MigrationCancel()
        cancels.withLock { $0[name] = cancel }
        defer { _ = cancels.withLock { $0.removeValue(forKey: name) } }
        // The agent port is the migration's from here on; the latest background report goes with it.
        let kept = stopKeeping(name)
        if migration.mode == .enlightened, migration.useAgent { migration.keptHotReport = kept }
        var switched = false
        defer { if !switched, vm.isRunning { keepHotReport(name, vm) } }

        // Prepare the destination first: if it cannot start, nothing happens here.
        let session = UInt64.random(in: 1...UInt64.max)
        let peer = PeerDaemonLink(try ControlChannel.connect(to, key: options.key), endpoint: to, key: options.key,
                                  session: session, reconnectMillis: Int(migration.reconnectTimeoutMillis), logger: logger)
        var spec = VMSpec(vm.config)
        spec.name = name
        let (uri, engine) = try peer.prepare(IncomingRequest(spec: spec, session: session, options: request.options))
        logger.info("migrating \(name) to \(to) (\(migration.mode.rawValue)), QEMU stream \(uri)")
        // On record from here: if this daemon dies before the switch, its successor calls the destination off
        // (the VM, taken back, runs here); after it, the successor finishes the push.
        let switchRecord = engine.map {
            var record = SourceSessionRecord(session: session, vmName: name, ramFile: vm.config.ramFile,
                                             regionPages: vm.config.regionPages, engine: "\($0)", destinationDaemon: "\(to)",
                                             options: request.options, stopTimestamp: 0, counterBefore: nil)
            record.alsoTo = request.alsoTo
            return record
        }
        if let switchRecord { record(switchRecord) }
        let route = engine.map { makeRoute(peer, enginePort: $0.port, paths: paths, options: request.options) }
        if let route { routes.withLock { $0[name] = route } }
        defer {
            route?.stop()
            if route != nil { _ = routes.withLock { $0.removeValue(forKey: name) } }
        }

        let outcome: SourceOutcome
        do {
            // Progress lines go to the client while the migration runs; the result line ends the request.
            let client = channel
            outcome = try SourceSide.migrate(source: vm, mode: migration.mode, session: session, destinationURI: uri,
                                             engineEndpoint: engine, options: migration, cancel: cancel,
                                             progress: { progress in try? client.send(ControlReply.progress(progress)) },
                                             fenced: { [self] stop, counter in switchRecord.map { save(switched: $0, stop, counter) } },
                                             engineStarted: { route?.attach($0) })
        } catch MigrationError.cancelled {
            peer.abort()
            store.remove(SourceSessionRecord.self, session: session)
            throw ControlError.remote("the migration of \(name) was cancelled before the switch; it keeps running here")
        } catch {
            peer.abort()
            if vm.isRunning, vm.runState == "running" {
                store.remove(SourceSessionRecord.self, session: session)
                throw ControlError.remote("migration of \(name) failed before the switch; it keeps running here: \(error)")
            }
            // After the switch the record stays: the fenced RAM file holds what the destination lacks, and a
            // restarted daemon takes the push up again.
            throw ControlError.remote("migration of \(name) failed: \(error)")
        }
        switched = true
        vms.withLock { _ = $0.removeValue(forKey: name) }
        forgetVM(name)
        // Every page is at the destination: nothing left that a restart would have to finish.
        store.remove(SourceSessionRecord.self, session: session)
        return .result(try peer.finish(outcome))
    }

    /// `migrate NAME --resume --to ADDR`: the switched migration of `name` reaches its destination at `to` from now
    /// on (the same daemon's host by another address); the route puts it on record, for a successor of this daemon.
    func redirect(_ name: String, to text: String) throws -> ControlReply {
        guard let to = Endpoint(text) else { throw ControlError.remote("to must be IPv4-ADDRESS:PORT") }
        guard let route = routes.withLock({ $0[name] }) else {
            throw ControlError.remote("no migration of \(name) is under way here in enlightened mode")
        }
        guard let record = store.sourceRecords().records.first(where: { $0.session == route.peer.session }),
              record.switched else {
            throw ControlError.remote("the migration of \(name) has not switched: call it off (migrate \(name) --cancel) "
                + "and migrate it again to \(to)")
        }
        let engine = route.redirect(to: to)
        logger.warning("the migration of \(name) is redirected by hand: its destination is reached at \(to) (engine \(engine)) from now on")
        return .ok
    }

    /// The destination daemon's addresses for a migration: `to`, then the others it was given (`--also-to`).
    static func paths(_ to: Endpoint, alsoTo: [String]?, mode: MigrationMode) throws -> [Endpoint] {
        let others = alsoTo ?? []
        guard !others.isEmpty else { return [to] }
        guard mode == .enlightened else {
            throw ControlError.remote("alsoTo needs enlightened mode: QEMU's own migration stream has one address")
        }
        guard others.count <= 8 else { throw ControlError.remote("alsoTo: at most 8 other addresses") }
        var paths = [to]
        for text in others {
            guard let other = Endpoint(text) else { throw ControlError.remote("alsoTo: \(text) is not IPv4-ADDRESS:PORT") }
            guard !paths.contains(other) else { throw ControlError.remote("alsoTo: \(text) is given twice (or is to)") }
            paths.append(other)
        }
        return paths
    }

    /// The route of a migration this daemon sends; each move it makes goes on the migration's record.
    func makeRoute(_ peer: PeerDaemonLink, enginePort: UInt16, paths: [Endpoint],
               options request: MigrationRequestOptions) -> MigrationRoute {
        let session = peer.session
        return MigrationRoute(peer: peer, enginePort: enginePort, paths: paths,
                              failoverMillis: request.failoverAfterMillis ?? 2_000, logger: logger) { [self] daemon, engine, others in
            guard var record = store.sourceRecords().records.first(where: { $0.session == session }) else { return }
            record.engine = "\(engine)"
            record.destinationDaemon = "\(daemon)"
            record.alsoTo = others.isEmpty ? nil : others.map { "\($0)" }
            self.record(record)
        }
    }

    /// The switch happened: from here a crash of this daemon must not lose the VM, so the migration is on disk.
    func save(switched record: SourceSessionRecord, _ stop: Double, _ counter: Int?) {
        // As on record: the route may have moved to another address of the destination since prepare.
        var record = store.sourceRecords().records.first(where: { $0.session == record.session }) ?? record
        record.stopTimestamp = stop
        record.counterBefore = counter
        record.switched = true
        self.record(record)
    }

    func record(_ record: SourceSessionRecord) {
        do { try store.save(record) } catch {
            logger.error("could not record the migration of \(record.vmName) in \(options.stateDirectory): \(error); if this daemon dies before the push ends, the migration cannot be resumed")
        }
    }
}
