// The destination's urgent channel: the fault thread's requests go out as page requests, and the pages
// that answer them come back on the same connection and are placed at once. It never waits behind the
// bulk push (a connection and a thread of its own, at raised priority).

import EpcopyProtocol
import Synchronization

final class FaultRequester: @unchecked Sendable {
    // SAFETY (@unchecked): built on the engine's thread, then run on one thread of its own.
    private let channel: PeerChannel
    private let requests: RequestQueue
    private let placer: PagePlacer
    private let counters: ReceiveCounters
    private let link: LinkSpec
    /// At most this many ranges per request (the protocol's bound).
    static let maxRangesPerRequest = 64

    init(channel: PeerChannel, requests: RequestQueue, placer: PagePlacer, counters: ReceiveCounters,
         link: LinkSpec) {
        self.channel = channel
        self.requests = requests
        self.placer = placer
        self.counters = counters
        self.link = link
    }

    /// Serves the urgent channel until `quitFD` is signalled or the source closes it.
    func run(quitFD: Int32) throws {
        JoinableThread.setCurrentNice(-10)
        let loop = try ChannelLoop(entries: 64)
        var running = true
        let queue = loop.sendQueue(fd: channel.descriptor.rawValue, kind: .urgent,
                                   shaper: LinkShaper(LinkSpec(delayNanos: link.delayNanos)))
        try loop.receive(on: channel, onMessage: { [placer, counters] message in
            guard case .pageData(let data) = message else {
                throw PeerError.unexpected("urgent channel: unexpected \(message.kind) from the source")
            }
            counters.bytes.add(UInt64(data.bytes.count), ordering: .relaxed)
            try data.bytes.withUnsafeBytes { raw in
                var offset = 0
                for run in data.runs.ranges {
                    // SAFETY: the decoder checked that the payload holds every run's pages, in order.
                    try placer.place(run: run, from: raw.baseAddress! + offset, urgent: true)
                    offset += Int(run.count << PageGeometry.shift)
                }
            }
        }, onClosed: { running = false })
        var nextRequestID: UInt64 = 1
        try loop.watch(fd: requests.event.descriptor.rawValue, tag: .requests) { [requests, placer] in
            let wanted = requests.take().filter { !placer.pages.isKnown($0) }
            guard !wanted.isEmpty else { return }
            let stamp = monotonicNanos()
            var batch = PageSet<PageIndex>()
            func flush() throws {
                let request = try PageRequest(requestID: nextRequestID, pages: batch)
                queue.enqueue(OutgoingFrame(bytes: PeerMessage.pageRequest(request).encodedFrame(checksum: fastChecksum)),
                              now: stamp)
                nextRequestID += 1
                batch = PageSet()
            }
            for range in PageSet<PageIndex>(pages: wanted).ranges {
                batch.insert(range)
                if batch.rangeCount == Self.maxRangesPerRequest { try flush() }
            }
            if !batch.isEmpty { try flush() }
        }
        try loop.watch(fd: quitFD, tag: .quit) { running = false }
        while running {
            try loop.turn(now: monotonicNanos(), maxWaitNanos: 100_000_000)
        }
    }
}

/// Bytes received from the source, counted by both receivers.
final class ReceiveCounters: Sendable {
    let bytes = Atomic<UInt64>(0)
}
