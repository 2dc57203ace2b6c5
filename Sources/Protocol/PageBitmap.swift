// The dense form of a page set: one bit per page over a window, for fragmented sets and for the wire's
// bitmap encoding, with conversions to and from the run form (PageSet).

/// A set of pages within `[base, base + bitCount)` stored as one bit per page, bit `i` of the bitmap standing for
/// page `base + i` (bit `i % 64` of word `i / 64`). Bits past `bitCount` are always zero.
public struct PageBitmap<Unit: PageNumber>: Hashable, Sendable {
    /// The page represented by bit 0.
    public let base: Unit
    /// Number of pages covered.
    public let bitCount: UInt64
    /// The bits, 64 pages per word.
    public private(set) var words: [UInt64]

    /// Wraps words whose padding bits are already zero.
    init(base: Unit, bitCount: UInt64, uncheckedWords words: [UInt64]) {
        self.base = base
        self.bitCount = bitCount
        self.words = words
    }

    /// An empty bitmap covering `[base, base + bitCount)`. Throws `invalidRange` if the end passes 2^64.
    public init(base: Unit, bitCount: UInt64) throws(ProtocolError) {
        let (_, overflow) = base.rawValue.addingReportingOverflow(bitCount)
        guard !overflow else {
            throw .invalidRange("bitmap at page \(base.rawValue) with \(bitCount) bits overflows 64 bits")
        }
        self.init(base: base, bitCount: bitCount,
                  uncheckedWords: [UInt64](repeating: 0, count: Int(bitCount / 64 + (bitCount % 64 == 0 ? 0 : 1))))
    }

    /// The bitmap of `set`, which must lie within `[base, base + bitCount)`.
    public init(set: PageSet<Unit>, base: Unit, bitCount: UInt64) throws(ProtocolError) {
        try self.init(base: base, bitCount: bitCount)
        if let first = set.first, first.rawValue < base.rawValue {
            throw .invalidRange("page \(first.rawValue) lies below bitmap base \(base.rawValue)")
        }
        if let last = set.last, last.rawValue - base.rawValue >= bitCount {
            throw .pageOutOfRange(page: last.rawValue, limit: base.rawValue + bitCount)
        }
        for run in set.storage {
            PageBitmap.setBits(&words, from: run.lower - base.rawValue, to: run.upper - base.rawValue)
        }
    }

    /// Sets bits `[from, to)`, a whole word at a time where possible.
    static func setBits(_ words: inout [UInt64], from: UInt64, to: UInt64) {
        var bit = from
        while bit < to {
            let word = Int(bit / 64)
            let offset = bit % 64
            let span = min(64 - offset, to - bit)
            let mask = span == 64 ? UInt64.max : ((1 << span) - 1) << offset
            words[word] |= mask
            bit += span
        }
    }

    /// Adds `page`. Traps if `page` lies outside the bitmap.
    public mutating func insert(_ page: Unit) {
        precondition(page.rawValue >= base.rawValue && page.rawValue - base.rawValue < bitCount,
                     "page outside the bitmap")
        let bit = page.rawValue - base.rawValue
        words[Int(bit / 64)] |= 1 << (bit % 64)
    }

    /// Whether `page` is in the bitmap; false for pages outside it.
    public func contains(_ page: Unit) -> Bool {
        guard page.rawValue >= base.rawValue, page.rawValue - base.rawValue < bitCount else {
            return false
        }
        let bit = page.rawValue - base.rawValue
        return words[Int(bit / 64)] & (1 << (bit % 64)) != 0
    }

    /// Number of pages present.
    public var count: UInt64 {
        words.reduce(0) { $0 + UInt64($1.nonzeroBitCount) }
    }

    /// The same pages as a run-length `PageSet`.
    public func toPageSet() -> PageSet<Unit> {
        // With no limit the run extraction cannot fail.
        (try? runs(maxRanges: .max)) ?? PageSet()
    }

    /// Extracts the runs, throwing `tooManyItems` as soon as there are more than `maxRanges`, so a hostile bitmap
    /// cannot make the decoder build an arbitrarily large run list.
    func runs(maxRanges: Int) throws(ProtocolError) -> PageSet<Unit> {
        let maxRanges = max(maxRanges, 0)
        var result: [RawRange] = []
        var total: UInt64 = 0
        var bit = nextBit(from: 0, set: true)
        while bit < bitCount {
            let end = nextBit(from: bit, set: false)
            guard result.count < maxRanges else {
                throw .tooManyItems(what: "ranges", count: UInt64(result.count) + 1, limit: UInt64(maxRanges))
            }
            result.append(RawRange(base.rawValue + bit, base.rawValue + end))
            total += end - bit
            bit = nextBit(from: end, set: true)
        }
        return PageSet(uncheckedStorage: result, count: total)
    }

    /// The first bit at or after `from` whose value is `set`, or `bitCount` if there is none.
    private func nextBit(from: UInt64, set: Bool) -> UInt64 {
        guard from < bitCount else {
            return bitCount
        }
        var word = Int(from / 64)
        var bits = (set ? words[word] : ~words[word]) & (UInt64.max << (from % 64))
        while true {
            if bits != 0 {
                return min(UInt64(word) * 64 + UInt64(bits.trailingZeroBitCount), bitCount)
            }
            word += 1
            if word == words.count {
                return bitCount
            }
            bits = set ? words[word] : ~words[word]
        }
    }
}

extension PageSet {
    /// The same pages as `bitmap`.
    public init(bitmap: PageBitmap<Unit>) {
        self = bitmap.toPageSet()
    }
}
