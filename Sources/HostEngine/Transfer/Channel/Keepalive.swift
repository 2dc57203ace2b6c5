// How a session notices that its link is gone when nothing fails. A reset or a closed socket reports
// itself; a black hole (a cable pulled, a link down, a firewall dropping packets) does not: sends still
// complete into the socket buffer and receives just never arrive. So each side says `keepalive` on its
// control channel every interval, and a peer that has been silent for longer than the timeout ends the
// session as a lost link (`PeerError.silent`), which the engines treat like a reset: reconnect and resume.
// LinkStatus is what the rest of epcopy (a progress bar, a test) sees of that: losses, and down since when.

import EpcopyProtocol
import Synchronization

/// How often to speak and how much silence means the link is lost.
public struct KeepaliveSpec: Sendable, Equatable {
    /// A keepalive goes out at least this often.
    public var intervalMillis: UInt64
    /// The peer silent for this long is a lost link; 0 never decides so (silence only waits).
    public var timeoutMillis: UInt64

    public init(intervalMillis: UInt64 = 250, timeoutMillis: UInt64 = 2000) {
        self.intervalMillis = max(intervalMillis, 10)
        self.timeoutMillis = timeoutMillis
    }

    /// 250 ms keepalives, a lost link after 2 s of silence.
    public static let standard = KeepaliveSpec()
}

/// One session's keepalive, driven from the loop that owns the control channel.
final class Keepalive {
    private let spec: KeepaliveSpec
    private let stream: MessageStream
    private var lastSent: UInt64 = 0

    /// `stream` is the control channel's receive stream.
    init(_ spec: KeepaliveSpec, stream: MessageStream) {
        self.spec = spec
        self.stream = stream
    }

    /// True when a keepalive is due now (and records it as sent).
    func due(now: UInt64) -> Bool {
        guard now &- lastSent >= spec.intervalMillis * 1_000_000 else { return false }
        lastSent = now
        return true
    }

    /// Throws `.silent` if the peer, having spoken in this session, has said nothing for the timeout.
    /// Silence counts only after the peer's first bytes: before the switch a source is connected but
    /// waits for its VM to stop, and that wait is not a lost link.
    func check(now: UInt64, _ step: String) throws(PeerError) {
        guard spec.timeoutMillis > 0, stream.bytesReceived > 0 else { return }
        let heard = stream.lastReceivedNanos
        guard now > heard else { return }
        let silence = now - heard
        if silence > spec.timeoutMillis * 1_000_000 { throw .silent(step, seconds: Double(silence) / 1e9) }
    }
}

/// A session's link as progress displays and tests see it, updated by the engine that owns the session.
public final class LinkStatus: Sendable {
    private let lostAt = Atomic<UInt64>(0)
    private let lossCount = Atomic<Int>(0)

    public init() {}

    /// Sessions lost so far (each one resumed, or still being recovered).
    public var losses: Int { lossCount.load(ordering: .relaxed) }

    /// How long the link has been down, or nil while it is up.
    public var downFor: Duration? { downSince.map { .nanoseconds(Int64(monotonicNanos() &- $0)) } }

    /// Since when (monotonic nanoseconds) the link is down, or nil while it is up.
    public var downSince: UInt64? {
        let since = lostAt.load(ordering: .acquiring)
        return since == 0 ? nil : since
    }

    func lost(at time: UInt64) {
        lossCount.add(1, ordering: .relaxed)
        lostAt.store(max(time, 1), ordering: .releasing)
    }

    func resumed() { lostAt.store(0, ordering: .releasing) }
}
