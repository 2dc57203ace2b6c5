// Idle page tracking (/sys/kernel/mm/page_idle/bitmap, CONFIG_IDLE_PAGE_TRACKING): write ones to mark pages
// idle, wait a window, read back — a page whose bit the kernel cleared was accessed in the window. It is the
// exact "used in the last window" signal, but only for pages on an LRU list (process and page-cache pages),
// and stock Debian kernels do not have it; where the file is missing the agent falls back to the
// ACTIVE/REFERENCED page flags. Each 64-bit word of the file covers 64 frames; I/O must be word-aligned.

#if canImport(Glibc)
import Glibc
#endif
import EpcopyProtocol

public struct PageIdleTracker {
    public static let defaultPath = "/sys/kernel/mm/page_idle/bitmap"
    public let path: String

    public init(path: String = PageIdleTracker.defaultPath) { self.path = path }

    /// True if this kernel offers idle page tracking to us.
    public var isAvailable: Bool { access(path, R_OK | W_OK) == 0 }

    /// Marks every frame of `frames` idle (pages the kernel cannot track ignore the write).
    public func markIdle(_ frames: PageSet<GuestFrameNumber>) throws {
        let file = try GuestFile(path: path, flags: O_WRONLY)
        let ones = [UInt64](repeating: ~0, count: 4096)
        for (first, words) in Self.wordSpans(frames) {
            var word = first
            while word < first + words {
                let n = Int(min(UInt64(ones.count), first + words - word))
                try ones.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[..<(n * 8)]), at: word * 8) }
                word += UInt64(n)
            }
        }
    }

    /// The frames of `frames` accessed since `markIdle` (their idle bit is clear).
    public func accessed(_ frames: PageSet<GuestFrameNumber>) throws -> PageSet<GuestFrameNumber> {
        let file = try GuestFile(path: path, flags: O_RDONLY)
        var young: [PageRange<GuestFrameNumber>] = []
        var buffer = [UInt64](repeating: 0, count: 4096)
        for (first, words) in Self.wordSpans(frames) {
            var word = first
            while word < first + words {
                let n = Int(min(UInt64(buffer.count), first + words - word))
                let got = try buffer.withUnsafeMutableBytes {
                    try file.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[..<(n * 8)]), at: word * 8)
                }
                for i in 0..<(got / 8) where buffer[i] != ~0 {
                    for bit in 0..<64 where buffer[i] & (1 << UInt64(bit)) == 0 {
                        young.append(PageRange(GuestFrameNumber(rawValue: (word + UInt64(i)) * 64 + UInt64(bit))))
                    }
                }
                word += UInt64(n)
            }
        }
        return PageSet(ranges: young).intersection(frames)
    }

    /// (first word, word count) spans covering `frames`, merged where they touch.
    static func wordSpans(_ frames: PageSet<GuestFrameNumber>) -> [(UInt64, UInt64)] {
        var spans: [(UInt64, UInt64)] = []
        for range in frames.ranges {
            let first = range.lowerBound.rawValue / 64
            let end = (range.upperBound.rawValue + 63) / 64
            if let last = spans.last, last.0 + last.1 >= first {
                spans[spans.count - 1].1 = max(last.0 + last.1, end) - last.0
            } else {
                spans.append((first, end - first))
            }
        }
        return spans
    }
}
