// PeerDaemonLink: the source daemon's control link to the destination daemon for one migration. Requests go
// on the connection that prepared the migration; when that connection is lost (a reset, an outage longer
// than TCP's patience), the last word — finish with the source's outcome, or abort — goes again on a new
// connection that names the session, with backoff until the migration's reconnect deadline. The
// destination keeps the migration's answer (ControlRejoin), so asking again after a lost reply returns
// the same result and never runs the finish twice.

import EpcopyProtocol
import Foundation
import Logging
import Synchronization

final class PeerDaemonLink: @unchecked Sendable {
    // SAFETY (@unchecked): used by the one thread that runs the migration.
    private var channel: ControlChannel?
    /// The connection that prepared the migration, never changed: what `redirect` shuts from another thread.
    private let first: ControlChannel?
    /// Where the destination daemon is reached; `redirect` changes it from another thread.
    private let target: Mutex<Endpoint>
    /// Where `first` goes (the daemon's address at prepare).
    private let firstEndpoint: Endpoint
    private var endpoint: Endpoint { target.withLock { $0 } }
    private let key: [UInt8]
    let session: UInt64
    /// How long to keep trying to get a lost connection back.
    private let reconnectMillis: Int
    private let logger: Logger

    /// `channel` nil: a daemon restarted after the switch, which has only the new connections.
    init(_ channel: ControlChannel?, endpoint: Endpoint, key: [UInt8], session: UInt64, reconnectMillis: Int,
         logger: Logger) {
        self.channel = channel
        first = channel
        target = Mutex(endpoint)
        firstEndpoint = endpoint
        self.key = key
        self.session = session
        self.reconnectMillis = reconnectMillis
        self.logger = logger
    }

    /// Asks the destination to prepare; returns QEMU's migration URI there and the engine's endpoint
    /// (enlightened mode). Before the switch nothing is retried: a failure here leaves the VM where it runs.
    func prepare(_ request: IncomingRequest) throws -> (uri: String, engine: Endpoint?) {
        guard let channel else { throw ControlError.io("no connection to \(endpoint)") }
        try channel.send(ControlRequest.incoming(request))
        guard case .prepared(let uri, let engineHost, let enginePort) = try channel.receiveReply(timeoutMillis: 120_000),
              uri.hasPrefix("tcp:")
        else { throw ControlError.protocolViolation("incoming answered without a tcp: migration URI") }
        var engine: Endpoint?
        if let engineHost, let enginePort { engine = Endpoint("\(engineHost):\(enginePort)") }
        return (uri, engine)
    }

    /// Asks the destination to prepare for a libvirt domain; returns where the source's libvirtd migrates it and
    /// where QEMU's stream goes. Nothing is retried: a failure here leaves the domain where it runs.
    func prepareDomain(_ request: IncomingDomainRequest) throws -> (libvirtURI: String, streamURI: String, enginePort: UInt16?) {
        guard let channel else { throw ControlError.io("no connection to \(endpoint)") }
        try channel.send(ControlRequest.incomingDomain(request))
        guard case .preparedDomain(let libvirtURI, let streamURI, let enginePort) = try channel.receiveReply(timeoutMillis: 120_000),
              libvirtURI.hasPrefix("qemu+"), streamURI.hasPrefix("tcp://"), enginePort != 0
        else { throw ControlError.protocolViolation("incomingDomain answered without a qemu+ libvirt URI, a tcp:// stream and a valid engine port") }
        return (libvirtURI, streamURI, enginePort)
    }

    /// Tells the destination what the source saw after the switch; returns the migration's result.
    func finish(_ source: SourceOutcome) throws -> MigrationResult {
        let reply = try lastWord(.finish(source: source), again: .finishSession(session: session, source: source))
        guard case .result(let result) = reply else {
            throw ControlError.protocolViolation("finish answered without a result")
        }
        return result
    }

    /// Calls the migration off before the switch. Best effort: a destination that never hears it gives up by
    /// itself when the source does not come back.
    func abort() {
        do { _ = try lastWord(.abort, again: .abortSession(session: session), expectsReply: false) } catch {
            logger.warning("could not tell \(endpoint) that the migration is off: \(error)")
        }
    }

    /// The destination daemon is reached at `endpoint` from now on (its other address). The connection on the old
    /// path is given up — a last word waiting on it fails at once, as on a lost link — and the next goes there.
    func redirect(to endpoint: Endpoint) {
        target.withLock { $0 = endpoint }
        first?.shutDown()
    }

    /// `request` on the first connection; on a lost connection, `again` on new ones until the deadline.
    private func lastWord(_ request: ControlRequest, again: ControlRequest,
                          expectsReply: Bool = true) throws -> ControlReply {
        if let channel {
            do {
                try channel.send(request)
                return expectsReply ? try channel.receiveReply(timeoutMillis: 900_000) : .ok
            } catch let error as ControlError where error.isConnectionLoss {
                let to = endpoint == firstEndpoint ? "" : " to \(endpoint)"
                logger.warning("control link to \(firstEndpoint) lost (\(error)); asking again on a new connection\(to)")
                self.channel = nil
            }
        }
        let deadline = monotonicNanos() + UInt64(max(reconnectMillis, 1_000)) * 1_000_000
        var delayMillis: UInt32 = 50
        while true {
            do {
                let fresh = try ControlChannel.connect(endpoint, key: key)
                try fresh.send(again)
                let reply = try fresh.receiveReply(timeoutMillis: 900_000)
                logger.info("control link to \(endpoint) recovered")
                return reply
            } catch let error as ControlError where error.isConnectionLoss && monotonicNanos() < deadline {
                logger.debug("control link to \(endpoint) still down: \(error)")
                usleep(delayMillis * 1000)
                delayMillis = min(delayMillis * 2, 1000)
            }
        }
    }
}

extension ControlError {
    /// The connection failed, not the peer's judgement: worth asking again on a new one.
    var isConnectionLoss: Bool {
        switch self {
        case .io, .timedOut: true
        case .protocolViolation, .refused, .remote: false
        }
    }
}
