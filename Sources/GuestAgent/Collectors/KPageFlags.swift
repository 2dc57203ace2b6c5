// /proc/kpageflags: one 64-bit word of page flags per page frame, readable by root. It is the agent's main
// signal: BUDDY marks free pages (every page of a free block, not only the head, since Linux 4.x), SLAB and
// PGTABLE mark kernel memory, LRU/ANON/MMAP/THP mark pages that belong to processes or the page cache, and
// ACTIVE/REFERENCED say the kernel saw a page used recently. Bit numbers are the kernel's ABI
// (include/uapi/linux/kernel-page-flags.h; the bits from 32 up are exported as well since Linux 2.6.32).

#if canImport(Glibc)
import Glibc
#endif
import EpcopyProtocol

/// Page flags as /proc/kpageflags reports them.
public struct KPageFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let locked = KPageFlags(rawValue: 1 << 0)
    public static let referenced = KPageFlags(rawValue: 1 << 2)
    public static let dirty = KPageFlags(rawValue: 1 << 4)
    public static let lru = KPageFlags(rawValue: 1 << 5)
    public static let active = KPageFlags(rawValue: 1 << 6)
    public static let slab = KPageFlags(rawValue: 1 << 7)
    public static let buddy = KPageFlags(rawValue: 1 << 10)
    public static let mmap = KPageFlags(rawValue: 1 << 11)
    public static let anon = KPageFlags(rawValue: 1 << 12)
    public static let swapBacked = KPageFlags(rawValue: 1 << 14)
    public static let compoundHead = KPageFlags(rawValue: 1 << 15)
    public static let compoundTail = KPageFlags(rawValue: 1 << 16)
    public static let huge = KPageFlags(rawValue: 1 << 17)
    public static let unevictable = KPageFlags(rawValue: 1 << 18)
    public static let hwPoison = KPageFlags(rawValue: 1 << 19)
    /// No struct page behind this frame.
    public static let noPage = KPageFlags(rawValue: 1 << 20)
    public static let thp = KPageFlags(rawValue: 1 << 22)
    /// Given away (a balloon-inflated or offlined page): its contents are not the guest's any more.
    public static let offline = KPageFlags(rawValue: 1 << 23)
    public static let zeroPage = KPageFlags(rawValue: 1 << 24)
    public static let idle = KPageFlags(rawValue: 1 << 25)
    public static let pageTable = KPageFlags(rawValue: 1 << 26)
    public static let reserved = KPageFlags(rawValue: 1 << 32)

    /// Flags that mean "belongs to a process or the page cache" rather than to the kernel itself.
    public static let userOwned: KPageFlags = [.lru, .anon, .mmap, .thp]
}

/// How a page is classified from its flags.
public enum PageClassifier {
    /// The class of one page. `young` is the idle-page-tracking verdict where the kernel has it (true: accessed
    /// in the window), nil where it does not; then ACTIVE/REFERENCED stand in for "used recently".
    ///
    /// Order matters: a free page is free whatever else is set; kernel memory (slab, page tables, reserved,
    /// anything not owned by a process or the page cache) outranks recent use, since the guest cannot run a
    /// moment without it; a flagless page is most likely a kernel allocation (alloc_pages sets no flag), so
    /// it is sent early rather than late — a wrong guess there costs a little order, never correctness.
    @inlinable
    public static func classify(_ flags: KPageFlags, young: Bool? = nil) -> PageClass {
        if flags.contains(.buddy) || flags.contains(.offline) { return .believedFree }
        if !flags.isDisjoint(with: [.slab, .pageTable, .reserved, .noPage, .hwPoison]) { return .kernel }
        if flags.isDisjoint(with: KPageFlags.userOwned) { return .kernel }
        let recent = young ?? !flags.isDisjoint(with: [.active, .referenced])
        return recent ? .recent : .inUse
    }

    /// True if a post-switch scan may report the page free.
    @inlinable
    public static func isFree(_ flags: KPageFlags) -> Bool {
        flags.contains(.buddy) || flags.contains(.offline)
    }
}

/// Reads /proc/kpageflags for the frames of a RAM map, a chunk at a time.
public struct KPageFlagsReader {
    public static let defaultPath = "/proc/kpageflags"
    public let path: String
    /// Frames per read (8 bytes each).
    public let chunkFrames: Int

    public init(path: String = KPageFlagsReader.defaultPath, chunkFrames: Int = 1 << 16) {
        self.path = path
        self.chunkFrames = max(chunkFrames, 1)
    }

    /// Calls `body(firstFrame, flags)` for consecutive chunks covering every frame of `frames`. A frame past the
    /// end of the file (the kernel knows fewer frames than the map claims) is reported as `noPage`.
    public func forEachChunk(
        of frames: PageSet<GuestFrameNumber>, _ body: (UInt64, UnsafeBufferPointer<UInt64>) throws -> Void
    ) throws {
        let file = try GuestFile(path: path, flags: O_RDONLY)
        var buffer = [UInt64](repeating: 0, count: chunkFrames)
        for range in frames.ranges {
            var frame = range.lowerBound.rawValue
            let end = range.upperBound.rawValue
            while frame < end {
                let count = Int(min(UInt64(chunkFrames), end - frame))
                let got = try buffer.withUnsafeMutableBytes { raw in
                    try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[..<(count * 8)]), at: frame * 8)
                }
                for i in (got / 8)..<count { buffer[i] = KPageFlags.noPage.rawValue }
                try buffer.withUnsafeBufferPointer { try body(frame, UnsafeBufferPointer(rebasing: $0[..<count])) }
                frame += UInt64(count)
            }
        }
    }
}

/// Collects sorted runs of frames per class without storing a class per page.
struct RunCollector {
    private var runs: [PageClass: [PageRange<GuestFrameNumber>]] = [:]
    private var current: PageClass?
    private var start: UInt64 = 0
    private var end: UInt64 = 0

    mutating func add(_ frame: UInt64, _ pageClass: PageClass) {
        if pageClass == current && frame == end {
            end += 1
            return
        }
        flush()
        current = pageClass
        start = frame
        end = frame + 1
    }

    private mutating func flush() {
        guard let current, end > start,
              let range = try? PageRange(start: GuestFrameNumber(rawValue: start), count: end - start)
        else { return }
        runs[current, default: []].append(range)
    }

    mutating func finish() -> [PageClass: PageSet<GuestFrameNumber>] {
        flush()
        current = nil
        return runs.mapValues { PageSet(ranges: $0) }
    }
}
