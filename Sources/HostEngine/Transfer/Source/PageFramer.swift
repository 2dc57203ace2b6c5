// Cutting claimed runs of pages into page-data frames that point into the mapped RAM file (no copy:
// the frame's iovecs are the pages), and telling zero-content pages apart so they travel as ranges.

import EpcopyProtocol

struct PageFramer {
    let base: UnsafeRawPointer
    /// Largest frame, in pages; at most 128 runs per frame.
    let maxFramePages: UInt64
    static let maxRunsPerFrame = 128

    /// Splits claimed runs into frames of at most `maxFramePages` pages and 128 runs.
    func frames(requestID: UInt64, runs: [PageRange<PageIndex>], pushClass: PushClass?) -> [OutgoingFrame] {
        var out: [OutgoingFrame] = []
        var current: [PageRange<PageIndex>] = []
        var pages: UInt64 = 0
        func flush() {
            if !current.isEmpty {
                out.append(OutgoingFrame(requestID: requestID, runs: current, mapping: base, pushClass: pushClass,
                                         checksum: fastChecksum))
            }
            current = []
            pages = 0
        }
        for run in runs {
            var start = run.lowerBound.rawValue
            var left = run.count
            while left > 0 {
                let take = min(left, maxFramePages - pages)
                current.append(try! PageRange(start: PageIndex(rawValue: start), count: take))
                pages += take
                start += take
                left -= take
                if pages == maxFramePages || current.count == Self.maxRunsPerFrame { flush() }
            }
        }
        flush()
        return out
    }

    /// Splits `runs` into runs of pages with data and runs of pages whose content is all zero.
    func splitZero(_ runs: [PageRange<PageIndex>]) -> (data: [PageRange<PageIndex>], zero: [PageRange<PageIndex>]) {
        var data: [PageRange<PageIndex>] = []
        var zero: [PageRange<PageIndex>] = []
        // SAFETY: every run lies inside the region, which the mapping at `base` covers whole.
        func isZero(_ page: UInt64) -> Bool { MemoryCompare.isZeroPage(base + Int(page << PageGeometry.shift)) }
        for run in runs {
            var start = run.lowerBound.rawValue
            var zeroRun = isZero(start)
            var page = start + 1
            while page <= run.upperBound.rawValue {
                let z = page < run.upperBound.rawValue ? isZero(page) : !zeroRun
                if z != zeroRun || page == run.upperBound.rawValue {
                    let r = try! PageRange(start: PageIndex(rawValue: start), count: page - start)
                    if zeroRun { zero.append(r) } else { data.append(r) }
                    start = page
                    zeroRun = z
                }
                page += 1
            }
        }
        return (data, zero)
    }
}
