// The source's main loop, on the engine's calling thread: it takes chunks from the PushScheduler (device
// pages, hot classes, the rest; believed-free pages held until the destination's free scan), sends
// zero-content pages as ranges and the rest as page-data frames on the bulk channel, reads the
// destination's control messages (acknowledgements, freed pages, free-scan marker, done) and releases
// what is acknowledged. It ends when the destination is done and every send has completed.

import EpcopyProtocol
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What the push loop shares with the engine that outlives one session.
struct PushShared {
    let metrics: TransferMetrics
    /// Lets the push go beyond the device class (set at RESUME).
    let bulkReleased: () -> Bool
    /// Whether acknowledged pages may be punched now (see `punchOnlyOnceAllowed`).
    let mayPunch: () -> Bool
    /// A failure of the urgent thread, checked every turn.
    let urgentFailure: () -> PeerError?
    let countZeroContent: (UInt64) -> Void
    let freeScanAnswered: (Bool) -> Void
    let freeHeld: (UInt64) -> Void
}

final class PushLoop {
    private let control: PeerChannel
    private let bulk: PeerChannel
    private let memory: SourceMemory
    private let scheduler: PushScheduler
    private let shaper: LinkShaper
    private let framer: PageFramer
    private let options: SourceOptions
    private let shared: PushShared
    /// Punch at least this often while acknowledgements come in, or once this many pages are due.
    static let punchIntervalNanos: UInt64 = 20_000_000
    static let punchBatchPages: UInt64 = 2048

    init(control: PeerChannel, bulk: PeerChannel, memory: SourceMemory, scheduler: PushScheduler,
         shaper: LinkShaper, framer: PageFramer, options: SourceOptions, shared: PushShared) {
        self.control = control
        self.bulk = bulk
        self.memory = memory
        self.scheduler = scheduler
        self.shaper = shaper
        self.framer = framer
        self.options = options
        self.shared = shared
    }

    /// Runs the session's push; returns when the push finished (monotonic nanoseconds).
    func run(state: inout ReleaseState, pagesFree: inout UInt64) throws(PeerError) -> UInt64 {
        do {
            return try runThrowing(state: &state, pagesFree: &pagesFree)
        } catch let error as PeerError {
            throw error
        } catch let error as SyscallError {
            if error.errno == EPIPE || error.errno == ECONNRESET { throw .closed("a channel to the destination") }
            throw .syscall("bulk loop", error)
        } catch {
            throw .unexpected("bulk loop: \(error)")
        }
    }

    private func runThrowing(state: inout ReleaseState, pagesFree: inout UInt64) throws -> UInt64 {
        let loop = try ChannelLoop(entries: 128)
        let metrics = shared.metrics
        let scheduler = scheduler
        let bulkQueue = loop.sendQueue(fd: bulk.descriptor.rawValue, kind: .bulk, shaper: shaper, sparse: false) { frame in
            metrics.bulkPages.add(frame.pages, ordering: .relaxed)
            metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
            if let c = frame.pushClass { metrics.recordPushed(c, pages: frame.pages) }
            if frame.pushClass == .device { Log.engine.trace("source: device frame sent") }
        }
        let controlQueue = loop.sendQueue(fd: control.descriptor.rawValue, kind: .control, shaper: shaper) { frame in
            metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
        }
        var pushExhausted = false
        var pushEnd: UInt64 = 0
        var sentDone = false
        var destinationDone = false
        var lastPunch = monotonicNanos()
        var lastTrace: UInt64 = 0
        let holdStart = monotonicNanos()
        var freeHoldStart: UInt64 = 0
        if options.holdFreeUntilScan { scheduler.holdFrom = .believedFree }
        func endFreeHold() {
            guard scheduler.holdFrom != nil else { return }
            scheduler.holdFrom = nil
            shared.freeHeld(freeHoldStart > 0 ? monotonicNanos() - freeHoldStart : 0)
        }
        // Messages are handled into locals, then folded into `state` (an inout cannot be captured).
        var acknowledged = PageSet<PageIndex>()
        var freed: [(PageSet<PageIndex>, PageSet<PageIndex>)] = []
        let controlStream = try loop.receive(on: control, onMessage: { [shared] message in
            switch message {
            case .ack(let pages):
                acknowledged.formUnion(pages)
            case .freePages(let pages):
                // The guest reported these free after resume: never send them, and nothing of them
                // needs keeping.
                freed.append((pages, scheduler.skipClaiming(pages)))
            case .progress, .keepalive:
                break
            case .freeScanDone(let answered, let reported):
                Log.engine.trace("source: free scan done (agent answered \(answered), \(reported) pages)")
                shared.freeScanAnswered(answered)
                endFreeHold()
            case .done:
                destinationDone = true
            case .abort(let a):
                throw PeerError.aborted(code: a.code, reason: a.reason)
            default:
                throw PeerError.unexpected("control channel: unexpected \(message.kind) from the destination")
            }
        }, onClosed: {
            if !destinationDone { throw PeerError.closed("control channel") }
        })
        func foldMessages() {
            if !acknowledged.isEmpty {
                state.acknowledged(acknowledged)
                acknowledged = PageSet()
            }
            for (pages, claimed) in freed {
                pagesFree += claimed.count
                state.freed(pages, claimed: claimed)
            }
            freed.removeAll()
        }
        foldMessages()
        let keepalive = Keepalive(options.keepalive, stream: controlStream)

        while !(destinationDone && bulkQueue.isIdle && controlQueue.isIdle) {
            let now = monotonicNanos()
            let holding = options.holdBulkUntilReleased && !shared.bulkReleased()
                && now - holdStart < options.bulkHoldMillis * 1_000_000
            if scheduler.holdFrom != nil, freeHoldStart > 0,
               now - freeHoldStart > options.freeHoldMillis * 1_000_000 {
                Log.engine.trace("source: no free scan from the destination after \(options.freeHoldMillis) ms; pushing on")
                endFreeHold()
            }
            while !pushExhausted, bulkQueue.pending < 2, !holding || scheduler.inDeviceClass {
                guard let chunk = scheduler.next() else {
                    if scheduler.blocked {
                        if freeHoldStart == 0 { freeHoldStart = now }
                    } else {
                        pushExhausted = true
                    }
                    break
                }
                if chunk.pushClass == .device { Log.engine.trace("source: device chunk \(chunk.runs.count) runs enqueued") }
                // Pages whose content is zero travel as a range in a zeroPages message, as QEMU sends a zero
                // marker: the destination zero-fills them on fault. The file is final, so the check holds.
                let (dataRuns, zeroRuns) = framer.splitZero(chunk.runs)
                if !zeroRuns.isEmpty {
                    let zeroSet = PageSet(ranges: zeroRuns)
                    shared.countZeroContent(zeroSet.count)
                    state.released.formUnion(zeroSet)
                    state.toPunch.formUnion(zeroSet)
                    for part in zeroSet.chunked(maxRanges: 4096) {
                        controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.zeroPages(part).encodedFrame(
                            checksum: fastChecksum)), now: now)
                    }
                }
                for frame in framer.frames(requestID: 0, runs: dataRuns, pushClass: chunk.pushClass) {
                    bulkQueue.enqueue(frame, now: now)
                }
            }
            if pushExhausted, bulkQueue.isIdle, !sentDone {
                sentDone = true
                pushEnd = now
                let snapshot = metrics.snapshot()
                controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.done(PeerDone(
                    pagesSent: snapshot.bulkPages + snapshot.urgentPages, bytesSent: snapshot.bytesWire))
                    .encodedFrame(checksum: fastChecksum)), now: now)
            }
            // Only into an idle queue (anything queued says as much), and not once the destination is done.
            if !destinationDone, controlQueue.isIdle, keepalive.due(now: now) {
                controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.keepalive.encodedFrame(checksum: fastChecksum)),
                                     now: now)
            }
            if Log.tracing, now - lastTrace > 100_000_000 {
                lastTrace = now
                Log.engine.trace(Logger.Message(stringLiteral: "src: released \(state.released.count)/\(memory.regionPages) pushed "
                    + "\(metrics.bulkPages.load(ordering: .relaxed)) urgent "
                    + "\(metrics.urgentPages.load(ordering: .relaxed)) bulk queue \(bulkQueue.pending) "
                    + "exhausted \(pushExhausted) destDone \(destinationDone)"))
            }
            if shared.mayPunch(), state.toPunch.count >= Self.punchBatchPages
                || (now - lastPunch > Self.punchIntervalNanos && !state.toPunch.isEmpty) {
                try state.punch(memory, enabled: options.releaseMemory)
                lastPunch = now
            }
            do {
                try loop.turn(now: now, maxWaitNanos: 20_000_000)
            } catch let error as SyscallError where error.errno == EPIPE || error.errno == ECONNRESET {
                // Once the destination is done it may close before a last frame of ours (held by link
                // emulation, say) goes out: nothing we still had to say matters then.
                if destinationDone { break }
                throw PeerError.closed("a channel to the destination")
            }
            foldMessages()
            if let error = shared.urgentFailure() { throw error }
            try keepalive.check(now: monotonicNanos(), "source: control channel")
        }
        // The destination has every page, so no send of a freed page is still queued.
        state.toPunch.formUnion(state.punchWhenIdle)
        state.punchWhenIdle = PageSet()
        // Not yet allowed: nothing is punched (the owner drops the whole file once the migration has ended).
        try state.punch(memory, enabled: options.releaseMemory && shared.mayPunch())
        guard state.complete else {
            throw PeerError.unexpected("the destination reported done, but \(memory.regionPages - state.released.count) "
                                       + "pages were never acknowledged")
        }
        return pushEnd == 0 ? monotonicNanos() : pushEnd
    }
}
