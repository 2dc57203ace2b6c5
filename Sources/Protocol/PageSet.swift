// Sets of pages. Post-copy migration tracks which pages are present, requested, zero, free or hot; those sets hold
// millions of pages but few runs, so they are stored as sorted, merged runs with linear-time set algebra. A dense
// bitmap form exists for fragmented sets and for the wire's bitmap encoding.

/// One stored run `[lower, upper)`, kept free of the generic parameter so the algorithms are compiled once.
@usableFromInline
struct RawRange: Hashable, Sendable {
    @usableFromInline var lower: UInt64
    @usableFromInline var upper: UInt64

    @inlinable init(_ lower: UInt64, _ upper: UInt64) {
        self.lower = lower
        self.upper = upper
    }

    @inlinable var count: UInt64 { upper - lower }
}

/// A set of pages stored as sorted, merged runs.
///
/// Invariant: runs are non-empty, sorted, pairwise disjoint and never adjacent (a run never starts where the
/// previous one ends), so every set has exactly one representation and `==` compares sets.
public struct PageSet<Unit: PageNumber>: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline var storage: [RawRange]
    /// Cached number of pages; kept in sync by every mutation.
    @usableFromInline var pageCount: UInt64

    /// The empty set.
    @inlinable public init() {
        storage = []
        pageCount = 0
    }

    /// Wraps runs that already satisfy the invariant.
    @inlinable init(uncheckedStorage: [RawRange], count: UInt64) {
        storage = uncheckedStorage
        pageCount = count
    }

    /// Wraps runs that already satisfy the invariant, counting the pages.
    init(uncheckedStorage: [RawRange]) {
        var total: UInt64 = 0
        for run in uncheckedStorage {
            total &+= run.count
        }
        self.init(uncheckedStorage: uncheckedStorage, count: total)
    }

    /// The set of pages in `range`.
    public init(_ range: PageRange<Unit>) {
        self.init(uncheckedStorage: [RawRange(range.lower, range.upper)], count: range.count)
    }

    /// The union of `ranges`, given in any order, possibly overlapping or adjacent.
    public init<S: Sequence>(ranges: S) where S.Element == PageRange<Unit> {
        var raw = ranges.map { RawRange($0.lower, $0.upper) }
        raw.sort { $0.lower < $1.lower }
        var merged: [RawRange] = []
        merged.reserveCapacity(raw.count)
        for run in raw {
            PageSet.appendMerging(run, to: &merged)
        }
        self.init(uncheckedStorage: merged)
    }

    /// The set of `pages`, given in any order, with duplicates allowed. Traps on page `UInt64.max`.
    public init<S: Sequence>(pages: S) where S.Element == Unit {
        var raw = pages.map(\.rawValue)
        raw.sort()
        var merged: [RawRange] = []
        for page in raw {
            precondition(page < UInt64.max, "page UInt64.max cannot be stored in a PageSet")
            PageSet.appendMerging(RawRange(page, page + 1), to: &merged)
        }
        self.init(uncheckedStorage: merged)
    }

    /// A set built from `sortedRanges`, which must already be sorted, disjoint and merged (no two consecutive
    /// ranges adjacent). Use this on untrusted input that must be canonical; it throws `unsortedRanges`,
    /// `overlappingRanges` or `unmergedRanges` naming the first offending range.
    public static func validated<S: Sequence>(
        sortedRanges: S
    ) throws(ProtocolError) -> PageSet where S.Element == PageRange<Unit> {
        var runs: [RawRange] = []
        runs.reserveCapacity(sortedRanges.underestimatedCount)
        var total: UInt64 = 0
        for (index, range) in sortedRanges.enumerated() {
            if let previous = runs.last {
                if range.lower < previous.lower {
                    throw .unsortedRanges(index: index)
                }
                if range.lower < previous.upper {
                    throw .overlappingRanges(index: index)
                }
                if range.lower == previous.upper {
                    throw .unmergedRanges(index: index)
                }
            }
            runs.append(RawRange(range.lower, range.upper))
            total &+= range.count
        }
        return PageSet(uncheckedStorage: runs, count: total)
    }

    /// Appends `run` (whose lower bound is not below any stored lower bound) to sorted, merged runs.
    @usableFromInline
    static func appendMerging(_ run: RawRange, to runs: inout [RawRange]) {
        if let last = runs.last, run.lower <= last.upper {
            if run.upper > last.upper {
                runs[runs.count - 1].upper = run.upper
            }
        } else {
            runs.append(run)
        }
    }

    // MARK: Queries

    /// Whether the set has no pages.
    @inlinable public var isEmpty: Bool { storage.isEmpty }

    /// Number of pages in the set.
    @inlinable public var count: UInt64 { pageCount }

    /// Number of maximal runs the set consists of.
    @inlinable public var rangeCount: Int { storage.count }

    /// The lowest page, if any.
    @inlinable public var first: Unit? { storage.first.map { Unit(rawValue: $0.lower) } }

    /// The highest page, if any.
    @inlinable public var last: Unit? { storage.last.map { Unit(rawValue: $0.upper - 1) } }

    /// The runs, in ascending order.
    @inlinable public var ranges: Ranges { Ranges(storage: storage) }

    /// Every page in ascending order, produced lazily.
    @inlinable public var pages: Pages { Pages(storage: storage) }

    /// Index of the first run whose upper bound is above `page`, i.e. the run containing `page` or the next one.
    @inlinable func firstIndex(upperAbove page: UInt64) -> Int {
        var low = 0
        var high = storage.count
        while low < high {
            let middle = low + (high - low) / 2
            if storage[middle].upper > page {
                high = middle
            } else {
                low = middle + 1
            }
        }
        return low
    }

    /// Index of the first run whose lower bound is above `page`.
    @inlinable func firstIndex(lowerAbove page: UInt64) -> Int {
        var low = 0
        var high = storage.count
        while low < high {
            let middle = low + (high - low) / 2
            if storage[middle].lower > page {
                high = middle
            } else {
                low = middle + 1
            }
        }
        return low
    }

    /// Whether `page` is in the set. O(log runs).
    @inlinable public func contains(_ page: Unit) -> Bool {
        let index = firstIndex(upperAbove: page.rawValue)
        return index < storage.count && storage[index].lower <= page.rawValue
    }

    /// Whether every page of `range` is in the set. O(log runs).
    @inlinable public func contains(_ range: PageRange<Unit>) -> Bool {
        let index = firstIndex(upperAbove: range.lower)
        return index < storage.count && storage[index].lower <= range.lower && storage[index].upper >= range.upper
    }

    /// The whole run containing `page`, or if `page` is not in the set the first run after it; nil when no page at
    /// or after `page` is in the set. A scan that was interrupted at `page` continues from here (clip the result's
    /// lower bound to `page` if only the rest of the run is wanted). O(log runs).
    @inlinable public func firstRange(atOrAfter page: Unit) -> PageRange<Unit>? {
        let index = firstIndex(upperAbove: page.rawValue)
        guard index < storage.count else {
            return nil
        }
        return PageRange(uncheckedLower: storage[index].lower, upper: storage[index].upper)
    }

    /// Whether every page of `other` is in this set. O(n + m).
    public func isSuperset(of other: PageSet<Unit>) -> Bool {
        guard other.pageCount <= pageCount else {
            return false
        }
        var index = 0
        for run in other.storage {
            while index < storage.count && storage[index].upper <= run.lower {
                index += 1
            }
            guard index < storage.count, storage[index].lower <= run.lower, storage[index].upper >= run.upper else {
                return false
            }
        }
        return true
    }

    /// Whether every page of this set is in `other`. O(n + m).
    public func isSubset(of other: PageSet<Unit>) -> Bool {
        other.isSuperset(of: self)
    }

    /// Whether the two sets share no page. O(n + m).
    public func isDisjoint(with other: PageSet<Unit>) -> Bool {
        var left = 0
        var right = 0
        while left < storage.count && right < other.storage.count {
            let a = storage[left]
            let b = other.storage[right]
            if a.lower < b.upper && b.lower < a.upper {
                return false
            }
            if a.upper <= b.upper {
                left += 1
            } else {
                right += 1
            }
        }
        return true
    }

    // MARK: Set algebra

    /// Pages in either set. O(n + m).
    public func union(_ other: PageSet<Unit>) -> PageSet<Unit> {
        if other.isEmpty { return self }
        if isEmpty { return other }
        var merged: [RawRange] = []
        merged.reserveCapacity(storage.count + other.storage.count)
        var left = 0
        var right = 0
        while left < storage.count || right < other.storage.count {
            let next: RawRange
            if right == other.storage.count
                || (left < storage.count && storage[left].lower <= other.storage[right].lower)
            {
                next = storage[left]
                left += 1
            } else {
                next = other.storage[right]
                right += 1
            }
            PageSet.appendMerging(next, to: &merged)
        }
        return PageSet(uncheckedStorage: merged)
    }

    /// Pages in both sets. O(n + m).
    public func intersection(_ other: PageSet<Unit>) -> PageSet<Unit> {
        var result: [RawRange] = []
        var total: UInt64 = 0
        var left = 0
        var right = 0
        while left < storage.count && right < other.storage.count {
            let a = storage[left]
            let b = other.storage[right]
            let lower = max(a.lower, b.lower)
            let upper = min(a.upper, b.upper)
            // Pieces cut from normalized inputs are separated by a gap of one input, so they never touch.
            if lower < upper {
                result.append(RawRange(lower, upper))
                total += upper - lower
            }
            if a.upper <= b.upper {
                left += 1
            } else {
                right += 1
            }
        }
        return PageSet(uncheckedStorage: result, count: total)
    }

    /// Pages in this set but not in `other`. O(n + m).
    public func subtracting(_ other: PageSet<Unit>) -> PageSet<Unit> {
        if other.isEmpty || isEmpty { return self }
        var result: [RawRange] = []
        result.reserveCapacity(storage.count)
        var total: UInt64 = 0
        var cut = 0
        for run in storage {
            var lower = run.lower
            while cut < other.storage.count && other.storage[cut].upper <= lower {
                cut += 1
            }
            // `cut` stays on the last run that may also cover the start of the next stored run.
            var index = cut
            while index < other.storage.count && other.storage[index].lower < run.upper {
                let hole = other.storage[index]
                if hole.lower > lower {
                    result.append(RawRange(lower, hole.lower))
                    total += hole.lower - lower
                }
                lower = max(lower, hole.upper)
                if lower >= run.upper {
                    break
                }
                index += 1
            }
            cut = index
            if lower < run.upper {
                result.append(RawRange(lower, run.upper))
                total += run.upper - lower
            }
        }
        return PageSet(uncheckedStorage: result, count: total)
    }

    /// Adds every page of `other`.
    public mutating func formUnion(_ other: PageSet<Unit>) { self = union(other) }

    /// Keeps only pages also in `other`.
    public mutating func formIntersection(_ other: PageSet<Unit>) { self = intersection(other) }

    /// Removes every page of `other`.
    public mutating func subtract(_ other: PageSet<Unit>) { self = subtracting(other) }

    // MARK: Single-run mutation

    /// Adds `page`; returns whether it was newly added. Traps on page `UInt64.max`.
    @discardableResult
    public mutating func insert(_ page: Unit) -> Bool {
        if contains(page) {
            return false
        }
        insert(PageRange(page))
        return true
    }

    /// Adds every page of `range`, merging with touching runs. O(log runs + runs moved).
    public mutating func insert(_ range: PageRange<Unit>) {
        var lower = range.lower
        var upper = range.upper
        // Runs ending at or after `lower` (including one ending exactly at it) may merge.
        let start = lower == 0 ? 0 : firstIndex(upperAbove: lower - 1)
        // Runs starting at or before `upper` (including one starting exactly at it) may merge.
        let end = firstIndex(lowerAbove: upper)
        var removed: UInt64 = 0
        if start < end {
            lower = min(lower, storage[start].lower)
            upper = max(upper, storage[end - 1].upper)
            for index in start..<end {
                removed += storage[index].count
            }
        }
        storage.replaceSubrange(start..<end, with: CollectionOfOne(RawRange(lower, upper)))
        pageCount = pageCount - removed + (upper - lower)
    }

    /// Removes `page`; returns whether it was present. Traps on page `UInt64.max`.
    @discardableResult
    public mutating func remove(_ page: Unit) -> Bool {
        if !contains(page) {
            return false
        }
        remove(PageRange(page))
        return true
    }

    /// Removes every page of `range`, splitting a run if needed. O(log runs + runs moved).
    public mutating func remove(_ range: PageRange<Unit>) {
        let start = firstIndex(upperAbove: range.lower)
        // Runs starting before `range.upper` intersect the range.
        let end = firstIndex(lowerAbove: range.upper - 1)
        guard start < end else {
            return
        }
        var removed: UInt64 = 0
        for index in start..<end {
            removed += storage[index].count
        }
        var pieces: [RawRange] = []
        let head = storage[start]
        if head.lower < range.lower {
            pieces.append(RawRange(head.lower, range.lower))
            removed -= range.lower - head.lower
        }
        let tail = storage[end - 1]
        if tail.upper > range.upper {
            pieces.append(RawRange(range.upper, tail.upper))
            removed -= tail.upper - range.upper
        }
        storage.replaceSubrange(start..<end, with: pieces)
        pageCount -= removed
    }

    public var description: String {
        let shown = storage.prefix(8).map { "\(hex($0.lower))..<\(hex($0.upper))" }
        let more = storage.count > shown.count ? ", …" : ""
        return "{" + shown.joined(separator: ", ") + more + "} (\(pageCount) pages in \(storage.count) runs)"
    }
}
