// The agent link's message type: one case per wire type code, and its codec — decoding checks every
// report against AgentDecodeContext (the guest is untrusted). The payload structs live in AgentMessages.swift.

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
