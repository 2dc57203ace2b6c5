// The source's urgent channel: page requests from the destination's faults come in, and the requested
// pages go straight back on the same connection. A page already claimed by the bulk push (or a hole) is
// not sent again — the `sent` bitmap makes every page go on the wire at most once per session — and each
// request points the push at the fault's neighbours (FaultHint).

import EpcopyProtocol
import Logging

final class FaultResponder: @unchecked Sendable {
    // SAFETY (@unchecked): built on the engine's thread, then run on one thread of its own; the shared
    // state (bitmap, hint, metrics) is Sendable.
    private let channel: PeerChannel
    private let sent: AtomicPageBitmap
    private let hint: FaultHint
    private let shaper: LinkShaper
    private let framer: PageFramer
    private let metrics: TransferMetrics

    init(channel: PeerChannel, sent: AtomicPageBitmap, hint: FaultHint, shaper: LinkShaper, framer: PageFramer,
         metrics: TransferMetrics) {
        self.channel = channel
        self.sent = sent
        self.hint = hint
        self.shaper = shaper
        self.framer = framer
        self.metrics = metrics
    }

    /// Serves requests until `stopFD` is signalled or the destination closes the channel.
    func run(stopFD: Int32) throws {
        JoinableThread.setCurrentNice(-10)
        let loop = try ChannelLoop(entries: 64)
        var running = true
        let queue = loop.sendQueue(fd: channel.descriptor.rawValue, kind: .urgent, shaper: shaper) { [metrics] frame in
            metrics.urgentPages.add(frame.pages, ordering: .relaxed)
            metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
        }
        try loop.receive(on: channel, onMessage: { [self] message in
            guard case .pageRequest(let request) = message else {
                throw PeerError.unexpected("urgent channel: unexpected \(message.kind)")
            }
            metrics.faults.add(1, ordering: .relaxed)
            Log.engine.trace("source: request \(request.pages)")
            if let first = request.pages.first { hint.publish(page: first.rawValue) }
            var runs: [PageRange<PageIndex>] = []
            for range in request.pages.ranges {
                sent.claim(start: range.lowerBound.rawValue, count: range.count) { s, n in
                    runs.append(try! PageRange(start: PageIndex(rawValue: s), count: n))
                }
            }
            // Pages already claimed went out on the bulk channel (or are holes): the destination gets
            // them from there; sending them twice is what the bitmap exists to prevent.
            let now = monotonicNanos()
            for frame in framer.frames(requestID: request.requestID, runs: runs, pushClass: nil) {
                queue.enqueue(frame, now: now)
            }
        }, onClosed: { running = false })
        try loop.watch(fd: stopFD, tag: .quit) { running = false }
        while running {
            try loop.turn(now: monotonicNanos(), maxWaitNanos: 100_000_000)
        }
    }
}
