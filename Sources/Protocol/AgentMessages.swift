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

/// A message on the agent link (in-guest agent ↔ host engine).
public enum AgentMessage: Equatable, Sendable {
    /// [1] Agent → engine handshake.
    case agentHello(AgentHello)
    /// [2] Engine → agent handshake reply.
    case hostHello(HostHello)
    /// [3] Engine → agent: collect a report.
    case reportRequest(ReportRequest)
    /// [4] Agent → engine: classified frames.
    case hotReport(HotReport)
    /// [5] Engine → destination agent: the VM resumed.
    case vmResumed(VMResumed)
    /// [6] Agent → engine: free frames.
    case freeReport(FreeReport)
    /// [7] Agent → engine: something failed.
    case agentError(AgentErrorReport)
    /// [8] Liveness probe, either direction.
    case ping(nonce: UInt64)
    /// [9] Answer to `ping`, echoing its nonce.
    case pong(nonce: UInt64)

    /// The wire type codes of agent messages. Stable: never renumber.
    public enum Kind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        case agentHello = 1
        case hostHello = 2
        case reportRequest = 3
        case hotReport = 4
        case vmResumed = 5
        case freeReport = 6
        case agentError = 7
        case ping = 8
        case pong = 9

        public var description: String {
            switch self {
            case .agentHello: return "agentHello"
            case .hostHello: return "hostHello"
            case .reportRequest: return "reportRequest"
            case .hotReport: return "hotReport"
            case .vmResumed: return "vmResumed"
            case .freeReport: return "freeReport"
            case .agentError: return "agentError"
            case .ping: return "ping"
            case .pong: return "pong"
            }
        }

        /// Prefix of errors about this message, e.g. "agent message hotReport".
        public var messageName: String { "agent message " + description }
    }

    /// The message's kind.
    public var kind: Kind {
        switch self {
        case .agentHello: return .agentHello
        case .hostHello: return .hostHello
        case .reportRequest: return .reportRequest
        case .hotReport: return .hotReport
        case .vmResumed: return .vmResumed
        case .freeReport: return .freeReport
        case .agentError: return .agentError
        case .ping: return .ping
        case .pong: return .pong
        }
    }

    /// The frame type code.
    public var typeCode: UInt8 { kind.rawValue }

    /// The payload bytes (without frame header).
    public func encodedPayload() -> [UInt8] {
        var writer = ByteWriter()
        switch self {
        case .agentHello(let hello):
            writer.writeU8(hello.versions.lowerBound)
            writer.writeU8(hello.versions.upperBound)
            writer.writeString(hello.agentVersion, maxLength: AgentHello.maxAgentVersionLength)
            writer.writeString(hello.kernelRelease, maxLength: AgentHello.maxKernelReleaseLength)
            writer.writeU32(hello.pageSize)
        case .hostHello(let hello):
            writer.writeU8(hello.version)
        case .reportRequest(let request):
            writer.writeU32(request.requestID)
            writer.writeU8(request.kind.rawValue)
            writer.writeU32(request.windowMillis)
        case .hotReport(let report):
            writer.writeU32(report.requestID)
            writer.writeU32(report.windowMillis)
            writer.writeU64(report.collectMicros)
            PageSetCodec.encode(report.ramMap, into: &writer)
            writer.writeU8(UInt8(report.classes.count))
            for entry in report.classes {
                writer.writeU8(entry.pageClass.rawValue)
                PageSetCodec.encode(entry.pages, into: &writer)
            }
        case .vmResumed(let resumed):
            writer.writeU64(resumed.sequence)
        case .freeReport(let report):
            writer.writeU32(report.requestID)
            writer.writeU64(report.scanMicros)
            PageSetCodec.encode(report.free, into: &writer)
        case .agentError(let error):
            writer.writeU16(error.code)
            writer.writeString(error.message, maxLength: AgentErrorReport.maxMessageLength)
        case .ping(let nonce), .pong(let nonce):
            writer.writeU64(nonce)
        }
        return writer.bytes
    }

    /// The message as a frame.
    public func frame(version: UInt8 = WireVersion.current) -> Frame {
        Frame(link: .agent, version: version, type: typeCode, payload: encodedPayload())
    }

    /// Header and payload ready to send.
    public func encodedFrame(
        version: UInt8 = WireVersion.current, checksum: ChecksumFunction = CRC32C.software
    ) -> [UInt8] {
        encodeFrame(link: .agent, version: version, type: typeCode, payload: encodedPayload(), checksum: checksum)
    }

    /// Decodes a frame received on the agent link.
    public static func decode(frame: Frame, context: AgentDecodeContext) throws(ProtocolError) -> AgentMessage {
        guard frame.link == .agent else {
            throw .linkMismatch(expected: .agent, found: frame.link)
        }
        return try decode(type: frame.type, payload: frame.payload, context: context)
    }

    /// Decodes a payload of the given type code.
    public static func decode(
        type: UInt8, payload: [UInt8], context: AgentDecodeContext
    ) throws(ProtocolError) -> AgentMessage {
        try withBytes(payload) { (raw) throws(ProtocolError) in try decode(type: type, payload: raw, context: context) }
    }

    /// Decodes a payload of the given type code; the payload must be consumed exactly.
    public static func decode(
        type: UInt8, payload: UnsafeRawBufferPointer, context: AgentDecodeContext
    ) throws(ProtocolError) -> AgentMessage {
        guard let kind = Kind(rawValue: type) else {
            throw .unknownMessageType(link: .agent, type: type)
        }
        var reader = FieldReader(payload, message: kind.messageName)
        let message: AgentMessage
        switch kind {
        case .agentHello:
            let versions = try reader.versions("versions")
            let agentVersion = try reader.string("agentVersion", maxLength: AgentHello.maxAgentVersionLength)
            let kernelRelease = try reader.string("kernelRelease", maxLength: AgentHello.maxKernelReleaseLength)
            let pageSize = try reader.u32("pageSize")
            message = .agentHello(try AgentHello(versions: versions, agentVersion: agentVersion,
                                                 kernelRelease: kernelRelease, pageSize: pageSize))
        case .hostHello:
            message = .hostHello(try HostHello(version: try reader.u8("version")))
        case .reportRequest:
            let requestID = try reader.u32("requestID")
            let kindCode = try reader.u8("kind")
            guard let reportKind = ReportKind(rawValue: kindCode) else {
                throw reader.invalid("kind", "unknown report kind \(kindCode)")
            }
            let window = try reader.u32("windowMillis")
            message = .reportRequest(try ReportRequest(requestID: requestID, kind: reportKind, windowMillis: window))
        case .hotReport:
            message = .hotReport(try decodeHotReport(from: &reader, context: context))
        case .vmResumed:
            message = .vmResumed(VMResumed(sequence: try reader.u64("sequence")))
        case .freeReport:
            let requestID = try reader.u32("requestID")
            let scanMicros = try reader.u64("scanMicros")
            let free = try reader.pageSet("free", GuestFrameNumber.self, pageLimit: context.maxFrame,
                                          maxRanges: context.maxRangesPerSet)
            message = .freeReport(FreeReport(requestID: requestID, scanMicros: scanMicros, free: free))
        case .agentError:
            let code = try reader.u16("code")
            let text = try reader.string("message", maxLength: AgentErrorReport.maxMessageLength)
            message = .agentError(AgentErrorReport(code: code, message: text))
        case .ping:
            message = .ping(nonce: try reader.u64("nonce"))
        case .pong:
            message = .pong(nonce: try reader.u64("nonce"))
        }
        try reader.finish()
        return message
    }

    private static func decodeHotReport(
        from reader: inout FieldReader, context: AgentDecodeContext
    ) throws(ProtocolError) -> HotReport {
        let requestID = try reader.u32("requestID")
        let window = try reader.u32("windowMillis")
        let collectMicros = try reader.u64("collectMicros")
        let ramMap = try reader.pageSet("ramMap", GuestFrameNumber.self, pageLimit: context.maxFrame,
                                        maxRanges: min(context.maxRAMRanges, context.maxRangesPerSet))
        let classCount = try reader.u8("classCount")
        guard Int(classCount) <= PageClass.allCases.count else {
            throw reader.invalid("classCount", "\(classCount) classes, at most \(PageClass.allCases.count) exist")
        }
        var classes: [ClassifiedPages] = []
        for _ in 0..<classCount {
            let code = try reader.u8("classes")
            guard let pageClass = PageClass(rawValue: code) else {
                throw reader.invalid("classes", "unknown page class \(code)")
            }
            // Reject a repeat before decoding its set, so a duplicate costs no work.
            if classes.contains(where: { $0.pageClass == pageClass }) {
                throw reader.invalid("classes", "class \(pageClass) appears twice")
            }
            let pages = try reader.pageSet("classes", GuestFrameNumber.self, pageLimit: context.maxFrame,
                                           maxRanges: context.maxRangesPerSet)
            classes.append(ClassifiedPages(pageClass, pages))
        }
        return try HotReport(requestID: requestID, windowMillis: window, collectMicros: collectMicros,
                             ramMap: ramMap, classes: classes)
    }
}
