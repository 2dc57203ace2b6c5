// The destination's main loop, on the engine's calling thread: the bulk push comes in (BulkFrameReceiver),
// the source's control messages come in (zero ranges, done, abort), and acknowledgements, freed pages, the
// free-scan marker and finally `done` go out on the control channel. It ends when every page is present
// or zero and the last acknowledgement has left: that is what lets the source release its last page.

import EpcopyProtocol
import Logging

final class DestinationBulkLoop {
    private let control: PeerChannel
    private let bulk: PeerChannel
    private let placer: PagePlacer
    private let counters: ReceiveCounters
    private let link: LinkSpec
    private let keepalive: KeepaliveSpec
    private let timeline: Timeline
    /// The guest's free scan, once it is in: (agent answered, pages reported). Set from another thread; told to
    /// the source once per session (a session lost before it arrived must not leave the source waiting).
    private let freeScanDone: () -> (Bool, UInt64)?
    /// A failure of another destination thread, checked every turn.
    private let failure: () -> PeerError?
    /// Acknowledge at least this often, even if fewer than 4096 pages were placed.
    static let ackIntervalNanos: UInt64 = 5_000_000

    init(control: PeerChannel, bulk: PeerChannel, placer: PagePlacer, counters: ReceiveCounters, link: LinkSpec,
         keepalive: KeepaliveSpec, timeline: Timeline, freeScanDone: @escaping () -> (Bool, UInt64)?,
         failure: @escaping () -> PeerError?) {
        self.control = control
        self.bulk = bulk
        self.placer = placer
        self.counters = counters
        self.link = link
        self.keepalive = keepalive
        self.timeline = timeline
        self.freeScanDone = freeScanDone
        self.failure = failure
    }

    func run() throws {
        let loop = try ChannelLoop(entries: 64)
        let pages = placer.pages
        let metrics = placer.metrics
        let controlQueue = loop.sendQueue(fd: control.descriptor.rawValue, kind: .control,
                                          shaper: LinkShaper(LinkSpec(delayNanos: link.delayNanos)))
        var sourceDone = false
        var finished = false
        let receiver = BulkFrameReceiver(channel: bulk, loop: loop, placer: placer, counters: counters)
        let controlStream = try loop.receive(on: control, onMessage: { [placer] message in
            switch message {
            case .zeroPages(let set):
                let t0 = monotonicNanos()
                try placer.markZero(set)
                Log.engine.trace("destination: \(set.count) zero pages marked in \((monotonicNanos() - t0) / 1000) us")
            case .done:
                sourceDone = true
            case .keepalive:
                break
            case .abort(let a):
                throw PeerError.aborted(code: a.code, reason: a.reason)
            default:
                throw PeerError.unexpected("control channel: unexpected \(message.kind) from the source")
            }
        }, onClosed: {
            if !finished { throw PeerError.closed("control channel") }
        })
        loop.on(.bulkReceive) { completion in try receiver.complete(completion, mayClose: sourceDone) }
        try receiver.arm()
        var lastAck = monotonicNanos()
        var lastSample: UInt64 = 0
        var sentDone = false
        var sentScanDone = false
        let keepalive = Keepalive(keepalive, stream: controlStream)
        func send(_ message: PeerMessage, _ now: UInt64) {
            controlQueue.enqueue(OutgoingFrame(bytes: message.encodedFrame(checksum: fastChecksum)), now: now)
        }
        while true {
            let now = monotonicNanos()
            let ackDue = now - lastAck > Self.ackIntervalNanos
            let acks = placer.takeAcknowledgements(force: ackDue)
            if !acks.isEmpty {
                for chunk in acks.chunked(maxRanges: 4096) { send(.ack(chunk), now) }
                lastAck = now
            } else if ackDue { lastAck = now }
            // Read before the freed pages, so the marker never overtakes a freePages it stands for.
            let scanDone = sentScanDone ? nil : freeScanDone()
            for chunk in pages.takeFreedNotPresent().chunked(maxRanges: 4096) where !chunk.isEmpty {
                send(.freePages(chunk), now)
            }
            if let (answered, reported) = scanDone {
                sentScanDone = true
                send(.freeScanDone(agentAnswered: answered, pagesReported: reported), now)
            }
            // Only into an idle queue (anything queued says as much), and not once `done` is out: the session is
            // ending, and a keepalive still held by link emulation would outlive it.
            if !sentDone, controlQueue.isIdle, keepalive.due(now: now) { send(.keepalive, now) }
            if now - lastSample > 100_000_000 {
                lastSample = now
                let bytes = counters.bytes.load(ordering: .relaxed)
                let faults = metrics.faults.load(ordering: .relaxed)
                Log.engine.trace(Logger.Message(stringLiteral: "dst: known \(pages.knownCount)/\(pages.regionPages) present \(pages.presentCount) "
                    + "bytes \(bytes) faults \(faults) \(receiver.traceState)"))
                timeline.sample(pagesPresent: pages.presentCount, bytesReceived: bytes, faults: faults, now: now)
            }
            if !sentDone, pages.isComplete, !placer.hasUnacknowledged {
                sentDone = true
                finished = true
                receiver.finished = true
                let snapshot = metrics.snapshot()
                send(.done(PeerDone(pagesSent: snapshot.bulkPages + snapshot.urgentPages,
                                    bytesSent: counters.bytes.load(ordering: .relaxed))), now)
            }
            if sentDone, controlQueue.isIdle { break }
            try loop.turn(now: now, maxWaitNanos: 5_000_000)
            if let error = failure() { throw error }
            try keepalive.check(now: monotonicNanos(), "destination: control channel")
        }
    }
}

extension PageSet {
    /// Splits a set into sets of at most `maxRanges` ranges (messages have size limits).
    func chunked(maxRanges: Int) -> [PageSet<Unit>] {
        guard rangeCount > maxRanges else { return [self] }
        var out: [PageSet<Unit>] = []
        var current: [PageRange<Unit>] = []
        for range in ranges {
            current.append(range)
            if current.count == maxRanges {
                out.append(PageSet(ranges: current))
                current = []
            }
        }
        if !current.isEmpty { out.append(PageSet(ranges: current)) }
        return out
    }
}
