// The daemon's two roles in an enlightened migration of a libvirt domain: libvirt's own migration (peer to peer,
// no post-copy) carries the domain's definition and device state, so libvirt's bookkeeping stays its own on
// both hosts, while the engines carry the RAM. The source daemon attaches to libvirt's QEMU through epcopy's
// monitor, holds its own link to the RAM file (libvirt deletes the file when it stops the fenced QEMU), sets
// x-ignore-shared, and lets SourceSide drive the switch with libvirt's call as the stream. The destination
// daemon listens for the shim's hand-over before the source calls libvirt; libvirt starts the incoming QEMU,
// whose shim hands its memory over, and DestinationSide attaches to it and sets x-ignore-shared there before
// libvirt's stream arrives (see docs/libvirt.md for why this order holds). Either way, a QEMU that stays
// with libvirt afterwards keeps x-ignore-shared off: libvirt's own migrations of it must carry its RAM.

import EpcopyProtocol
import Foundation

extension Daemon {
    /// Source role: moves libvirt's running domain `name` to the destination daemon behind `peer`, which has
    /// prepared its libvirt and engine (`prepared`).
    func migrateDomainEnlightened(_ request: MigrateRequest, domain: LibvirtDomain, connection: LibvirtConnection,
                                  xml: String, uuid: String, peer: PeerDaemonLink, to: Endpoint, session: UInt64,
                                  prepared: (libvirtURI: String, streamURI: String, enginePort: UInt16?),
                                  migration: MigrationOptions, cancel: MigrationCancel,
                                  channel: ControlChannel) throws -> ControlReply {
        let name = domain.name
        guard let enginePort = prepared.enginePort else {
            peer.abort()
            throw ControlError.protocolViolation("the destination daemon prepared \(name) without an engine port")
        }
        let heldRAM = "/dev/shm/epcopy-held-\(session).ram"
        let source: QEMUProcess
        do { source = try attachDomainSource(name: name, uuid: uuid, xml: xml, heldRAM: heldRAM) } catch {
            peer.abort()
            throw error
        }
        defer {
            source.teardown()
            unlink(heldRAM)
        }
        // On record from here, as for epcopy's own VMs (DaemonMigrateOut): a successor of this daemon calls a migration
        // that had not switched off, and takes one that had up from the held RAM file once libvirt says the domain
        // left (DaemonResumption).
        var switchRecord = SourceSessionRecord(session: session, vmName: name, ramFile: heldRAM,
                                               regionPages: source.config.regionPages, engine: "\(to.host):\(enginePort)",
                                               destinationDaemon: "\(to)", options: request.options, stopTimestamp: 0,
                                               counterBefore: nil)
        switchRecord.libvirtUUID = uuid
        record(switchRecord)
        defer { store.remove(SourceSessionRecord.self, session: session) }
        let request = LibvirtMigrationRequest(destinationURI: prepared.libvirtURI, streamURI: prepared.streamURI,
                                              postcopy: false, keepSourceDefinition: request.keepSourceDefinition ?? false)
        let stream = ManagedStream(name: "libvirt's migration of \(name)") { try domain.migrate(request) }
        logger.info("libvirt migrates \(name) to \(prepared.libvirtURI) (enlightened: device state by libvirt, RAM by the engines to \(to.host):\(enginePort))")
        var outcome: SourceOutcome
        do {
            let client = channel
            outcome = try SourceSide.migrate(source: source, mode: .enlightened, session: session, destinationURI: "",
                                             engineEndpoint: Endpoint(host: to.host, port: enginePort), options: migration,
                                             stream: stream, cancel: cancel,
                                             progress: { progress in try? client.send(ControlReply.progress(progress)) },
                                             fenced: { [self] stop, counter in save(switched: switchRecord, stop, counter) })
        } catch {
            peer.abort()
            let state = connection.hasDomain(name) ? ((try? connection.domain(name).state()) ?? "unknown") : "absent"
            if state != "absent", state != "shut off" { try? QEMUMigration.setIgnoreShared(source.qmp, false) }
            if case MigrationError.cancelled = error {
                throw ControlError.remote("the migration of \(name) was cancelled before the switch; libvirt says it is \(state) here")
            }
            throw ControlError.remote("the enlightened migration of \(name) failed (\(error)); libvirt says it is \(state) here")
        }
        outcome.sourceState = connection.hasDomain(name) ? ((try? connection.domain(name).state()) ?? "unknown") : "absent"
        return .result(try peer.finish(outcome))
    }

    /// libvirt's QEMU of the domain, attached through epcopy's monitor, with x-ignore-shared set and its RAM file
    /// linked at `heldRAM` (the engine and the digests read it there; it outlives libvirt's removal of the file).
    private func attachDomainSource(name: String, uuid: String, xml: String, heldRAM: String) throws -> QEMUProcess {
        let requirements = DomainRequirements(memoryBackingDirectory: options.libvirtRAMPrefix, shimLibrary: options.preloadLibrary)
        let devices = try DomainDevices(liveXML: xml)
        guard let ramBytes = devices.memoryBytes, ramBytes > 0 else {
            throw ControlError.remote("the live XML of \(name) gives no <memory> size")
        }
        let config = DomainQEMU.config(name: name, uuid: uuid, devices: devices, requirements: requirements,
                                       ramFile: heldRAM, ramBytes: ramBytes)
        let source: QEMUProcess
        do { source = try QEMUProcess.attach(managed: config, qemuPid: try DomainQEMU.pid(name: name), connectTimeout: .seconds(10)) }
        catch { throw ControlError.remote("epcopy's monitor of \(name) (\(config.qmpSocket)): \(error)") }
        do {
            let ramFile = try DomainQEMU.ramFile(source.qmp)
            unlink(heldRAM)
            guard link(ramFile, heldRAM) == 0 else {
                throw ControlError.remote("cannot hold the RAM file \(ramFile) at \(heldRAM): \(String(cString: strerror(errno))) (both must be on one tmpfs)")
            }
            var info = stat()
            guard stat(heldRAM, &info) == 0, UInt64(info.st_size) == ramBytes else {
                throw ControlError.remote("the RAM file \(ramFile) is \(info.st_size) bytes, the domain's memory \(ramBytes)")
            }
            return source
        } catch {
            source.teardown()
            unlink(heldRAM)
            throw error
        }
    }

    /// Destination role: listens for the shim's hand-over and the source engine, answers where, and receives the
    /// domain into the QEMU that libvirt starts for it.
    func incomingDomainEnlightened(_ request: IncomingDomainRequest, connection: LibvirtConnection, libvirtURI: String,
                                   streamURI: String, version: String?, migration: MigrationOptions,
                                   channel: ControlChannel) throws -> ControlReply {
        let name = try Self.validName(request.name)
        guard UUID(uuidString: request.uuid) != nil else { throw ControlError.remote("uuid: not a UUID") }
        let requirements = DomainRequirements(memoryBackingDirectory: options.libvirtRAMPrefix, shimLibrary: options.preloadLibrary)
        let handover: UffdHandoverListener
        let listener: Listener
        do {
            handover = try UffdHandoverListener(path: requirements.shimSocket(uuid: request.uuid))
            listener = try TCP.listen(on: Endpoint(host: DestinationSide.anyAddress, port: 0))
        } catch { throw ControlError.remote("cannot prepare for \(name): \(error)") }
        let uuid = request.uuid
        var incoming = ManagedIncoming(handover: handover, engineListener: listener) { pid, ramFile, length in
            let devices = try DomainDevices(liveXML: try connection.domain(name).liveXML())
            return DomainQEMU.config(name: name, uuid: uuid, devices: devices, requirements: requirements,
                                     ramFile: ramFile, ramBytes: length)
        }
        let rejoin = ControlRejoin()
        remember(rejoin, session: request.session)
        // libvirt's migration may fail before it starts a QEMU here: the source's abort ends the wait.
        incoming.abandonIf = {
            guard let step = try? channel.receiveRequest(timeoutMillis: 1) else { return false }
            if case .abort = step {
                rejoin.deliver(.abort)
                return true
            }
            return false
        }
        try channel.send(ControlReply.preparedDomain(libvirtURI: libvirtURI, streamURI: streamURI,
                                                     enginePort: incoming.enginePort))
        let destination: DestinationSide
        do { destination = try DestinationSide(managed: incoming, session: request.session, options: migration) } catch {
            rejoin.finish(.failure(.remote("\(error)")))
            throw ControlError.remote("\(error)")
        }
        return try receiveDomain(destination, name: name, session: request.session, migration: migration,
                                 channel: channel, rejoin: rejoin, connection: connection, version: version)
    }

    /// From the QEMU's hand-over to the end: receives the domain, then its vCPUs run
    /// where its RAM now is and its definition says so; the QEMU that libvirt keeps gets x-ignore-shared off again.
    func receiveDomain(_ destination: DestinationSide, name: String, session: UInt64, migration: MigrationOptions,
                       channel: ControlChannel?, rejoin: ControlRejoin, connection: LibvirtConnection,
                       version: String?) throws -> ControlReply {
        defer {
            // The domain stays with libvirt: its later migrations by libvirt must carry its RAM.
            if destination.qemu.isRunning { try? QEMUMigration.setIgnoreShared(destination.qemu.qmp, false) }
            destination.qemu.teardown()
        }
        return try receive(destination, name: name, session: session, migration: migration, channel: channel,
                           rejoin: rejoin) { result in
            let domain = try? connection.domain(name)
            // The vCPUs run where the RAM now is, and the domain's definition says so (<vcpupin>, <numatune>).
            if let numa = destination.numa, let domain {
                do {
                    let count = try domain.pinVCPUs(to: numa.cpus)
                    logger.info("\(name): \(count) vCPUs pinned to the CPUs of NUMA node \(numa.node) (<vcpupin>)")
                } catch { logger.warning("\(name): vCPUs not pinned to NUMA node \(numa.node): \(error)") }
                do {
                    try domain.preferNumaNode(numa.node)
                    logger.info("\(name): its definition keeps its RAM on NUMA node \(numa.node) (<numatune>)")
                } catch { logger.warning("\(name): <numatune> not written: \(error)") }
            }
            result.libvirtVersion = version
            result.destinationState = (try? domain?.state()) ?? "absent"
        }
    }
}
