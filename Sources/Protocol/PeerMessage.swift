// The peer link's message type: one case per wire type code (stable, never renumbered), and its codec —
// encoding each payload, and decoding with the per-connection limits of PeerDecodeContext, rejecting
// (never trapping on) any byte string. The payload structs live in PeerMessages.swift.

/// A message on the peer link (source engine ↔ destination engine).
public enum PeerMessage: Equatable, Sendable {
    /// [1] Handshake opener, both directions.
    case hello(PeerHello)
    /// [2] Authentication challenge: a nonce to MAC.
    case authChallenge(nonce: Bytes32)
    /// [3] Authentication response: HMAC-SHA256 over the challenge (computed by the engine).
    case authResponse(mac: Bytes32)
    /// [4] Handshake accepted.
    case welcome(PeerWelcome)
    /// [5] Urgent request for faulted pages.
    case pageRequest(PageRequest)
    /// [6] Page contents.
    case pageData(PageData)
    /// [7] Source → destination: these pages are zero (holes); they are never sent, zero-fill them.
    case zeroPages(PageSet<PageIndex>)
    /// [8] Destination → source: the guest reported these pages free after resume; never push them.
    case freePages(PageSet<PageIndex>)
    /// [9] Destination → source: these pages are placed; the source may release them.
    case ack(PageSet<PageIndex>)
    /// [10] Progress report.
    case progress(PeerProgress)
    /// [11] All pages sent.
    case done(PeerDone)
    /// [12] Migration abandoned.
    case abort(PeerAbort)
    /// [13] Session resumed after reconnect.
    case resume(PeerResume)
    /// [14] Destination → source: the guest's post-resume free scan is in (its pages went out as `freePages`
    /// before this), or there will be none (`agentAnswered` false). Believed-free pages are pushed after it.
    case freeScanDone(agentAnswered: Bool, pagesReported: UInt64)
    /// [15] Either direction, on the control channel: the sender is alive. A side sends one every keepalive
    /// interval; a peer silent for longer than the keepalive timeout is a lost link even when no error
    /// says so (a black hole: packets dropped, nothing reset). No payload.
    case keepalive

    /// The wire type codes of peer messages. Stable: never renumber.
    public enum Kind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        case hello = 1
        case authChallenge = 2
        case authResponse = 3
        case welcome = 4
        case pageRequest = 5
        case pageData = 6
        case zeroPages = 7
        case freePages = 8
        case ack = 9
        case progress = 10
        case done = 11
        case abort = 12
        case resume = 13
        case freeScanDone = 14
        case keepalive = 15

        public var description: String {
            switch self {
            case .hello: return "hello"
            case .authChallenge: return "authChallenge"
            case .authResponse: return "authResponse"
            case .welcome: return "welcome"
            case .pageRequest: return "pageRequest"
            case .pageData: return "pageData"
            case .zeroPages: return "zeroPages"
            case .freePages: return "freePages"
            case .ack: return "ack"
            case .progress: return "progress"
            case .done: return "done"
            case .abort: return "abort"
            case .resume: return "resume"
            case .freeScanDone: return "freeScanDone"
            case .keepalive: return "keepalive"
            }
        }

        /// Prefix of errors about this message, e.g. "peer message pageData".
        public var messageName: String { "peer message " + description }
    }

    /// The message's kind.
    public var kind: Kind {
        switch self {
        case .hello: return .hello
        case .authChallenge: return .authChallenge
        case .authResponse: return .authResponse
        case .welcome: return .welcome
        case .pageRequest: return .pageRequest
        case .pageData: return .pageData
        case .zeroPages: return .zeroPages
        case .freePages: return .freePages
        case .ack: return .ack
        case .progress: return .progress
        case .done: return .done
        case .abort: return .abort
        case .resume: return .resume
        case .freeScanDone: return .freeScanDone
        case .keepalive: return .keepalive
        }
    }

    /// The frame type code.
    public var typeCode: UInt8 { kind.rawValue }

    /// The payload bytes (without frame header).
    public func encodedPayload() -> [UInt8] {
        var writer = ByteWriter()
        switch self {
        case .hello(let hello):
            hello.encode(into: &writer)
        case .authChallenge(let nonce):
            nonce.write(to: &writer)
        case .authResponse(let mac):
            mac.write(to: &writer)
        case .welcome(let welcome):
            writer.writeU8(welcome.version)
            writer.writeU64(welcome.sessionID)
        case .pageRequest(let request):
            writer.writeU64(request.requestID)
            PageSetCodec.encode(request.pages, into: &writer)
        case .pageData(let data):
            writer = ByteWriter(capacity: 16 + data.bytes.count)
            writer.writeU64(data.requestID)
            PageSetCodec.encode(data.runs, form: .ranges, into: &writer)
            writer.writeBytes(data.bytes)
        case .zeroPages(let pages), .freePages(let pages), .ack(let pages):
            PageSetCodec.encode(pages, into: &writer)
        case .progress(let progress):
            writer.writeU64(progress.pagesPresent)
            writer.writeU64(progress.pagesTotal)
            writer.writeU64(progress.bytesReceived)
            writer.writeU64(progress.faults)
        case .done(let done):
            writer.writeU64(done.pagesSent)
            writer.writeU64(done.bytesSent)
        case .abort(let abort):
            writer.writeU16(abort.code)
            writer.writeString(abort.reason, maxLength: PeerAbort.maxReasonLength)
        case .resume(let resume):
            writer.writeU64(resume.sessionID)
            PageSetCodec.encode(resume.present, into: &writer)
        case .freeScanDone(let answered, let pages):
            writer.writeU8(answered ? 1 : 0)
            writer.writeU64(pages)
        case .keepalive:
            break
        }
        return writer.bytes
    }

    /// The message as a frame.
    public func frame(version: UInt8 = WireVersion.current) -> Frame {
        Frame(link: .peer, version: version, type: typeCode, payload: encodedPayload())
    }

    /// Header and payload ready to send.
    public func encodedFrame(
        version: UInt8 = WireVersion.current, checksum: ChecksumFunction = CRC32C.software
    ) -> [UInt8] {
        encodeFrame(link: .peer, version: version, type: typeCode, payload: encodedPayload(), checksum: checksum)
    }

    /// Decodes a frame received on the peer link.
    public static func decode(frame: Frame, context: PeerDecodeContext) throws(ProtocolError) -> PeerMessage {
        guard frame.link == .peer else {
            throw .linkMismatch(expected: .peer, found: frame.link)
        }
        return try decode(type: frame.type, payload: frame.payload, context: context)
    }

    /// Decodes a payload of the given type code.
    public static func decode(
        type: UInt8, payload: [UInt8], context: PeerDecodeContext
    ) throws(ProtocolError) -> PeerMessage {
        try withBytes(payload) { (raw) throws(ProtocolError) in try decode(type: type, payload: raw, context: context) }
    }

    /// Decodes a payload of the given type code; the payload must be consumed exactly.
    public static func decode(
        type: UInt8, payload: UnsafeRawBufferPointer, context: PeerDecodeContext
    ) throws(ProtocolError) -> PeerMessage {
        guard let kind = Kind(rawValue: type) else {
            throw .unknownMessageType(link: .peer, type: type)
        }
        var reader = FieldReader(payload, message: kind.messageName)
        let pageLimit = context.regionPages
        let maxRanges = context.maxRangesPerSet
        let message: PeerMessage
        switch kind {
        case .hello:
            message = .hello(try PeerHello.decode(from: &reader))
        case .authChallenge:
            message = .authChallenge(nonce: try reader.bytes32("nonce"))
        case .authResponse:
            message = .authResponse(mac: try reader.bytes32("mac"))
        case .welcome:
            let version = try reader.u8("version")
            message = .welcome(try PeerWelcome(version: version, sessionID: try reader.u64("sessionID")))
        case .pageRequest:
            let requestID = try reader.u64("requestID")
            let pages = try reader.pageSet("pages", PageIndex.self, pageLimit: pageLimit,
                                           maxRanges: min(context.maxRequestRanges, maxRanges))
            message = .pageRequest(try PageRequest(requestID: requestID, pages: pages))
        case .pageData:
            let header = try PageData.decodeHeader(from: &reader, context: context)
            let bytes = try reader.read("data") { (raw) throws(ProtocolError) in
                try raw.readByteArray(count: raw.remaining)
            }
            message = .pageData(try PageData(requestID: header.requestID, runs: header.runs, bytes: bytes))
        case .zeroPages:
            message = .zeroPages(try reader.pageSet("pages", PageIndex.self, pageLimit: pageLimit,
                                                    maxRanges: maxRanges))
        case .freePages:
            message = .freePages(try reader.pageSet("pages", PageIndex.self, pageLimit: pageLimit,
                                                    maxRanges: maxRanges))
        case .ack:
            message = .ack(try reader.pageSet("pages", PageIndex.self, pageLimit: pageLimit, maxRanges: maxRanges))
        case .progress:
            let present = try reader.u64("pagesPresent")
            let total = try reader.u64("pagesTotal")
            let bytes = try reader.u64("bytesReceived")
            let faults = try reader.u64("faults")
            guard total <= context.regionPages else {
                throw reader.invalid("pagesTotal", "\(total) above the region's \(context.regionPages) pages")
            }
            message = .progress(try PeerProgress(pagesPresent: present, pagesTotal: total, bytesReceived: bytes,
                                                 faults: faults))
        case .done:
            let pages = try reader.u64("pagesSent")
            message = .done(PeerDone(pagesSent: pages, bytesSent: try reader.u64("bytesSent")))
        case .abort:
            let code = try reader.u16("code")
            message = .abort(PeerAbort(code: code, reason: try reader.string("reason",
                                                                             maxLength: PeerAbort.maxReasonLength)))
        case .resume:
            let sessionID = try reader.u64("sessionID")
            let present = try reader.pageSet("present", PageIndex.self, pageLimit: pageLimit, maxRanges: maxRanges)
            message = .resume(PeerResume(sessionID: sessionID, present: present))
        case .freeScanDone:
            let answered = try reader.u8("agentAnswered")
            guard answered <= 1 else { throw reader.invalid("agentAnswered", "\(answered) is not 0 or 1") }
            let pages = try reader.u64("pagesReported")
            guard pages <= context.regionPages else {
                throw reader.invalid("pagesReported", "\(pages) above the region's \(context.regionPages) pages")
            }
            message = .freeScanDone(agentAnswered: answered == 1, pagesReported: pages)
        case .keepalive:
            message = .keepalive
        }
        try reader.finish()
        return message
    }
}
