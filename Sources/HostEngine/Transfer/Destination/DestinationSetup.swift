// Where the destination's userfaultfd comes from: the QEMU shim's hand-over (path (b) of the design), or
// a takeover from a dead engine. A takeover must find out what the dead engine already placed: with
// UFFDIO_COPY a page is in the RAM file's page cache exactly when it was placed (the copy is atomic),
// so mincore() on a mapping of the file answers it. It must also wake the range: a fault the dead
// engine had read but not resolved is never delivered again, and only a wake makes the thread fault
// anew.

import CEpcopyLinux
import EpcopyProtocol
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a replacement engine needs to take over guest memory: written by the engine that accepted the
/// hand-over, read by `epcopy engine destination --take-over`.
public struct DestinationState: Codable, Sendable, Equatable {
    public var pid: Int32
    public var remoteUffdFD: Int32
    public var hostAddress: UInt64
    public var length: UInt64
    public var fileOffset: UInt64
    public var path: String
    public var sessionID: UInt64

    enum CodingKeys: String, CodingKey {
        case pid
        case remoteUffdFD = "remote_uffd_fd"
        case hostAddress = "host_address"
        case length
        case fileOffset = "file_offset"
        case path
        case sessionID = "session_id"
    }

    public init(pid: Int32, remoteUffdFD: Int32, hostAddress: UInt64, length: UInt64, fileOffset: UInt64,
                path: String, sessionID: UInt64) {
        self.pid = pid
        self.remoteUffdFD = remoteUffdFD
        self.hostAddress = hostAddress
        self.length = length
        self.fileOffset = fileOffset
        self.path = path
        self.sessionID = sessionID
    }

    public func write(to file: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(self)
        // Write then rename: a reader never sees half a state file.
        let temporary = file + ".tmp"
        try data.write(to: URL(fileURLWithPath: temporary))
        guard rename(temporary, file) == 0 else { throw SyscallError(call: "rename(\(file))", errno: errno) }
    }

    public static func read(from file: String) throws -> DestinationState {
        try JSONDecoder().decode(DestinationState.self, from: Data(contentsOf: URL(fileURLWithPath: file)))
    }
}

extension DestinationMemory {
    /// Guest memory handed over by the shim in the process that owns it.
    public init(handover: consuming UffdHandover) throws(SyscallError) {
        let mode: PlacementMode = .copy
        self.init(uffd: try handover.uffd.duplicate(), hostAddress: UInt(handover.hostVirtualAddress),
                  length: Int(handover.length), firstPage: PageIndex(rawValue: handover.fileOffset >> PageGeometry.shift), mode: mode)
    }

    /// Takes the uffd over from the process that owns guest memory; `present` receives the pages the
    /// previous engine had already placed.
    public static func takeOver(_ state: DestinationState, present: inout PageSet<PageIndex>) throws
        -> DestinationMemory
    {
        let uffd = try UffdHandoverListener.takeOver(pid: state.pid, remoteFD: state.remoteUffdFD)
        present = try residentPages(path: state.path, offset: state.fileOffset, length: state.length)
        let memory = DestinationMemory(uffd: uffd, hostAddress: UInt(state.hostAddress), length: Int(state.length),
                                       firstPage: PageIndex(rawValue: state.fileOffset >> PageGeometry.shift),
                                       mode: .copy)
        // Re-raise faults the previous engine read and never answered.
        try memory.placement.wakeAll()
        return memory
    }

    /// Pages of `path` in `[offset, offset+length)` that are in the page cache (RAM-file page numbers).
    public static func residentPages(path: String, offset: UInt64, length: UInt64) throws -> PageSet<PageIndex> {
        let file = try FileDescriptor.open(path, O_RDONLY)
        let mapping = try MemoryMapping(file: file, length: Int(length), offset: offset, protection: PROT_READ)
        let pages = Int(length >> PageGeometry.shift)
        var vector = [UInt8](repeating: 0, count: pages)
        let rc = mincore(mapping.pointer, Int(length), &vector)
        guard rc == 0 else { throw SyscallError(call: "mincore(\(path))", errno: errno) }
        var present = PageSet<PageIndex>()
        var i = 0
        let first = offset >> PageGeometry.shift
        while i < pages {
            guard vector[i] & 1 != 0 else { i += 1; continue }
            var j = i
            while j < pages, vector[j] & 1 != 0 { j += 1 }
            present.insert(try PageRange(start: PageIndex(rawValue: first + UInt64(i)), count: UInt64(j - i)))
            i = j
        }
        return present
    }
}
