// Where a guest frame lives in the RAM file. The agent reports guest-physical frames; the engine moves RAM-file
// pages. On q35 RAM below 4 GiB sits at the same offset — only up to 2 GiB once the guest has 2.75 GiB or more
// (QEMU's pc_q35 lowmem rule) — and the rest is mapped from 4 GiB up, following it in the file. Frames in the
// PCI hole or past the end are not RAM: a report naming them is wrong, and they are dropped and counted.

import EpcopyProtocol

public struct GuestRAMLayout: Sendable, Equatable {
    public let regionPages: UInt64
    /// RAM-file pages mapped below 4 GiB.
    public let lowPages: UInt64
    static let fourGiBFrame: UInt64 = (1 << 32) >> PageGeometry.shift

    public init(regionPages: UInt64) {
        self.regionPages = regionPages
        let bytes = regionPages << PageGeometry.shift
        lowPages = (bytes >= 0xB000_0000 ? 0x8000_0000 : bytes) >> PageGeometry.shift
    }

    /// One past the highest guest frame that is RAM.
    public var frameLimit: UInt64 {
        regionPages > lowPages ? Self.fourGiBFrame + (regionPages - lowPages) : lowPages
    }

    /// The RAM-file page of a guest frame, or nil if the frame is not RAM.
    public func pageIndex(_ frame: GuestFrameNumber) -> PageIndex? {
        let f = frame.rawValue
        if f < lowPages { return PageIndex(rawValue: f) }
        if f >= Self.fourGiBFrame, f - Self.fourGiBFrame < regionPages - lowPages {
            return PageIndex(rawValue: lowPages + (f - Self.fourGiBFrame))
        }
        return nil
    }

    /// The RAM-file pages of `frames`, and how many frames were not RAM.
    public func pages(_ frames: PageSet<GuestFrameNumber>) -> (pages: PageSet<PageIndex>, outside: UInt64) {
        var ranges: [PageRange<PageIndex>] = []
        var inside: UInt64 = 0
        func add(_ lower: UInt64, _ upper: UInt64, shiftTo base: UInt64, from origin: UInt64) {
            guard upper > lower, let r = try? PageRange(start: PageIndex(rawValue: base + (lower - origin)),
                                                        count: upper - lower) else { return }
            ranges.append(r)
            inside += upper - lower
        }
        for range in frames.ranges {
            let (lo, hi) = (range.lowerBound.rawValue, range.upperBound.rawValue)
            add(lo, min(hi, lowPages), shiftTo: 0, from: 0)
            let highEnd = Self.fourGiBFrame + (regionPages - lowPages)
            add(max(lo, Self.fourGiBFrame), min(hi, highEnd), shiftTo: lowPages, from: Self.fourGiBFrame)
        }
        return (PageSet(ranges: ranges), frames.count - inside)
    }
}
