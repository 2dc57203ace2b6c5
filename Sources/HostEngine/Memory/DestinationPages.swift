// What the destination knows about each page of guest memory, shared by the fault thread and the
// engine's receive loops: present (placed), zero (never fetch; zero-fill on fault — holes at the source,
// free pages, ranges the guest removed), and the faults still waiting for a page. The transfer is complete
// when every page is present or zero. The state only records; deciding and placing happen elsewhere
// (the engine decides, Placement places).

import EpcopyProtocol
import Synchronization

/// Page states the destination threads share, by RAM-file page.
public final class DestinationPages: Sendable {
    // Bit i of each bitmap is RAM-file page i.
    private let presentBits: AtomicPageBitmap
    private let zeroBits: AtomicPageBitmap
    private let knownBits: AtomicPageBitmap
    public let regionPages: UInt64
    /// Pages known so far (popcount of `known`, kept as a counter: the loops test it every iteration).
    private let knownPages = Atomic<UInt64>(0)
    /// Pages the guest freed or removed that were not here yet: the source must not send them.
    private let freedNotPresent = Mutex(PageSet<PageIndex>())

    public init(regionPages: UInt64) {
        self.regionPages = regionPages
        presentBits = AtomicPageBitmap(pageCount: regionPages)
        zeroBits = AtomicPageBitmap(pageCount: regionPages)
        knownBits = AtomicPageBitmap(pageCount: regionPages)
    }

    @inline(__always) public func isPresent(_ page: PageIndex) -> Bool { presentBits.contains(page.rawValue) }
    @inline(__always) public func isZero(_ page: PageIndex) -> Bool { zeroBits.contains(page.rawValue) }
    @inline(__always) public func isKnown(_ page: PageIndex) -> Bool { knownBits.contains(page.rawValue) }
    /// Present, or zero: nothing more will arrive or be asked for.
    @inline(__always) public func isSettled(_ page: PageIndex) -> Bool { isPresent(page) || isZero(page) }

    /// Pages placed so far.
    public var presentCount: UInt64 { presentBits.count }
    /// Pages known to be zero so far.
    public var zeroCount: UInt64 { zeroBits.count }
    public var knownCount: UInt64 { knownPages.load(ordering: .relaxed) }
    /// Every page is present or zero.
    public var isComplete: Bool { knownCount == regionPages }

    /// Every page present or zero: what a resumed session tells the source it need not send.
    public func settledSet() -> PageSet<PageIndex> {
        var settled = PageSet(ranges: presentBits.setRuns())
        settled.formUnion(PageSet(ranges: zeroBits.setRuns()))
        return settled
    }

    /// Marks `[first, first+count)` placed (and known, each page counted once).
    public func markPresent(first: PageIndex, count: UInt64) {
        for p in first.rawValue..<(first.rawValue + count) {
            presentBits.insert(p)
            markKnown(p)
        }
    }

    /// Marks one page mapped by a zero fill: present from now on, as far as faults are concerned.
    public func markZeroFilled(_ page: PageIndex) { presentBits.insert(page.rawValue) }

    /// Marks pages the engine will never fetch and that are not in the region's scope (below the mapping).
    public func markOutOfScope(first: PageIndex, count: UInt64) {
        for p in first.rawValue..<(first.rawValue + count) { markKnown(p) }
    }

    @inline(__always)
    private func markKnown(_ page: UInt64) {
        if knownBits.insert(page) { knownPages.add(1, ordering: .relaxed) }
    }

    /// Marks pages never to be fetched (zero on fault); returns the pages newly marked. Works a bitmap
    /// word at a time: the source's hole list covers most of a fresh guest and arrives in the middle of
    /// the switchover, so a page-at-a-time loop here showed up as 120 ms of downtime.
    /// A page already present stays as it is: placement and the fault thread check `present` first.
    public func markZero(_ pages: PageSet<PageIndex>) -> PageSet<PageIndex> {
        var marked: [PageRange<PageIndex>] = []
        for range in pages.ranges where range.lowerBound.rawValue < regionPages {
            let start = range.lowerBound.rawValue
            let count = min(range.upperBound.rawValue, regionPages) - start
            zeroBits.claim(start: start, count: count) { first, n in
                marked.append(try! PageRange(start: PageIndex(rawValue: first), count: n))
                var newlyKnown: UInt64 = 0
                knownBits.claim(start: first, count: n) { _, k in newlyKnown += k }
                knownPages.add(newlyKnown, ordering: .relaxed)
            }
        }
        return PageSet(ranges: marked)
    }

    /// The guest (or its QEMU) removed `[first, first+count)`: those pages read as zero from now on,
    /// present or not. Returns the pages that had not arrived yet (the source must not send them).
    public func markRemoved(first: PageIndex, count: UInt64) -> PageSet<PageIndex> {
        var freed = PageSet<PageIndex>()
        for p in first.rawValue..<(first.rawValue + count) {
            let wasPresent = presentBits.contains(p)
            presentBits.remove(p)
            if zeroBits.insert(p) { markKnown(p) }
            if !wasPresent { freed.insert(PageIndex(rawValue: p)) }
        }
        return freed
    }

    /// Records pages freed before they arrived, for the next message to the source.
    public func noteFreedNotPresent(_ pages: PageSet<PageIndex>) {
        guard !pages.isEmpty else { return }
        freedNotPresent.withLock { $0.formUnion(pages) }
    }

    /// Takes the pages noted by `noteFreedNotPresent` since the last call.
    public func takeFreedNotPresent() -> PageSet<PageIndex> {
        freedNotPresent.withLock { f in
            defer { f = PageSet() }
            return f
        }
    }
}

/// Pages whose faults are waiting for the source, with the time each fault was read.
public final class PendingFaults: Sendable {
    private let waiting = Mutex<[PageIndex: UInt64]>([:])
    private let size = Atomic<Int>(0)

    public init() {}

    /// Records a fault; returns false if the page was already waiting (no second request needed).
    public func add(_ page: PageIndex, at time: UInt64) -> Bool {
        waiting.withLock { w in
            guard w[page] == nil else { return false }
            w[page] = time
            size.store(w.count, ordering: .relaxed)
            return true
        }
    }

    /// Removes the pages of `[first, first+count)` that were waiting and returns their fault times.
    public func resolve(first: PageIndex, count: UInt64) -> [UInt64] {
        guard size.load(ordering: .relaxed) > 0 else { return [] }
        let start = first.rawValue
        return waiting.withLock { w in
            var times: [UInt64] = []
            if count < UInt64(w.count) {
                for p in start..<(start + count) {
                    if let t = w.removeValue(forKey: PageIndex(rawValue: p)) { times.append(t) }
                }
            } else {
                for (page, t) in w where page.rawValue >= start && page.rawValue < start + count {
                    times.append(t)
                    w[page] = nil
                }
            }
            size.store(w.count, ordering: .relaxed)
            return times
        }
    }

    /// Faults waiting now.
    public var count: Int { size.load(ordering: .relaxed) }

    /// The pages waiting now, in order (a resumed session asks for them again: their requests may have
    /// been lost with the old urgent channel).
    public func waitingPages() -> [PageIndex] {
        waiting.withLock { $0.keys.sorted() }
    }

    /// Removes and returns the waiting pages that lie in `set` (pages just marked zero: nothing will be sent
    /// for them, so whoever takes them must zero-fill and wake).
    public func take(in set: PageSet<PageIndex>) -> [PageIndex] {
        guard size.load(ordering: .relaxed) > 0, !set.isEmpty else { return [] }
        return waiting.withLock { w in
            let pages = w.keys.filter { set.contains($0) }
            for page in pages { w[page] = nil }
            size.store(w.count, ordering: .relaxed)
            return pages
        }
    }
}
