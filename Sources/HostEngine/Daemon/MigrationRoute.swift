// Where a migration this daemon sends reaches its destination — the peer daemon, and the destination engine at
// that host's engine port — and the one way to change it: an operator who knows the destination host by another
// address (a second network path) redirects a switched migration there by hand (`epcopy migrate NAME --resume
// --to ADDR`). The destination engine listens on every address of its host, so only the host part changes; the
// source engine stops retrying the old address at once and the control link's last word goes to the new one.

import EpcopyProtocol
import Synchronization

final class MigrationRoute: Sendable {
    let peer: PeerDaemonLink
    /// The destination engine's port (the same on each of its host's addresses).
    let enginePort: UInt16
    private let state = Mutex<(engine: SourceEngine?, host: String?)>((nil, nil))

    init(peer: PeerDaemonLink, enginePort: UInt16) {
        self.peer = peer
        self.enginePort = enginePort
    }

    /// The source engine of the push, once it exists; a redirect asked for earlier applies to it at once.
    func attach(_ engine: SourceEngine) {
        state.withLock { s in
            s.engine = engine
            if let host = s.host { engine.redirect(to: Endpoint(host: host, port: enginePort)) }
        }
    }

    /// The destination daemon is at `daemon` from now on; returns where the engine is reached.
    @discardableResult
    func redirect(to daemon: Endpoint) -> Endpoint {
        let engine = Endpoint(host: daemon.host, port: enginePort)
        state.withLock { s in
            s.host = daemon.host
            s.engine?.redirect(to: engine)
        }
        peer.redirect(to: daemon)
        return engine
    }
}
