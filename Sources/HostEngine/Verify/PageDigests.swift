// What the destination placed, page by page, as CRC32C digests: the migration's integrity check. The
// guest keeps running and writing after RESUME, so comparing memories afterwards would flag the guest's
// own writes; comparing what was *placed* with what the source held at STOP is exact. Four bytes a
// page (512 KiB for a 512 MiB guest); each slot is written once, by the thread that placed the page.
// The table can live in a shared file (/dev/shm) instead of the engine's heap, so that what a killed
// engine or daemon placed is still checked by its successor: a slot is written before its page's bit.

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
    /// The shared file's mapping that holds `slots` and `recorded`'s words, when the table is persistent.
    private let mapping: MemoryMapping?

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        slots = .allocate(capacity: Int(max(pageCount, 1)))
        slots.initialize(repeating: 0, count: Int(max(pageCount, 1)))
        recorded = AtomicPageBitmap(pageCount: pageCount)
        mapping = nil
    }

    /// File layout: magic, page count, the slots (padded to 8 bytes), the bitmap of recorded pages.
    private static let magic: UInt64 = 0x3130_4749_4443_5045  // "EPCDIG01", little-endian
    private static func layout(_ pageCount: UInt64) -> (slotsAt: Int, wordsAt: Int, length: Int) {
        let slotBytes = (Int(max(pageCount, 1)) * 4 + 7) & ~7
        return (16, 16 + slotBytes, 16 + slotBytes + max(AtomicPageBitmap.wordCount(pageCount), 1) * 8)
    }

    /// A table in the shared file at `path`: a fresh one (`fresh`: created or emptied), or the one a previous
    /// engine of this migration left there, whose recorded pages stay recorded. A file that is not such a
    /// table for `pageCount` pages is refused.
    public init(pageCount: UInt64, file path: String, fresh: Bool) throws {
        let (slotsAt, wordsAt, length) = Self.layout(pageCount)
        let file = try FileDescriptor.open(path, fresh ? (O_RDWR | O_CREAT | O_TRUNC) : O_RDWR)
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw SyscallError(call: "fstat(\(path))", errno: errno) }
        if fresh {
            guard ftruncate(file.rawValue, off_t(length)) == 0 else { throw SyscallError(call: "ftruncate(\(path))", errno: errno) }
        } else if Int(st.st_size) != length {
            throw VerifyError.badDigestFile(path, "\(st.st_size) bytes, expected \(length) for \(pageCount) pages")
        }
        let mapping = try MemoryMapping(file: file, length: length)
        let base = mapping.pointer
        let header = base.assumingMemoryBound(to: UInt64.self)
        if fresh {
            header[0] = Self.magic
            header[1] = pageCount
        } else if header[0] != Self.magic || header[1] != pageCount {
            throw VerifyError.badDigestFile(path, "not a digest table of \(pageCount) pages")
        }
        self.pageCount = pageCount
        slots = (base + slotsAt).assumingMemoryBound(to: UInt32.self)
        recorded = AtomicPageBitmap(pageCount: pageCount, words: (base + wordsAt).assumingMemoryBound(to: UInt64.self))
        self.mapping = consume mapping
    }

    deinit { if mapping == nil { slots.deallocate() } }

    /// Pages recorded so far.
    public var recordedCount: UInt64 { (0..<pageCount).reduce(0) { $0 + (recorded.contains($1) ? 1 : 0) } }

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

public enum VerifyError: Error, CustomStringConvertible, Sendable {
    /// A digest table file a previous engine should have left is not one.
    case badDigestFile(String, String)

    public var description: String {
        switch self {
        case .badDigestFile(let path, let why): return "digest table \(path): \(why)"
        }
    }
}
