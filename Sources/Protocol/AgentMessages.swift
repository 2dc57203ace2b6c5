// Messages between the in-guest agent and the host engine over virtio-serial. The agent tells the engine which
// guest frames are hot, in use or free so the engine can order (or skip) page transfers. The guest is untrusted, so
// reports are checked hard: every frame below `maxFrame`, classes within the RAM map and pairwise disjoint.

/// Per-connection limits applied when decoding agent messages.
public struct AgentDecodeContext: Sendable, Hashable {
    /// Exclusive limit on guest frame numbers (default 2^36 frames, a 256 TiB guest).
    public var maxFrame: UInt64
    /// Most runs in a hot report's RAM map.
    public var maxRAMRanges: Int
    /// Most runs any one page set may have; bounds decoded memory for fragmented bitmaps (16 bytes per run).
    public var maxRangesPerSet: Int

    /// Limits for one agent connection.
    public init(maxFrame: UInt64 = 1 << 36, maxRAMRanges: Int = 1024, maxRangesPerSet: Int = .max) {
        self.maxFrame = maxFrame
        self.maxRAMRanges = maxRAMRanges
        self.maxRangesPerSet = maxRangesPerSet
    }
}

/// Agent → engine, first message: the agent's versions and build.
public struct AgentHello: Equatable, Sendable {
    /// Longest agent version string, in bytes.
    public static let maxAgentVersionLength = 64
    /// Longest kernel release string, in bytes.
    public static let maxKernelReleaseLength = 128

    /// Wire versions the agent supports.
    public let versions: ClosedRange<UInt8>
    /// The agent's own version string.
    public let agentVersion: String
    /// The guest kernel's release (`uname -r`).
    public let kernelRelease: String
    /// Guest page size; must be 4096.
    public let pageSize: UInt32

    /// A validated hello; throws for version 0, over-long strings or a page size other than 4096.
    public init(
        versions: ClosedRange<UInt8> = WireVersion.supported, agentVersion: String, kernelRelease: String,
        pageSize: UInt32 = UInt32(PageGeometry.size)
    ) throws(ProtocolError) {
        let message = AgentMessage.Kind.agentHello.messageName
        guard versions.lowerBound >= 1 else {
            throw .invalidField(message: message, field: "versions", reason: "minimum version 0 does not exist")
        }
        try checkLength(agentVersion, maxLength: AgentHello.maxAgentVersionLength, message: message,
                        field: "agentVersion")
        try checkLength(kernelRelease, maxLength: AgentHello.maxKernelReleaseLength, message: message,
                        field: "kernelRelease")
        guard UInt64(pageSize) == PageGeometry.size else {
            throw .invalidField(message: message, field: "pageSize", reason: "\(pageSize), only 4096 is supported")
        }
        self.versions = versions
        self.agentVersion = agentVersion
        self.kernelRelease = kernelRelease
        self.pageSize = pageSize
    }
}

/// Engine → agent: the chosen wire version.
public struct HostHello: Equatable, Sendable {
    /// The negotiated version (never 0).
    public let version: UInt8

    /// A validated host hello; throws for version 0.
    public init(version: UInt8) throws(ProtocolError) {
        guard version >= 1 else {
            throw .invalidField(message: AgentMessage.Kind.hostHello.messageName, field: "version",
                                reason: "version 0 does not exist")
        }
        self.version = version
    }
}

/// What a `reportRequest` asks the agent to collect.
public enum ReportKind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Classify pages by recent use; answered by `hotReport`.
    case hot = 1
    /// List free pages; answered by `freeReport`.
    case free = 2

    public var description: String {
        switch self {
        case .hot: return "hot"
        case .free: return "free"
        }
    }
}

/// Engine → agent: collect a report.
public struct ReportRequest: Equatable, Sendable {
    /// Longest observation window, in milliseconds.
    public static let maxWindowMillis: UInt32 = 60_000

    /// Echoed in the report.
    public let requestID: UInt32
    /// Which report.
    public let kind: ReportKind
    /// How long to observe accesses (hot reports), at most 60 000 ms.
    public let windowMillis: UInt32

    /// A validated request; throws if the window exceeds 60 s.
    public init(requestID: UInt32, kind: ReportKind, windowMillis: UInt32) throws(ProtocolError) {
        guard windowMillis <= ReportRequest.maxWindowMillis else {
            throw .invalidField(message: AgentMessage.Kind.reportRequest.messageName, field: "windowMillis",
                                reason: "\(windowMillis) ms, at most \(ReportRequest.maxWindowMillis) allowed")
        }
        self.requestID = requestID
        self.kind = kind
        self.windowMillis = windowMillis
    }
}

/// How the agent classifies guest pages; the raw values order classes from highest transfer priority to lowest.
public enum PageClass: UInt8, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    /// Kernel text and data: needed by everything.
    case kernel = 1
    /// Touched during the observation window.
    case recent = 2
    /// Allocated but not recently touched.
    case inUse = 3
    /// Believed free by the guest (may be reused any time).
    case believedFree = 4

    public static func < (lhs: PageClass, rhs: PageClass) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String {
        switch self {
        case .kernel: return "kernel"
        case .recent: return "recent"
        case .inUse: return "inUse"
        case .believedFree: return "believedFree"
        }
    }
}

/// The pages of one class in a hot report.
public struct ClassifiedPages: Equatable, Sendable {
    /// The class.
    public let pageClass: PageClass
    /// Its frames.
    public let pages: PageSet<GuestFrameNumber>

    /// Pairs a class with its frames.
    public init(_ pageClass: PageClass, _ pages: PageSet<GuestFrameNumber>) {
        self.pageClass = pageClass
        self.pages = pages
    }
}

/// Agent → engine: the guest's RAM map and its frames classified by recent use.
public struct HotReport: Equatable, Sendable {
    /// The request answered.
    public let requestID: UInt32
    /// The observation window actually used, in milliseconds.
    public let windowMillis: UInt32
    /// Time spent collecting, in microseconds.
    public let collectMicros: UInt64
    /// The guest's System RAM ranges; never empty.
    public let ramMap: PageSet<GuestFrameNumber>
    /// At most one entry per class, sorted by class (highest priority first), each a subset of `ramMap` and
    /// disjoint from the others. Frames in no class are unclassified.
    public let classes: [ClassifiedPages]

    /// A validated report; `classes` may be given in any order and is stored sorted. Throws `invalidField` for an
    /// empty RAM map, a duplicated class, a class reaching outside the RAM map or two overlapping classes.
    public init(
        requestID: UInt32, windowMillis: UInt32, collectMicros: UInt64, ramMap: PageSet<GuestFrameNumber>,
        classes: [ClassifiedPages]
    ) throws(ProtocolError) {
        let message = AgentMessage.Kind.hotReport.messageName
        guard !ramMap.isEmpty else {
            throw .invalidField(message: message, field: "ramMap", reason: "empty")
        }
        let sorted = classes.sorted { $0.pageClass < $1.pageClass }
        for (index, entry) in sorted.enumerated() {
            if index > 0 && sorted[index - 1].pageClass == entry.pageClass {
                throw .invalidField(message: message, field: "classes",
                                    reason: "class \(entry.pageClass) appears twice")
            }
            guard entry.pages.isSubset(of: ramMap) else {
                throw .invalidField(message: message, field: "classes",
                                    reason: "class \(entry.pageClass) is not within ramMap")
            }
            for earlier in sorted[..<index] where !earlier.pages.isDisjoint(with: entry.pages) {
                throw .invalidField(message: message, field: "classes",
                                    reason: "class \(entry.pageClass) overlaps class \(earlier.pageClass)")
            }
        }
        self.requestID = requestID
        self.windowMillis = windowMillis
        self.collectMicros = collectMicros
        self.ramMap = ramMap
        self.classes = sorted
    }

    /// The frames of `pageClass`, or nil if the report does not include that class.
    public func pages(of pageClass: PageClass) -> PageSet<GuestFrameNumber>? {
        classes.first { $0.pageClass == pageClass }?.pages
    }
}

/// Engine → destination agent: the VM has resumed; start watching the guest.
public struct VMResumed: Equatable, Sendable {
    /// Increases with every resume, so the agent can tell a repeated notice from a new resume.
    public let sequence: UInt64

    /// A resume notice.
    public init(sequence: UInt64) {
        self.sequence = sequence
    }
}

/// Agent → engine: frames the guest reports free.
public struct FreeReport: Equatable, Sendable {
    /// The request answered.
    public let requestID: UInt32
    /// Time spent scanning, in microseconds.
    public let scanMicros: UInt64
    /// The free frames.
    public let free: PageSet<GuestFrameNumber>

    /// A free-page report.
    public init(requestID: UInt32, scanMicros: UInt64, free: PageSet<GuestFrameNumber>) {
        self.requestID = requestID
        self.scanMicros = scanMicros
        self.free = free
    }
}

/// Agent → engine: the agent failed to do something.
public struct AgentErrorReport: Equatable, Sendable {
    /// Longest message, in bytes.
    public static let maxMessageLength = 512

    /// Machine-readable cause.
    public let code: UInt16
    /// Human-readable cause, at most 512 bytes of UTF-8.
    public let message: String

    /// An error report; a longer `message` is cut to 512 bytes at a Unicode scalar boundary rather than refused,
    /// since an error must always be reportable.
    public init(code: UInt16, message: String) {
        self.code = code
        self.message = truncatedUTF8(message, maxBytes: AgentErrorReport.maxMessageLength)
    }
}
