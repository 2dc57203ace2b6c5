// The daemon's two roles for libvirt domains (`epcopy serve --libvirt URI`): the domain belongs to each host's
// libvirt daemon, before and after, and libvirt itself moves it — peer to peer, persistent on the destination,
// undefined on the source unless the operator keeps it — so that `virsh list`, `console`, `shutdown` and
// `dominfo` stay true on both hosts. The source daemon prepares the destination daemon (which answers where its
// libvirtd and QEMU's stream are reached), asks its libvirtd to migrate, switches a post-copy migration when it
// runs, and reports what its libvirt says of the domain afterwards; the destination daemon reads the guest's own
// verdict from the domain's serial log and libvirt's statistics of the completed job. `postcopy` and `precopy`
// are libvirt's own migrations (what an operator would run instead of epcopy); enlightened mode needs what
// `epcopy libvirt check` lists (refused here with its findings otherwise) and runs in DaemonLibvirtEnlightened.

import EpcopyProtocol
import Foundation
import Synchronization

extension Daemon {
    /// The libvirt daemon this daemon serves with.
    func libvirt() throws -> LibvirtConnection {
        guard let uri = options.libvirtURI else {
            throw ControlError.remote("this epcopy daemon serves no libvirt daemon: start it with --libvirt URI")
        }
        do { return try LibvirtConnection(uri: uri) } catch { throw ControlError.remote("\(error)") }
    }

    /// Source role: libvirt moves domain `request.name` to the host of the daemon at `request.to`.
    func migrateDomainOut(_ request: MigrateRequest, channel: ControlChannel) throws -> ControlReply {
        let name = try Self.validName(request.name)
        guard let to = Endpoint(request.to) else { throw ControlError.remote("to must be IPv4-ADDRESS:PORT") }
        let migration = try migrationOptions(request.options)
        guard request.alsoTo == nil else { throw ControlError.remote("alsoTo: not for libvirt domains (libvirt migrates over one path)") }
        let connection = try libvirt()
        let domain: LibvirtDomain
        do { domain = try connection.domain(name) } catch { throw ControlError.remote("\(error)") }
        guard domain.isActive else { throw ControlError.remote("the libvirt domain \(name) is not running here") }
        let xml: String
        let uuid: String
        do { (xml, uuid) = (try domain.liveXML(), try domain.uuid()) } catch { throw ControlError.remote("\(error)") }
        if migration.mode == .enlightened {
            let check = try DomainRequirements(memoryBackingDirectory: options.libvirtRAMPrefix,
                                               shimLibrary: options.preloadLibrary).check(xml: xml)
            let missing = check.items.filter { !$0.ok && $0.required }
            guard missing.isEmpty else {
                throw ControlError.remote("the libvirt domain \(name) cannot be migrated in enlightened mode: it lacks "
                    + missing.map { "\($0.name) (\($0.found))" }.joined(separator: "; ")
                    + ". `epcopy libvirt check \(name)` shows the XML for each, `epcopy libvirt prepare \(name)` adds it")
            }
        }
        guard busy.withLock({ $0.insert(name).inserted }) else { throw ControlError.remote("\(name) is already migrating") }
        defer { _ = busy.withLock { $0.remove(name) } }
        let cancel = MigrationCancel()
        cancels.withLock { $0[name] = cancel }
        defer { _ = cancels.withLock { $0.removeValue(forKey: name) } }

        let session = UInt64.random(in: 1...UInt64.max)
        let peer = PeerDaemonLink(try ControlChannel.connect(to, key: options.key), endpoint: to, key: options.key,
                                  session: session, reconnectMillis: Int(migration.reconnectTimeoutMillis), logger: logger)
        // The domain's own <numatune> node is where the destination puts its RAM, unless the operator named one.
        var incomingOptions = request.options
        if incomingOptions.numaNode == nil, let node = (try? DomainDevices(liveXML: xml))?.numaNode {
            incomingOptions.numaNode = "\(node)"
            logger.info("\(name): <numatune> asks for NUMA node \(node); the destination binds its RAM there")
        }
        let prepared = try peer.prepareDomain(IncomingDomainRequest(name: name, uuid: uuid, session: session,
                                                                    options: incomingOptions))
        if migration.mode == .enlightened {
            return try migrateDomainEnlightened(request, domain: domain, connection: connection, xml: xml, uuid: uuid,
                                                peer: peer, to: to, session: session, prepared: prepared,
                                                migration: migration, cancel: cancel, channel: channel)
        }
        let (libvirtURI, streamURI) = (prepared.libvirtURI, prepared.streamURI)
        let devices = try DomainDevices(liveXML: xml)
        let counterBefore = GuestVerdict.lastCounter(devices.readSerialLog())
        logger.info("libvirt migrates \(name) to \(libvirtURI) (\(migration.mode.rawValue)), QEMU stream \(streamURI)")

        // While libvirt migrates, two threads watch it (below); `stopWatching` ends them.
        let done = Atomic<Bool>(false)
        let lastStats = Mutex<LibvirtJobStats?>(nil)
        // When libvirt's domain here was first seen paused (the switch): libvirt reports no downtime for a
        // post-copy migration, so it is measured from the domain's states on both hosts, polled every 20 ms.
        let pausedAt = Mutex<Double?>(nil)
        let client = channel
        let started = monotonicNanos()
        // Progress and cancel: libvirt's job statistics (a query that may wait while libvirt's job holds QEMU's monitor).
        let watcher = JoinableThread(name: "epcopy-lvwatch") {
            while !done.load(ordering: .acquiring) {
                let stats = domain.jobStats(completed: false)
                if let stats { lastStats.withLock { $0 = stats } }
                if let stats, let total = stats.dataTotal {
                    try? client.send(ControlReply.progress(MigrationProgress(bytesMoved: stats.dataProcessed ?? 0, bytesTotal: total)))
                }
                if cancel.isRequested { _ = try? domain.abortJob() }
                usleep(250_000)
            }
        }
        // The switch (post-copy: as soon as QEMU's stream runs; asking earlier is refused, so ask until it is taken)
        // and the moment the domain stops here, from its state (which needs no job).
        let switcher = JoinableThread(name: "epcopy-lvswitch") { [migration, logger] in
            var switched = migration.mode != .postcopy
            var pastPointOfNoReturn = false
            while !done.load(ordering: .acquiring) {
                if !switched, !cancel.isRequested, pastPointOfNoReturn || cancel.beginSwitch() {
                    pastPointOfNoReturn = true
                    if (try? domain.startPostCopy()) != nil {
                        switched = true
                        logger.info("libvirt's migration of \(name) switched to post-copy after \((monotonicNanos() - started) / 1_000_000) ms")
                    }
                }
                if pausedAt.withLock({ $0 == nil }), (try? domain.state()) == "paused" {
                    let now = Date().timeIntervalSince1970
                    pausedAt.withLock { $0 = now }
                }
                usleep(20_000)
            }
        }
        func stopWatching() {
            done.store(true, ordering: .releasing)
            watcher.join()
            switcher.join()
        }
        let start = monotonicNanos()
        do {
            try domain.migrate(LibvirtMigrationRequest(destinationURI: libvirtURI, streamURI: streamURI,
                                                       postcopy: migration.mode == .postcopy,
                                                       keepSourceDefinition: request.keepSourceDefinition ?? false))
        } catch {
            stopWatching()
            peer.abort()
            let state = (try? domain.state()) ?? "unknown"
            throw ControlError.remote("libvirt's migration of \(name) failed (\(error)); libvirt says it is \(state) here")
        }
        let end = monotonicNanos()
        let completed = domain.jobStats(completed: true)
        stopWatching()
        let seen = completed ?? lastStats.withLock { $0 }
        var outcome = SourceOutcome(stopTimestamp: pausedAt.withLock { $0 } ?? 0, tReleaseMillis: Double(end - start) / 1e6,
                                    bytesWire: seen?.dataProcessed ?? seen?.memoryTransferred ?? 0,
                                    counterBefore: counterBefore, sourceDigests: nil)
        outcome.libvirtDowntimeMillis = completed?.downtimeMillis.map { Double($0) }
        outcome.postcopyRequests = seen?.postcopyRequests
        outcome.sourceState = connection.hasDomain(name) ? ((try? connection.domain(name).state()) ?? "unknown") : "absent"
        return .result(try peer.finish(outcome))
    }

    /// Destination role: libvirt brings the domain here; answer where, wait for the source's word, and check the guest.
    func incomingDomain(_ request: IncomingDomainRequest, channel: ControlChannel) throws -> ControlReply {
        let name = try Self.validName(request.name)
        let migration = try migrationOptions(request.options)
        let connection = try libvirt()
        if connection.hasDomain(name), let existing = try? connection.domain(name), existing.isActive {
            throw ControlError.remote("a libvirt domain named \(name) already runs here")
        }
        let version = try? connection.libvirtVersion()
        let host = options.listen.host
        let (libvirtURI, streamURI) = (options.libvirtMigrateURI ?? "qemu+tcp://\(host)/system", "tcp://\(host)")
        if migration.mode == .enlightened {
            return try incomingDomainEnlightened(request, connection: connection, libvirtURI: libvirtURI,
                                                 streamURI: streamURI, version: version, migration: migration,
                                                 channel: channel)
        }
        let rejoin = ControlRejoin()
        remember(rejoin, session: request.session)
        try channel.send(ControlReply.preparedDomain(libvirtURI: libvirtURI, streamURI: streamURI, enginePort: nil))
        let arriving = ArrivingDomain(connection: connection, name: name)
        // When the domain was first seen running here (see the source's pausedAt).
        let runningAt = Mutex<Double?>(nil)
        let watching = Atomic<Bool>(true)
        let resumeWatch = JoinableThread(name: "epcopy-lvresume") {
            while watching.load(ordering: .acquiring), runningAt.withLock({ $0 == nil }) {
                if arriving.hasResumed {
                    let now = Date().timeIntervalSince1970
                    runningAt.withLock { $0 = now }
                }
                usleep(20_000)
            }
        }
        defer {
            watching.store(false, ordering: .releasing)
            resumeWatch.join()
        }
        switch lastWord(from: channel, rejoin: rejoin, session: request.session, destination: arriving,
                        reconnectMillis: max(Int(migration.reconnectTimeoutMillis), 10_000)) {
        case .said(.finish(let source)):
            let result = domainResult(name, connection: connection, mode: migration.mode, source: source, version: version,
                                      runningAt: runningAt.withLock { $0 })
            rejoin.finish(.success(result))
            logger.info("received libvirt domain \(name): guest \(result.guestVerdict), libvirt says \(result.destinationState ?? "?")")
            return .result(result)
        case .said(.abort), .silentBeforeSwitch:
            let text = "the source abandoned the migration of \(name) before it ended"
            rejoin.finish(.failure(.remote(text)))
            throw ControlError.remote(text)
        case .silentAfterSwitch:
            let text = "the source daemon never came back: libvirt runs \(name) here, unverified"
            rejoin.finish(.failure(.remote(text)))
            throw ControlError.remote(text)
        }
    }

    /// What the destination's libvirt and the guest say after libvirt's migration.
    private func domainResult(_ name: String, connection: LibvirtConnection, mode: MigrationMode, source: SourceOutcome,
                              version: String?, runningAt: Double?) -> MigrationResult {
        let domain = try? connection.domain(name)
        let state = (try? domain?.state()) ?? "absent"
        let stats = domain?.jobStats(completed: true)
        let devices = (try? domain?.liveXML()).flatMap { try? DomainDevices(liveXML: $0) }
        let verdict = GuestVerdict.watch(log: { devices?.readSerialLog() ?? "" }, state: { "libvirt: \(state)" },
                                         before: source.counterBefore, settle: 2)
        var result = MigrationResult(
            mode: mode, downtimeMillis: measuredDowntime(destination: stats?.downtimeMillis, source: source.libvirtDowntimeMillis,
                                                         paused: source.stopTimestamp, running: runningAt),
            tReleaseMillis: source.tReleaseMillis,
            bytesWire: max(stats?.dataProcessed ?? stats?.memoryTransferred ?? 0, source.bytesWire), faults: stats?.postcopyRequests ?? source.postcopyRequests ?? 0, faultP50Micros: 0,
            faultP99Micros: 0, faultsBeforeResume: 0, pagesCompared: 0, mismatchedPages: 0, verification: "guest",
            guestVerdict: devices?.serialLog == nil ? "no serial log in the domain's XML" : verdict.verdict,
            guestCounterBefore: source.counterBefore, guestCounterAfter: verdict.counterAfter, enlightened: nil,
            pagesByClass: nil, pagesSkippedFree: nil, agentReportMillis: nil, agentReportAgeMillis: nil,
            freeScanMillis: nil, pagesReportedFree: nil, agentNotes: nil, stopUnixSeconds: nil, resumeUnixSeconds: nil)
        result.stopUnixSeconds = source.stopTimestamp > 0 ? source.stopTimestamp : nil
        result.resumeUnixSeconds = runningAt
        result.libvirtVersion = version
        result.sourceState = source.sourceState
        result.destinationState = state
        return result
    }
}

/// The guest's downtime in libvirt's own modes: the destination libvirt's figure, else the source's, else the time
/// between the source seeing the domain paused and the destination seeing it run (polled, ±20 ms). A zero from libvirt
/// means it did not measure (seen in post-copy on the destination), not that the guest never stopped, so it is skipped.
private func measuredDowntime(destination: UInt64?, source: Double?, paused: Double, running: Double?) -> Double {
    if let destination, destination > 0 { return Double(destination) }
    if let source, source > 0 { return source }
    guard paused > 0, let running, running >= paused else { return 0 }
    return (running - paused) * 1000
}

/// A libvirt domain on its way here, as the destination daemon sees it through its libvirt.
private struct ArrivingDomain: ArrivingGuest {
    let connection: LibvirtConnection
    let name: String
    /// libvirt owns the QEMU: it is never this daemon's to lose.
    var isAlive: Bool { true }
    var hasResumed: Bool { (try? connection.domain(name).state()) == "running" }
    /// libvirt's migration moves RAM and device state together: once the domain runs here with no job left, all is here.
    var hasDrained: Bool { hasResumed && ((try? connection.domain(name))?.jobStats(completed: false) == nil) }
}
