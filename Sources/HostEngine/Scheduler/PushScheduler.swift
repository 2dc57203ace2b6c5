// The source's background push order. Faults are served on their own channel; this decides what the
// bulk channel sends next: the neighbourhood of the latest fault first (the guest is likely to touch it
// next, as QEMU's get_queued_page assumes), then priority classes in order — pages the device-state
// load touches, hot classes, other in-use pages, believed-free pages last. Every page is claimed in the
// shared `sent` bitmap before it is sent, so the urgent and bulk paths never send a page twice, and
// pages in the skip set (holes, free pages) are claimed without being sent.

import EpcopyProtocol
import Synchronization

/// Priority classes of the push, highest first. Urgent faults are above all of them.
public enum PushClass: Int, Sendable, CaseIterable, CustomStringConvertible {
    /// Pages the device-state load touches (vrings, ROM shadow): needed before the guest can run.
    case device = 0
    /// Kernel pages (slab, page tables, non-LRU in use).
    case kernel
    /// Pages used in the last window.
    case recent
    /// Other in-use pages.
    case inUse
    /// Pages the guest believed free before the switch: may have been written since, so sent last.
    case believedFree
    /// Everything no report mentioned.
    case unclassified

    public var description: String {
        switch self {
        case .device: "device"
        case .kernel: "kernel"
        case .recent: "recent"
        case .inUse: "in_use"
        case .believedFree: "believed_free"
        case .unclassified: "unclassified"
        }
    }
}

/// Where a fault happened, published by the urgent path for the bulk path (lock-free).
public final class FaultHint: Sendable {
    private let packed = Atomic<UInt64>(0)  // generation << 40 | page (pages < 2^40)

    public init() {}

    public func publish(page: UInt64) {
        var old = packed.load(ordering: .relaxed)
        while true {
            let generation = (old >> 40) &+ 1
            let (done, current) = packed.compareExchange(expected: old, desired: generation << 40 | (page & (1 << 40 - 1)),
                                                         ordering: .acquiringAndReleasing)
            if done { return }
            old = current
        }
    }

    /// (generation, page); generation 0 means no fault yet.
    public func read() -> (generation: UInt64, page: UInt64) {
        let value = packed.load(ordering: .acquiring)
        return (value >> 40, value & (1 << 40 - 1))
    }
}

/// The bulk channel's chunk size: grows while no fault comes, drops to the minimum on a fault
/// (CRIU's update_xfer_len: 64 KiB → 4 MiB), so a fault's neighbourhood goes out in small chunks
/// right behind it and an undisturbed push runs at full size.
public struct AdaptiveChunk: Sendable {
    public let minPages: UInt64
    public let maxPages: UInt64
    public private(set) var pages: UInt64

    public init(minPages: UInt64 = 16, maxPages: UInt64 = 1024) {
        precondition(minPages >= 1 && minPages <= maxPages)
        self.minPages = minPages
        self.maxPages = maxPages
        self.pages = minPages
    }

    public mutating func grow() { pages = min(pages * 2, maxPages) }
    public mutating func shrink() { pages = minPages }
}

/// One chunk to send: runs of pages already claimed in the `sent` bitmap, all of one class.
public struct PushChunk: Sendable, Equatable {
    public var runs: [PageRange<PageIndex>]
    public var pushClass: PushClass
    /// True when the chunk is the neighbourhood of a fault rather than class order.
    public var prefetch: Bool

    public var pageCount: UInt64 { runs.reduce(0) { $0 + $1.count } }
}

public final class PushScheduler {
    public let regionPages: UInt64
    public let sent: AtomicPageBitmap
    private let hint: FaultHint
    private var classes: [(PushClass, PageSet<PageIndex>)]
    private var classIndex = 0
    private var cursor: UInt64 = 0
    private var seenGeneration: UInt64 = 0
    private var prefetchNext: UInt64 = 0
    private var prefetchLeft: UInt64 = 0
    public private(set) var chunk: AdaptiveChunk
    /// Pages to prefetch after each fault (its neighbourhood).
    public let prefetchPages: UInt64
    /// Pages claimed without sending (skip set).
    public private(set) var skippedPages: UInt64 = 0

    /// `classes` need not cover the region: pages no class names are pushed last as `unclassified`.
    /// A page in several classes is pushed with the first (highest) one.
    public init(regionPages: UInt64, classes: [(PushClass, PageSet<PageIndex>)], sent: AtomicPageBitmap,
                hint: FaultHint, chunk: AdaptiveChunk = AdaptiveChunk(), prefetchPages: UInt64 = 64) {
        precondition(sent.pageCount == regionPages)
        self.regionPages = regionPages
        self.sent = sent
        self.hint = hint
        self.chunk = chunk
        self.prefetchPages = prefetchPages
        let all = PageSet<PageIndex>(try! PageRange(start: PageIndex(rawValue: 0), count: max(regionPages, 1)))
        // Class sets come from a guest report: clip them to the region (the engine must never trust
        // them to stay inside it).
        var ordered = classes.map { ($0.0, $0.1.intersection(all)) }.sorted { $0.0.rawValue < $1.0.rawValue }
        let covered = ordered.reduce(PageSet<PageIndex>()) { $0.union($1.1) }
        if regionPages > 0 {
            ordered.append((.unclassified, all.subtracting(covered)))
        }
        self.classes = ordered.filter { !$0.1.isEmpty }
    }

    /// Claims pages that must never be sent (holes, free pages). Safe to call at any time; pages
    /// already sent stay sent. Returns how many pages were newly skipped.
    @discardableResult
    public func skip(_ pages: PageSet<PageIndex>) -> UInt64 {
        skipClaiming(pages).count
    }

    /// As `skip`, returning the pages this call claimed. The others were already sent or are on their way —
    /// their data may still be read from the source mapping by a queued send.
    public func skipClaiming(_ pages: PageSet<PageIndex>) -> PageSet<PageIndex> {
        var claimed: [PageRange<PageIndex>] = []
        for range in pages.ranges where range.lowerBound.rawValue < regionPages {
            let end = min(range.upperBound.rawValue, regionPages)
            sent.claim(start: range.lowerBound.rawValue, count: end - range.lowerBound.rawValue) { start, n in
                claimed.append(try! PageRange(start: PageIndex(rawValue: start), count: n))
            }
        }
        let set = PageSet(ranges: claimed)
        skippedPages += set.count
        return set
    }

    /// Classes from this one down are held back (`next` returns nil and sets `blocked`) until it is set to nil:
    /// believed-free pages wait for the destination's post-resume free scan, which may drop most of them.
    public var holdFrom: PushClass?
    /// The last `next` returned nil because of `holdFrom`, not because every page was claimed.
    public private(set) var blocked = false

    /// True while the class order is still in the device class (prefetch aside).
    public var inDeviceClass: Bool {
        classIndex < classes.count && classes[classIndex].0 == .device
    }

    /// The next chunk to push, or nil when every page has been claimed.
    public func next() -> PushChunk? {
        blocked = false
        let (generation, faultPage) = hint.read()
        if generation != seenGeneration {
            seenGeneration = generation
            chunk.shrink()
            prefetchNext = faultPage &+ 1
            prefetchLeft = prefetchPages
        }
        while prefetchLeft > 0, prefetchNext < regionPages {
            let span = min(prefetchLeft, regionPages - prefetchNext, chunk.pages)
            let runs = claim(start: prefetchNext, count: span)
            prefetchNext += span
            prefetchLeft -= span
            if !runs.isEmpty { return PushChunk(runs: runs, pushClass: classOf(runs[0].lowerBound), prefetch: true) }
        }
        prefetchLeft = 0
        while classIndex < classes.count {
            let (pushClass, set) = classes[classIndex]
            if let held = holdFrom, pushClass.rawValue >= held.rawValue {
                blocked = true
                return nil
            }
            var budget = chunk.pages
            var runs: [PageRange<PageIndex>] = []
            var classDone = false
            while budget > 0 {
                guard let range = set.firstRange(atOrAfter: PageIndex(rawValue: cursor)) else {
                    classDone = true
                    break
                }
                // Skip what the urgent path or the skip set already claimed, a word at a time.
                let from = max(range.lowerBound.rawValue, cursor)
                guard let start = sent.firstClear(atOrAfter: from), start < range.upperBound.rawValue else {
                    cursor = range.upperBound.rawValue
                    continue
                }
                let span = min(range.upperBound.rawValue - start, budget)
                let claimed = claim(start: start, count: span)
                runs += claimed
                budget -= claimed.reduce(0) { $0 + $1.count }
                cursor = start + span
            }
            if !runs.isEmpty {
                chunk.grow()
                return PushChunk(runs: Array(PageSet(ranges: runs).ranges), pushClass: pushClass, prefetch: false)
            }
            if classDone {
                classIndex += 1
                cursor = 0
            }
        }
        return nil
    }

    /// The class a page is pushed in (for per-class accounting of prefetched pages).
    public func classOf(_ page: PageIndex) -> PushClass {
        classes.first { $0.1.contains(page) }?.0 ?? .unclassified
    }

    private func claim(start: UInt64, count: UInt64) -> [PageRange<PageIndex>] {
        var runs: [PageRange<PageIndex>] = []
        sent.claim(start: start, count: count) { s, n in
            runs.append(try! PageRange(start: PageIndex(rawValue: s), count: n))
        }
        return runs
    }
}
