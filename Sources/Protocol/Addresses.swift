// Typed addresses and page numbers. The engine juggles guest-physical addresses, offsets into the RAM file and host
// virtual addresses; mixing them up is the classic post-copy bug, so the API never takes a bare UInt64 for any of
// them and converting between them is explicit.

/// Page size and shift used by every address conversion. Epcopy only supports 4 KiB pages.
public enum PageGeometry: Sendable {
    /// log2 of the page size.
    public static let shift = 12
    /// Page size in bytes.
    public static let size: UInt64 = 4096
}

/// An address in the guest's physical address space.
public struct GuestPhysicalAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address as a number.
    public var rawValue: UInt64

    /// Wraps a raw guest-physical address.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The frame containing this address (rounding down).
    @inlinable public var frame: GuestFrameNumber { GuestFrameNumber(rawValue: rawValue >> PageGeometry.shift) }

    /// Whether the address is a multiple of the page size.
    @inlinable public var isPageAligned: Bool { rawValue & (PageGeometry.size - 1) == 0 }

    @inlinable public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { "gpa " + hex(rawValue) }
}

/// A byte offset into the VM's RAM file (the file backing guest memory on the host).
public struct RAMOffset: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The offset in bytes.
    public var rawValue: UInt64

    /// Wraps a raw byte offset.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The page containing this offset (rounding down).
    @inlinable public var pageIndex: PageIndex { PageIndex(rawValue: rawValue >> PageGeometry.shift) }

    /// Whether the offset is a multiple of the page size.
    @inlinable public var isPageAligned: Bool { rawValue & (PageGeometry.size - 1) == 0 }

    @inlinable public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { "ram " + hex(rawValue) }
}

/// An address in the host engine's own virtual address space (e.g. inside an mmap of the RAM file).
public struct HostVirtualAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address as a number.
    public var rawValue: UInt64

    /// Wraps a raw host virtual address.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Whether the address is a multiple of the page size.
    @inlinable public var isPageAligned: Bool { rawValue & (PageGeometry.size - 1) == 0 }

    @inlinable public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { "hva " + hex(rawValue) }
}

/// A page number in some numbering space. `PageSet` and `PageRange` are generic over it so a set of RAM-file pages
/// cannot be passed where a set of guest frames is expected.
///
/// Page sets use exclusive upper bounds, so `UInt64.max` itself is not a usable page number; pages derived from
/// byte addresses are always far below it.
public protocol PageNumber: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// Wraps a raw page number.
    init(rawValue: UInt64)
    /// The page number as a number.
    var rawValue: UInt64 { get }
}

extension PageNumber {
    @inlinable public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A page within the VM's RAM file: `RAMOffset / 4096`.
public struct PageIndex: PageNumber {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Byte offset of the first byte of this page. Traps if the page lies beyond 2^64 bytes, which no page
    /// accepted by a decoder with a sane limit can.
    @inlinable public var ramOffset: RAMOffset {
        precondition(rawValue <= UInt64.max >> PageGeometry.shift, "page index has no 64-bit byte offset")
        return RAMOffset(rawValue: rawValue << PageGeometry.shift)
    }

    public var description: String { "page " + hex(rawValue) }
}

/// A guest-physical page frame number: `GuestPhysicalAddress / 4096`.
public struct GuestFrameNumber: PageNumber {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Guest-physical address of the first byte of this frame. Traps if the frame lies beyond 2^64 bytes, which no
    /// frame accepted by a decoder with a sane limit can.
    @inlinable public var address: GuestPhysicalAddress {
        precondition(rawValue <= UInt64.max >> PageGeometry.shift, "frame number has no 64-bit address")
        return GuestPhysicalAddress(rawValue: rawValue << PageGeometry.shift)
    }

    public var description: String { "gfn " + hex(rawValue) }
}

/// A non-empty half-open run of pages `[lowerBound, upperBound)`.
///
/// Construction validates the bounds, so every value has `count >= 1` and an upper bound that fits in 64 bits.
public struct PageRange<Unit: PageNumber>: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline let lower: UInt64
    @usableFromInline let upper: UInt64

    /// Already validated bounds; used by `PageSet`, whose storage guarantees `lower < upper`.
    @inlinable init(uncheckedLower lower: UInt64, upper: UInt64) {
        self.lower = lower
        self.upper = upper
    }

    /// A run of `count` pages starting at `start`. Throws `invalidRange` if `count` is 0 or the run would end past
    /// 2^64.
    @inlinable public init(start: Unit, count: UInt64) throws(ProtocolError) {
        guard count > 0 else {
            throw .invalidRange("empty range at page \(start.rawValue)")
        }
        let (end, overflow) = start.rawValue.addingReportingOverflow(count)
        guard !overflow else {
            throw .invalidRange("range at page \(start.rawValue) with \(count) pages overflows 64 bits")
        }
        self.init(uncheckedLower: start.rawValue, upper: end)
    }

    /// The run `[lowerBound, upperBound)`. Throws `invalidRange` if it would be empty.
    @inlinable public init(lowerBound: Unit, upperBound: Unit) throws(ProtocolError) {
        guard lowerBound < upperBound else {
            throw .invalidRange("range \(lowerBound.rawValue)..<\(upperBound.rawValue) is empty")
        }
        self.init(uncheckedLower: lowerBound.rawValue, upper: upperBound.rawValue)
    }

    /// The one-page run containing `page`. Traps for `UInt64.max`, which has no exclusive upper bound.
    @inlinable public init(_ page: Unit) {
        precondition(page.rawValue < UInt64.max, "page UInt64.max cannot start a range")
        self.init(uncheckedLower: page.rawValue, upper: page.rawValue + 1)
    }

    /// First page of the run.
    @inlinable public var lowerBound: Unit { Unit(rawValue: lower) }
    /// One past the last page of the run.
    @inlinable public var upperBound: Unit { Unit(rawValue: upper) }
    /// Number of pages in the run (always at least 1).
    @inlinable public var count: UInt64 { upper - lower }

    /// Whether `page` lies in the run.
    @inlinable public func contains(_ page: Unit) -> Bool {
        page.rawValue >= lower && page.rawValue < upper
    }

    /// Whether the two runs share at least one page.
    @inlinable public func overlaps(_ other: PageRange<Unit>) -> Bool {
        lower < other.upper && other.lower < upper
    }

    public var description: String { "[\(hex(lower)), \(hex(upper)))" }
}

/// A run of pages of the RAM file.
public typealias RAMPageRange = PageRange<PageIndex>
/// A run of guest-physical frames.
public typealias GuestFrameRange = PageRange<GuestFrameNumber>
