// The daemon after a restart: every migration it had switched and not finished (SessionStore) is taken up
// again on a thread of its own — the push from the fenced RAM file to the waiting destination engine
// (SourceResumption), then the finish to the destination daemon (PeerDaemonLink, on a new connection
// naming the session). `epcopy migrate NAME --resume` waits here for its result. A libvirt domain's migration
// is first settled by what libvirt says of the domain (DaemonLibvirtResumption), whether or not it had switched.

import EpcopyProtocol
import Foundation

extension Daemon {
    /// Takes up every recorded migration; called once, before the daemon serves anyone.
    func resumeSwitchedMigrations() {
        let (all, complaints) = store.sourceRecords()
        for complaint in complaints { logger.error("\(complaint)") }
        // A libvirt domain's migration is settled by what libvirt says of the domain, switched or not (see
        // DaemonLibvirtResumption); epcopy's own VMs by the record.
        let domains = all.filter { $0.libvirtUUID != nil }
        let own = all.filter { $0.libvirtUUID == nil }
        let records = own.filter(\.switched)
        let running = adoptVMs(fenced: Set(records.map(\.vmName)))
        let adopted = adoptIncomingMigrations()
        removeOrphanedRAMFiles(keeping: Set(records.map(\.ramFile)).union(adopted).union(running))
        for record in own where !record.switched { callOff(record) }
        for record in records + domains { takeUp(record) }
    }

    /// Takes the push of `record` up on a thread of its own; `migrate --resume` hears the result.
    private func takeUp(_ record: SourceSessionRecord) {
        let waiter = ControlRejoin()
        resumptions.withLock { $0[record.vmName] = waiter }
        if record.libvirtUUID == nil {
            logger.warning("taking up the migration of \(record.vmName) (session \(record.session)) that a previous daemon switched: the destination gets the rest from \(record.ramFile)")
        } else {
            logger.warning("taking up the migration of the libvirt domain \(record.vmName) (session \(record.session)) that a previous daemon was sending: waiting for libvirt to say where the domain is")
        }
        let thread = JoinableThread(name: "epcopy-resume") { [self] in
            defer { store.remove(SourceSessionRecord.self, session: record.session) }
            waiter.finish(record.libvirtUUID == nil ? resume(record) : resumeDomain(record))
        }
        _ = thread  // ends on its own; `migrate --resume` waits on `waiter`
    }

    /// A migration the previous daemon had prepared and not switched: the VM still runs here (taken back), so the
    /// destination is told to give its side up. Its own patience would do it too, but only after the reconnect
    /// deadline, holding a VM's worth of memory meanwhile. A VM that is not running here is left alone: the
    /// migration may have switched a moment before the previous daemon died.
    private func callOff(_ record: SourceSessionRecord) {
        store.remove(SourceSessionRecord.self, session: record.session)
        let running = vms.withLock { $0[record.vmName] }.map {
            $0.runState == "running"
        } ?? false
        guard running, let peer = Endpoint(record.destinationDaemon) else {
            logger.error("the migration of \(record.vmName) (session \(record.session)) that a previous daemon was sending had not switched as far as its record says, but the VM does not run here: it is left as it is")
            return
        }
        logger.warning("calling off the migration of \(record.vmName) (session \(record.session)) that a previous daemon had not switched: the VM keeps running here")
        let link = PeerDaemonLink(nil, endpoint: peer, key: options.key, session: record.session,
                                  reconnectMillis: 10_000, logger: logger)
        let thread = JoinableThread(name: "epcopy-calloff") { link.abort() }
        _ = thread  // ends on its own
    }

    /// RAM files (and digest tables) of this daemon's VMs that died with a previous daemon, except those a record
    /// or a VM taken back still needs: nothing else can use them, and each holds a guest's worth of host memory.
    private func removeOrphanedRAMFiles(keeping needed: Set<String>) {
        let prefix = "epcopy-\(options.instance)-"
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm") else { return }
        for name in names where name.hasPrefix(prefix) && (name.hasSuffix(".ram") || name.hasSuffix(".digests")) {
            let path = "/dev/shm/\(name)"
            guard !needed.contains(path) else { continue }
            if unlink(path) == 0 { logger.warning("removed \(path), left by a previous daemon whose VM died with it") }
        }
    }

    /// `holdPunching`: nothing is punched until the engine is allowed to (`engineStarted` gets it); `settle`, after
    /// the push, says what libvirt shows of the domain here, or throws when the destination must not be finished.
    func resume(_ record: SourceSessionRecord, holdPunching: Bool = false, engineStarted: ((SourceEngine) -> Void)? = nil,
                settle: (() throws -> String?)? = nil) -> Result<MigrationResult, ControlError> {
        do {
            let migration = try migrationOptions(record.options)
            guard let peer = Endpoint(record.destinationDaemon), let engine = Endpoint(record.engine) else {
                throw ControlError.remote("the record names no destination daemon or engine (\(record.destinationDaemon), \(record.engine))")
            }
            let link = PeerDaemonLink(nil, endpoint: peer, key: options.key, session: record.session,
                                      reconnectMillis: Int(migration.reconnectTimeoutMillis), logger: logger)
            let route = makeRoute(link, enginePort: engine.port,
                              paths: try Self.paths(peer, alsoTo: record.alsoTo, mode: migration.mode),
                              options: record.options)
            routes.withLock { $0[record.vmName] = route }
            defer {
                route.stop()
                _ = routes.withLock { $0.removeValue(forKey: record.vmName) }
            }
            var outcome = try SourceResumption.run(record, options: migration, holdPunching: holdPunching, engineStarted: {
                route.attach($0)
                engineStarted?($0)
            })
            outcome.sourceState = try settle?()
            let result = try link.finish(outcome)
            let downtime = String(format: "%.1f", result.downtimeMillis)
            logger.info("resumed migration of \(record.vmName) finished: downtime \(downtime) ms, \(result.mismatchedPages) mismatched pages, guest \(result.guestVerdict)")
            return .success(result)
        } catch {
            logger.error("resumed migration of \(record.vmName) failed: \(error)")
            return .failure(error as? ControlError ?? .remote("resumed migration of \(record.vmName): \(error)"))
        }
    }

    /// `migrate NAME --resume`: the result of a migration this daemon took up after a restart.
    func awaitResumed(_ name: String) throws -> ControlReply {
        guard let waiter = resumptions.withLock({ $0[name] }) else {
            throw ControlError.remote("no migration of \(name) was taken up here after a restart")
        }
        guard let answer = waiter.waitForAnswer(millis: 3_600_000) else {
            throw ControlError.remote("the resumed migration of \(name) did not end within an hour")
        }
        return .result(try answer.get())
    }
}
