// Emulated links on loopback. This kernel has no netem, so bandwidth and delay are imposed in user
// space by the sender: a frame is handed to the socket only when it would have arrived over a link of
// the given rate and one-way delay. One shaper per direction is shared by all channels of a session,
// so urgent frames queue behind bulk frames on the wire exactly as on a real FIFO link.

import Synchronization

public struct LinkSpec: Sendable, Equatable, CustomStringConvertible {
    /// Bytes per second; nil means unshaped.
    public var bytesPerSecond: UInt64?
    /// One-way delay in nanoseconds (half the RTT).
    public var delayNanos: UInt64

    public init(bytesPerSecond: UInt64? = nil, delayNanos: UInt64 = 0) {
        self.bytesPerSecond = bytesPerSecond
        self.delayNanos = delayNanos
    }

    public static let unshaped = LinkSpec()
    public var isShaped: Bool { bytesPerSecond != nil || delayNanos > 0 }

    /// Parses "1gbit", "10gbit", "500mbit", "100mbit" (bits per second, as tc writes them).
    public static func parseRate(_ text: String) -> UInt64? {
        let lower = text.lowercased()
        let units: [(String, UInt64)] = [("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000), ("bit", 1)]
        for (suffix, scale) in units where lower.hasSuffix(suffix) {
            guard let value = Double(lower.dropLast(suffix.count)), value.isFinite, value > 0 else { return nil }
            let bytes = value * Double(scale) / 8
            guard bytes >= 1, bytes < 1e18 else { return nil }
            return UInt64(bytes)
        }
        return nil
    }

    /// Parses "0", "2ms", "500us", "1s".
    public static func parseDuration(_ text: String) -> UInt64? {
        let lower = text.lowercased()
        let units: [(String, Double)] = [("ms", 1e6), ("us", 1e3), ("ns", 1), ("s", 1e9)]
        if lower == "0" { return 0 }
        for (suffix, scale) in units where lower.hasSuffix(suffix) {
            guard let value = Double(lower.dropLast(suffix.count)), value.isFinite, value >= 0 else { return nil }
            let nanos = value * scale
            guard nanos < 1e15 else { return nil }  // 11 days: anything longer is a typo
            return UInt64(nanos)
        }
        return nil
    }

    public var description: String {
        let rate = bytesPerSecond.map { "\(Double($0) * 8 / 1e9) Gbit/s" } ?? "unlimited"
        return "rate \(rate), one-way delay \(Double(delayNanos) / 1e6) ms"
    }
}

public final class LinkShaper: Sendable {
    public let spec: LinkSpec
    private let linkFreeAt = Mutex<UInt64>(0)

    public init(_ spec: LinkSpec) { self.spec = spec }

    /// The time (monotonic ns) at which a frame of `bytes` entering the link at `now` has fully
    /// arrived at the far end: it waits for the frames ahead of it, takes bytes/rate to serialise,
    /// and then the one-way delay.
    ///
    /// `sparse` frames (fault requests and replies, acknowledgements) are served the way a flow-queueing
    /// qdisc (fq_codel, the Linux default) serves a sparse flow: ahead of the bulk backlog, which they
    /// push back by their own serialisation time. A plain FIFO would make every fault wait for megabytes
    /// of queued bulk pages, which is not what a real link with separate TCP connections does.
    public func arrival(bytes: Int, now: UInt64, sparse: Bool = false) -> UInt64 {
        guard let rate = spec.bytesPerSecond else { return now + spec.delayNanos }
        let serialise = UInt64(bytes) * 1_000_000_000 / max(rate, 1)
        let finish = linkFreeAt.withLock { free -> UInt64 in
            if sparse {
                free = max(now, free) + serialise
                return now + serialise
            }
            let start = max(now, free)
            free = start + serialise
            return free
        }
        return finish + spec.delayNanos
    }
}
