// Helpers for the protocol tests: random page sets with a reference model (seeded by EpcopyProtocol's
// SplitMix64, so every randomised test reproduces from the seed in its failure message), and small
// conveniences for catching typed errors.

import EpcopyProtocol
import Testing

/// The error thrown by `body`, or nil if it returned; records an issue for a non-protocol error.
func caught<T>(_ body: () throws -> T) -> ProtocolError? {
    do {
        _ = try body()
        return nil
    } catch let error as ProtocolError {
        return error
    } catch {
        Issue.record("unexpected non-protocol error \(error)")
        return nil
    }
}

/// A random set within `0..<universe`: either a mix of long runs, short runs and single pages, or a fragmented
/// window; returned together with the same set as a plain `Set` for reference.
func randomPageSet<Unit: PageNumber>(
    _ unit: Unit.Type = PageIndex.self, universe: UInt64, using rng: inout SplitMix64
) -> (PageSet<Unit>, Set<UInt64>) {
    var reference = Set<UInt64>()
    if Int.random(in: 0..<4, using: &rng) == 0 {
        // Fragmented: a window where each page is present with probability 1/2 (bitmap territory).
        let start = UInt64.random(in: 0..<universe, using: &rng)
        let end = min(start + UInt64.random(in: 1...300, using: &rng), universe)
        for page in start..<end where Bool.random(using: &rng) {
            reference.insert(page)
        }
        return (PageSet(pages: reference.map { Unit(rawValue: $0) }), reference)
    }
    let runs = Int.random(in: 0...12, using: &rng)
    let maxLength = [1, 4, 40, 400].randomElement(using: &rng) ?? 1
    for _ in 0..<runs {
        let start = UInt64.random(in: 0..<universe, using: &rng)
        let length = UInt64.random(in: 1...UInt64(maxLength), using: &rng)
        for page in start..<min(start + length, universe) {
            reference.insert(page)
        }
    }
    return (PageSet(pages: reference.map { Unit(rawValue: $0) }), reference)
}

/// The pages of `set` as a plain `Set`.
func pagesOf<Unit>(_ set: PageSet<Unit>) -> Set<UInt64> {
    Set(set.pages.map(\.rawValue))
}

/// Why `set` breaks the PageSet invariant (sorted, non-empty, disjoint, non-adjacent runs, cached count right), or
/// nil if it holds.
func invariantViolation<Unit>(_ set: PageSet<Unit>) -> String? {
    var total: UInt64 = 0
    var previousUpper: UInt64?
    for (index, range) in set.ranges.enumerated() {
        if range.count == 0 {
            return "run \(index) is empty"
        }
        if let previousUpper, range.lowerBound.rawValue <= previousUpper {
            return "run \(index) starts at \(range.lowerBound.rawValue), not after \(previousUpper)"
        }
        previousUpper = range.upperBound.rawValue
        total += range.count
    }
    if total != set.count {
        return "count \(set.count) but runs hold \(total) pages"
    }
    if set.rangeCount != set.ranges.count {
        return "rangeCount \(set.rangeCount) but \(set.ranges.count) runs"
    }
    return nil
}

/// `PageSet<PageIndex>` from literal ranges (start, count); traps on invalid test data.
func pageSet(_ runs: [(UInt64, UInt64)]) -> PageSet<PageIndex> {
    PageSet(ranges: runs.map { run in
        // Test data is written by hand; an invalid range is a bug in the test itself.
        guard let range = try? PageRange(start: PageIndex(rawValue: run.0), count: run.1) else {
            preconditionFailure("bad test range \(run)")
        }
        return range
    })
}

/// `PageSet<GuestFrameNumber>` from literal ranges (start, count).
func frameSet(_ runs: [(UInt64, UInt64)]) -> PageSet<GuestFrameNumber> {
    PageSet(ranges: pageSet(runs).ranges.map { range in
        guard let frames = try? PageRange(start: GuestFrameNumber(rawValue: range.lowerBound.rawValue),
                                          count: range.count) else {
            preconditionFailure("bad test range \(range)")
        }
        return frames
    })
}

/// Deterministic non-trivial bytes.
func patternBytes(count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
}

/// A Bytes32 filled from `seed`.
func bytes32(seed: UInt64) -> Bytes32 {
    Bytes32(patternBytes(count: 32, seed: seed)) ?? .zero
}

/// Little-endian bytes of `value`.
func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { [UInt8]($0) }
}

/// Minimal LEB128 encoding of `value`.
func varint(_ value: UInt64) -> [UInt8] {
    var writer = ByteWriter()
    writer.writeVarint(value)
    return writer.bytes
}
