// NumaPlacement: which host node a destination guest's RAM goes to. `auto` takes the node with the most free
// memory among those that can hold the guest, preferring the nodes whose CPUs the vCPUs will run on; a named
// node must exist. Pure: a topology and a request in, a choice and its reason out.

public enum NumaRequest: Sendable, Equatable, CustomStringConvertible {
    case auto
    case node(Int)

    /// "auto" or a node number.
    public init?(_ text: String) {
        if text == "auto" { self = .auto; return }
        guard let node = Int(text), node >= 0, node < 1024 else { return nil }
        self = .node(node)
    }

    public var description: String {
        switch self {
        case .auto: "auto"
        case .node(let node): "\(node)"
        }
    }
}

public struct NumaChoice: Sendable, Equatable {
    public var node: Int
    public var cpus: [Int]
    /// Why this node, in words.
    public var reason: String
}

public enum NumaPlacement {
    /// The node for a guest of `guestBytes` whose vCPUs may run on `vcpuCPUs` (nil: anywhere).
    public static func choose(_ request: NumaRequest, topology: NumaTopology, guestBytes: UInt64,
                              vcpuCPUs: Set<Int>? = nil) throws -> NumaChoice {
        switch request {
        case .node(let id):
            guard let node = topology.node(id) else {
                throw NumaError("NUMA node \(id) does not exist here (nodes: \(topology.nodes.map { "\($0.id)" }.joined(separator: ", ")))")
            }
            let fits = node.freeBytes >= guestBytes
            return NumaChoice(node: id, cpus: node.cpus, reason: "node \(id) as asked" + (fits ? "" : "; it has only \(node.freeBytes >> 20) MiB free for a \(guestBytes >> 20) MiB guest"))
        case .auto:
            let holding = topology.nodes.filter { $0.freeBytes >= guestBytes }
            let near = holding.filter { node in vcpuCPUs.map { !$0.isDisjoint(with: node.cpus) } ?? !node.cpus.isEmpty }
            let pool = !near.isEmpty ? near : (!holding.isEmpty ? holding : topology.nodes)
            let best = pool.max { ($0.freeBytes, -$0.id) < ($1.freeBytes, -$1.id) }!
            let why: String
            if !near.isEmpty {
                why = "the most free memory (\(best.freeBytes >> 20) MiB) of the nodes that hold the guest and run its vCPUs"
            } else if !holding.isEmpty {
                why = "the most free memory (\(best.freeBytes >> 20) MiB) of the nodes that hold the guest (none runs its vCPUs)"
            } else {
                why = "no node holds the \(guestBytes >> 20) MiB guest; the most free memory (\(best.freeBytes >> 20) MiB)"
            }
            return NumaChoice(node: best.id, cpus: best.cpus, reason: "auto: node \(best.id), \(why)")
        }
    }
}
