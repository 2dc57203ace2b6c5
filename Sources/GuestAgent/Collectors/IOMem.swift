// The guest's RAM map, from /proc/iomem. Page reports are in guest-physical frame numbers, and only the
// "System RAM" ranges hold guest memory: everything else (ROM, ACPI tables, PCI holes) either travels
// with the device state or is not memory at all. The engine maps these frames to RAM-file offsets.

import EpcopyProtocol

/// One line of /proc/iomem.
public struct IOMemEntry: Sendable, Equatable {
    /// Nesting level (two spaces of indentation per level).
    public var depth: Int
    public var start: GuestPhysicalAddress
    /// Inclusive, as /proc/iomem prints it.
    public var last: GuestPhysicalAddress
    public var name: String
}

public enum IOMemError: Error, Equatable, CustomStringConvertible {
    case malformedLine(number: Int, text: String)
    case addressesHidden
    case noSystemRAM

    public var description: String {
        switch self {
        case .malformedLine(let n, let text): "/proc/iomem line \(n) is not 'START-END : NAME': \(text)"
        case .addressesHidden: "/proc/iomem shows only zero addresses: it must be read as root"
        case .noSystemRAM: "/proc/iomem lists no System RAM"
        }
    }
}

public enum IOMem {
    /// Parses the whole file. Lines look like `  00100000-bfffffff : System RAM`.
    public static func parse(_ text: String) throws(IOMemError) -> [IOMemEntry] {
        var entries: [IOMemEntry] = []
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
            let indent = rawLine.prefix { $0 == " " }.count
            let line = rawLine.dropFirst(indent)
            // "START-END : NAME" (no Foundation here: the agent is a static binary).
            let chars = Array(line.utf8)
            guard let sep = (0..<max(chars.count - 2, 0)).first(where: {
                chars[$0] == 0x20 && chars[$0 + 1] == 0x3A && chars[$0 + 2] == 0x20
            }) else { throw .malformedLine(number: index + 1, text: String(rawLine)) }
            let span = String(decoding: chars[..<sep], as: UTF8.self).split(separator: "-")
            let name = String(decoding: chars[(sep + 3)...], as: UTF8.self)
            guard span.count == 2, let start = UInt64(span[0], radix: 16), let last = UInt64(span[1], radix: 16),
                  start <= last
            else { throw .malformedLine(number: index + 1, text: String(rawLine)) }
            entries.append(IOMemEntry(depth: indent / 2, start: GuestPhysicalAddress(rawValue: start),
                                      last: GuestPhysicalAddress(rawValue: last),
                                      name: name))
        }
        return entries
    }

    /// The frames of top-level "System RAM" ranges. Partial pages at either end are left out: a frame is
    /// reported only if all of it is RAM (the BIOS area at 0x9fc00 ends a range mid-page).
    public static func systemRAM(_ text: String) throws(IOMemError) -> PageSet<GuestFrameNumber> {
        let entries = try parse(text)
        let ram = entries.filter { $0.depth == 0 && $0.name == "System RAM" }
        guard !ram.isEmpty else { throw .noSystemRAM }
        if ram.allSatisfy({ $0.start.rawValue == 0 && $0.last.rawValue == 0 }) { throw .addressesHidden }
        var frames = PageSet<GuestFrameNumber>()
        for entry in ram {
            let first = (entry.start.rawValue + PageGeometry.size - 1) >> PageGeometry.shift
            let end = (entry.last.rawValue &+ 1) >> PageGeometry.shift  // exclusive; last+1 may be 2^64 → 0
            let endFrame = entry.last.rawValue == UInt64.max ? (UInt64.max >> PageGeometry.shift) + 1 : end
            guard endFrame > first,
                  let range = try? PageRange(start: GuestFrameNumber(rawValue: first), count: endFrame - first)
            else { continue }
            frames.insert(range)
        }
        return frames
    }
}
