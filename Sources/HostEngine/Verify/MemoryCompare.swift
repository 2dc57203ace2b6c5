// Integrity is the first property of a migration: every test compares destination memory with the
// source as it was at the switch, byte for byte, on every page that is not known to be free. A
// migration that completes with one wrong page is a failure, so the comparison reports each page.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

public struct MemoryComparison: Sendable, Codable, Equatable {
    public var pagesCompared: UInt64
    public var mismatchedPages: UInt64
    /// The first mismatching pages (at most 16), for the error message.
    public var firstMismatches: [UInt64]

    enum CodingKeys: String, CodingKey {
        case pagesCompared = "pages_compared"
        case mismatchedPages = "mismatched_pages"
        case firstMismatches = "first_mismatches"
    }
}

public enum MemoryCompare {
    /// All 4096 bytes zero: the first byte is zero and every byte equals its successor.
    @inline(__always)
    public static func isZeroPage(_ page: UnsafeRawPointer) -> Bool {
        page.load(as: UInt8.self) == 0 && memcmp(page, page + 1, 4095) == 0
    }

    /// Compares `pages` pages of `actual` against `expected`; pages in `skip` are not compared, pages in
    /// `zero` must be all zeros in `actual`.
    public static func compare(actual: UnsafeRawPointer, expected: UnsafeRawPointer, pages: UInt64,
                               skip: PageSet<PageIndex> = PageSet(), zero: PageSet<PageIndex> = PageSet())
        -> MemoryComparison
    {
        var result = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        for page in 0..<pages {
            let p = PageIndex(rawValue: page)
            if skip.contains(p) { continue }
            let offset = Int(page << PageGeometry.shift)
            result.pagesCompared += 1
            let bad = zero.contains(p) ? !isZeroPage(actual + offset) : memcmp(actual + offset, expected + offset, 4096) != 0
            if bad {
                result.mismatchedPages += 1
                if result.firstMismatches.count < 16 { result.firstMismatches.append(page) }
            }
        }
        return result
    }

    /// Compares against the test pattern instead of a copy (`seed`), pages in `zero` must be zero.
    public static func comparePattern(actual: UnsafeRawPointer, pages: UInt64, seed: UInt64,
                                      zero: PageSet<PageIndex> = PageSet()) -> MemoryComparison {
        var result = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        for page in 0..<pages {
            let offset = Int(page << PageGeometry.shift)
            let bad: Bool
            if zero.contains(PageIndex(rawValue: page)) {
                bad = !isZeroPage(actual + offset)
            } else {
                bad = epc_pattern_check(actual + offset, page, 1, seed) >= 0
            }
            result.pagesCompared += 1
            if bad {
                result.mismatchedPages += 1
                if result.firstMismatches.count < 16 { result.firstMismatches.append(page) }
            }
        }
        return result
    }

    /// Fills pages with the test pattern (page numbers relative to the file start).
    public static func fillPattern(_ base: UnsafeMutableRawPointer, firstPage: UInt64 = 0, pages: UInt64, seed: UInt64) {
        epc_pattern_fill(base, firstPage, pages, seed)
    }
}
