// The destination's one path from received bytes to guest memory. Both receivers (urgent replies and the
// bulk push) hand their runs of pages here; this decides which pages still need placing (never one that
// is present, never one marked zero since — placing stale contents would resurrect a page the guest
// removed), places them through Placement, records what was placed (state, acknowledgements for the
// source's release, fault latencies, digests) and answers faults on pages that turned out to be zero.

import EpcopyProtocol
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public final class PagePlacer: Sendable {
    public let placement: Placement
    public let pages: DestinationPages
    public let pending: PendingFaults
    public let metrics: TransferMetrics
    /// Digests of placed pages (`--verify`).
    public let digests: PageDigests?
    /// Placed since the last acknowledgement was sent.
    private let unacknowledged = Mutex(PageSet<PageIndex>())

    public init(placement: Placement, pages: DestinationPages, pending: PendingFaults, metrics: TransferMetrics,
                digests: PageDigests?) {
        self.placement = placement
        self.pages = pages
        self.pending = pending
        self.metrics = metrics
        self.digests = digests
    }

    /// Places pages `[run)` from `source` (the run's bytes, contiguous). Pages already present or marked
    /// zero are skipped. Returns the pages placed.
    @discardableResult
    public func place(run: PageRange<PageIndex>, from source: UnsafeRawPointer, urgent: Bool) throws(PeerError) -> UInt64 {
        var placed: UInt64 = 0
        var p = run.lowerBound.rawValue
        let end = run.upperBound.rawValue
        while p < end {
            // Longest stretch of pages that still need placing.
            while p < end, pages.isSettled(PageIndex(rawValue: p)) { p += 1 }
            var q = p
            while q < end, !pages.isSettled(PageIndex(rawValue: q)) { q += 1 }
            if q > p {
                // SAFETY: `source` holds the whole run; p and q lie inside it.
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

    /// One UFFDIO_COPY per stretch, resumed where the kernel stopped.
    private func copy(first: UInt64, count: UInt64, from source: UnsafeRawPointer,
                      urgent: Bool) throws(PeerError) -> UInt64 {
        var page = first
        let end = first + count
        var placed: UInt64 = 0
        var retries = 0
        while page < end {
            // SAFETY: `page` is inside [first, end), which `source` covers.
            let src = source + Int((page - first) << PageGeometry.shift)
            let result: Userfaultfd.Placement
            do { result = try placement.copy(first: PageIndex(rawValue: page), count: end - page, from: src) } catch {
                throw .syscall("placing page \(page)", error)
            }
            let donePages: UInt64
            switch result {
            case .placed:
                donePages = end - page
            case .alreadyPresent(let n):
                // Someone placed the next page first (a zero fill on fault): record what we placed, skip it.
                donePages = UInt64(n) >> PageGeometry.shift
                recordPlaced(first: page, count: donePages, from: src, urgent: urgent)
                page += donePages
                placed += donePages
                pages.markPresent(first: PageIndex(rawValue: page), count: 1)
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
            recordPlaced(first: page, count: donePages, from: src, urgent: urgent)
            placed += donePages
            page += donePages
            // A page marked zero meanwhile (removed) must not be placed: re-check the rest.
            if page < end, pages.isZero(PageIndex(rawValue: page)) { break }
        }
        return placed
    }

    private func recordPlaced(first: UInt64, count: UInt64, from source: UnsafeRawPointer, urgent: Bool) {
        guard count > 0 else { return }
        let firstPage = PageIndex(rawValue: first)
        digests?.record(first: first, count: count, from: source)
        pages.markPresent(first: firstPage, count: count)
        let now = monotonicNanos()
        for t in pending.resolve(first: firstPage, count: count) {
            Log.engine.trace("fault: pages \(first)+\(count) placed after \((now - t) / 1000) us (urgent \(urgent))")
            metrics.recordFaultLatency(nanos: now - t, viaBulk: !urgent)
        }
        unacknowledged.withLock { $0.insert(try! PageRange(start: firstPage, count: count)) }
    }

    /// Marks pages zero (the source's zero ranges, the guest's free report) and answers the faults already
    /// waiting for them: the source will send nothing for those, so they are zero-filled and woken here.
    /// Returns the pages newly marked.
    @discardableResult
    public func markZero(_ set: PageSet<PageIndex>) throws(PeerError) -> PageSet<PageIndex> {
        let marked = pages.markZero(set)
        for page in pending.take(in: marked) { try zeroFill(page) }
        return marked
    }

    /// Maps a zero page at `page`, whose fault is waiting and has been taken out of `pending`; wakes it.
    private func zeroFill(_ page: PageIndex) throws(PeerError) {
        let result: Userfaultfd.Placement
        do { result = try placement.zeroFill(page) } catch { throw .syscall("zero-filling \(page)", error) }
        switch result {
        case .placed, .alreadyPresent, .retry:
            // .alreadyPresent: mapped meanwhile (the fault thread zero-filled it on a second fault), now woken.
            // .retry: a remove is pending and the fault will be delivered again, to the fault thread.
            break
        case .targetGone:
            throw .unexpected("the process that owns guest memory is gone")
        }
        pages.markZeroFilled(page)
        Log.engine.trace("destination: \(page) was requested, then marked zero: zero-filled")
    }

    /// Acknowledgements due: everything placed since the last call, when `force` or at least `minPages`.
    public func takeAcknowledgements(force: Bool, minPages: UInt64 = 4096) -> PageSet<PageIndex> {
        unacknowledged.withLock { a in
            guard force || a.count >= minPages else { return PageSet() }
            defer { a = PageSet() }
            return a
        }
    }

    public var hasUnacknowledged: Bool { unacknowledged.withLock { !$0.isEmpty } }
}
