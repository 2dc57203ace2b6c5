// The source's guest memory: the final RAM file of a stopped, fenced VM, mapped read-only for sending,
// and its release. Pages the source no longer needs — acknowledged by the destination, reported free by
// its guest, holes from the start — are punched out of the file (fallocate PUNCH_HOLE), so the host gets
// its memory back while the transfer runs; when every page is released the source holds none of the VM.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

final class SourceMemory: @unchecked Sendable {
    // SAFETY (@unchecked): the descriptor and mapping are immutable after init; punching is done by the
    // bulk thread only.
    let file: FileDescriptor
    let mapping: MemoryMapping
    let regionPages: UInt64

    /// Opens the RAM file. It is opened read-write only so that acknowledged pages can be punched
    /// out; it is mapped read-only and the engine never writes guest memory.
    init(ramFile path: String) throws(PeerError) {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDWR) } catch { throw .syscall("open the source RAM file", error) }
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            throw .syscall("stat \(path)", SyscallError(call: "fstat", errno: errno))
        }
        let size = UInt64(st.st_size)
        guard size > 0, size % PageGeometry.size == 0 else {
            throw .unexpected("\(path): size \(size) is not a positive multiple of 4096")
        }
        do {
            mapping = try MemoryMapping(file: fd, length: Int(size), protection: PROT_READ)
        } catch { throw .syscall("map \(path)", error) }
        file = fd
        regionPages = size / PageGeometry.size
    }

    /// The mapping's base (page 0 of the file).
    var base: UnsafeRawPointer { UnsafeRawPointer(mapping.pointer) }

    /// Pages that are holes in the file: zero by construction, never sent (SEEK_DATA/SEEK_HOLE).
    func holes() -> PageSet<PageIndex> {
        var holes = PageSet<PageIndex>()
        let size = Int64(regionPages * PageGeometry.size)
        var offset: Int64 = 0
        while offset < size {
            let data = Int64(lseek(file.rawValue, Int(offset), SEEK_DATA))
            let holeEnd = data < 0 ? size : min(Int64(data), size)  // ENXIO: no data after offset
            // Whole pages inside [offset, holeEnd).
            let first = (UInt64(offset) + PageGeometry.size - 1) >> PageGeometry.shift
            let end = UInt64(holeEnd) >> PageGeometry.shift
            if end > first, let range = try? PageRange(start: PageIndex(rawValue: first), count: end - first) {
                holes.insert(range)
            }
            if data < 0 || holeEnd >= size { break }
            let nextHole = Int64(lseek(file.rawValue, Int(holeEnd), SEEK_HOLE))
            offset = nextHole < 0 ? size : Int64(nextHole)
        }
        return holes
    }

    /// Returns pages to the host: fallocate(PUNCH_HOLE) per range.
    func punch(_ pages: PageSet<PageIndex>) throws(SyscallError) {
        for range in pages.ranges {
            try file.punchHole(offset: range.lowerBound.rawValue << PageGeometry.shift,
                               length: range.count << PageGeometry.shift)
        }
    }
}

/// Release bookkeeping that survives a reconnect.
struct ReleaseState {
    let regionPages: UInt64
    /// Pages the source no longer needs: acknowledged, free, or holes from the start.
    var released = PageSet<PageIndex>()
    /// Acknowledged but not yet punched.
    var toPunch = PageSet<PageIndex>()
    /// Reported free while a send of them may still be queued: punched once the session's sends are over
    /// (punching earlier would change the bytes under a frame whose CRC is already computed).
    var punchWhenIdle = PageSet<PageIndex>()

    init(regionPages: UInt64) { self.regionPages = regionPages }
    var complete: Bool { released.count == regionPages }

    /// Pages the destination acknowledged (or already had): released, to be punched.
    mutating func acknowledged(_ pages: PageSet<PageIndex>) {
        let fresh = pages.subtracting(released)
        released.formUnion(fresh)
        toPunch.formUnion(fresh)
    }

    /// Pages the destination's guest reported free; `claimed` are those the push had not sent yet.
    mutating func freed(_ pages: PageSet<PageIndex>, claimed: PageSet<PageIndex>) {
        let fresh = pages.subtracting(released)
        released.formUnion(fresh)
        toPunch.formUnion(fresh.intersection(claimed))
        punchWhenIdle.formUnion(fresh.subtracting(claimed))
    }

    /// Punches what is due (everything when `enabled` is false is dropped: tests keep the source intact).
    mutating func punch(_ memory: SourceMemory, enabled: Bool) throws(SyscallError) {
        defer { toPunch = PageSet() }
        guard enabled else { return }
        try memory.punch(toPunch)
    }
}
