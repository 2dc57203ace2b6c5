// Page-set algebra checked against a plain Set<UInt64> model on random sets, with the run invariant (sorted,
// merged, non-adjacent, count in sync) verified after every operation, plus exact bitmap conversions.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

private let universe: UInt64 = 2000

/// Reference answer for `firstRange(atOrAfter:)`: the maximal run of `pages` containing `page`, or the next one.
private func referenceFirstRange(_ pages: Set<UInt64>, atOrAfter page: UInt64) -> (UInt64, UInt64)? {
    guard let start = pages.filter({ $0 >= page }).min() else {
        return nil
    }
    var lower = start
    // If `page` is inside a run, the run may begin before it.
    while lower > 0 && pages.contains(lower - 1) {
        lower -= 1
    }
    var upper = start
    while pages.contains(upper) {
        upper += 1
    }
    return (lower, upper)
}

@Suite(.tier(.unit)) struct PageSetTests {
    @Test func binaryOperationsMatchReference() {
        let seed: UInt64 = 0x5E7_0001
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<400 {
            let (a, refA) = randomPageSet(universe: universe, using: &rng)
            let (b, refB) = randomPageSet(universe: universe, using: &rng)
            let context = "seed \(seed) iteration \(iteration)"
            for (name, result, expected) in [
                ("union", a.union(b), refA.union(refB)),
                ("intersection", a.intersection(b), refA.intersection(refB)),
                ("subtracting", a.subtracting(b), refA.subtracting(refB)),
                ("reverse subtracting", b.subtracting(a), refB.subtracting(refA)),
            ] {
                #expect(invariantViolation(result) == nil, "\(name): \(context)")
                #expect(pagesOf(result) == expected, "\(name): \(context)")
                #expect(result.count == UInt64(expected.count), "\(name): \(context)")
            }
            #expect(a.isSuperset(of: b) == refA.isSuperset(of: refB), "\(context)")
            #expect(a.isSubset(of: b) == refA.isSubset(of: refB), "\(context)")
            #expect(a.isDisjoint(with: b) == refA.isDisjoint(with: refB), "\(context)")
            #expect(a.isSuperset(of: a.intersection(b)), "\(context)")
            #expect(a.subtracting(b).isDisjoint(with: b), "\(context)")
            #expect(a.isEmpty == refA.isEmpty, "\(context)")
            #expect(a.first?.rawValue == refA.min(), "\(context)")
            #expect(a.last?.rawValue == refA.max(), "\(context)")
            #expect(a.pages.map(\.rawValue) == refA.sorted(), "\(context)")
            for _ in 0..<20 {
                let probe = UInt64.random(in: 0..<universe + 5, using: &rng)
                #expect(a.contains(PageIndex(rawValue: probe)) == refA.contains(probe), "\(context) probe \(probe)")
                let expected = referenceFirstRange(refA, atOrAfter: probe)
                let found = a.firstRange(atOrAfter: PageIndex(rawValue: probe))
                #expect(found.map { ($0.lowerBound.rawValue, $0.upperBound.rawValue) } ?? (0, 0) == expected ?? (0, 0),
                        "\(context) firstRange probe \(probe)")
            }
        }
    }

    @Test func insertAndRemoveMatchReference() throws {
        let seed: UInt64 = 0x5E7_0002
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<300 {
            var (set, reference) = randomPageSet(universe: universe, using: &rng)
            for step in 0..<25 {
                let context = "seed \(seed) iteration \(iteration) step \(step)"
                let start = UInt64.random(in: 0..<universe, using: &rng)
                let length = UInt64.random(in: 1...(Bool.random(using: &rng) ? 3 : 300), using: &rng)
                let range = try RAMPageRange(start: PageIndex(rawValue: start), count: length)
                switch Int.random(in: 0..<4, using: &rng) {
                case 0:
                    let inserted = set.insert(PageIndex(rawValue: start))
                    #expect(inserted == reference.insert(start).inserted, "\(context)")
                case 1:
                    set.insert(range)
                    reference.formUnion(start..<start + length)
                case 2:
                    let removed = set.remove(PageIndex(rawValue: start))
                    #expect(removed == (reference.remove(start) != nil), "\(context)")
                default:
                    set.remove(range)
                    reference.subtract(start..<start + length)
                }
                #expect(invariantViolation(set) == nil, "\(context)")
                #expect(pagesOf(set) == reference, "\(context)")
                #expect(set.contains(range) == reference.isSuperset(of: start..<start + length), "\(context)")
            }
        }
    }

    @Test func rangesInitializerNormalizes() throws {
        let seed: UInt64 = 0x5E7_0003
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<300 {
            var ranges: [RAMPageRange] = []
            var reference = Set<UInt64>()
            for _ in 0..<Int.random(in: 0..<15, using: &rng) {
                let start = UInt64.random(in: 0..<500, using: &rng)
                let length = UInt64.random(in: 1...40, using: &rng)
                ranges.append(try RAMPageRange(start: PageIndex(rawValue: start), count: length))
                reference.formUnion(start..<start + length)
            }
            let set = PageSet(ranges: ranges)
            #expect(invariantViolation(set) == nil, "seed \(seed) iteration \(iteration)")
            #expect(pagesOf(set) == reference, "seed \(seed) iteration \(iteration)")
            // The canonical form is accepted unchanged by the strict constructor.
            #expect(try PageSet.validated(sortedRanges: set.ranges) == set, "seed \(seed) iteration \(iteration)")
        }
    }

    @Test func validatedRejectsNonCanonicalInput() throws {
        func ranges(_ runs: [(UInt64, UInt64)]) throws -> [RAMPageRange] {
            try runs.map { run throws(ProtocolError) in
                try RAMPageRange(start: PageIndex(rawValue: run.0), count: run.1)
            }
        }
        #expect(throws: ProtocolError.unsortedRanges(index: 2)) {
            try PageSet.validated(sortedRanges: try ranges([(0, 2), (10, 2), (5, 1)]))
        }
        #expect(throws: ProtocolError.overlappingRanges(index: 1)) {
            try PageSet.validated(sortedRanges: try ranges([(0, 5), (4, 2)]))
        }
        #expect(throws: ProtocolError.unmergedRanges(index: 1)) {
            try PageSet.validated(sortedRanges: try ranges([(0, 5), (5, 2)]))
        }
        let valid = try PageSet.validated(sortedRanges: try ranges([(0, 5), (6, 2)]))
        #expect(valid.count == 7 && valid.rangeCount == 2)
        #expect(ProtocolError.overlappingRanges(index: 3).description == "range 3 overlaps range 2")
    }

    @Test func emptyAndEdgeSets() throws {
        let empty = PageSet<PageIndex>()
        #expect(empty.isEmpty && empty.count == 0 && empty.rangeCount == 0)
        #expect(empty.first == nil && empty.last == nil)
        #expect(empty.firstRange(atOrAfter: PageIndex(rawValue: 0)) == nil)
        #expect(Array(empty.pages).isEmpty)
        #expect(empty.isSubset(of: empty) && empty.isDisjoint(with: empty))

        // Runs touching the top of the representable space.
        let top = try RAMPageRange(start: PageIndex(rawValue: .max - 3), count: 3)
        var set = PageSet(top)
        set.insert(try RAMPageRange(start: PageIndex(rawValue: 0), count: 2))
        #expect(set.count == 5)
        #expect(set.last == PageIndex(rawValue: .max - 1))
        set.remove(top)
        #expect(set == pageSet([(0, 2)]))
        #expect(set.description == "{0x0..<0x2} (2 pages in 1 runs)")
    }

    @Test func bitmapConversionsAreExact() throws {
        let seed: UInt64 = 0x5E7_0004
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<300 {
            let (set, reference) = randomPageSet(GuestFrameNumber.self, universe: universe, using: &rng)
            let context = "seed \(seed) iteration \(iteration)"
            // A base at or below the first page and a bit count reaching at least the last, not word-aligned.
            let base = UInt64.random(in: 0...(reference.min() ?? 100), using: &rng)
            let end = (reference.max().map { $0 + 1 } ?? base) + UInt64.random(in: 0..<70, using: &rng)
            let bitmap = try PageBitmap(set: set, base: GuestFrameNumber(rawValue: base), bitCount: end - base)
            #expect(bitmap.count == UInt64(reference.count), "\(context)")
            #expect(bitmap.toPageSet() == set, "\(context)")
            #expect(PageSet(bitmap: bitmap) == set, "\(context)")
            for probe in stride(from: UInt64(0), to: universe + 80, by: 7) {
                #expect(bitmap.contains(GuestFrameNumber(rawValue: probe)) == reference.contains(probe),
                        "\(context) probe \(probe)")
            }
            // Built page by page, the bitmap is identical.
            var manual = try PageBitmap(base: GuestFrameNumber(rawValue: base), bitCount: end - base)
            for page in reference {
                manual.insert(GuestFrameNumber(rawValue: page))
            }
            #expect(manual == bitmap, "\(context)")
        }
    }

    @Test func bitmapRejectsSetsOutsideIt() {
        let set = frameSet([(10, 5)])
        #expect(throws: ProtocolError.pageOutOfRange(page: 14, limit: 14)) {
            try PageBitmap(set: set, base: GuestFrameNumber(rawValue: 10), bitCount: 4)
        }
        #expect(throws: ProtocolError.invalidRange("page 10 lies below bitmap base 11")) {
            try PageBitmap(set: set, base: GuestFrameNumber(rawValue: 11), bitCount: 100)
        }
        let overflow = ProtocolError.invalidRange("bitmap at page 18446744073709551615 with 1 bits overflows 64 bits")
        #expect(throws: overflow) {
            try PageBitmap<GuestFrameNumber>(base: GuestFrameNumber(rawValue: .max), bitCount: 1)
        }
    }
}
