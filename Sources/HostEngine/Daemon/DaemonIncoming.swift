// The daemon's destination role: start the VM here under the shim, tell the source where to send, then wait
// for the source's last word — finish (with what the source saw, to verify against) or abort — on the
// connection that prepared the migration or, if that one is lost, on a new one (ControlRejoin). A lost
// control connection never costs the VM: before the switch the destination waits for the source to come
// back or give up (the VM keeps running on the source meanwhile); once the guest runs here it stays here,
// and if the source never comes back the migration finishes here without the source's report.
// In enlightened mode the destination's QEMU outlives this daemon and the migration is on record
// (SessionStore) from the moment it is prepared: a restarted daemon adopts the QEMU and its userfaultfd,
// serves the source's engine again on the same port and waits for the source's last word as if the control
// connection had only been lost (`adoptIncomingMigrations`).

import EpcopyProtocol
import Foundation

extension Daemon {
    /// Destination role: start the VM here and receive it.
    func incoming(_ request: IncomingRequest, channel: ControlChannel) throws -> ControlReply {
        let spec = try Self.validSpec(request.spec)
        let name = try Self.validName(spec.name)
        let migration = try migrationOptions(request.options)
        guard vms.withLock({ $0[name] == nil }) else { throw ControlError.remote("a VM named \(name) already runs here") }
        let qemuName = "\(options.instance)-\(name)"
        try supersede(qemuName, by: request.session)
        let survival = DestinationSide.Survival(digestsFile: "/dev/shm/epcopy-\(qemuName).digests") { [self] succession in
            record(DestinationSessionRecord(vmName: name, options: request.options, succession: succession))
        }
        let destination = try DestinationSide(spec: spec, name: qemuName, mode: migration.mode,
                                              session: request.session, bindHost: options.listen.host,
                                              options: migration, deadlineSeconds: options.vmDeadlineSeconds,
                                              survival: survival)
        if let succession = destination.currentSuccession {
            record(DestinationSessionRecord(vmName: name, options: request.options, succession: succession))
        }
        let rejoin = ControlRejoin()
        remember(rejoin, session: request.session)
        do {
            try channel.send(ControlReply.prepared(migrationURI: destination.migrationURI,
                                                   engineHost: destination.engineEndpoint?.host,
                                                   enginePort: destination.engineEndpoint?.port))
        } catch {
            destination.abandon()
            forget(request.session, destination)
            rejoin.finish(.failure(.remote("the destination could not answer the source: \(error)")))
            throw error
        }
        return try receive(destination, name: name, session: request.session, migration: migration,
                           channel: channel, rejoin: rejoin)
    }

    /// Carries on every migration a previous daemon was receiving when it died (its QEMU outlived it); called once,
    /// before the daemon serves anyone. Returns the files those migrations still need.
    func adoptIncomingMigrations() -> Set<String> {
        let (records, complaints) = store.destinationRecords()
        for complaint in complaints { logger.error("\(complaint)") }
        var needed = Set<String>()
        for record in records {
            let config = record.succession.spec.config(name: record.succession.qemuName)
            needed.insert(config.ramFile)
            if let digests = record.succession.digestsFile { needed.insert(digests) }
            // Registered before anyone is served: the source's finish may be the first request to arrive.
            let rejoin = ControlRejoin()
            remember(rejoin, session: record.session)
            logger.warning("adopting the migration of \(record.vmName) (session \(record.session)) that a previous daemon was receiving: QEMU pid \(record.succession.qemuPid)")
            let thread = JoinableThread(name: "epcopy-adopt") { [self] in adopt(record, rejoin: rejoin) }
            _ = thread  // ends on its own
        }
        return needed
    }

    private func adopt(_ record: DestinationSessionRecord, rejoin: ControlRejoin) {
        let name = record.vmName
        do {
            let migration = try migrationOptions(record.options)
            let destination = try DestinationSide(adopting: record.succession, options: migration) { [self] succession in
                self.record(DestinationSessionRecord(vmName: name, options: record.options, succession: succession))
            }
            logger.info("adopted \(name): QEMU \(destination.qemu.pid) and its userfaultfd; serving the source's engine on \(destination.engineEndpoint.map { "\($0)" } ?? "?") again")
            _ = try receive(destination, name: name, session: record.session, migration: migration, channel: nil,
                            rejoin: rejoin)
        } catch {
            logger.error("could not carry on receiving \(name) (session \(record.session)): \(error)")
            rejoin.finish(.failure(.remote("the destination daemon restarted and could not carry on: \(error)")))
            store.remove(DestinationSessionRecord.self, session: record.session)
        }
    }

    /// From prepared to the end: waits for the source's last word (on `channel` while it lives; a side adopted
    /// after a restart has none and waits for a rejoin) and finishes, keeps or gives up the VM accordingly.
    /// A managed VM (a libvirt domain) is libvirt's to keep: it joins none of this daemon's VMs, and `amend`
    /// adds what libvirt says to the result.
    func receive(_ destination: DestinationSide, name: String, session: UInt64, migration: MigrationOptions,
                 channel: ControlChannel?, rejoin: ControlRejoin,
                 amend: (inout MigrationResult) -> Void = { _ in }) throws -> ControlReply {
        incomingSides.withLock { $0[session] = destination }
        defer { forget(session, destination) }
        let reconnectMillis = max(Int(migration.reconnectTimeoutMillis), 10_000)
        switch lastWord(from: channel, rejoin: rejoin, session: session, destination: destination,
                        reconnectMillis: reconnectMillis) {
        case .said(.finish(let source)):
            var result: MigrationResult
            do {
                let outcome = try destination.finish()
                result = Migration.combine(source: source, destination: outcome, destinationSide: destination,
                                           options: migration)
                amend(&result)
            } catch {
                rejoin.finish(.failure(.remote("\(error)")))
                throw error
            }
            keep(name, destination)
            rejoin.finish(.success(result))
            let downtime = String(format: "%.1f", result.downtimeMillis)
            logger.info("received \(name): downtime \(downtime) ms, \(result.mismatchedPages) mismatched pages, guest \(result.guestVerdict)")
            return .result(result)
        case .said(.abort), .silentBeforeSwitch:
            destination.abandon()
            let text = "the source abandoned the migration of \(name) before the switch"
            rejoin.finish(.failure(.remote(text)))
            throw ControlError.remote(text)
        case .silentAfterSwitch:
            // The guest runs here and every page is here: keep it. Its memory cannot be checked against the source
            // (its digests never came), so say so instead of claiming a verified migration.
            let text = "the source daemon never came back after the switch: \(name) runs here, its memory unverified"
            do { _ = try destination.finish() } catch {
                rejoin.finish(.failure(.remote("\(text); \(error)")))
                throw error
            }
            keep(name, destination)
            logger.warning("\(text)")
            rejoin.finish(.failure(.remote(text)))
            throw ControlError.remote(text)
        }
    }

    /// A new migration of a VM whose earlier one is still arriving here: an earlier one that never switched was
    /// given up by its source (which is starting over: before the switch the source decides), so it is called off
    /// now instead of at the end of its patience; one whose guest runs here is never given up.
    private func supersede(_ qemuName: String, by session: UInt64) throws {
        let earlier = incomingSides.withLock { $0.filter { $0.value.qemu.config.name == qemuName } }
        for (old, side) in earlier {
            guard !side.hasResumed else {
                throw ControlError.remote("an earlier migration of this VM (session \(old)) has switched and is still arriving here")
            }
            logger.warning("session \(old): superseded by session \(session) of the same VM before its switch; calling it off")
            _ = rejoins.withLock { $0[old] }?.deliver(.abort)
        }
        let deadline = monotonicNanos() + 30_000_000_000
        var gone = earlier.isEmpty
        while !gone, monotonicNanos() < deadline {
            usleep(50_000)
            gone = incomingSides.withLock { sides in !earlier.keys.contains { sides[$0] != nil } }
        }
        guard gone else { throw ControlError.remote("an earlier migration of this VM is still being torn down here") }
    }

    /// Writes a destination record; a failure costs only the ability to carry on after a restart.
    private func record(_ record: DestinationSessionRecord) {
        do { try store.save(record) } catch {
            logger.error("could not record the migration of \(record.vmName) in \(options.stateDirectory): \(error); if this daemon dies before it ends, it cannot be carried on")
        }
    }

    /// The migration is over here (received, kept or given up): nothing a restart would carry on.
    func forget(_ session: UInt64, _ destination: DestinationSide) {
        _ = incomingSides.withLock { $0.removeValue(forKey: session) }
        store.remove(DestinationSessionRecord.self, session: session)
        if let digests = destination.currentSuccession?.digestsFile { unlink(digests) }
    }

    /// A source that lost its control connection, asking again on a new one.
    func rejoined(_ session: UInt64, _ step: ControlRejoin.Step) throws -> ControlReply {
        guard let rejoin = rejoins.withLock({ $0[session] }) else {
            throw ControlError.remote("no migration with session \(session) here")
        }
        if !rejoin.deliver(step) { logger.info("session \(session): the source asked again; answering as before") }
        if case .abort = step { return .ok }
        // The finish runs on the incoming request's thread: the drain, the digests, the guest's verdict.
        guard let answer = rejoin.waitForAnswer(millis: 900_000) else {
            throw ControlError.remote("session \(session) did not finish within 15 minutes")
        }
        return .result(try answer.get())
    }

    enum LastWord {
        case said(ControlRejoin.Step)
        /// The control connection was lost, the source never came back, and the guest never ran here.
        case silentBeforeSwitch
        /// The control connection was lost and the source never came back, but the guest runs here.
        case silentAfterSwitch
    }

    /// Waits for the source's finish or abort. While the connection lives it is read for it; once it is lost,
    /// only a rejoin brings it. The source comes back when its side is done (after its own drain), so the wait
    /// runs `reconnectMillis` past whichever is later, the loss or the last page landing here; a guest that
    /// never ran here is given up `reconnectMillis` after the loss.
    func lastWord(from channel: ControlChannel?, rejoin: ControlRejoin, session: UInt64,
                  destination: any ArrivingGuest, reconnectMillis: Int) -> LastWord {
        var lostAt: UInt64? = channel == nil ? monotonicNanos() : nil
        var drainedAt: UInt64?
        let patience = UInt64(reconnectMillis) * 1_000_000
        while true {
            if let step = rejoin.waitForStep(millis: lostAt == nil ? 0 : 200) { return .said(step) }
            guard let lost = lostAt else {
                guard let channel else { lostAt = monotonicNanos(); continue }
                do {
                    switch try channel.receiveRequest(timeoutMillis: 500) {
                    case .finish(let source): rejoin.deliver(.finish(source))
                    case .abort: rejoin.deliver(.abort)
                    case let other:
                        try? channel.send(ControlReply.error("\(other.name) in the middle of a migration: expected finish or abort"))
                    }
                } catch ControlError.timedOut {
                } catch ControlError.protocolViolation(let text) {
                    try? channel.send(ControlReply.error("not a request: \(text)"))
                } catch {
                    lostAt = monotonicNanos()
                    logger.warning("session \(session): the control connection to the source was lost (\(error)); waiting for it to come back")
                }
                continue
            }
            let now = monotonicNanos()
            if !destination.isAlive { return destination.hasResumed ? .silentAfterSwitch : .silentBeforeSwitch }
            if destination.hasDrained, drainedAt == nil { drainedAt = now }
            if destination.hasResumed {
                if let drained = drainedAt, now > max(drained, lost) + patience { return .silentAfterSwitch }
            } else if now > lost + patience {
                return .silentBeforeSwitch
            }
        }
    }

    /// Registers a migration's rendezvous; forgets the oldest finished ones beyond the last 16.
    func remember(_ rejoin: ControlRejoin, session: UInt64) {
        rejoins.withLock { all in
            all[session] = rejoin
            if all.count > 16 {
                for (key, value) in all where value.isFinished && key != session && all.count > 16 { all[key] = nil }
            }
        }
    }

    /// The VM lives here now.
    private func keep(_ name: String, _ destination: DestinationSide) {
        guard !destination.qemu.managed else { return }
        vms.withLock { $0[name] = destination.qemu }
        recordVM(name, destination.qemu)
        keepHotReport(name, destination.qemu)
    }
}

/// What the destination daemon watches of a guest arriving here while it waits for the source's last word.
protocol ArrivingGuest {
    /// Its QEMU still runs here.
    var isAlive: Bool { get }
    /// It has run here (RESUME).
    var hasResumed: Bool { get }
    /// Every page is here.
    var hasDrained: Bool { get }
}

extension DestinationSide: ArrivingGuest {
    var isAlive: Bool { qemu.isRunning }
}
