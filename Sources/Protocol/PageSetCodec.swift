// How a PageSet travels inside a payload. Sets are the bulk of most messages, so there are two forms (run list or
// bitmap) and the encoder picks the smaller. The decoder is written against hostile input: every count is checked
// against the bytes that remain before anything is reserved, and every page against the caller's limit.
//
// Form 0, ranges: varint rangeCount, then per range varint gap and varint count. The gap is the start page for the
//   first range and the distance from the previous range's upper bound after that; it must be >= 1 (0 would mean
//   two adjacent runs that should have been merged) and every count must be >= 1.
// Form 1, bitmap: varint base, varint bitCount, then ceil(bitCount / 8) bytes, bit i (LSB first within each byte)
//   standing for page base + i. Padding bits past bitCount must be 0.

/// Encodes and decodes `PageSet` values inside message payloads.
public enum PageSetCodec: Sendable {
    /// The two encodings, identified by the first byte.
    public enum Form: UInt8, Sendable, CaseIterable {
        /// Gap/count pairs; compact for sets with few runs.
        case ranges = 0
        /// One bit per page between the first and last page; compact for fragmented sets.
        case bitmap = 1
    }

    /// Exact encoded size of `set` in `form`, in bytes (UInt64 because a sparse set's bitmap can be enormous).
    public static func encodedSize<Unit>(of set: PageSet<Unit>, form: Form) -> UInt64 {
        switch form {
        case .ranges:
            var size = 1 + UInt64(ByteWriter.varintSize(UInt64(set.rangeCount)))
            var previousUpper: UInt64 = 0
            for (index, run) in set.storage.enumerated() {
                let gap = index == 0 ? run.lower : run.lower - previousUpper
                size += UInt64(ByteWriter.varintSize(gap) + ByteWriter.varintSize(run.count))
                previousUpper = run.upper
            }
            return size
        case .bitmap:
            let (base, bitCount) = bitmapBounds(of: set)
            return 1 + UInt64(ByteWriter.varintSize(base) + ByteWriter.varintSize(bitCount)) + byteCount(bits: bitCount)
        }
    }

    /// The smaller of the two forms for `set` (ranges on a tie).
    public static func preferredForm<Unit>(for set: PageSet<Unit>) -> Form {
        encodedSize(of: set, form: .bitmap) < encodedSize(of: set, form: .ranges) ? .bitmap : .ranges
    }

    /// Appends `set` in `form`, or in the smaller form if `form` is nil.
    public static func encode<Unit>(_ set: PageSet<Unit>, form: Form? = nil, into writer: inout ByteWriter) {
        let chosen = form ?? preferredForm(for: set)
        writer.writeU8(chosen.rawValue)
        switch chosen {
        case .ranges:
            writer.writeVarint(UInt64(set.rangeCount))
            var previousUpper: UInt64 = 0
            for (index, run) in set.storage.enumerated() {
                writer.writeVarint(index == 0 ? run.lower : run.lower - previousUpper)
                writer.writeVarint(run.count)
                previousUpper = run.upper
            }
        case .bitmap:
            let (base, bitCount) = bitmapBounds(of: set)
            writer.writeVarint(base)
            writer.writeVarint(bitCount)
            var words = [UInt64](repeating: 0, count: Int(bitCount / 64 + (bitCount % 64 == 0 ? 0 : 1)))
            for run in set.storage {
                PageBitmap<Unit>.setBits(&words, from: run.lower - base, to: run.upper - base)
            }
            // Byte k of the LSB-first stream is bits 8k..<8k+8, i.e. byte k % 8 (little-endian) of word k / 8.
            for index in 0..<Int(byteCount(bits: bitCount)) {
                writer.writeU8(UInt8(truncatingIfNeeded: words[index / 8] >> (UInt64(index % 8) * 8)))
            }
        }
    }

    /// `set` encoded in `form`, or in the smaller form if `form` is nil.
    public static func encode<Unit>(_ set: PageSet<Unit>, form: Form? = nil) -> [UInt8] {
        var writer = ByteWriter()
        encode(set, form: form, into: &writer)
        return writer.bytes
    }

    /// Reads one encoded set from `reader`.
    ///
    /// - Parameters:
    ///   - pageLimit: exclusive upper bound on page numbers; any page at or above it throws `pageOutOfRange`.
    ///   - maxRanges: largest number of runs accepted (`tooManyItems` beyond it).
    ///   - allowBitmap: whether form 1 is accepted; fields that must list runs pass false.
    /// Memory stays proportional to the bytes actually present: a range count is checked against the remaining
    /// bytes before capacity is reserved, a bit count against the remaining bits before the bitmap is read.
    public static func decode<Unit>(
        _ unit: Unit.Type = Unit.self, from reader: inout ByteReader, pageLimit: UInt64, maxRanges: Int = .max,
        allowBitmap: Bool = true
    ) throws(ProtocolError) -> PageSet<Unit> {
        let maxRanges = max(maxRanges, 0)
        let formByte = try reader.readU8()
        switch Form(rawValue: formByte) {
        case .ranges:
            return try decodeRanges(from: &reader, pageLimit: pageLimit, maxRanges: maxRanges)
        case .bitmap where allowBitmap:
            return try decodeBitmap(from: &reader, pageLimit: pageLimit, maxRanges: maxRanges)
        default:
            throw .unsupportedPageSetForm(formByte)
        }
    }

    /// Decodes `bytes`, which must contain exactly one encoded set (`trailingBytes` otherwise).
    public static func decode<Unit>(
        _ bytes: [UInt8], as unit: Unit.Type = Unit.self, pageLimit: UInt64, maxRanges: Int = .max,
        allowBitmap: Bool = true
    ) throws(ProtocolError) -> PageSet<Unit> {
        try withBytes(bytes) { (raw) throws(ProtocolError) in
            var reader = ByteReader(raw)
            let set = try decode(Unit.self, from: &reader, pageLimit: pageLimit, maxRanges: maxRanges,
                                 allowBitmap: allowBitmap)
            try reader.expectEnd()
            return set
        }
    }

    private static func decodeRanges<Unit>(
        from reader: inout ByteReader, pageLimit: UInt64, maxRanges: Int
    ) throws(ProtocolError) -> PageSet<Unit> {
        let rangeCount = try reader.readVarint()
        // Each range needs at least two bytes, so a larger count is a lie and must not size an allocation.
        let possible = UInt64(reader.remaining / 2)
        guard rangeCount <= possible else {
            throw .tooManyItems(what: "ranges", count: rangeCount, limit: possible)
        }
        guard rangeCount <= UInt64(maxRanges) else {
            throw .tooManyItems(what: "ranges", count: rangeCount, limit: UInt64(maxRanges))
        }
        var runs: [RawRange] = []
        runs.reserveCapacity(Int(rangeCount))
        var total: UInt64 = 0
        var previousUpper: UInt64 = 0
        for index in 0..<Int(rangeCount) {
            let gap = try reader.readVarint()
            let count = try reader.readVarint()
            if index > 0 && gap == 0 {
                throw .unmergedRanges(index: index)
            }
            guard count > 0 else {
                throw .invalidRange("range \(index) has count 0")
            }
            let (start, startOverflow) = previousUpper.addingReportingOverflow(gap)
            let (upper, upperOverflow) = start.addingReportingOverflow(count)
            guard !startOverflow, !upperOverflow else {
                throw .invalidRange("range \(index) (gap \(gap), count \(count)) overflows 64 bits")
            }
            guard upper <= pageLimit else {
                throw .pageOutOfRange(page: max(start, pageLimit), limit: pageLimit)
            }
            runs.append(RawRange(start, upper))
            total += count
            previousUpper = upper
        }
        return PageSet(uncheckedStorage: runs, count: total)
    }

    private static func decodeBitmap<Unit>(
        from reader: inout ByteReader, pageLimit: UInt64, maxRanges: Int
    ) throws(ProtocolError) -> PageSet<Unit> {
        let base = try reader.readVarint()
        let bitCount = try reader.readVarint()
        let bytes = byteCount(bits: bitCount)
        guard bytes <= UInt64(reader.remaining) else {
            throw .truncated(needed: Int(bytes), available: reader.remaining)
        }
        let (_, overflow) = base.addingReportingOverflow(bitCount)
        guard !overflow else {
            throw .invalidRange("bitmap at page \(base) with \(bitCount) bits overflows 64 bits")
        }
        let raw = try reader.readBytes(count: Int(bytes))
        let usedBits = bitCount % 8
        if usedBits != 0, let last = raw.last, last >> usedBits != 0 {
            throw .bitmapPaddingNotZero
        }
        var words = [UInt64](repeating: 0, count: (raw.count + 7) / 8)
        words.withUnsafeMutableBytes { $0.copyMemory(from: raw) }
        for index in words.indices {
            words[index] = UInt64(littleEndian: words[index])
        }
        let bitmap = PageBitmap(base: Unit(rawValue: base), bitCount: bitCount, uncheckedWords: words)
        let set = try bitmap.runs(maxRanges: maxRanges)
        if let last = set.last, last.rawValue >= pageLimit,
           let offending = set.firstRange(atOrAfter: Unit(rawValue: pageLimit))
        {
            throw .pageOutOfRange(page: max(offending.lower, pageLimit), limit: pageLimit)
        }
        return set
    }

    /// The bitmap form's base and bit count for `set`: from its first to its last page, or 0/0 when empty.
    private static func bitmapBounds<Unit>(of set: PageSet<Unit>) -> (base: UInt64, bitCount: UInt64) {
        guard let first = set.storage.first, let last = set.storage.last else {
            return (0, 0)
        }
        return (first.lower, last.upper - first.lower)
    }

    /// ceil(bits / 8) without overflow.
    private static func byteCount(bits: UInt64) -> UInt64 {
        bits / 8 + (bits % 8 == 0 ? 0 : 1)
    }
}
