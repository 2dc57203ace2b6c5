// The source role. The VM's RAM file is final (the source QEMU is stopped and fenced), so the engine
// maps it read-only and moves it: faults first, on the urgent channel; everything else in scheduler
// order on the bulk channel; holes (pages that are zero by construction) never. As the destination
// acknowledges pages, the engine punches them out of the file, so the source host gets its memory
// back progressively; when the last page is acknowledged the source holds none of the VM (T_release).
//
// Threads: the calling thread runs the bulk loop (bulk sends, control messages, release); one
// dedicated thread runs the urgent loop. They share the `sent` bitmap, which makes every page go on
// the wire at most once per session, and a FaultHint, which points the push at a fault's neighbours.

import CEpcopyLinux
import EpcopyProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public struct SourceOptions: Sendable {
    public var sessionID: UInt64
    public var vmName: String
    public var link: LinkSpec
    /// Push classes from the guest's hot report (RAM-file pages); unnamed pages go last.
    public var classes: [(PushClass, PageSet<PageIndex>)]
    public var connectTimeoutMillis: Int32
    /// How long to wait for a destination that went away to come back (0: fail at once).
    public var reconnectTimeoutMillis: Int32
    /// Largest page-data frame, in pages (4 MiB by default).
    public var maxFramePages: UInt64
    /// Pages pushed right behind each fault.
    public var prefetchPages: UInt64
    /// Punch acknowledged pages out of the RAM file (the point of the source role; off only in tests
    /// that need the source intact afterwards).
    public var releaseMemory: Bool
    /// Shared key: both engines prove they hold it (HMAC-SHA256 challenge-response) before any page moves.
    public var authKey: [UInt8]?
    /// Push only the device class until `releaseBulk()` (the migration calls it at RESUME): during the
    /// switchover the destination QEMU needs the CPU for loading device state, and a full-speed push on
    /// a small host stretches the downtime. Faults are served throughout. Released automatically after
    /// `bulkHoldMillis` in case RESUME never comes.
    public var holdBulkUntilReleased: Bool = false
    public var bulkHoldMillis: UInt64 = 2000
    /// Push believed-free pages (and anything after them) only once the destination says its guest's free scan
    /// is in (`freeScanDone`), or `freeHoldMillis` after the push first waited for it: the scan turns most of
    /// them into pages never sent. Set when the source agent gave a hint.
    public var holdFreeUntilScan: Bool = false
    public var freeHoldMillis: UInt64 = 3000

    public init(sessionID: UInt64, vmName: String, link: LinkSpec = .unshaped,
                classes: [(PushClass, PageSet<PageIndex>)] = [], connectTimeoutMillis: Int32 = 10_000,
                reconnectTimeoutMillis: Int32 = 0, maxFramePages: UInt64 = 256, prefetchPages: UInt64 = 64,
                releaseMemory: Bool = true, authKey: [UInt8]? = nil) {
        self.sessionID = sessionID
        self.vmName = vmName
        self.link = link
        self.classes = classes
        self.connectTimeoutMillis = connectTimeoutMillis
        self.reconnectTimeoutMillis = reconnectTimeoutMillis
        self.maxFramePages = maxFramePages
        self.prefetchPages = prefetchPages
        self.releaseMemory = releaseMemory
        self.authKey = authKey
    }
}

public struct SourceReport: Sendable, Codable, Equatable {
    public var regionPages: UInt64
    public var pagesPushed: UInt64
    public var pagesUrgent: UInt64
    public var pagesZero: UInt64
    public var pagesFree: UInt64
    public var pagesPresentAtResume: UInt64
    public var bytesWire: UInt64
    public var requests: UInt64
    public var pushMillis: Double
    public var tReleaseMillis: Double
    public var cpuSeconds: Double
    public var reconnects: Int
    public var pagesByClass: [String: UInt64]
    /// Pages whose content was zero, sent as ranges instead of data (holes are in `pagesZero`).
    public var pagesZeroContent: UInt64 = 0
    /// The destination's guest answered its free scan (nil: no word came from the destination).
    public var freeScanAnswered: Bool? = nil
    /// Time the push waited for the free scan.
    public var freeHoldMillis: Double = 0

    enum CodingKeys: String, CodingKey {
        case regionPages = "region_pages"
        case pagesPushed = "pages_pushed"
        case pagesUrgent = "pages_urgent"
        case pagesZero = "pages_zero"
        case pagesFree = "pages_free"
        case pagesPresentAtResume = "pages_present_at_resume"
        case bytesWire = "bytes_wire"
        case requests
        case pushMillis = "push_ms"
        case tReleaseMillis = "t_release_ms"
        case cpuSeconds = "cpu_s"
        case reconnects
        case pagesByClass = "pages_by_class"
        case pagesZeroContent = "pages_zero_content"
        case freeScanAnswered = "free_scan_answered"
        case freeHoldMillis = "free_hold_ms"
    }
}

public final class SourceEngine: @unchecked Sendable {
    // SAFETY (@unchecked): the mapping and file are immutable after init; the threads share only
    // the atomic bitmap, the hint, the metrics and the error slot, which are Sendable.
    private let file: FileDescriptor
    private let mapping: MemoryMapping
    public let regionPages: UInt64
    public let options: SourceOptions
    private let metrics = TransferMetrics()
    private let urgentError = Mutex<PeerError?>(nil)
    private let bulkReleased = Atomic<Bool>(false)
    /// Pages found all-zero at push time and sent as zeroPages ranges instead of data.
    private let zeroContentPages = Atomic<UInt64>(0)
    /// What the destination said about its free scan, and how long the push waited for it.
    private let freeScan = Mutex<(answered: Bool?, heldNanos: UInt64)>((nil, 0))

    /// Pages sent so far (bulk and urgent), for progress displays.
    public var pagesSent: UInt64 {
        metrics.bulkPages.load(ordering: .relaxed) + metrics.urgentPages.load(ordering: .relaxed)
    }

    /// Pages sent as zero ranges so far (claimed and queued), for progress displays.
    public var pagesSentAsZero: UInt64 { zeroContentPages.load(ordering: .relaxed) }

    /// Lets the bulk push go beyond the device class (see `holdBulkUntilReleased`).
    public func releaseBulk() { bulkReleased.store(true, ordering: .releasing) }
    /// CPU seconds of the engine's own threads (not the process: a test or benchmark shares it).
    private let threadCPU = Mutex<Double>(0)

    /// Opens the RAM file. It is opened read-write only so that acknowledged pages can be punched
    /// out; it is mapped read-only and the engine never writes guest memory.
    public init(ramFile path: String, options: SourceOptions) throws(PeerError) {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDWR) } catch { throw .syscall("open the source RAM file", error) }
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            throw .syscall("stat \(path)", SyscallError(call: "fstat", errno: errno))
        }
        let size = UInt64(st.st_size)
        guard size > 0, size % PageGeometry.size == 0 else {
            throw .unexpected("\(path): size \(size) is not a positive multiple of 4096")
        }
        do {
            mapping = try MemoryMapping(file: fd, length: Int(size), protection: PROT_READ)
        } catch { throw .syscall("map \(path)", error) }
        file = fd
        regionPages = size / PageGeometry.size
        self.options = options
    }

    /// Pages that are holes in the file: zero by construction, never sent (SEEK_DATA/SEEK_HOLE).
    public func holes() -> PageSet<PageIndex> {
        var holes = PageSet<PageIndex>()
        let size = Int64(regionPages * PageGeometry.size)
        var offset: Int64 = 0
        while offset < size {
            let data = Int64(lseek(file.rawValue, Int(offset), SEEK_DATA))
            let holeEnd = data < 0 ? size : min(Int64(data), size)  // ENXIO: no data after offset
            // Whole pages inside [offset, holeEnd).
            let first = (UInt64(offset) + PageGeometry.size - 1) >> PageGeometry.shift
            let end = UInt64(holeEnd) >> PageGeometry.shift
            if end > first, let range = try? PageRange(start: PageIndex(rawValue: first), count: end - first) {
                holes.insert(range)
            }
            if data < 0 || holeEnd >= size { break }
            let nextHole = Int64(lseek(file.rawValue, Int(holeEnd), SEEK_HOLE))
            offset = nextHole < 0 ? size : Int64(nextHole)
        }
        return holes
    }

    /// Connects to the destination and moves the whole region; returns when the destination holds
    /// every page and the source has released everything.
    ///
    /// `gate`, when given, is called once the channels are connected and authenticated and must return
    /// when the RAM file is final (the source VM has stopped): a migration connects while the VM still
    /// runs, so that at STOP the first pages — those the device-state load touches — leave at once.
    public func run(destination: Endpoint, gate: (@Sendable () -> Void)? = nil) throws(PeerError) -> SourceReport {
        let start = monotonicNanos()
        let cpuStart = threadCPUSeconds()
        var state = ReleaseState(regionPages: regionPages)
        var zero = PageSet<PageIndex>()
        var pendingGate = gate
        var reconnects = 0
        var presentAtResume: UInt64 = 0
        var pagesFree: UInt64 = 0
        var pushEnd: UInt64 = 0
        while true {
            do {
                let outcome = try runSession(destination: destination, zero: &zero, gate: &pendingGate, state: &state,
                                             presentAtResume: &presentAtResume, pagesFree: &pagesFree)
                pushEnd = outcome
                break
            } catch {
                guard options.reconnectTimeoutMillis > 0, error.isConnectionLoss else { throw error }
                reconnects += 1
                // The destination went away mid-transfer; its replacement tells us what it has.
                continue
            }
        }
        let end = monotonicNanos()
        let snapshot = metrics.snapshot()
        return SourceReport(
            regionPages: regionPages, pagesPushed: snapshot.bulkPages, pagesUrgent: snapshot.urgentPages,
            pagesZero: zero.count, pagesFree: pagesFree, pagesPresentAtResume: presentAtResume,
            bytesWire: snapshot.bytesWire, requests: snapshot.faults,
            pushMillis: Double(pushEnd &- start) / 1e6, tReleaseMillis: Double(end - start) / 1e6,
            cpuSeconds: threadCPUSeconds() - cpuStart + threadCPU.withLock { $0 }, reconnects: reconnects,
            pagesByClass: snapshot.pagesByClass, pagesZeroContent: zeroContentPages.load(ordering: .relaxed),
            freeScanAnswered: freeScan.withLock { $0.answered },
            freeHoldMillis: Double(freeScan.withLock { $0.heldNanos }) / 1e6)
    }

    /// Release bookkeeping that survives a reconnect.
    struct ReleaseState {
        let regionPages: UInt64
        /// Pages the source no longer needs: acknowledged, free, or holes from the start.
        var released = PageSet<PageIndex>()
        /// Acknowledged but not yet punched.
        var toPunch = PageSet<PageIndex>()
        /// Reported free while a send of them may still be queued: punched once the session's sends are over
        /// (punching earlier would change the bytes under a frame whose CRC is already computed).
        var punchWhenIdle = PageSet<PageIndex>()

        init(regionPages: UInt64) { self.regionPages = regionPages }
        var complete: Bool { released.count == regionPages }
    }

    private func connectChannels(destination: Endpoint, deadline: UInt64)
        throws(PeerError) -> (PeerConnection, PeerConnection, PeerConnection)
    {
        func one(_ kind: PeerChannelKind) throws(PeerError) -> PeerConnection {
            while true {
                do {
                    let fd = try TCP.connect(to: destination, timeoutMillis: options.connectTimeoutMillis)
                    if kind != .bulk { TCP.setNoDelay(fd.rawValue) }
                    TCP.setBufferSizes(fd.rawValue, bytes: 1 << 20)
                    let connection = PeerConnection(descriptor: fd, channel: kind,
                                                    context: PeerDecodeContext(regionPages: regionPages))
                    let nonce = Bytes32.random()
                    let hello = try PeerHello(role: .source, channel: kind.rawValue, sessionID: options.sessionID,
                                              vmName: options.vmName, regionPages: regionPages, nonce: nonce)
                    try connection.send(.hello(hello))
                    var destinationProven = false
                    var reply = try connection.receive(timeoutMillis: options.connectTimeoutMillis)
                    if case .authResponse(let mac) = reply {
                        // The destination proves it holds the key by MACing our nonce.
                        guard let key = options.authKey else {
                            throw PeerError.unexpected("the destination requires authentication: give the shared key")
                        }
                        let expected = HMACSHA256.response(key: key, challenge: nonce, sessionID: options.sessionID,
                                                           role: .destination)
                        guard mac.constantTimeEquals(expected) else {
                            throw PeerError.unexpected("authentication failed on the \(kind) channel: the destination's "
                                                       + "key does not match ours")
                        }
                        destinationProven = true
                        guard case .authChallenge(let challenge) = try connection.receive(
                            timeoutMillis: options.connectTimeoutMillis)
                        else { throw PeerError.unexpected("handshake: expected the destination's challenge") }
                        try connection.send(.authResponse(mac: HMACSHA256.response(
                            key: key, challenge: challenge, sessionID: options.sessionID, role: .source)))
                        reply = try connection.receive(timeoutMillis: options.connectTimeoutMillis)
                    }
                    switch reply {
                    case .welcome(let w) where w.sessionID == options.sessionID:
                        if options.authKey != nil && !destinationProven {
                            throw PeerError.unexpected("the destination did not authenticate; refusing to send memory "
                                                       + "to an unauthenticated peer")
                        }
                        return connection
                    case .abort(let a):
                        throw PeerError.aborted(code: a.code, reason: a.reason)
                    case let other:
                        throw PeerError.unexpected("handshake on the \(kind) channel: expected welcome, got \(other.kind)")
                    }
                } catch let error as PeerError {
                    throw error
                } catch let error as ProtocolError {
                    throw PeerError.protocolViolation("hello", error)
                } catch let error as SyscallError {
                    if monotonicNanos() < deadline, [ECONNREFUSED, ECONNRESET, ETIMEDOUT].contains(error.errno) {
                        usleep(50_000)
                        continue
                    }
                    throw PeerError.syscall("connect to the destination \(destination) (\(kind) channel)", error)
                } catch {
                    throw PeerError.unexpected("\(error)")
                }
            }
        }
        let control = try one(.control)
        let urgent = try one(.urgent)
        let bulk = try one(.bulk)
        return (control, urgent, bulk)
    }

    /// One connected session; returns the time the push finished. Throws `.closed` if the
    /// destination went away (the caller may wait for it to come back).
    private func runSession(destination: Endpoint, zero: inout PageSet<PageIndex>,
                            gate: inout (@Sendable () -> Void)?, state: inout ReleaseState,
                            presentAtResume: inout UInt64, pagesFree: inout UInt64) throws(PeerError) -> UInt64 {
        let wait = options.reconnectTimeoutMillis > 0 ? UInt64(options.reconnectTimeoutMillis) * 1_000_000 : 0
        let (control, urgent, bulk) = try connectChannels(destination: destination, deadline: monotonicNanos() + wait)

        // The destination opens with what it already has (nothing, unless it is a replacement).
        let present: PageSet<PageIndex>
        switch try control.receive(timeoutMillis: options.connectTimeoutMillis) {
        case .resume(let r) where r.sessionID == options.sessionID:
            present = r.present
        case .abort(let a):
            throw .aborted(code: a.code, reason: a.reason)
        case let other:
            throw .unexpected("expected resume on the control channel, got \(other.kind)")
        }
        if let wait = gate {
            wait()
            gate = nil
        }
        let gateOpened = monotonicNanos()
        if zero.isEmpty {
            // The file is final now: its holes are pages that are zero and will stay so.
            zero = holes()
            state.released.formUnion(zero)
        }
        Trace.log("source: holes \(zero.count) pages in \(zero.rangeCount) ranges, scan \((monotonicNanos() - gateOpened) / 1000) us")
        presentAtResume = present.count
        state.released.formUnion(present)
        state.toPunch.formUnion(present)
        try control.send(.zeroPages(zero))

        // Every page not yet released is (again) to be sent: a fresh bitmap per session.
        let sent = AtomicPageBitmap(pageCount: regionPages)
        let hint = FaultHint()
        let scheduler = PushScheduler(regionPages: regionPages, classes: options.classes, sent: sent, hint: hint,
                                      chunk: AdaptiveChunk(minPages: 16, maxPages: options.maxFramePages),
                                      prefetchPages: options.prefetchPages)
        scheduler.skip(state.released)
        let shaper = LinkShaper(options.link)
        let stop = try eventfd("urgent loop stop")
        let urgentFD = urgent.descriptor.rawValue
        let urgentLeftover = urgent.takeBufferedBytes()
        let stopFD = stop.descriptor.rawValue
        let mappingAddress = mapping.address
        let urgentThread = JoinableThread(name: "epcopy-src-urg") { [self] in
            do {
                try urgentLoop(fd: urgentFD, leftover: urgentLeftover, stopFD: stopFD, sent: sent, hint: hint,
                               shaper: shaper, mapping: UnsafeRawPointer(bitPattern: mappingAddress)!)
            } catch let error as PeerError {
                urgentError.withLock { $0 = error }
            } catch let error as SyscallError {
                urgentError.withLock { $0 = .syscall("urgent channel", error) }
            } catch {
                urgentError.withLock { $0 = .unexpected("urgent loop: \(error)") }
            }
            let cpu = threadCPUSeconds()
            threadCPU.withLock { $0 += cpu }
        }
        defer {
            stop.signal()
            urgentThread.join()
            withExtendedLifetime(urgent) {}
        }
        let pushEnd = try bulkLoop(control: control, bulk: bulk.descriptor.rawValue, scheduler: scheduler,
                                   shaper: shaper, state: &state, pagesFree: &pagesFree)
        withExtendedLifetime(bulk) {}
        if let error = urgentError.withLock({ $0 }) { throw error }
        return pushEnd
    }

    private func eventfd(_ what: String) throws(PeerError) -> EventFD {
        do { return try EventFD() } catch { throw .syscall(what, error) }
    }

    /// Splits claimed runs into frames of at most `maxFramePages` pages and 128 runs.
    private func frames(requestID: UInt64, runs: [PageRange<PageIndex>], pushClass: PushClass?,
                        mapping: UnsafeRawPointer) -> [OutgoingFrame] {
        var out: [OutgoingFrame] = []
        var current: [PageRange<PageIndex>] = []
        var pages: UInt64 = 0
        func flush() {
            if !current.isEmpty {
                out.append(OutgoingFrame(requestID: requestID, runs: current, mapping: mapping, pushClass: pushClass,
                                         checksum: fastChecksum))
            }
            current = []
            pages = 0
        }
        for run in runs {
            var start = run.lowerBound.rawValue
            var left = run.count
            while left > 0 {
                let take = min(left, options.maxFramePages - pages)
                current.append(try! PageRange(start: PageIndex(rawValue: start), count: take))
                pages += take
                start += take
                left -= take
                if pages == options.maxFramePages || current.count == 128 { flush() }
            }
        }
        flush()
        return out
    }

    private enum Tag {
        static let controlRecv: UInt64 = 1
        static let bulkSend: UInt64 = 2
        static let controlSend: UInt64 = 3
        static let urgentRecv: UInt64 = 4
        static let urgentSend: UInt64 = 5
        static let stop: UInt64 = 6
    }

    private func urgentLoop(fd: Int32, leftover: [UInt8], stopFD: Int32, sent: AtomicPageBitmap, hint: FaultHint,
                            shaper: LinkShaper, mapping: UnsafeRawPointer) throws {
        JoinableThread.setCurrentNice(-10)
        let ring = try Ring(entries: 64)
        let stream = try MessageStream(fd: fd, tag: Tag.urgentRecv, channel: .urgent, ring: ring, group: 1,
                                       context: PeerDecodeContext(regionPages: regionPages), alreadyRead: leftover)
        let queue = SendQueue(fd: fd, tag: Tag.urgentSend, shaper: shaper)
        try stream.arm(ring)
        try ring.pollMultishot(fd: stopFD, userData: Tag.stop)
        var running = true
        func handle(_ message: PeerMessage) throws {
            guard case .pageRequest(let request) = message else {
                throw PeerError.unexpected("urgent channel: unexpected \(message.kind)")
            }
            metrics.faults.add(1, ordering: .relaxed)
            Trace.log("source: request \(request.pages)")
            if let first = request.pages.first { hint.publish(page: first.rawValue) }
            var runs: [PageRange<PageIndex>] = []
            for range in request.pages.ranges {
                sent.claim(start: range.lowerBound.rawValue, count: range.count) { s, n in
                    runs.append(try! PageRange(start: PageIndex(rawValue: s), count: n))
                }
            }
            // Pages already claimed went out on the bulk channel (or are holes): the destination gets
            // them from there; sending them twice is what this bitmap exists to prevent.
            let now = monotonicNanos()
            for frame in frames(requestID: request.requestID, runs: runs, pushClass: nil, mapping: mapping) {
                queue.enqueue(frame, now: now)
            }
        }
        try stream.drainBuffered(handle)
        while running {
            let now = monotonicNanos()
            let wake = try queue.pump(ring: ring, now: now)
            let timeout = wake.map { Int64($0 - now) } ?? 100_000_000
            _ = try ring.submitAndWait(timeoutNanos: max(timeout, 1000))
            try ring.drainCompletions { completion in
                switch completion.userData {
                case Tag.urgentRecv:
                    try stream.complete(completion, ring: ring, handle)
                    if stream.closed { running = false }
                case Tag.urgentSend:
                    if let frame = try queue.complete(completion, ring: ring) {
                        metrics.urgentPages.add(frame.pages, ordering: .relaxed)
                        metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
                    }
                case Tag.stop:
                    running = false
                default:
                    break
                }
            }
        }
    }

    private func bulkLoop(control: PeerConnection, bulk: Int32, scheduler: PushScheduler, shaper: LinkShaper,
                          state: inout ReleaseState, pagesFree: inout UInt64) throws(PeerError) -> UInt64 {
        do {
            return try bulkLoopThrowing(control: control, bulk: bulk, scheduler: scheduler, shaper: shaper,
                                        state: &state, pagesFree: &pagesFree)
        } catch let error as PeerError {
            throw error
        } catch let error as SyscallError {
            if error.errno == EPIPE || error.errno == ECONNRESET { throw .closed("bulk channel") }
            throw .syscall("bulk loop", error)
        } catch {
            throw .unexpected("bulk loop: \(error)")
        }
    }

    private func bulkLoopThrowing(control: PeerConnection, bulk: Int32, scheduler: PushScheduler,
                                  shaper: LinkShaper, state: inout ReleaseState,
                                  pagesFree: inout UInt64) throws -> UInt64 {
        let ring = try Ring(entries: 128)
        let controlFD = control.descriptor.rawValue
        let stream = try MessageStream(fd: controlFD, tag: Tag.controlRecv, channel: .control, ring: ring, group: 2,
                                       context: PeerDecodeContext(regionPages: regionPages),
                                       alreadyRead: control.takeBufferedBytes())
        let bulkQueue = SendQueue(fd: bulk, tag: Tag.bulkSend, shaper: shaper, sparse: false)
        let controlQueue = SendQueue(fd: controlFD, tag: Tag.controlSend, shaper: shaper)
        try stream.arm(ring)
        let mappingBase = UnsafeRawPointer(mapping.pointer)
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
            let held = freeHoldStart > 0 ? monotonicNanos() - freeHoldStart : 0
            freeScan.withLock { $0.heldNanos += held }
        }

        func handle(_ message: PeerMessage) throws {
            switch message {
            case .ack(let pages):
                let fresh = pages.subtracting(state.released)
                state.released.formUnion(fresh)
                state.toPunch.formUnion(fresh)
            case .freePages(let pages):
                // The guest reported these free after resume: never send them, and nothing of them
                // needs keeping.
                let claimed = scheduler.skipClaiming(pages)
                pagesFree += claimed.count
                let fresh = pages.subtracting(state.released)
                state.released.formUnion(fresh)
                state.toPunch.formUnion(fresh.intersection(claimed))
                state.punchWhenIdle.formUnion(fresh.subtracting(claimed))
            case .progress:
                break
            case .freeScanDone(let answered, let reported):
                Trace.log("source: free scan done (agent answered \(answered), \(reported) pages)")
                freeScan.withLock { $0.answered = answered }
                endFreeHold()
            case .done:
                destinationDone = true
            case .abort(let a):
                throw PeerError.aborted(code: a.code, reason: a.reason)
            default:
                throw PeerError.unexpected("control channel: unexpected \(message.kind) from the destination")
            }
        }
        try stream.drainBuffered(handle)

        while !(destinationDone && bulkQueue.isIdle && controlQueue.isIdle) {
            let now = monotonicNanos()
            let holding = options.holdBulkUntilReleased && !bulkReleased.load(ordering: .acquiring)
                && now - holdStart < options.bulkHoldMillis * 1_000_000
            if scheduler.holdFrom != nil, freeHoldStart > 0,
               now - freeHoldStart > options.freeHoldMillis * 1_000_000 {
                Trace.log("source: no free scan from the destination after \(options.freeHoldMillis) ms; pushing on")
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
                if chunk.pushClass == .device { Trace.log("source: device chunk \(chunk.runs.count) runs enqueued") }
                // Pages whose content is zero travel as a range in a zeroPages message, as QEMU sends a zero
                // marker: the destination zero-fills them on fault. The file is final, so the check holds.
                let (dataRuns, zeroRuns) = Self.splitZero(chunk.runs, mapping: mappingBase)
                if !zeroRuns.isEmpty {
                    let zeroSet = PageSet(ranges: zeroRuns)
                    zeroContentPages.add(zeroSet.count, ordering: .relaxed)
                    state.released.formUnion(zeroSet)
                    state.toPunch.formUnion(zeroSet)
                    for part in zeroSet.chunked(maxRanges: 4096) {
                        controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.zeroPages(part).encodedFrame(
                            checksum: fastChecksum)), now: now)
                    }
                }
                for frame in frames(requestID: 0, runs: dataRuns, pushClass: chunk.pushClass, mapping: mappingBase) {
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
            if Trace.enabled, now - lastTrace > 100_000_000 {
                lastTrace = now
                Trace.log("src: released \(state.released.count)/\(regionPages) pushed \(metrics.bulkPages.load(ordering: .relaxed)) "
                          + "urgent \(metrics.urgentPages.load(ordering: .relaxed)) bulk queue \(bulkQueue.pending) "
                          + "exhausted \(pushExhausted) destDone \(destinationDone)")
            }
            if state.toPunch.count >= 2048 || (now - lastPunch > 20_000_000 && !state.toPunch.isEmpty) {
                try punch(&state)
                lastPunch = now
            }
            let wakeBulk = try bulkQueue.pump(ring: ring, now: now)
            let wakeControl = try controlQueue.pump(ring: ring, now: now)
            let wake = [wakeBulk, wakeControl].compactMap { $0 }.min()
            let timeout = wake.map { Int64($0 &- now) } ?? 20_000_000
            _ = try ring.submitAndWait(timeoutNanos: max(min(timeout, 20_000_000), 1000))
            try ring.drainCompletions { completion in
                switch completion.userData {
                case Tag.controlRecv:
                    try stream.complete(completion, ring: ring, handle)
                    if stream.closed && !destinationDone { throw PeerError.closed("control channel") }
                case Tag.bulkSend:
                    do {
                        if let frame = try bulkQueue.complete(completion, ring: ring) {
                            metrics.bulkPages.add(frame.pages, ordering: .relaxed)
                            metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
                            if let c = frame.pushClass { metrics.recordPushed(c, pages: frame.pages) }
                            if frame.pushClass == .device { Trace.log("source: device frame sent") }
                        }
                    } catch let error as SyscallError where error.errno == EPIPE || error.errno == ECONNRESET {
                        throw PeerError.closed("bulk channel")
                    }
                case Tag.controlSend:
                    if let frame = try controlQueue.complete(completion, ring: ring) {
                        metrics.bytesWire.add(UInt64(frame.totalBytes), ordering: .relaxed)
                    }
                default:
                    break
                }
            }
            if let error = urgentError.withLock({ $0 }) { throw error }
        }
        // The destination has every page, so no send of a freed page is still queued.
        state.toPunch.formUnion(state.punchWhenIdle)
        state.punchWhenIdle = PageSet()
        try punch(&state)
        guard state.complete else {
            throw PeerError.unexpected("the destination reported done, but \(regionPages - state.released.count) "
                                       + "pages were never acknowledged")
        }
        return pushEnd == 0 ? monotonicNanos() : pushEnd
    }

    /// Returns acknowledged pages to the host: fallocate(PUNCH_HOLE) per range.
    /// Splits `runs` into runs of pages with data and runs of pages whose content is all zero.
    static func splitZero(_ runs: [PageRange<PageIndex>], mapping: UnsafeRawPointer)
        -> (data: [PageRange<PageIndex>], zero: [PageRange<PageIndex>]) {
        var data: [PageRange<PageIndex>] = []
        var zero: [PageRange<PageIndex>] = []
        for run in runs {
            var start = run.lowerBound.rawValue
            var isZero = MemoryCompare.isZeroPage(mapping + Int(start << PageGeometry.shift))
            var page = start + 1
            while page <= run.upperBound.rawValue {
                let z = page < run.upperBound.rawValue
                    ? MemoryCompare.isZeroPage(mapping + Int(page << PageGeometry.shift)) : !isZero
                if z != isZero || page == run.upperBound.rawValue {
                    let r = try! PageRange(start: PageIndex(rawValue: start), count: page - start)
                    if isZero { zero.append(r) } else { data.append(r) }
                    start = page
                    isZero = z
                }
                page += 1
            }
        }
        return (data, zero)
    }

    private func punch(_ state: inout ReleaseState) throws {
        defer { state.toPunch = PageSet() }
        guard options.releaseMemory else { return }
        for range in state.toPunch.ranges {
            try file.punchHole(offset: range.lowerBound.rawValue << PageGeometry.shift,
                               length: range.count << PageGeometry.shift)
        }
    }
}
