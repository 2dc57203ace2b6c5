// The destination role. The guest already runs here; its memory is registered with a userfaultfd, so
// every first touch of a page that has not arrived stops in the kernel until this engine places it.
// The engine is a composition: the fault service (its own thread: resolve or enqueue), the fault
// requester (urgent channel, its own thread: requests out, faulted pages in) and the bulk loop on the
// calling thread (pushed pages in, acknowledgements and control out), all placing through one PagePlacer.
// When every page is present or known to be zero, the engine tells the source it is done and unregisters
// the range: a page never placed reads as zero from then on, which is exactly what holes and free pages are.

import EpcopyProtocol
import Logging
import Synchronization

public final class DestinationEngine: @unchecked Sendable {
    // SAFETY (@unchecked): configuration is immutable; threads share only Sendable state (page state,
    // queues, metrics, the error slot). `memory` is read-only after init.
    private let memory: DestinationMemory
    public let options: DestinationOptions
    public let pages: DestinationPages
    public let metrics = TransferMetrics()
    private let placer: PagePlacer
    private let counters = ReceiveCounters()
    private let failure = Mutex<PeerError?>(nil)
    private let freeScanDone = Mutex<(Bool, UInt64)?>(nil)
    /// CPU seconds of the engine's helper threads, added when each ends.
    private let threadCPU = Mutex<Double>(0)
    /// The link as the engine sees it: losses so far, and since when it is down.
    public let link = LinkStatus()
    /// Digests of placed pages when `options.recordDigests`.
    public var digests: PageDigests? { placer.digests }

    public init(memory: consuming DestinationMemory, options: DestinationOptions) {
        self.memory = memory
        self.options = options
        let regionPages = self.memory.regionPages
        pages = DestinationPages(regionPages: regionPages)
        placer = PagePlacer(placement: self.memory.placement, pages: pages, pending: PendingFaults(), metrics: metrics,
                            digests: options.recordDigests ? options.digests ?? PageDigests(pageCount: regionPages) : nil)
        for range in options.initiallyPresent.ranges where range.lowerBound.rawValue < regionPages {
            pages.markPresent(first: range.lowerBound, count: min(range.upperBound.rawValue, regionPages)
                                - range.lowerBound.rawValue)
        }
        // Pages below the mapping (firstPage > 0) are not ours to fetch.
        pages.markOutOfScope(first: PageIndex(rawValue: 0), count: self.memory.firstPage.rawValue)
    }

    /// The engine's own mapping of guest memory (path (a) only), as an integer address.
    public var ownMappingAddress: UInt? { memory.ownMappingAddress }

    /// Accepts the source's three channels on `listener` and serves the transfer until every page is
    /// here. The guest (or test program) may fault from before this call until after it returns.
    ///
    /// A lost link (reset, closed, or silent past the keepalive timeout) ends only the session: with
    /// `reconnectTimeoutMillis` set, the engine waits that long for the source to connect again on the same
    /// listener, tells it every page it holds (`resume`), re-requests the faults that were waiting, and goes
    /// on. The fault thread runs throughout, so a vCPU that touches a missing page meanwhile just waits.
    public func run(listener: borrowing Listener) throws(PeerError) -> DestinationReport {
        let start = monotonicNanos()
        let cpuStart = threadCPUSeconds()
        let timeline = Timeline(start: start)
        let requests: RequestQueue
        do { requests = try RequestQueue() } catch { throw .syscall("destination set-up: eventfd", error) }
        let quitFaults = try Self.eventFD()
        let faultService = FaultService(placement: placer.placement, pages: pages, requests: requests,
                                        pending: placer.pending, metrics: metrics,
                                        quitFD: quitFaults.descriptor.rawValue)
        let faultThread = helperThread("epcopy-faults") { () throws(PeerError) in
            do throws(SyscallError) { try faultService.run() } catch { throw .syscall("fault thread", error) }
        }
        defer {
            quitFaults.signal()
            faultThread.join()
        }
        var losses = 0
        var pausedNanos: UInt64 = 0
        var lostAt: UInt64? = nil
        while true {
            do throws(PeerError) {
                let deadline = lostAt.map { $0 + Self.nanos(options.reconnectTimeoutMillis) }
                    ?? start + Self.nanos(options.acceptTimeoutMillis)
                try runSession(listener: listener, requests: requests, timeline: timeline, acceptDeadline: deadline,
                               reconnecting: lostAt != nil, resumed: { [link] now in
                                   if let lost = lostAt { pausedNanos += now - lost }
                                   lostAt = nil
                                   link.resumed()
                               })
                break
            } catch {
                // A failure of the fault thread, or anything the source said wrong, is not a lost link; a
                // reconnect that ran out of time is final.
                guard options.reconnectTimeoutMillis > 0, error.isConnectionLoss, failure.withLock({ $0 }) == nil
                else { throw error }
                if lostAt == nil {
                    losses += 1
                    lostAt = monotonicNanos()
                    link.lost(at: lostAt!)
                }
                Log.engine.warning("destination: link lost (\(error)); waiting up to \(options.reconnectTimeoutMillis) ms for the source; \(placer.pending.count) faults wait for it")
            }
        }
        if options.unregisterWhenDone {
            do { try placer.placement.unregister() } catch {
                // The range is gone already if the process that owned it is (nothing left to serve); any
                // other failure leaves its threads to fault on pages nobody will place, so say so.
                Log.engine.warning("destination: unregister at the end failed: \(error)")
            }
        }
        let end = monotonicNanos()
        let snapshot = metrics.snapshot()
        return DestinationReport(regionPages: pages.regionPages, pagesReceived: snapshot.bulkPages + snapshot.urgentPages,
                                 pagesZero: pages.zeroCount, bytesReceived: counters.bytes.load(ordering: .relaxed),
                                 transferMillis: Double(end - start) / 1e6,
                                 cpuSeconds: threadCPUSeconds() - cpuStart + threadCPU.withLock { $0 },
                                 metrics: snapshot, timeline: timeline.jsonLines, linkLosses: losses,
                                 pausedMillis: Double(pausedNanos) / 1e6)
    }

    /// One session: accept the three channels, say what is here, serve until done or the link is lost.
    /// While `reconnecting`, a connection that fails its handshake (a stale attempt, a scanner, a wrong key)
    /// is refused and the wait goes on: only the deadline ends it, so nobody can end a paused migration by
    /// connecting to it.
    private func runSession(listener: borrowing Listener, requests: RequestQueue, timeline: Timeline,
                            acceptDeadline deadline: UInt64, reconnecting: Bool,
                            resumed: (UInt64) -> Void) throws(PeerError) {
        let identity = ChannelIdentity(sessionID: options.sessionID, vmName: "destination",
                                       regionPages: pages.regionPages, key: options.authKey)
        var channels: [PeerChannelKind: PeerChannel] = [:]
        // The three channels may arrive in any order.
        while channels.count < PeerChannelKind.session.count {
            let left = Int64(deadline) - Int64(monotonicNanos())
            guard left > 0 else {
                throw .timedOut("waiting for the source (\(PeerChannelKind.session.count - channels.count) channels to go)")
            }
            let channel: PeerChannel
            do {
                channel = try PeerChannel.accept(on: listener, identity: identity, kinds: PeerChannelKind.session,
                                                 timeoutMillis: Int32(min(left / 1_000_000 + 1, Int64(Int32.max))))
            } catch {
                guard monotonicNanos() < deadline else {
                    throw .timedOut("waiting for the source on \(listener.endpoint) (\(channels.count) of "
                                    + "\(PeerChannelKind.session.count) channels came)")
                }
                guard reconnecting || error.isConnectionLoss else { throw error }
                Log.engine.info("destination: refused a connection while waiting for the source: \(error)")
                continue
            }
            if channels[channel.channel] != nil {
                // A reconnecting source may leave a half-open attempt behind: the newest connection wins.
                Log.engine.info("destination: the source opened its \(channel.channel) channel again; using the new one")
            }
            channels[channel.channel] = channel
        }
        let control = channels[.control]!
        let urgent = channels[.urgent]!
        let bulk = channels[.bulk]!
        // A resumed session: everything present or zero here, which the source need not send again (and may
        // release). The first session says only what a replacement engine took over; pages the guest freed
        // before it go as freePages, so the source counts them as what they are.
        var have = options.initiallyPresent
        if reconnecting { have.formUnion(pages.settledSet()) }
        try control.send(.resume(PeerResume(sessionID: options.sessionID, present: have)))
        resumed(monotonicNanos())
        // Faults whose requests went out on a lost urgent channel are asked for again.
        requests.push(placer.pending.waitingPages())

        let quitUrgent = try Self.eventFD()
        let requester = FaultRequester(channel: urgent, requests: requests, placer: placer, counters: counters,
                                       link: options.link)
        let quitUrgentFD = quitUrgent.descriptor.rawValue
        let urgentError = Mutex<PeerError?>(nil)
        let urgentThread = JoinableThread(name: "epcopy-dst-urg") { [self] in
            do throws(PeerError) {
                try Self.loopErrors("urgent loop") { try requester.run(quitFD: quitUrgentFD) }
            } catch { urgentError.withLock { $0 = error } }
            let cpu = threadCPUSeconds()
            threadCPU.withLock { $0 += cpu }
        }
        defer {
            quitUrgent.signal()
            urgentThread.join()
        }
        let loop = DestinationBulkLoop(control: control, bulk: bulk, placer: placer, counters: counters,
                                       link: options.link, keepalive: options.keepalive, timeline: timeline,
                                       freeScanDone: { [self] in self.freeScanDone.withLock { $0 } },
                                       failure: { [self] in
                                           self.failure.withLock { $0 } ?? urgentError.withLock { $0 }
                                       })
        try Self.loopErrors("bulk loop") { try loop.run() }
        withExtendedLifetime((urgent, bulk)) {}
    }

    private static func nanos(_ millis: Int32) -> UInt64 { UInt64(max(millis, 0)) * 1_000_000 }

    private static func eventFD() throws(PeerError) -> EventFD {
        do { return try EventFD() } catch { throw .syscall("destination set-up: eventfd", error) }
    }

    /// A helper thread whose error ends the transfer (seen by the bulk loop) and whose CPU time is counted.
    private func helperThread(_ name: String, _ body: @escaping @Sendable () throws(PeerError) -> Void) -> JoinableThread {
        JoinableThread(name: name) { [self] in
            do throws(PeerError) { try body() } catch { fail(error) }
            let cpu = threadCPUSeconds()
            threadCPU.withLock { $0 += cpu }
        }
    }

    /// Loops throw PeerError for what the peer did and SyscallError for what the kernel said.
    static func loopErrors(_ step: String, _ body: () throws -> Void) throws(PeerError) {
        do { try body() } catch let error as PeerError { throw error } catch let error as SyscallError {
            throw .syscall(step, error)
        } catch { throw .unexpected("\(step): \(error)") }
    }

    /// Pages the guest reports free after the switch (the agent's post-resume scan): those not yet here
    /// are never fetched — a fault zero-fills them — and the source is told to drop them from the push.
    /// Safe at any time: on the destination every first touch of a missing page goes through this
    /// engine, and a page that is free at scan time has no content anyone may read.
    public func markFree(_ free: PageSet<PageIndex>) {
        do { pages.noteFreedNotPresent(try placer.markZero(free)) } catch { fail(error) }
    }

    /// Tells the source the guest's free scan is in (after `markFree` with its pages) — or that none will come
    /// (`agentAnswered` false): the source then pushes the believed-free pages it held back.
    public func finishFreeScan(agentAnswered: Bool, pagesReported: UInt64) {
        freeScanDone.withLock { $0 = (agentAnswered, pagesReported) }
    }

    private func fail(_ error: PeerError) {
        failure.withLock { if $0 == nil { $0 = error } }
    }
}
