// The page-set wire encoding: both forms round-trip, the encoder's choice is really the smaller one, and every
// malformed or hostile encoding is refused with its specific error without allocating for claimed sizes.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

private let limit: UInt64 = 1 << 20

private func decode(_ bytes: [UInt8], pageLimit: UInt64 = limit, maxRanges: Int = .max,
                    allowBitmap: Bool = true) throws -> PageSet<PageIndex> {
    try PageSetCodec.decode(bytes, as: PageIndex.self, pageLimit: pageLimit, maxRanges: maxRanges,
                            allowBitmap: allowBitmap)
}

@Suite(.tier(.unit)) struct PageSetCodecTests {
    @Test func bothFormsRoundTripAndTheEncoderPicksTheSmaller() throws {
        let seed: UInt64 = 0xC0DE_0001
        var rng = SplitMix64(seed: seed)
        var chosen: [PageSetCodec.Form: Int] = [:]
        for iteration in 0..<400 {
            let (set, _) = randomPageSet(universe: 2000, using: &rng)
            let context = "seed \(seed) iteration \(iteration)"
            var sizes: [PageSetCodec.Form: Int] = [:]
            for form in PageSetCodec.Form.allCases {
                let bytes = PageSetCodec.encode(set, form: form)
                #expect(bytes.first == form.rawValue, "\(context)")
                #expect(UInt64(bytes.count) == PageSetCodec.encodedSize(of: set, form: form), "\(context) \(form)")
                #expect(try decode(bytes) == set, "\(context) \(form)")
                sizes[form] = bytes.count
            }
            let automatic = PageSetCodec.encode(set)
            let smallest = min(sizes[.ranges] ?? 0, sizes[.bitmap] ?? 0)
            #expect(automatic.count == smallest, "\(context)")
            #expect(try decode(automatic) == set, "\(context)")
            let form = PageSetCodec.preferredForm(for: set)
            chosen[form, default: 0] += 1
        }
        // The random sets are varied enough that both forms get chosen.
        #expect(chosen[.ranges, default: 0] > 0 && chosen[.bitmap, default: 0] > 0, "\(chosen)")
    }

    @Test func knownEncodings() throws {
        let set = pageSet([(3, 2), (10, 1)])
        // Ranges: form 0, 2 ranges, (gap 3, count 2), (gap 10 - 5 = 5, count 1).
        #expect(PageSetCodec.encode(set, form: .ranges) == [0, 2, 3, 2, 5, 1])
        // Bitmap: form 1, base 3, 8 bits, pages 3, 4, 10 -> bits 0, 1, 7.
        #expect(PageSetCodec.encode(set, form: .bitmap) == [1, 3, 8, 0b1000_0011])
        #expect(PageSetCodec.encode(PageSet<PageIndex>()) == [0, 0])
        #expect(try decode([1, 0, 0]).isEmpty)
        // Dense but fragmented: every other page of 64 pages is far smaller as a bitmap.
        let fragmented = PageSet(pages: stride(from: UInt64(0), to: 64, by: 2).map { PageIndex(rawValue: $0) })
        #expect(PageSetCodec.preferredForm(for: fragmented) == .bitmap)
        #expect(PageSetCodec.preferredForm(for: pageSet([(0, 1), (1_000_000, 1)])) == .ranges)
    }

    @Test func pagesAtOrAboveTheLimitAreRejected() {
        let set = pageSet([(0, 2), (99, 3)])
        // Run [99, 102) crosses the limit 100: the first offending page is 100.
        #expect(throws: ProtocolError.pageOutOfRange(page: 100, limit: 100)) {
            try decode(PageSetCodec.encode(set, form: .ranges), pageLimit: 100)
        }
        #expect(throws: ProtocolError.pageOutOfRange(page: 100, limit: 100)) {
            try decode(PageSetCodec.encode(set, form: .bitmap), pageLimit: 100)
        }
        #expect(throws: ProtocolError.pageOutOfRange(page: 200, limit: 100)) {
            try decode(PageSetCodec.encode(pageSet([(200, 1)]), form: .ranges), pageLimit: 100)
        }
        // Exactly up to the limit is fine.
        #expect(throws: Never.self) { try decode(PageSetCodec.encode(set), pageLimit: 102) }
    }

    @Test func malformedRangesAreRejected() {
        // Gap 0 after the first range: adjacent runs that should have been merged.
        #expect(throws: ProtocolError.unmergedRanges(index: 1)) { try decode([0, 2, 0, 5, 0, 1]) }
        // A gap of 0 before the first range is just a start at page 0.
        #expect(throws: Never.self) { try decode([0, 1, 0, 5]) }
        #expect(throws: ProtocolError.invalidRange("range 1 has count 0")) { try decode([0, 2, 0, 5, 1, 0]) }
        #expect(throws: ProtocolError.invalidRange("range 1 (gap 18446744073709551615, count 1) overflows 64 bits")) {
            try decode([0, 2, 0, 5] + varint(.max) + [1], pageLimit: .max)
        }
        #expect(throws: ProtocolError.truncated(needed: 2, available: 1)) { try decode([0, 1, 3, 0x80]) }
        // One range needs at least two bytes.
        #expect(throws: ProtocolError.tooManyItems(what: "ranges", count: 1, limit: 0)) { try decode([0, 1, 3]) }
        #expect(throws: ProtocolError.tooManyItems(what: "ranges", count: 3, limit: 2)) {
            try decode([0, 3, 1, 1, 1, 1, 1, 1], maxRanges: 2)
        }
        #expect(throws: ProtocolError.trailingBytes(count: 1)) { try decode([0, 1, 3, 1, 9]) }
        #expect(throws: ProtocolError.unsupportedPageSetForm(2)) { try decode([2, 0]) }
        #expect(throws: ProtocolError.unsupportedPageSetForm(1)) { try decode([1, 0, 0], allowBitmap: false) }
    }

    @Test func malformedBitmapsAreRejected() {
        // 4 bits declared, bit 5 set in padding.
        #expect(throws: ProtocolError.bitmapPaddingNotZero) { try decode([1, 0, 4, 0b0010_0001]) }
        #expect(throws: Never.self) { try decode([1, 0, 4, 0b0000_1001]) }
        // 17 bits need 3 bytes.
        #expect(throws: ProtocolError.truncated(needed: 3, available: 2)) { try decode([1, 0, 17, 0xFF, 0xFF]) }
        let overflow = ProtocolError.invalidRange("bitmap at page 18446744073709551615 with 8 bits overflows 64 bits")
        #expect(throws: overflow) {
            try decode([1] + varint(.max) + [8, 0], pageLimit: .max)
        }
        // 0b0101_0101 has four runs.
        #expect(throws: ProtocolError.tooManyItems(what: "ranges", count: 3, limit: 2)) {
            try decode([1, 0, 8, 0b0101_0101], maxRanges: 2)
        }
    }

    @Test func hugeClaimsAreRejectedWithoutAllocating() throws {
        let clock = ContinuousClock()
        let started = clock.now
        // 2^60 ranges claimed in a 10-byte set.
        let claim = [0] + varint(1 << 60)
        let padding = [UInt8](repeating: 1, count: 10 - claim.count)
        #expect(throws: ProtocolError.tooManyItems(what: "ranges", count: 1 << 60, limit: UInt64(padding.count / 2))) {
            try decode(claim + padding)
        }
        // 2^63 bits claimed with no bytes behind them.
        #expect(throws: ProtocolError.truncated(needed: 1 << 60, available: 0)) {
            try decode([1, 0] + varint(1 << 63))
        }
        // Even an enormous but honest-looking run costs one stored range.
        let huge = try decode([0, 1, 0] + varint(1 << 62), pageLimit: .max)
        #expect(huge.count == 1 << 62 && huge.rangeCount == 1)
        #expect(clock.now - started < .seconds(1))
    }
}
