// What the destination placed, page by page, as CRC32C digests: the migration's integrity check. The
// guest keeps running and writing after RESUME, so comparing memories afterwards would flag the guest's
// own writes; comparing what was *placed* with what the source held at STOP is exact. Four bytes a
// page (512 KiB for a 512 MiB guest); each slot is written once, by the thread that placed the page.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

public final class PageDigests: @unchecked Sendable {
    // SAFETY (@unchecked): slot p is written only by the thread that placed page p (a page is placed
    // once: UFFDIO_COPY is atomic and EEXIST for the loser), and read after the transfer has ended.
    private let slots: UnsafeMutablePointer<UInt32>
    private let recorded: AtomicPageBitmap
    public let pageCount: UInt64

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        slots = .allocate(capacity: Int(max(pageCount, 1)))
        slots.initialize(repeating: 0, count: Int(max(pageCount, 1)))
        recorded = AtomicPageBitmap(pageCount: pageCount)
    }

    deinit { slots.deallocate() }

    /// The digest of one 4 KiB page.
    @inline(__always)
    public static func digest(_ page: UnsafeRawPointer) -> UInt32 {
        fastChecksum(UnsafeRawBufferPointer(start: page, count: Int(PageGeometry.size)), 0)
    }

    public static let zeroPageDigest: UInt32 = {
        let zeros = [UInt8](repeating: 0, count: Int(PageGeometry.size))
        return zeros.withUnsafeBytes { digest($0.baseAddress!) }
    }()

    /// Records `count` pages starting at `first`, read from `source`.
    public func record(first: UInt64, count: UInt64, from source: UnsafeRawPointer) {
        for i in 0..<count {
            slots[Int(first + i)] = Self.digest(source + Int(i << PageGeometry.shift))
            recorded.insert(first + i)
        }
    }

    public func recordZero(_ page: UInt64) {
        slots[Int(page)] = Self.zeroPageDigest
        recorded.insert(page)
    }

    /// The digest of what was placed at `page`, or nil if nothing was placed there.
    public func placed(_ page: UInt64) -> UInt32? {
        recorded.contains(page) ? slots[Int(page)] : nil
    }

    /// Digests of every page of a RAM file (the source at STOP, before anything is released).
    public static func ofFile(_ path: String) throws -> [UInt32] {
        let file = try FileDescriptor.open(path, O_RDONLY)
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw SyscallError(call: "fstat(\(path))", errno: errno) }
        let pages = Int(st.st_size) >> PageGeometry.shift
        let mapping = try MemoryMapping(file: file, length: pages << PageGeometry.shift, protection: PROT_READ)
        return (0..<pages).map { digest(UnsafeRawPointer(mapping.pointer) + ($0 << PageGeometry.shift)) }
    }

    /// Compares with the source's page digests: a placed page must match, a page never placed must have
    /// been zero at the source (a hole) or be in `free`.
    public func compare(sourceDigests: [UInt32], free: PageSet<PageIndex> = PageSet()) -> MemoryComparison {
        var result = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        for page in 0..<min(pageCount, UInt64(sourceDigests.count)) {
            let expected = sourceDigests[Int(page)]
            let bad: Bool
            if let placed = placed(page) {
                bad = placed != expected
            } else if free.contains(PageIndex(rawValue: page)) {
                continue
            } else {
                bad = expected != Self.zeroPageDigest
            }
            result.pagesCompared += 1
            if bad {
                result.mismatchedPages += 1
                if result.firstMismatches.count < 16 { result.firstMismatches.append(page) }
            }
        }
        if UInt64(sourceDigests.count) != pageCount {
            result.mismatchedPages += max(pageCount, UInt64(sourceDigests.count)) - min(pageCount, UInt64(sourceDigests.count))
        }
        return result
    }

    /// Compares against the source as it was at STOP (`source` maps the whole RAM file).
    public func compare(source: UnsafeRawPointer, free: PageSet<PageIndex> = PageSet()) -> MemoryComparison {
        let sourceDigests = (0..<Int(pageCount)).map { Self.digest(source + ($0 << PageGeometry.shift)) }
        return compare(sourceDigests: sourceDigests, free: free)
    }
}
