// NumaBinding: puts a destination guest's RAM on one host node before the first page is placed, and counts where
// its pages are afterwards. The RAM is a shmem file: mbind on a shared mapping of it sets the file's own (shared)
// policy, which every later allocation in the file follows, UFFDIO_COPY's into QEMU's mapping included. The
// policy is MPOL_PREFERRED: a full node costs locality, never a failed placement (a lost page). Where the pages
// landed is read from /proc/PID/numa_maps for QEMU's mapping of the file.

import CEpcopyLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

public enum NumaBinding {
    /// <linux/mempolicy.h>
    static let mpolPreferred: Int32 = 1
    static let maskBits = 1024

    /// Sets `node` as the preferred node of `length` bytes at `offset` of the RAM file at `path`.
    public static func prefer(node: Int, file path: String, offset: UInt64 = 0, length: UInt64) throws {
        guard node >= 0, node < maskBits - 1 else { throw NumaError("NUMA node \(node) is out of range") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw NumaError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard let base = mmap(nil, Int(length), PROT_READ, MAP_SHARED, fd, off_t(offset)), base != MAP_FAILED else {
            throw NumaError("mmap \(path): \(String(cString: strerror(errno)))")
        }
        defer { munmap(base, Int(length)) }
        var mask = [UInt](repeating: 0, count: maskBits / UInt.bitWidth)
        mask[node / UInt.bitWidth] |= 1 << UInt(node % UInt.bitWidth)
        let rc = mask.withUnsafeBufferPointer {
            epc_mbind(UInt64(UInt(bitPattern: base)), length, mpolPreferred, $0.baseAddress, UInt(maskBits), 0)
        }
        guard rc == 0 else { throw NumaError("mbind \(path) to node \(node): \(String(cString: strerror(Int32(-rc))))") }
    }

    /// Pages of process `pid`'s mapping at `address`, by node (numa_maps' N<node>=<pages>); nil when there is no
    /// such mapping or the file cannot be read.
    public static func pagesByNode(pid: Int32, address: UInt64) -> [Int: UInt64]? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/numa_maps", encoding: .utf8) else { return nil }
        return pagesByNode(numaMaps: text, address: address)
    }

    /// The same, from numa_maps text.
    public static func pagesByNode(numaMaps text: String, address: UInt64) -> [Int: UInt64]? {
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard let first = fields.first, UInt64(first, radix: 16) == address else { continue }
            var pages: [Int: UInt64] = [:]
            for field in fields.dropFirst() where field.hasPrefix("N") {
                let parts = field.dropFirst().split(separator: "=")
                guard parts.count == 2, let node = Int(parts[0]), let count = UInt64(parts[1]) else { continue }
                pages[node] = count
            }
            return pages
        }
        return nil
    }

    /// The fraction of the counted pages on `node` (nil when none is counted).
    public static func fraction(onNode node: Int, of pages: [Int: UInt64]) -> Double? {
        let total = pages.values.reduce(0, +)
        guard total > 0 else { return nil }
        return Double(pages[node] ?? 0) / Double(total)
    }
}
