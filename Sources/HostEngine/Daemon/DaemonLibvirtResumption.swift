// What a restarted source daemon does with an enlightened migration of a libvirt domain that its predecessor was
// sending. The domain's QEMU is libvirt's, and libvirt's own migration call (made by the dead daemon) runs on in
// libvirtd without it: the destination QEMU's device-state load may wait on a page that only a source engine can
// send, so libvirt's job cannot end until an engine serves again. The successor therefore:
//   1. waits until the RAM is final — libvirt has paused the domain here (STOP) or it is gone — and takes the push
//      up from the held RAM file at once, faults first, punching nothing; or, when libvirt runs the domain here
//      again with no job (its migration failed), calls the destination off and sends nothing;
//   2. meanwhile watches libvirt until its job ends: the domain gone or shut off here means the destination runs it,
//      and the engine may punch; running here means libvirt took it back (its RAM is whole: nothing was punched),
//      and the destination is called off.
// x-ignore-shared goes off again in a QEMU that libvirt keeps, so its own later migrations carry the RAM.

import EpcopyProtocol
import Foundation

extension Daemon {
    /// Where libvirt has a domain whose migration a previous daemon was sending.
    enum LibvirtOutcome: Equatable, Sendable {
        /// Gone from this host ("absent") or "shut off" here, no job: the destination has it.
        case moved(sourceState: String)
        /// Paused here (the switch: the RAM is final), libvirt's job still running.
        case paused
        /// Running here, no job: libvirt's migration did not complete and the domain stayed.
        case keptHere
        /// libvirt did not say within the wait (the reason).
        case unsettled(String)
    }

    /// Polls libvirt here (every 200 ms, up to `seconds`) until it says `moved` or `keptHere` — or, with
    /// `orPaused`, also `paused`.
    func libvirtOutcome(of record: SourceSessionRecord, orPaused: Bool, seconds: Double = 300) -> LibvirtOutcome {
        guard let uri = options.libvirtURI else {
            return .unsettled("this daemon serves no libvirt daemon (start it with serve --libvirt URI, as its predecessor)")
        }
        let deadline = monotonicNanos() + UInt64(seconds * 1e9)
        var connection: LibvirtConnection?
        var last = "no answer from libvirt at \(uri)"
        while monotonicNanos() < deadline {
            if connection == nil { connection = try? LibvirtConnection(uri: uri) }
            if let connection {
                guard connection.hasDomain(record.vmName) else { return .moved(sourceState: "absent") }
                if let domain = try? connection.domain(record.vmName), let state = try? domain.state() {
                    let job = domain.hasActiveJob
                    last = "libvirt says \(state)\(job == true ? " with a job running" : "")"
                    if job == false, state == "shut off" { return .moved(sourceState: state) }
                    if job == false, state == "running" { return .keptHere }
                    if orPaused, state == "paused" { return .paused }
                }
            }
            usleep(200_000)
        }
        return .unsettled("\(last) after \(Int(seconds)) s")
    }

    /// Takes up a libvirt domain's migration (see the file's header); the result `migrate --resume` hears.
    func resumeDomain(_ record: SourceSessionRecord) -> Result<MigrationResult, ControlError> {
        switch libvirtOutcome(of: record, orPaused: true) {
        case .keptHere:
            callOffKeptDomain(record)
            return .failure(.remote("libvirt kept \(record.vmName) running on this host (its migration did not complete): the destination was called off"))
        case .unsettled(let why):
            logger.error("the migration of the libvirt domain \(record.vmName) (session \(record.session)) is left as it is: \(why); its RAM stays at \(record.ramFile)")
            return .failure(.remote("libvirt did not settle the migration of \(record.vmName): \(why)"))
        case .moved, .paused:
            break
        }
        var record = record
        let sawStop = record.switched
        if !record.switched {
            // The previous daemon died before it saw STOP: T_release counts from now.
            record.stopTimestamp = Date().timeIntervalSince1970
            record.switched = true
        }
        logger.warning("\(record.vmName): its RAM here is final (libvirt has stopped or moved it; the previous daemon \(sawStop ? "had seen" : "died before") STOP): the destination gets every page it lacks from \(record.ramFile), nothing punched until libvirt's migration has ended")
        let settled = record
        let verdict = ResultSlot<LibvirtOutcome, MigrationError>()
        var watcher: JoinableThread?
        let result = resume(settled, holdPunching: true, engineStarted: { [self] engine in
            watcher = JoinableThread(name: "epcopy-lv-watch") { [self] in
                let outcome = libvirtOutcome(of: settled, orPaused: false)
                verdict.set(.success(outcome))
                if case .moved = outcome { engine.allowPunching() }
            }
        }, settle: { [self] in
            watcher?.join()
            switch (watcher == nil ? nil : try? verdict.get()) ?? .unsettled("libvirt was not asked") {
            case .moved(let state):
                return state
            case .keptHere:
                callOffKeptDomain(settled)
                throw ControlError.remote("libvirt kept \(record.vmName) running on this host (its migration did not complete): the destination was called off; nothing here was punched")
            case .paused, .unsettled:
                throw ControlError.remote("libvirt's migration of \(record.vmName) did not end: the pages went to the destination, the domain stays paused here")
            }
        })
        return result
    }

    /// libvirt kept the domain here: the destination gives its side up, the domain's QEMU carries its RAM in
    /// libvirt's later migrations again, and the held link to its RAM file goes.
    func callOffKeptDomain(_ record: SourceSessionRecord) {
        logger.warning("libvirt kept \(record.vmName) running here (its migration did not complete after the previous daemon died): calling the destination off")
        if let uuid = record.libvirtUUID {
            let requirements = DomainRequirements(memoryBackingDirectory: options.libvirtRAMPrefix, shimLibrary: options.preloadLibrary)
            do {
                let qmp = try QMPClient.connect(path: requirements.monitorSocket(uuid: uuid), timeout: .seconds(10))
                try QEMUMigration.setIgnoreShared(qmp, false)
            } catch {
                logger.error("\(record.vmName): x-ignore-shared could not be turned off again (\(error)); libvirt's own migrations of it would be refused by their destination until it is restarted")
            }
        }
        unlink(record.ramFile)
        if let peer = Endpoint(record.destinationDaemon) {
            PeerDaemonLink(nil, endpoint: peer, key: options.key, session: record.session, reconnectMillis: 10_000,
                           logger: logger).abort()
        }
    }
}
