// Where a migration this daemon sends reaches its destination — the peer daemon, and the destination engine at
// that host's engine port — and the two ways that changes. The destination host may have several addresses (a
// second network path; its daemon listens on each, `serve --also-listen`, and its engine on all of them, so only
// the host part changes). Given them at migrate time (`--also-to`), the route goes round them by itself: when the
// engines' link has been down for the failover time on one address, the source engine and the control link's
// last word move to the next, and so on round, within the one reconnect deadline. An operator can also send a
// switched migration to an address by hand (`epcopy migrate NAME --resume --to ADDR`), which renews the deadline.
// Every move is put on record (`moved`), so that a successor of this daemon starts from where the route was.

import EpcopyProtocol
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

final class MigrationRoute: Sendable {
    let peer: PeerDaemonLink
    /// The destination engine's port (the same on each of its host's addresses).
    let enginePort: UInt16
    /// How long the link may be down on one address before the next is tried.
    private let failoverNanos: UInt64
    /// Called after every move with the daemon address now used and the others, for the record.
    private let moved: @Sendable (_ daemon: Endpoint, _ engine: Endpoint, _ others: [Endpoint]) -> Void
    private let logger: Logger

    private struct State: Sendable {
        var engine: SourceEngine?
        /// The destination daemon's addresses; `current` is the one in use.
        var paths: [Endpoint]
        var current = 0
        /// When the route last moved (monotonic): the failover time counts from the later of this and the loss.
        var movedAt: UInt64 = 0
        /// An operator's redirect asked for before the engine existed.
        var redirectedByHand = false
        var stopped = false
    }
    private let state: Mutex<State>
    private let watcher = Mutex<JoinableThread?>(nil)

    /// `paths`: the daemon's address the migration starts on, then its other addresses.
    init(peer: PeerDaemonLink, enginePort: UInt16, paths: [Endpoint], failoverMillis: Int, logger: Logger,
         moved: @escaping @Sendable (_ daemon: Endpoint, _ engine: Endpoint, _ others: [Endpoint]) -> Void) {
        precondition(!paths.isEmpty, "a route needs the destination daemon's address")
        self.peer = peer
        self.enginePort = enginePort
        failoverNanos = UInt64(max(failoverMillis, 100)) * 1_000_000
        self.logger = logger
        self.moved = moved
        state = Mutex(State(paths: paths))
    }

    /// The source engine of the push, once it exists; a redirect asked for earlier applies to it at once. With
    /// more than one address, a watcher moves the route when the link stays down (until `stop`).
    func attach(_ engine: SourceEngine) {
        let (many, byHand, current) = state.withLock { s in
            s.engine = engine
            return (s.paths.count > 1, s.redirectedByHand, s.paths[s.current])
        }
        if byHand { engine.redirect(to: engineEndpoint(current)) }
        guard many else { return }
        watcher.withLock { w in
            guard w == nil else { return }
            w = JoinableThread(name: "epcopy-route") { [self] in watch() }
        }
    }

    /// The migration is over (or given up): the watcher ends.
    func stop() {
        state.withLock { $0.stopped = true }
        let thread = watcher.withLock { w -> JoinableThread? in
            let t = w
            w = nil
            return t
        }
        thread?.join()
    }

    /// An operator's redirect: the destination daemon is at `daemon` from now on; returns where the engine is
    /// reached. The reconnect deadline starts again.
    @discardableResult
    func redirect(to daemon: Endpoint) -> Endpoint {
        let engine = state.withLock { s -> SourceEngine? in
            if let index = s.paths.firstIndex(of: daemon) { s.current = index } else {
                s.paths.append(daemon)
                s.current = s.paths.count - 1
            }
            s.movedAt = monotonicNanos()
            s.redirectedByHand = true
            return s.engine
        }
        engine?.redirect(to: engineEndpoint(daemon), renewingDeadline: true)
        return move(to: daemon)
    }

    private func engineEndpoint(_ daemon: Endpoint) -> Endpoint { Endpoint(host: daemon.host, port: enginePort) }

    /// Points the control link at `daemon` and records the move; returns the engine's endpoint there.
    private func move(to daemon: Endpoint) -> Endpoint {
        peer.redirect(to: daemon)
        let others = state.withLock { s in s.paths.filter { $0 != daemon } }
        let engine = engineEndpoint(daemon)
        moved(daemon, engine, others)
        return engine
    }

    /// Every 100 ms until `stop`: has the link been down on this address for the failover time?
    private func watch() {
        while !state.withLock({ $0.stopped }) {
            usleep(100_000)
            failOverIfDue()
        }
    }

    private func failOverIfDue() {
        let step = state.withLock { s -> (from: Endpoint, to: Endpoint, engine: SourceEngine, downNanos: UInt64)? in
            guard let engine = s.engine, s.paths.count > 1, let since = engine.link.downSince else { return nil }
            let now = monotonicNanos()  // read after `since`, so never before it
            guard now &- max(since, s.movedAt) >= failoverNanos else { return nil }
            let from = s.paths[s.current]
            s.current = (s.current + 1) % s.paths.count
            s.movedAt = now
            return (from, s.paths[s.current], engine, now &- since)
        }
        guard let step else { return }
        let seconds = String(format: "%.1f", Double(step.downNanos) / 1e9)
        logger.warning("the link to \(step.from) has been down for \(seconds) s: trying the destination's other address \(step.to)")
        step.engine.redirect(to: engineEndpoint(step.to), renewingDeadline: false)
        _ = move(to: step.to)
    }
}
