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
    /// Digests of placed pages when `options.recordDigests`.
    public var digests: PageDigests? { placer.digests }

    public init(memory: consuming DestinationMemory, options: DestinationOptions) {
        self.memory = memory
        self.options = options
        let regionPages = self.memory.regionPages
        pages = DestinationPages(regionPages: regionPages)
        placer = PagePlacer(placement: self.memory.placement, pages: pages, pending: PendingFaults(), metrics: metrics,
                            digests: options.recordDigests ? PageDigests(pageCount: regionPages) : nil)
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
    public func run(listener: borrowing Listener) throws(PeerError) -> DestinationReport {
        let start = monotonicNanos()
        let cpuStart = threadCPUSeconds()
        let timeline = Timeline(start: start)
        let identity = ChannelIdentity(sessionID: options.sessionID, vmName: "destination",
                                       regionPages: pages.regionPages, key: options.authKey)
        var channels: [PeerChannelKind: PeerChannel] = [:]
        // The three channels may arrive in any order.
        while channels.count < PeerChannelKind.session.count {
            let channel = try PeerChannel.accept(on: listener, identity: identity, kinds: PeerChannelKind.session,
                                                 timeoutMillis: options.acceptTimeoutMillis)
            guard channels[channel.channel] == nil else {
                throw .unexpected("the source opened a second \(channel.channel) channel for one session")
            }
            channels[channel.channel] = channel
        }
        let control = channels[.control]!
        let urgent = channels[.urgent]!
        let bulk = channels[.bulk]!
        try control.send(.resume(PeerResume(sessionID: options.sessionID, present: options.initiallyPresent)))

        func eventFD() throws(PeerError) -> EventFD {
            do { return try EventFD() } catch { throw .syscall("destination set-up: eventfd", error) }
        }
        let requests: RequestQueue
        do { requests = try RequestQueue() } catch { throw .syscall("destination set-up: eventfd", error) }
        let quitFaults = try eventFD()
        let quitUrgent = try eventFD()
        let faultService = FaultService(placement: placer.placement, pages: pages, requests: requests,
                                        pending: placer.pending, metrics: metrics,
                                        quitFD: quitFaults.descriptor.rawValue)
        let faultThread = helperThread("epcopy-faults") { () throws(PeerError) in
            do throws(SyscallError) { try faultService.run() } catch { throw .syscall("fault thread", error) }
        }
        let requester = FaultRequester(channel: urgent, requests: requests, placer: placer, counters: counters,
                                       link: options.link)
        let quitUrgentFD = quitUrgent.descriptor.rawValue
        let urgentThread = helperThread("epcopy-dst-urg") { () throws(PeerError) in
            try Self.loopErrors("urgent loop") { try requester.run(quitFD: quitUrgentFD) }
        }
        defer {
            quitFaults.signal()
            quitUrgent.signal()
            faultThread.join()
            urgentThread.join()
        }
        let loop = DestinationBulkLoop(control: control, bulk: bulk, placer: placer, counters: counters,
                                       link: options.link, timeline: timeline,
                                       takeFreeScanDone: { [self] in
                                           self.freeScanDone.withLock { d in defer { d = nil }; return d }
                                       },
                                       failure: { [self] in self.failure.withLock { $0 } })
        try Self.loopErrors("bulk loop") { try loop.run() }
        if options.unregisterWhenDone {
            do { try placer.placement.unregister() } catch {
                // The range is gone already only if the process that owned it is: nothing left to serve.
                Log.engine.trace("destination: unregister at the end: \(error)")
            }
        }
        let end = monotonicNanos()
        let snapshot = metrics.snapshot()
        withExtendedLifetime((urgent, bulk)) {}
        return DestinationReport(regionPages: pages.regionPages, pagesReceived: snapshot.bulkPages + snapshot.urgentPages,
                                 pagesZero: pages.zeroCount, bytesReceived: counters.bytes.load(ordering: .relaxed),
                                 transferMillis: Double(end - start) / 1e6,
                                 cpuSeconds: threadCPUSeconds() - cpuStart + threadCPU.withLock { $0 },
                                 metrics: snapshot, timeline: timeline.jsonLines)
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
