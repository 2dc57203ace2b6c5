// The source role. The VM's RAM file is final (the source QEMU is stopped and fenced), so the engine
// maps it read-only and moves it: faults first, on the urgent channel (FaultResponder, a thread of its
// own); everything else in scheduler order on the bulk channel (PushLoop, on the calling thread); holes
// (pages that are zero by construction) never. As the destination acknowledges pages they are punched
// out of the file (SourceMemory/ReleaseState), so the source host gets its memory back progressively;
// when the last page is acknowledged the source holds none of the VM (T_release). The two threads share
// the `sent` bitmap, which makes every page go on the wire at most once per session, and a FaultHint,
// which points the push at a fault's neighbours. A session that loses its destination can wait for a
// replacement, which says what it already has, or reach it at another address (`redirect`).

import EpcopyProtocol
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public final class SourceEngine: @unchecked Sendable {
    // SAFETY (@unchecked): the memory is immutable after init; the threads share only the atomic bitmap,
    // the hint, the metrics and the error slot, which are Sendable.
    private let memory: SourceMemory
    public var regionPages: UInt64 { memory.regionPages }
    public let options: SourceOptions
    private let metrics = TransferMetrics()
    private let urgentError = Mutex<PeerError?>(nil)
    private let bulkReleased = Atomic<Bool>(false)
    private let punchingAllowed = Atomic<Bool>(false)
    /// Pages found all-zero at push time and sent as zeroPages ranges instead of data.
    private let zeroContentPages = Atomic<UInt64>(0)
    /// What the destination said about its free scan, and how long the push waited for it.
    private let freeScan = Mutex<(answered: Bool?, heldNanos: UInt64)>((nil, 0))
    /// CPU seconds of the engine's own threads (not the process: a test or benchmark shares it).
    private let threadCPU = Mutex<Double>(0)

    /// The link as the engine sees it, for progress displays: losses so far, and since when it is down.
    public let link = LinkStatus()
    /// Another address of the same destination, for the next connection (see `redirect`).
    private let redirected = Mutex<(endpoint: Endpoint, renewsDeadline: Bool)?>(nil)

    /// Reach the destination at `endpoint` from the next connection on: a session still connected goes on,
    /// one reconnecting stops trying the old address and tries this one. An operator's redirect renews the
    /// reconnect deadline (`renewingDeadline`); a daemon going round the peer's addresses by itself does not,
    /// so that the deadline still bounds the outage.
    public func redirect(to endpoint: Endpoint, renewingDeadline: Bool = true) {
        redirected.withLock { $0 = (endpoint, renewingDeadline) }
    }

    /// Pages sent so far (bulk and urgent), for progress displays.
    public var pagesSent: UInt64 {
        metrics.bulkPages.load(ordering: .relaxed) + metrics.urgentPages.load(ordering: .relaxed)
    }

    /// Pages sent as zero ranges so far (claimed and queued), for progress displays.
    public var pagesSentAsZero: UInt64 { zeroContentPages.load(ordering: .relaxed) }

    /// Lets the bulk push go beyond the device class (see `holdBulkUntilReleased`).
    public func releaseBulk() { bulkReleased.store(true, ordering: .releasing) }

    /// Lets acknowledged pages be punched (see `punchOnlyOnceAllowed`).
    public func allowPunching() { punchingAllowed.store(true, ordering: .releasing) }

    /// Opens and maps the RAM file (see SourceMemory).
    public init(ramFile path: String, options: SourceOptions) throws(PeerError) {
        memory = try SourceMemory(ramFile: path)
        self.options = options
    }

    /// Pages that are holes in the file: zero by construction, never sent.
    public func holes() -> PageSet<PageIndex> { memory.holes() }

    /// Connects to the destination and moves the whole region; returns when the destination holds
    /// every page and the source has released everything.
    ///
    /// `gate`, when given, is called once the channels are connected and authenticated and must return
    /// when the RAM file is final (the source VM has stopped): a migration connects while the VM still
    /// runs, so that at STOP the first pages — those the device-state load touches — leave at once. The gate
    /// returns false when the migration is off before its switch: nothing is sent, the destination is told
    /// (`abort`), and `run` throws `.aborted`.
    public func run(destination: Endpoint, gate: (@Sendable () -> Bool)? = nil) throws(PeerError) -> SourceReport {
        let start = monotonicNanos()
        let cpuStart = threadCPUSeconds()
        var state = ReleaseState(regionPages: regionPages)
        var zero = PageSet<PageIndex>()
        var pendingGate = gate
        var reconnects = 0
        var presentAtResume: UInt64 = 0
        var pagesFree: UInt64 = 0
        var pushEnd: UInt64 = 0
        let wait = UInt64(max(options.reconnectTimeoutMillis, 0)) * 1_000_000
        var lostAt: UInt64? = nil
        var pausedNanos: UInt64 = 0
        var backoffMicros: UInt32 = 50_000
        // The deadline runs from the first loss after the last one that made progress: a session that resumes
        // and fails again at once, over and over, must not renew it forever.
        var stalledSince: UInt64? = nil
        var releasedAtLastLoss: UInt64 = 0
        var destination = destination
        while true {
            if let next = redirected.withLock({ r -> (endpoint: Endpoint, renewsDeadline: Bool)? in defer { r = nil }; return r }) {
                Log.engine.warning("source: the destination is reached at \(next.endpoint) from now on (was \(destination))")
                destination = next.endpoint
                if next.renewsDeadline { stalledSince = monotonicNanos() }  // the deadline starts again from here
                backoffMicros = 50_000
            }
            do {
                let outcome = try runSession(destination: destination, retryUntil: (stalledSince ?? start) + wait,
                                             zero: &zero,
                                             gate: &pendingGate, state: &state, presentAtResume: &presentAtResume,
                                             pagesFree: &pagesFree, resumed: { [link] now in
                                                 if let lost = lostAt { pausedNanos += now - lost }
                                                 lostAt = nil
                                                 link.resumed()
                                             })
                pushEnd = outcome
                break
            } catch {
                // A lost link, or a destination that went away: the next session (the same destination once the
                // link is back, or its replacement) says what it has. While reconnecting, a handshake that
                // times out is the link still being down, not a peer that misbehaves.
                var timedOut = false
                if case .timedOut = error { timedOut = true }
                let recoverable = error.isConnectionLoss || (lostAt != nil && timedOut)
                let released = state.released.count
                if released > releasedAtLastLoss { stalledSince = nil }
                releasedAtLastLoss = released
                if stalledSince == nil { stalledSince = monotonicNanos() }
                guard wait > 0, recoverable, monotonicNanos() < stalledSince! + wait else { throw error }
                if lostAt == nil {
                    reconnects += 1
                    lostAt = monotonicNanos()
                    link.lost(at: lostAt!)
                    backoffMicros = 50_000
                    Log.engine.warning("source: link lost (\(error)); reconnecting for up to \(options.reconnectTimeoutMillis) ms; \(state.released.count) of \(regionPages) pages are at the destination")
                } else {
                    Log.engine.info("source: reconnect attempt failed: \(error)")
                }
                usleep(backoffMicros)
                backoffMicros = min(backoffMicros * 2, 500_000)
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
            pausedMillis: Double(pausedNanos) / 1e6,
            pagesByClass: snapshot.pagesByClass, pagesZeroContent: zeroContentPages.load(ordering: .relaxed),
            freeScanAnswered: freeScan.withLock { $0.answered },
            freeHoldMillis: Double(freeScan.withLock { $0.heldNanos }) / 1e6)
    }

    /// One connected session; returns the time the push finished. Throws `.closed` if the
    /// destination went away (the caller may wait for it to come back).
    private func runSession(destination: Endpoint, retryUntil deadline: UInt64, zero: inout PageSet<PageIndex>,
                            gate: inout (@Sendable () -> Bool)?, state: inout ReleaseState,
                            presentAtResume: inout UInt64, pagesFree: inout UInt64,
                            resumed: (UInt64) -> Void) throws(PeerError) -> UInt64 {
        let identity = ChannelIdentity(sessionID: options.sessionID, vmName: options.vmName, regionPages: regionPages,
                                       key: options.authKey)
        func open(_ kind: PeerChannelKind) throws(PeerError) -> PeerChannel {
            try PeerChannel.connect(to: destination, kind: kind, identity: identity,
                                    timeoutMillis: options.connectTimeoutMillis, retryUntil: deadline,
                                    giveUpIf: { self.redirected.withLock { $0 != nil } })
        }
        let control = try open(.control)
        let urgent = try open(.urgent)
        let bulk = try open(.bulk)

        // The destination opens with what it already has (nothing, unless it is a replacement).
        let present: PageSet<PageIndex>
        switch try control.receive(timeoutMillis: options.connectTimeoutMillis) {
        case .resume(let r) where r.sessionID == options.sessionID:
            present = r.present
            resumed(monotonicNanos())
        case .abort(let a):
            throw .aborted(code: a.code, reason: a.reason)
        case let other:
            throw .unexpected("expected resume on the control channel, got \(other.kind)")
        }
        if let wait = gate {
            guard wait() else {
                let reason = "the migration was called off before the switch"
                try? control.send(.abort(PeerAbort(code: PeerAbort.cancelledCode, reason: reason)))
                throw .aborted(code: PeerAbort.cancelledCode, reason: reason)
            }
            gate = nil
        }
        let gateOpened = monotonicNanos()
        if zero.isEmpty {
            // The file is final now: its holes are pages that are zero and will stay so.
            zero = memory.holes()
            state.released.formUnion(zero)
        }
        Log.engine.trace("source: holes \(zero.count) pages in \(zero.rangeCount) ranges, scan \((monotonicNanos() - gateOpened) / 1000) us")
        presentAtResume = present.count
        // Pages released here that the destination does not hold are zero (holes, zero content): on a resumed
        // session the zeroPages that said so may have been lost with the old one.
        let zeroThere = state.released.subtracting(present)
        state.released.formUnion(present)
        state.toPunch.formUnion(present)
        for chunk in zeroThere.chunked(maxRanges: 4096) { try control.send(.zeroPages(chunk)) }

        // Every page not yet released is (again) to be sent: a fresh bitmap per session.
        let sent = AtomicPageBitmap(pageCount: regionPages)
        let hint = FaultHint()
        let scheduler = PushScheduler(regionPages: regionPages, classes: options.classes, sent: sent, hint: hint,
                                      chunk: AdaptiveChunk(minPages: 16, maxPages: options.maxFramePages),
                                      prefetchPages: options.prefetchPages)
        scheduler.skip(state.released)
        let shaper = LinkShaper(options.link)
        let framer = PageFramer(base: memory.base, maxFramePages: options.maxFramePages)
        let stop = try Self.eventFD("urgent loop stop")
        let responder = FaultResponder(channel: urgent, sent: sent, hint: hint, shaper: shaper, framer: framer,
                                       metrics: metrics)
        let stopFD = stop.descriptor.rawValue
        // A new session: what the last one's urgent thread hit is history.
        urgentError.withLock { $0 = nil }
        let urgentThread = JoinableThread(name: "epcopy-src-urg") { [self] in
            do { try responder.run(stopFD: stopFD) } catch let error as PeerError {
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
        let push = PushLoop(control: control, bulk: bulk, memory: memory, scheduler: scheduler, shaper: shaper,
                            framer: framer, options: options, shared: PushShared(
                                metrics: metrics,
                                bulkReleased: { [self] in self.bulkReleased.load(ordering: .acquiring) },
                                mayPunch: { [self] in
                                    !self.options.punchOnlyOnceAllowed || self.punchingAllowed.load(ordering: .acquiring)
                                },
                                urgentFailure: { [self] in self.urgentError.withLock { $0 } },
                                countZeroContent: { [self] in self.zeroContentPages.add($0, ordering: .relaxed) },
                                freeScanAnswered: { [self] answered in self.freeScan.withLock { $0.answered = answered } },
                                freeHeld: { [self] held in self.freeScan.withLock { $0.heldNanos += held } }))
        let pushEnd = try push.run(state: &state, pagesFree: &pagesFree)
        withExtendedLifetime(bulk) {}
        if let error = urgentError.withLock({ $0 }) { throw error }
        return pushEnd
    }

    private static func eventFD(_ what: String) throws(PeerError) -> EventFD {
        do { return try EventFD() } catch { throw .syscall(what, error) }
    }
}
