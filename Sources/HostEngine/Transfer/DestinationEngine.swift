// The destination role. The guest already runs here; its memory is registered with a userfaultfd, so
// every first touch of a page that has not arrived stops in the kernel until this engine places it.
// Three threads: the fault thread (resolve or enqueue, see FaultService), the urgent loop (requests
// out, faulted pages in, placed at once) and the bulk loop on the calling thread (pushed pages in,
// acknowledgements and control out). When every page is present or known to be zero, the engine tells
// the source it is done and unregisters the range: a page never placed reads as zero from then on,
// which is exactly what holes and free pages are.

import CEpcopyLinux
import EpcopyProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Guest memory at the destination, as the engine sees it.
public struct DestinationMemory: ~Copyable, Sendable {
    /// The userfaultfd the range is registered with (the engine's own, a hand-over, or a takeover).
    public let uffd: FileDescriptor
    /// Start of the registered range in the process that owns the memory.
    public let hostAddress: UInt
    public let length: Int
    /// RAM-file page at `hostAddress` (file offset / 4096).
    public let firstPage: UInt64
    public let mode: PlacementMode
    /// The engine's own mapping, when it registered its own memory (tests, benchmarks).
    public let ownMapping: MemoryMapping?
    public let ownMappingAddress: UInt?

    public init(uffd: consuming FileDescriptor, hostAddress: UInt, length: Int, firstPage: UInt64,
                mode: PlacementMode, ownMapping: consuming MemoryMapping? = nil, ownMappingAddress: UInt? = nil) {
        self.uffd = uffd
        self.hostAddress = hostAddress
        self.length = length
        self.firstPage = firstPage
        self.mode = mode
        self.ownMapping = ownMapping
        self.ownMappingAddress = ownMappingAddress
    }

    /// Maps `file` and registers the mapping with a fresh uffd of this process (path (a) of the design:
    /// tests and benchmarks, where the faulting threads live in the engine's own process).
    public static func registerOwn(file: borrowing FileDescriptor, length: Int) throws(SyscallError) -> DestinationMemory {
        let mapping = try MemoryMapping(file: file, length: length)
        let uffd = try Userfaultfd(features: [.missingShmem, .eventRemove])
        _ = try uffd.register(start: mapping.address, length: length, mode: .missing)
        let address = mapping.address
        return DestinationMemory(uffd: try uffd.descriptor.duplicate(), hostAddress: address, length: length,
                                 firstPage: 0, mode: .copy, ownMapping: mapping, ownMappingAddress: address)
    }

    public var regionPages: UInt64 { firstPage + UInt64(length) / PageGeometry.size }
}

public struct DestinationOptions: Sendable {
    public var sessionID: UInt64
    public var link: LinkSpec
    /// Pages already present (a replacement engine after a takeover); sent to the source as `resume`.
    public var initiallyPresent: PageSet<PageIndex>
    public var acceptTimeoutMillis: Int32
    /// Unregister the range when done (always, except in tests that inspect the registration).
    public var unregisterWhenDone: Bool
    /// Record a digest of every placed page (`--verify`): see PageDigests.
    public var recordDigests: Bool
    /// Shared key: a source that cannot prove it holds it is refused.
    public var authKey: [UInt8]?

    public init(sessionID: UInt64, link: LinkSpec = .unshaped, initiallyPresent: PageSet<PageIndex> = PageSet(),
                acceptTimeoutMillis: Int32 = 30_000, unregisterWhenDone: Bool = true, recordDigests: Bool = false,
                authKey: [UInt8]? = nil) {
        self.sessionID = sessionID
        self.link = link
        self.initiallyPresent = initiallyPresent
        self.acceptTimeoutMillis = acceptTimeoutMillis
        self.unregisterWhenDone = unregisterWhenDone
        self.recordDigests = recordDigests
        self.authKey = authKey
    }
}

public struct DestinationReport: Sendable, Codable, Equatable {
    public var regionPages: UInt64
    public var pagesReceived: UInt64
    public var pagesZero: UInt64
    public var bytesReceived: UInt64
    public var transferMillis: Double
    public var cpuSeconds: Double
    public var metrics: TransferMetrics.Snapshot
    public var timeline: [String]

    enum CodingKeys: String, CodingKey {
        case regionPages = "region_pages"
        case pagesReceived = "pages_received"
        case pagesZero = "pages_zero"
        case bytesReceived = "bytes_received"
        case transferMillis = "transfer_ms"
        case cpuSeconds = "cpu_s"
        case metrics
        case timeline
    }
}

public final class DestinationEngine: @unchecked Sendable {
    // SAFETY (@unchecked): configuration is immutable; threads share only Sendable state (bitmaps,
    // queues, metrics, the error slot). `memory` is read-only after init.
    private let memory: DestinationMemory
    public let options: DestinationOptions
    public let pages: DestinationPages
    public let metrics = TransferMetrics()
    private let pending = PendingFaults()
    private let acks = Mutex(PageSet<PageIndex>())
    private let failure = Mutex<PeerError?>(nil)
    private let freeScanDone = Mutex<(Bool, UInt64)?>(nil)
    private let bytesIn = Atomic<UInt64>(0)
    /// CPU seconds of the engine's helper threads, added when each ends.
    private let threadCPU = Mutex<Double>(0)
    /// Digests of placed pages when `options.recordDigests`.
    public let digests: PageDigests?
    private let staging: UnsafeMutableRawPointer
    private let stagingSize: Int

    public init(memory: consuming DestinationMemory, options: DestinationOptions) {
        self.memory = memory
        self.options = options
        self.pages = DestinationPages(regionPages: self.memory.regionPages)
        self.digests = options.recordDigests ? PageDigests(pageCount: self.memory.regionPages) : nil
        for range in options.initiallyPresent.ranges {
            for p in range.lowerBound.rawValue..<min(range.upperBound.rawValue, pages.regionPages) {
                pages.present.insert(p)
                pages.markKnown(p)
            }
        }
        // Pages below the mapping (firstPage > 0) are not ours to fetch.
        for p in 0..<self.memory.firstPage { pages.markKnown(p) }
        stagingSize = Int(Link.peer.maxPayload) + FrameHeader.size
        staging = .allocate(byteCount: stagingSize, alignment: 4096)
    }

    deinit { staging.deallocate() }

    /// The engine's own mapping of guest memory (path (a) only), as an integer address.
    public var ownMappingAddress: UInt? { memory.ownMappingAddress }

    /// Accepts the source's three channels on `listener` and serves the transfer until every page is
    /// here. The guest (or test program) may fault from before this call until after it returns.
    public func run(listener: borrowing Listener) throws(PeerError) -> DestinationReport {
        let start = monotonicNanos()
        let cpuStart = threadCPUSeconds()
        let timeline = Timeline(start: start)
        var control: PeerConnection? = nil
        var urgent: PeerConnection? = nil
        var bulk: PeerConnection? = nil
        // The three channels may arrive in any order.
        while control == nil || urgent == nil || bulk == nil {
            let fd: FileDescriptor
            do { fd = try TCP.accept(listener, timeoutMillis: options.acceptTimeoutMillis) } catch {
                throw .syscall("waiting for the source on \(listener.endpoint)", error)
            }
            let connection = PeerConnection(descriptor: fd, channel: .control,
                                            context: PeerDecodeContext(regionPages: pages.regionPages))
            let hello: PeerHello
            switch try connection.receive(timeoutMillis: options.acceptTimeoutMillis) {
            case .hello(let h): hello = h
            case let other: throw .unexpected("handshake: expected hello, got \(other.kind)")
            }
            guard let kind = PeerChannelKind(rawValue: hello.channel) else {
                try? connection.send(.abort(PeerAbort(code: 2, reason: "unknown channel \(hello.channel)")))
                throw .unexpected("handshake: unknown channel \(hello.channel)")
            }
            guard hello.role == .source, hello.sessionID == options.sessionID,
                  hello.regionPages == pages.regionPages
            else {
                let reason = "session \(hello.sessionID) with \(hello.regionPages) pages does not match session "
                    + "\(options.sessionID) with \(pages.regionPages) pages"
                try? connection.send(.abort(PeerAbort(code: 1, reason: reason)))
                throw .unexpected("handshake on the \(kind) channel: \(reason)")
            }
            connection.channel = kind
            if let key = options.authKey {
                try authenticate(connection, hello: hello, key: key)
            }
            let version: UInt8
            do { version = try WireVersion.negotiate(local: WireVersion.supported, remote: hello.versions) } catch {
                throw .protocolViolation("version negotiation", error)
            }
            do {
                try connection.send(.welcome(PeerWelcome(version: version, sessionID: options.sessionID)))
            } catch let e as PeerError { throw e } catch { throw .unexpected("\(error)") }
            if kind != .bulk { TCP.setNoDelay(connection.descriptor.rawValue) }
            TCP.setBufferSizes(connection.descriptor.rawValue, bytes: 1 << 20)
            switch kind {
            case .control: control = connection
            case .urgent: urgent = connection
            case .bulk: bulk = connection
            }
        }
        let controlConnection = control!
        let urgentConnection = urgent!
        let bulkConnection = bulk!
        try controlConnection.send(.resume(PeerResume(sessionID: options.sessionID,
                                                      present: options.initiallyPresent)))

        func eventFD() throws(PeerError) -> EventFD {
            do { return try EventFD() } catch { throw .syscall("destination set-up: eventfd", error) }
        }
        let requests: RequestQueue
        do { requests = try RequestQueue() } catch { throw .syscall("destination set-up: eventfd", error) }
        let quitFaults = try eventFD()
        let quitUrgent = try eventFD()
        let faultService = FaultService(uffd: memory.uffd.rawValue, base: memory.hostAddress, length: memory.length,
                                        firstPage: memory.firstPage, mode: memory.mode, pages: pages,
                                        requests: requests, pending: pending, metrics: metrics,
                                        quitFD: quitFaults.descriptor.rawValue)
        let faultThread = JoinableThread(name: "epcopy-faults") { [self] in
            do throws(SyscallError) { try faultService.run() } catch { fail(.syscall("fault thread", error)) }
            let cpu = threadCPUSeconds()
            threadCPU.withLock { $0 += cpu }
        }
        let urgentFD = urgentConnection.descriptor.rawValue
        let leftover = urgentConnection.takeBufferedBytes()
        let quitUrgentFD = quitUrgent.descriptor.rawValue
        let urgentThread = JoinableThread(name: "epcopy-dst-urg") { [self] in
            do {
                try urgentLoop(fd: urgentFD, leftover: leftover, requests: requests, quitFD: quitUrgentFD)
            } catch let error as PeerError { fail(error) } catch { fail(.unexpected("urgent loop: \(error)")) }
            let cpu = threadCPUSeconds()
            threadCPU.withLock { $0 += cpu }
        }
        defer {
            quitFaults.signal()
            quitUrgent.signal()
            faultThread.join()
            urgentThread.join()
        }
        let bulkLeftover = bulkConnection.takeBufferedBytes()
        do {
            try bulkLoop(control: controlConnection, bulkFD: bulkConnection.descriptor.rawValue,
                         bulkLeftover: bulkLeftover, timeline: timeline)
        } catch let error as PeerError {
            throw error
        } catch let error as SyscallError {
            throw .syscall("bulk loop", error)
        } catch {
            throw .unexpected("bulk loop: \(error)")
        }
        if options.unregisterWhenDone {
            _ = epc_uffd_unregister(memory.uffd.rawValue, UInt64(memory.hostAddress), UInt64(memory.length))
        }
        let end = monotonicNanos()
        let snapshot = metrics.snapshot()
        withExtendedLifetime((urgentConnection, bulkConnection)) {}
        return DestinationReport(regionPages: pages.regionPages, pagesReceived: snapshot.bulkPages + snapshot.urgentPages,
                                 pagesZero: pages.zero.count, bytesReceived: bytesIn.load(ordering: .relaxed),
                                 transferMillis: Double(end - start) / 1e6, cpuSeconds: threadCPUSeconds() - cpuStart + threadCPU.withLock { $0 },
                                 metrics: snapshot, timeline: timeline.jsonLines)
    }

    /// Mutual HMAC challenge-response: answer the source's nonce, then make it answer ours.
    private func authenticate(_ connection: PeerConnection, hello: PeerHello, key: [UInt8]) throws(PeerError) {
        try connection.send(.authResponse(mac: HMACSHA256.response(key: key, challenge: hello.nonce,
                                                                   sessionID: hello.sessionID, role: .destination)))
        let challenge = Bytes32.random()
        try connection.send(.authChallenge(nonce: challenge))
        let reply = try connection.receive(timeoutMillis: options.acceptTimeoutMillis)
        let expected = HMACSHA256.response(key: key, challenge: challenge, sessionID: hello.sessionID, role: .source)
        guard case .authResponse(let mac) = reply, mac.constantTimeEquals(expected) else {
            try? connection.send(.abort(PeerAbort(code: 3, reason: "authentication failed")))
            throw .unexpected("authentication failed on the \(connection.channel) channel: the source did not prove "
                              + "it holds the shared key")
        }
    }

    /// Pages the guest reports free after the switch (the agent's post-resume scan): those not yet here
    /// are never fetched — a fault zero-fills them — and the source is told to drop them from the push.
    /// Safe at any time: on the destination every first touch of a missing page goes through this
    /// engine, and a page that is free at scan time has no content anyone may read.
    public func markFree(_ free: PageSet<PageIndex>) {
        let newly = pages.markZero(free)
        if !newly.isEmpty { pages.freedNotPresent.withLock { $0.formUnion(newly) } }
        do { try zeroFillWaiting(in: newly) } catch { fail(error) }
    }

    /// Pages just marked zero whose faults already went out as requests: the source will send nothing for
    /// them (it claimed them for its zero message, or drops them as free), so fill and wake them here.
    private func zeroFillWaiting(in marked: PageSet<PageIndex>) throws(PeerError) {
        for page in pending.take(in: marked) { try zeroFill(page) }
    }

    /// Tells the source the guest's free scan is in (after `markFree` with its pages) — or that none will come
    /// (`agentAnswered` false): the source then pushes the believed-free pages it held back.
    public func finishFreeScan(agentAnswered: Bool, pagesReported: UInt64) {
        freeScanDone.withLock { $0 = (agentAnswered, pagesReported) }
    }

    private func fail(_ error: PeerError) {
        failure.withLock { if $0 == nil { $0 = error } }
    }

    private func checkFailure() throws(PeerError) {
        if let error = failure.withLock({ $0 }) { throw error }
    }

    // MARK: placement

    /// Places pages `[run)` from `source` into guest memory. Pages already present or marked zero are
    /// skipped (a zero mark after the page was sent means the guest removed it: placing stale contents
    /// would resurrect it). Returns the pages placed.
    func place(run: PageRange<PageIndex>, from source: UnsafeRawPointer, urgent: Bool) throws(PeerError) -> UInt64 {
        var placed: UInt64 = 0
        var p = run.lowerBound.rawValue
        let end = run.upperBound.rawValue
        while p < end {
            // Longest stretch of pages that still need placing.
            while p < end, pages.present.contains(p) || pages.zero.contains(p) { p += 1 }
            var q = p
            while q < end, !pages.present.contains(q), !pages.zero.contains(q) { q += 1 }
            if q > p {
                placed += try copy(first: p, count: q - p,
                                   from: source + Int((p - run.lowerBound.rawValue) << PageGeometry.shift),
                                   urgent: urgent)
            }
            p = q
        }
        if placed > 0 {
            if urgent { metrics.urgentPages.add(placed, ordering: .relaxed) } else {
                metrics.bulkPages.add(placed, ordering: .relaxed)
            }
        }
        return placed
    }

    /// Maps a zero page at `page`, whose fault is waiting and has been taken out of `pending`; wakes it.
    private func zeroFill(_ page: UInt64) throws(PeerError) {
        let address = memory.hostAddress + UInt((page - memory.firstPage) << PageGeometry.shift)
        let result: Userfaultfd.Placement
        do { result = try Userfaultfd.zeroFillPage(fd: memory.uffd.rawValue, address: address) } catch {
            throw .syscall("zero-filling page \(page)", error)
        }
        switch result {
        case .placed, .alreadyPresent, .retry:
            // .alreadyPresent: mapped meanwhile (the fault thread zero-filled it on a second fault), now woken.
            // .retry: a remove is pending and the fault will be delivered again, to the fault thread.
            break
        case .targetGone:
            throw .unexpected("the process that owns guest memory is gone")
        }
        pages.present.insert(page)
        Trace.log("destination: page \(page) was requested, then marked zero: zero-filled")
    }

    private func copy(first: UInt64, count: UInt64, from source: UnsafeRawPointer,
                      urgent: Bool) throws(PeerError) -> UInt64 {
        var page = first
        let end = first + count
        var placed: UInt64 = 0
        var retries = 0
        while page < end {
            let address = memory.hostAddress + UInt((page - memory.firstPage) << PageGeometry.shift)
            let bytes = Int((end - page) << PageGeometry.shift)
            let src = source + Int((page - first) << PageGeometry.shift)
            var done: Int64 = 0
            let rc = epc_uffd_copy(memory.uffd.rawValue, UInt64(address), UInt64(UInt(bitPattern: src)),
                                   UInt64(bytes), 0, &done)
            let result: Userfaultfd.Placement
            do { result = try Userfaultfd.placement("UFFDIO_COPY", rc: rc, done: done) } catch {
                throw .syscall("placing page \(page)", error)
            }
            let donePages: UInt64
            switch result {
            case .placed:
                donePages = end - page
            case .alreadyPresent(let n):
                // Someone placed the next page first (a zero fill on fault): skip it.
                donePages = UInt64(n) >> PageGeometry.shift
                digests?.record(first: page, count: donePages, from: src)
                markPlaced(first: page, count: donePages, urgent: urgent)
                page += donePages
                placed += donePages
                pages.present.insert(page)
                pages.markKnown(page)
                page += 1
                continue
            case .retry(let n):
                // A remove event is pending: the fault thread reads it; retry shortly.
                donePages = UInt64(n) >> PageGeometry.shift
                retries += 1
                if retries > 10_000 { throw .unexpected("UFFDIO_COPY kept returning EAGAIN at page \(page)") }
                if donePages == 0 { usleep(20) }
            case .targetGone:
                throw .unexpected("the process that owns guest memory is gone")
            }
            digests?.record(first: page, count: donePages, from: src)
            markPlaced(first: page, count: donePages, urgent: urgent)
            placed += donePages
            page += donePages
            // A page marked zero meanwhile (removed) must not be placed: re-check the rest.
            if page < end, pages.zero.contains(page) { break }
        }
        return placed
    }

    private func markPlaced(first: UInt64, count: UInt64, urgent: Bool) {
        guard count > 0 else { return }
        for p in first..<(first + count) {
            pages.present.insert(p)
            pages.markKnown(p)
        }
        let now = monotonicNanos()
        for t in pending.resolve(start: first, count: count) {
            Trace.log("fault: pages \(first)+\(count) placed after \((now - t) / 1000) us (urgent \(urgent))")
            metrics.recordFaultLatency(nanos: now - t, viaBulk: !urgent)
        }
        acks.withLock { $0.insert(try! PageRange(start: PageIndex(rawValue: first), count: count)) }
    }

    // MARK: loops

    private enum Tag {
        static let urgentRecv: UInt64 = 1
        static let urgentSend: UInt64 = 2
        static let requests: UInt64 = 3
        static let quit: UInt64 = 4
        static let controlRecv: UInt64 = 5
        static let controlSend: UInt64 = 6
        static let bulkHeader: UInt64 = 7
        static let bulkPayload: UInt64 = 8
    }

    private func urgentLoop(fd: Int32, leftover: [UInt8], requests: RequestQueue, quitFD: Int32) throws {
        JoinableThread.setCurrentNice(-10)
        let ring = try Ring(entries: 64)
        let stream = try MessageStream(fd: fd, tag: Tag.urgentRecv, channel: .urgent, ring: ring, group: 1,
                                       context: PeerDecodeContext(regionPages: pages.regionPages), alreadyRead: leftover)
        let shaper = LinkShaper(LinkSpec(delayNanos: options.link.delayNanos))
        let queue = SendQueue(fd: fd, tag: Tag.urgentSend, shaper: shaper)
        try stream.arm(ring)
        try ring.pollMultishot(fd: requests.event.descriptor.rawValue, userData: Tag.requests)
        try ring.pollMultishot(fd: quitFD, userData: Tag.quit)
        var nextRequestID: UInt64 = 1
        var running = true
        func handle(_ message: PeerMessage) throws {
            guard case .pageData(let data) = message else {
                throw PeerError.unexpected("urgent channel: unexpected \(message.kind) from the source")
            }
            bytesIn.add(UInt64(data.bytes.count), ordering: .relaxed)
            try data.bytes.withUnsafeBytes { raw in
                var offset = 0
                for run in data.runs.ranges {
                    _ = try place(run: run, from: raw.baseAddress! + offset, urgent: true)
                    offset += Int(run.count << PageGeometry.shift)
                }
            }
        }
        try stream.drainBuffered(handle)
        while running {
            let now = monotonicNanos()
            let wake = try queue.pump(ring: ring, now: now)
            let timeout = wake.map { Int64($0 &- now) } ?? 100_000_000
            _ = try ring.submitAndWait(timeoutNanos: max(timeout, 1000))
            try ring.drainCompletions { completion in
                switch completion.userData {
                case Tag.urgentRecv:
                    try stream.complete(completion, ring: ring, handle)
                    if stream.closed { running = false }
                case Tag.urgentSend:
                    _ = try queue.complete(completion, ring: ring)
                case Tag.requests:
                    if !completion.more {
                        try ring.pollMultishot(fd: requests.event.descriptor.rawValue, userData: Tag.requests)
                    }
                    let wanted = requests.take().filter { !pages.known.contains($0) }
                    guard !wanted.isEmpty else { break }
                    let set = PageSet<PageIndex>(pages: wanted.map { PageIndex(rawValue: $0) })
                    // At most 64 ranges per request (the protocol's bound).
                    var batch = PageSet<PageIndex>()
                    let stamp = monotonicNanos()
                    for range in set.ranges {
                        batch.insert(range)
                        if batch.rangeCount == 64 {
                            queue.enqueue(OutgoingFrame(bytes: PeerMessage.pageRequest(
                                try PageRequest(requestID: nextRequestID, pages: batch)).encodedFrame(checksum: fastChecksum)),
                                          now: stamp)
                            nextRequestID += 1
                            batch = PageSet()
                        }
                    }
                    if !batch.isEmpty {
                        queue.enqueue(OutgoingFrame(bytes: PeerMessage.pageRequest(
                            try PageRequest(requestID: nextRequestID, pages: batch)).encodedFrame(checksum: fastChecksum)),
                                      now: stamp)
                        nextRequestID += 1
                    }
                case Tag.quit:
                    running = false
                default:
                    break
                }
            }
        }
    }

    private func bulkLoop(control: PeerConnection, bulkFD: Int32, bulkLeftover: [UInt8],
                          timeline: Timeline) throws {
        let ring = try Ring(entries: 64)
        let controlFD = control.descriptor.rawValue
        let stream = try MessageStream(fd: controlFD, tag: Tag.controlRecv, channel: .control, ring: ring, group: 2,
                                       context: PeerDecodeContext(regionPages: pages.regionPages),
                                       alreadyRead: control.takeBufferedBytes())
        let shaper = LinkShaper(LinkSpec(delayNanos: options.link.delayNanos))
        let controlQueue = SendQueue(fd: controlFD, tag: Tag.controlSend, shaper: shaper)
        try stream.arm(ring)
        let context = PeerDecodeContext(regionPages: pages.regionPages)

        // Bulk frames: header (16 bytes), then the payload, each read whole (MSG_WAITALL) into `staging`.
        // Bytes the handshake already read are consumed first.
        var carried = bulkLeftover[...]
        var want = FrameHeader.size
        var have = 0
        var header: FrameHeader? = nil
        func armBulk() throws {
            let take = min(carried.count, want - have)
            if take > 0 {
                carried.withUnsafeBytes { staging.advanced(by: have).copyMemory(from: $0.baseAddress!, byteCount: take) }
                carried = carried.dropFirst(take)
                have += take
            }
            if have == want {
                try bulkReceived()
                return
            }
            try ring.recv(fd: bulkFD, staging + have, length: want - have, flags: Int32(MSG_WAITALL),
                          userData: header == nil ? Tag.bulkHeader : Tag.bulkPayload)
        }
        func bulkReceived() throws {
            if header == nil {
                let h: FrameHeader
                do {
                    h = try FrameHeader.parse(UnsafeRawBufferPointer(start: staging, count: FrameHeader.size),
                                              link: .peer)
                } catch { throw PeerError.protocolViolation("bulk channel", error) }
                guard h.type == PeerMessage.Kind.pageData.rawValue else {
                    throw PeerError.unexpected("bulk channel: only page data may arrive here, got type \(h.type)")
                }
                header = h
                want = FrameHeader.size + h.length
            } else if let h = header {
                let payload = UnsafeRawBufferPointer(start: staging + FrameHeader.size, count: h.length)
                let runs: PageSet<PageIndex>
                let dataOffset: Int
                do {
                    try h.verify(header: UnsafeRawBufferPointer(start: staging, count: FrameHeader.size),
                                 payload: payload, checksum: fastChecksum)
                    let decoded = try PageData.decodeHeader(payload: payload, context: context)
                    runs = decoded.runs
                    dataOffset = decoded.dataOffset
                } catch { throw PeerError.protocolViolation("bulk channel", error) }
                var offset = dataOffset
                for run in runs.ranges {
                    _ = try place(run: run, from: payload.baseAddress! + offset, urgent: false)
                    offset += Int(run.count << PageGeometry.shift)
                }
                bytesIn.add(UInt64(FrameHeader.size + h.length), ordering: .relaxed)
                Trace.log("destination: bulk frame \(runs.rangeCount) runs placed")
                header = nil
                want = FrameHeader.size
                have = 0
            }
            if !finished { try armBulk() }
        }
        var finished = false
        var sourceDone = false
        var bulkClosed = false
        var lastAck = monotonicNanos()
        var lastSample: UInt64 = 0
        func handle(_ message: PeerMessage) throws {
            switch message {
            case .zeroPages(let set):
                let t0 = monotonicNanos()
                try zeroFillWaiting(in: pages.markZero(set))
                Trace.log("destination: \(set.count) zero pages marked in \((monotonicNanos() - t0) / 1000) us")
            case .done:
                sourceDone = true
            case .abort(let a):
                throw PeerError.aborted(code: a.code, reason: a.reason)
            default:
                throw PeerError.unexpected("control channel: unexpected \(message.kind) from the source")
            }
        }
        try stream.drainBuffered(handle)
        try armBulk()
        var sentDone = false
        while true {
            let now = monotonicNanos()
            let ackDue = now - lastAck > 5_000_000
            let pendingAcks = acks.withLock { a -> PageSet<PageIndex> in
                guard ackDue || a.count >= 4096 else { return PageSet() }
                defer { a = PageSet() }
                return a
            }
            if !pendingAcks.isEmpty {
                for chunk in pendingAcks.chunked(maxRanges: 4096) {
                    controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.ack(chunk).encodedFrame(checksum: fastChecksum)),
                                         now: now)
                }
                lastAck = now
            } else if ackDue { lastAck = now }
            // Taken before the freed pages, so the marker never overtakes a freePages it stands for.
            let scanDone = freeScanDone.withLock { d -> (Bool, UInt64)? in
                defer { d = nil }
                return d
            }
            let freed = pages.freedNotPresent.withLock { f -> PageSet<PageIndex> in
                defer { f = PageSet() }
                return f
            }
            for chunk in freed.chunked(maxRanges: 4096) where !chunk.isEmpty {
                controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.freePages(chunk).encodedFrame(checksum: fastChecksum)),
                                     now: now)
            }
            if let (answered, reported) = scanDone {
                controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.freeScanDone(
                    agentAnswered: answered, pagesReported: reported).encodedFrame(checksum: fastChecksum)), now: now)
            }
            if now - lastSample > 100_000_000 {
                lastSample = now
                Trace.log("dst: known \(pages.knownCount.load(ordering: .relaxed))/\(pages.regionPages) present \(pages.present.count) "
                          + "bytes \(bytesIn.load(ordering: .relaxed)) faults \(metrics.faults.load(ordering: .relaxed)) "
                          + "bulk want \(want) have \(have) header \(header != nil)")
                timeline.sample(pagesPresent: pages.present.count, bytesReceived: bytesIn.load(ordering: .relaxed),
                                faults: metrics.faults.load(ordering: .relaxed), now: now)
            }
            if !sentDone, pages.knownCount.load(ordering: .relaxed) == pages.regionPages, acks.withLock({ $0.isEmpty }) {
                sentDone = true
                finished = true
                let snapshot = metrics.snapshot()
                controlQueue.enqueue(OutgoingFrame(bytes: PeerMessage.done(PeerDone(
                    pagesSent: snapshot.bulkPages + snapshot.urgentPages, bytesSent: bytesIn.load(ordering: .relaxed)))
                    .encodedFrame(checksum: fastChecksum)), now: now)
            }
            if sentDone, controlQueue.isIdle { break }
            let wake = try controlQueue.pump(ring: ring, now: now)
            let timeout = wake.map { Int64($0 &- now) } ?? 5_000_000
            _ = try ring.submitAndWait(timeoutNanos: max(min(timeout, 5_000_000), 1000))
            try ring.drainCompletions { completion in
                switch completion.userData {
                case Tag.controlRecv:
                    try stream.complete(completion, ring: ring, handle)
                    if stream.closed && !finished { throw PeerError.closed("control channel") }
                case Tag.controlSend:
                    _ = try controlQueue.complete(completion, ring: ring)
                case Tag.bulkHeader, Tag.bulkPayload:
                    if completion.result < 0 {
                        if finished { break }
                        throw PeerError.syscall("recv on the bulk channel",
                                                SyscallError(call: "recv", errno: -completion.result))
                    }
                    if completion.result == 0 {
                        bulkClosed = true
                        if !finished && !sourceDone { throw PeerError.closed("bulk channel") }
                        break
                    }
                    have += Int(completion.result)
                    if have < want { try armBulk() } else { try bulkReceived() }
                default:
                    break
                }
            }
            try checkFailure()
        }
        _ = bulkClosed
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
