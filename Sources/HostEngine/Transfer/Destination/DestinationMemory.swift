// What a destination engine is given: guest memory registered with a userfaultfd (the shim's hand-over,
// a takeover, or the engine's own mapping in tests), its options, and the report it returns.

import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Guest memory at the destination, as the engine sees it.
public struct DestinationMemory: ~Copyable, Sendable {
    /// The userfaultfd the range is registered with (the engine's own, a hand-over, or a takeover).
    public let uffd: FileDescriptor
    /// Start of the registered range in the process that owns the memory.
    public let hostAddress: UInt
    public let length: Int
    /// RAM-file page at `hostAddress` (file offset / 4096).
    public let firstPage: PageIndex
    public let mode: PlacementMode
    /// The engine's own mapping, when it registered its own memory (tests, benchmarks).
    public let ownMapping: MemoryMapping?
    public let ownMappingAddress: UInt?

    public init(uffd: consuming FileDescriptor, hostAddress: UInt, length: Int, firstPage: PageIndex,
                mode: PlacementMode, ownMapping: consuming MemoryMapping? = nil, ownMappingAddress: UInt? = nil) {
        self.uffd = uffd
        self.hostAddress = hostAddress
        self.length = length
        self.firstPage = firstPage
        self.mode = mode
        self.ownMapping = ownMapping
        self.ownMappingAddress = ownMappingAddress
    }

    /// Maps `file` and registers the mapping with a fresh uffd of this process (path (a) of the design:
    /// tests and benchmarks, where the faulting threads live in the engine's own process).
    public static func registerOwn(file: borrowing FileDescriptor, length: Int) throws(SyscallError) -> DestinationMemory {
        let mapping = try MemoryMapping(file: file, length: length)
        let uffd = try Userfaultfd(features: [.missingShmem, .eventRemove])
        _ = try uffd.register(start: mapping.address, length: length, mode: .missing)
        let address = mapping.address
        return DestinationMemory(uffd: try uffd.descriptor.duplicate(), hostAddress: address, length: length,
                                 firstPage: PageIndex(rawValue: 0), mode: .copy, ownMapping: mapping, ownMappingAddress: address)
    }

    public var regionPages: UInt64 { firstPage.rawValue + UInt64(length) / PageGeometry.size }

    /// Placement on this memory (the descriptor stays owned here; the value must not outlive it).
    public var placement: Placement {
        Placement(uffd: uffd.rawValue, base: hostAddress, length: length, firstPage: firstPage, mode: mode)
    }
}

public struct DestinationOptions: Sendable {
    public var sessionID: UInt64
    public var link: LinkSpec
    /// Pages already present (a replacement engine after a takeover); sent to the source as `resume`.
    public var initiallyPresent: PageSet<PageIndex>
    public var acceptTimeoutMillis: Int32
    /// After a lost link, how long to wait for the source to come back (0: the transfer fails at once). Faults
    /// wait meanwhile: a vCPU that touches a missing page stops until the page comes, never reads a zero.
    public var reconnectTimeoutMillis: Int32 = 0
    /// Keepalives on the control channel, and how much silence is a lost link.
    public var keepalive: KeepaliveSpec = .standard
    /// Unregister the range when done (always, except in tests that inspect the registration).
    public var unregisterWhenDone: Bool
    /// Record a digest of every placed page (`--verify`): see PageDigests.
    public var recordDigests: Bool
    /// With `recordDigests`: the table to record into, when the caller keeps it in a file that outlives the
    /// engine (a daemon that may be restarted); nil: a fresh table in memory.
    public var digests: PageDigests?
    /// Shared key: a source that cannot prove it holds it is refused.
    public var authKey: [UInt8]?

    public init(sessionID: UInt64, link: LinkSpec = .unshaped, initiallyPresent: PageSet<PageIndex> = PageSet(),
                acceptTimeoutMillis: Int32 = 30_000, unregisterWhenDone: Bool = true, recordDigests: Bool = false,
                authKey: [UInt8]? = nil) {
        self.sessionID = sessionID
        self.link = link
        self.initiallyPresent = initiallyPresent
        self.acceptTimeoutMillis = acceptTimeoutMillis
        self.unregisterWhenDone = unregisterWhenDone
        self.recordDigests = recordDigests
        self.authKey = authKey
    }
}

public struct DestinationReport: Sendable, Codable, Equatable {
    public var regionPages: UInt64
    public var pagesReceived: UInt64
    public var pagesZero: UInt64
    public var bytesReceived: UInt64
    public var transferMillis: Double
    public var cpuSeconds: Double
    public var metrics: TransferMetrics.Snapshot
    public var timeline: [String]
    /// Sessions lost to the link (or the source) and resumed.
    public var linkLosses: Int = 0
    /// Time between losing a session and resuming on the next one, summed.
    public var pausedMillis: Double = 0

    enum CodingKeys: String, CodingKey {
        case regionPages = "region_pages"
        case pagesReceived = "pages_received"
        case pagesZero = "pages_zero"
        case bytesReceived = "bytes_received"
        case transferMillis = "transfer_ms"
        case cpuSeconds = "cpu_s"
        case metrics
        case timeline
        case linkLosses = "link_losses"
        case pausedMillis = "paused_ms"
    }
}
