// A bitmap of page states shared between threads without locks: the fault thread reads "present" while
// the placement threads set it, and on the source the urgent and bulk senders both claim pages from
// one "sent" map so that each page goes on the wire at most once. Word-level fetch-or claims 64
// pages per atomic operation.

import CEpcopyLinux
import EpcopyProtocol

public final class AtomicPageBitmap: @unchecked Sendable {
    // SAFETY: `words` is allocated once, never resized, and only accessed through the atomic helpers;
    // @unchecked Sendable is sound because every access is atomic.
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int
    /// Whether `words` was allocated here (else it lives in memory the creator owns, e.g. a shared mapping).
    private let ownsWords: Bool
    /// Number of pages the bitmap covers.
    public let pageCount: UInt64

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        self.wordCount = Int((pageCount + 63) / 64)
        self.words = .allocate(capacity: max(wordCount, 1))
        self.words.initialize(repeating: 0, count: max(wordCount, 1))
        ownsWords = true
    }

    /// A bitmap over `wordCount(pageCount)` words that the caller owns and keeps alive longer than this bitmap
    /// (their current bits are its contents).
    public init(pageCount: UInt64, words: UnsafeMutablePointer<UInt64>) {
        self.pageCount = pageCount
        self.wordCount = Self.wordCount(pageCount)
        self.words = words
        ownsWords = false
    }

    public static func wordCount(_ pageCount: UInt64) -> Int { Int((pageCount + 63) / 64) }

    deinit { if ownsWords { words.deallocate() } }

    @inline(__always)
    public func contains(_ page: UInt64) -> Bool {
        precondition(page < pageCount, "page \(page) outside bitmap of \(pageCount)")
        return epc_atomic_load_u64(words + Int(page >> 6)) & (1 << (page & 63)) != 0
    }

    /// Sets the bit; returns true when this call set it (it was clear before).
    @inline(__always)
    @discardableResult
    public func insert(_ page: UInt64) -> Bool {
        precondition(page < pageCount, "page \(page) outside bitmap of \(pageCount)")
        let bit: UInt64 = 1 << (page & 63)
        return epc_atomic_fetch_or_u64(words + Int(page >> 6), bit) & bit == 0
    }

    /// Clears the bit (used only when a reconnect demands a page again).
    public func remove(_ page: UInt64) {
        precondition(page < pageCount)
        _ = epc_atomic_fetch_and_u64(words + Int(page >> 6), ~(1 << (page & 63)))
    }

    /// Sets every bit of `[start, start+count)` and calls `claimed` with each maximal run that this
    /// call set (pages already set by someone else are skipped). Runs are reported in order.
    public func claim(start: UInt64, count: UInt64, _ claimed: (_ start: UInt64, _ count: UInt64) -> Void) {
        precondition(start <= pageCount && count <= pageCount - start)
        var runStart: UInt64 = 0
        var runLength: UInt64 = 0
        var page = start
        let end = start + count
        while page < end {
            let wordIndex = page >> 6
            let firstBit = page & 63
            let bitsHere = min(64 - firstBit, end - page)
            let mask: UInt64 = bitsHere == 64 ? ~0 : ((1 << bitsHere) - 1) << firstBit
            let old = epc_atomic_fetch_or_u64(words + Int(wordIndex), mask)
            var won = mask & ~old
            if won == mask {
                // Fast path: the whole slice is ours.
                if runLength > 0 && runStart + runLength == page { runLength += bitsHere } else {
                    if runLength > 0 { claimed(runStart, runLength) }
                    runStart = page
                    runLength = bitsHere
                }
            } else {
                var bit = firstBit
                while bit < firstBit + bitsHere {
                    let p = (wordIndex << 6) + bit
                    if won & (1 << bit) != 0 {
                        if runLength > 0 && runStart + runLength == p { runLength += 1 } else {
                            if runLength > 0 { claimed(runStart, runLength) }
                            runStart = p
                            runLength = 1
                        }
                    }
                    bit += 1
                }
                won = 0
            }
            page += bitsHere
        }
        if runLength > 0 { claimed(runStart, runLength) }
    }

    /// Number of set bits (a snapshot; other threads may be setting bits meanwhile).
    public var count: UInt64 {
        var total: UInt64 = 0
        for i in 0..<wordCount { total += UInt64(epc_atomic_load_u64(words + i).nonzeroBitCount) }
        return total
    }

    /// The set pages as maximal runs, in order (a snapshot; bits set meanwhile may or may not be in it).
    public func setRuns() -> [PageRange<PageIndex>] {
        var runs: [PageRange<PageIndex>] = []
        var runStart: UInt64 = 0
        var runLength: UInt64 = 0
        for i in 0..<wordCount {
            var word = epc_atomic_load_u64(words + i)
            if i == wordCount - 1, pageCount & 63 != 0 { word &= (1 << (pageCount & 63)) - 1 }
            let base = UInt64(i) << 6
            if word == ~0 {
                if runLength > 0, runStart + runLength == base { runLength += 64 } else {
                    if runLength > 0 { runs.append(try! PageRange(start: PageIndex(rawValue: runStart), count: runLength)) }
                    (runStart, runLength) = (base, 64)
                }
                continue
            }
            while word != 0 {
                let bit = UInt64(word.trailingZeroBitCount)
                let ones = UInt64((~(word >> bit)).trailingZeroBitCount)
                let first = base + bit
                if runLength > 0, runStart + runLength == first { runLength += ones } else {
                    if runLength > 0 { runs.append(try! PageRange(start: PageIndex(rawValue: runStart), count: runLength)) }
                    (runStart, runLength) = (first, ones)
                }
                word = bit + ones >= 64 ? 0 : word & ~(((1 << ones) - 1) << bit)
            }
        }
        if runLength > 0 { runs.append(try! PageRange(start: PageIndex(rawValue: runStart), count: runLength)) }
        return runs
    }

    /// The first clear page at or after `page`, or nil.
    public func firstClear(atOrAfter page: UInt64) -> UInt64? {
        var p = page
        while p < pageCount {
            let word = epc_atomic_load_u64(words + Int(p >> 6)) | ((1 << (p & 63)) &- 1)
            if word != ~0 {
                let candidate = (p & ~63) + UInt64((~word).trailingZeroBitCount)
                return candidate < pageCount ? candidate : nil
            }
            p = (p & ~63) + 64
        }
        return nil
    }
}
