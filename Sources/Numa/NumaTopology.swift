// NumaTopology: this host's NUMA nodes as sysfs describes them (/sys/devices/system/node/nodeN: its CPUs from
// `cpulist`, its memory from `meminfo`), read from any root so tests can hand it a tree of their own.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

public struct NumaNode: Sendable, Equatable, Codable {
    public var id: Int
    public var cpus: [Int]
    public var totalBytes: UInt64
    public var freeBytes: UInt64

    public init(id: Int, cpus: [Int], totalBytes: UInt64, freeBytes: UInt64) {
        self.id = id
        self.cpus = cpus
        self.totalBytes = totalBytes
        self.freeBytes = freeBytes
    }

    enum CodingKeys: String, CodingKey {
        case id, cpus
        case totalBytes = "total_bytes"
        case freeBytes = "free_bytes"
    }
}

public struct NumaTopology: Sendable, Equatable {
    public static let sysfsRoot = "/sys/devices/system/node"
    /// By node id. A host without the sysfs tree (no CONFIG_NUMA) is one node holding every CPU.
    public var nodes: [NumaNode]

    public init(nodes: [NumaNode]) { self.nodes = nodes.sorted { $0.id < $1.id } }

    /// Reads `root` (a directory of nodeN entries). Throws when it has none that parse.
    public static func read(root: String = sysfsRoot) throws -> NumaTopology {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        var nodes: [NumaNode] = []
        for entry in entries where entry.hasPrefix("node") {
            guard let id = Int(entry.dropFirst(4)), id >= 0, id < 1024 else { continue }
            let dir = "\(root)/\(entry)"
            let cpus = (try? String(contentsOfFile: "\(dir)/cpulist", encoding: .utf8)).flatMap(parseCPUList) ?? []
            let meminfo = (try? String(contentsOfFile: "\(dir)/meminfo", encoding: .utf8)) ?? ""
            guard let total = meminfoBytes(meminfo, "MemTotal"), let free = meminfoBytes(meminfo, "MemFree") else { continue }
            nodes.append(NumaNode(id: id, cpus: cpus, totalBytes: total, freeBytes: free))
        }
        guard !nodes.isEmpty else { throw NumaError("no NUMA node with a readable meminfo under \(root)") }
        return NumaTopology(nodes: nodes)
    }

    public func node(_ id: Int) -> NumaNode? { nodes.first { $0.id == id } }

    /// The node that holds `cpu`, if any.
    public func node(ofCPU cpu: Int) -> NumaNode? { nodes.first { $0.cpus.contains(cpu) } }

    /// "0-3,8,10-11" → [0, 1, 2, 3, 8, 10, 11]; nil when malformed. An empty list (a memory-only node) is [].
    public static func parseCPUList(_ text: String) -> [Int]? {
        let trimmed = text.split(whereSeparator: { $0.isWhitespace }).joined()
        guard !trimmed.isEmpty else { return [] }
        var cpus: [Int] = []
        for part in trimmed.split(separator: ",") {
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard bounds.count <= 2, let low = Int(bounds[0]), low >= 0, low < 65536 else { return nil }
            let high = bounds.count == 2 ? Int(bounds[1]) : low
            guard let high, high >= low, high < 65536 else { return nil }
            cpus += Array(low...high)
        }
        return cpus
    }

    /// "Node 0 MemFree:   123456 kB" → bytes.
    static func meminfoBytes(_ text: String, _ key: String) -> UInt64? {
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 4, fields[2] == "\(key):", let kB = UInt64(fields[3]), kB < (1 << 44) else { continue }
            return kB << 10
        }
        return nil
    }
}

public struct NumaError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
