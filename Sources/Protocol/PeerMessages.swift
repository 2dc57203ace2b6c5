// Messages between the source and destination engines over TCP: handshake and authentication, demand-paging
// requests and page data, the page sets that let each side skip work (zero, free, acknowledged pages), progress and
// teardown. Payload structs validate what they can on construction; decoding also applies per-connection limits
// from `PeerDecodeContext`.

/// Which side of a migration an engine is.
public enum PeerRole: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// The engine the VM migrates away from; it owns the pages.
    case source = 1
    /// The engine the VM runs on after switch-over; it faults pages in.
    case destination = 2

    public var description: String {
        switch self {
        case .source: return "source"
        case .destination: return "destination"
        }
    }
}

/// Per-connection limits applied when decoding peer messages.
public struct PeerDecodeContext: Sendable, Hashable {
    /// Number of pages in the migrated region; every `PageIndex` on the wire must be below it. (`hello` carries the
    /// region size itself and is not checked against this.)
    public var regionPages: UInt64
    /// Most pages one `pageData` message may carry.
    public var maxPageDataPages: Int
    /// Most runs one `pageRequest` may list.
    public var maxRequestRanges: Int
    /// Most runs any one page set may have; bounds decoded memory for fragmented bitmaps (16 bytes per run).
    public var maxRangesPerSet: Int

    /// Limits for a region of `regionPages` pages.
    public init(regionPages: UInt64, maxPageDataPages: Int = 2048, maxRequestRanges: Int = 64,
                maxRangesPerSet: Int = .max) {
        self.regionPages = regionPages
        self.maxPageDataPages = maxPageDataPages
        self.maxRequestRanges = maxRequestRanges
        self.maxRangesPerSet = maxRangesPerSet
    }
}

/// First message in each direction: who is speaking, which versions it supports and what it is migrating.
public struct PeerHello: Equatable, Sendable {
    /// Longest VM name, in bytes.
    public static let maxVMNameLength = 256
    /// Largest region: 2^40 pages (4 PiB).
    public static let maxRegionPages: UInt64 = 1 << 40

    /// The sender's role.
    public let role: PeerRole
    /// Which connection this is: 1 control, 2 urgent (faults), 3 bulk (push) of a session; 4 a daemon's
    /// control link (requests between daemons and their clients, no session).
    public let channel: UInt8
    /// Wire versions the sender supports.
    public let versions: ClosedRange<UInt8>
    /// Identifies the migration; a reconnect presents the same ID.
    public let sessionID: UInt64
    /// VM name: 1...256 bytes of `[A-Za-z0-9._-]`.
    public let vmName: String
    /// Pages in the migrated region (1...2^40).
    public let regionPages: UInt64
    /// Page size; must be 4096.
    public let pageSize: UInt32
    /// The sender's fresh nonce for mutual authentication.
    public let nonce: Bytes32

    /// A validated hello; throws `invalidField` for any value the protocol forbids.
    public init(
        role: PeerRole, channel: UInt8 = 1, versions: ClosedRange<UInt8> = WireVersion.supported,
        sessionID: UInt64, vmName: String,
        regionPages: UInt64, pageSize: UInt32 = UInt32(PageGeometry.size), nonce: Bytes32
    ) throws(ProtocolError) {
        let message = PeerMessage.Kind.hello.messageName
        guard versions.lowerBound >= 1 else {
            throw .invalidField(message: message, field: "versions", reason: "minimum version 0 does not exist")
        }
        guard !vmName.utf8.isEmpty else {
            throw .invalidField(message: message, field: "vmName", reason: "empty")
        }
        try checkLength(vmName, maxLength: PeerHello.maxVMNameLength, message: message, field: "vmName")
        guard vmName.utf8.allSatisfy(PeerHello.isNameByte) else {
            throw .invalidField(message: message, field: "vmName", reason: "only A-Z, a-z, 0-9, '.', '_', '-' allowed")
        }
        guard regionPages >= 1 && regionPages <= PeerHello.maxRegionPages else {
            throw .invalidField(message: message, field: "regionPages",
                                reason: "\(regionPages) pages, must be 1...\(PeerHello.maxRegionPages)")
        }
        guard UInt64(pageSize) == PageGeometry.size else {
            throw .invalidField(message: message, field: "pageSize", reason: "\(pageSize), only 4096 is supported")
        }
        guard (1...4).contains(channel) else {
            throw .invalidField(message: message, field: "channel", reason: "\(channel), must be 1...4")
        }
        self.role = role
        self.channel = channel
        self.versions = versions
        self.sessionID = sessionID
        self.vmName = vmName
        self.regionPages = regionPages
        self.pageSize = pageSize
        self.nonce = nonce
    }

    private static func isNameByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }

    func encode(into writer: inout ByteWriter) {
        writer.writeU8(role.rawValue)
        writer.writeU8(channel)
        writer.writeU8(versions.lowerBound)
        writer.writeU8(versions.upperBound)
        writer.writeU64(sessionID)
        writer.writeString(vmName, maxLength: PeerHello.maxVMNameLength)
        writer.writeU64(regionPages)
        writer.writeU32(pageSize)
        nonce.write(to: &writer)
    }

    static func decode(from reader: inout FieldReader) throws(ProtocolError) -> PeerHello {
        let roleCode = try reader.u8("role")
        guard let role = PeerRole(rawValue: roleCode) else {
            throw reader.invalid("role", "unknown role \(roleCode)")
        }
        let channel = try reader.u8("channel")
        let versions = try reader.versions("versions")
        let sessionID = try reader.u64("sessionID")
        let vmName = try reader.string("vmName", maxLength: maxVMNameLength)
        let regionPages = try reader.u64("regionPages")
        let pageSize = try reader.u32("pageSize")
        let nonce = try reader.bytes32("nonce")
        return try PeerHello(role: role, channel: channel, versions: versions, sessionID: sessionID, vmName: vmName,
                             regionPages: regionPages, pageSize: pageSize, nonce: nonce)
    }
}

/// The destination's acceptance after authentication: the negotiated version and the session.
public struct PeerWelcome: Equatable, Sendable {
    /// The negotiated wire version (never 0).
    public let version: UInt8
    /// The session being accepted.
    public let sessionID: UInt64

    /// A validated welcome; throws `invalidField` for version 0.
    public init(version: UInt8, sessionID: UInt64) throws(ProtocolError) {
        guard version >= 1 else {
            throw .invalidField(message: PeerMessage.Kind.welcome.messageName, field: "version",
                                reason: "version 0 does not exist")
        }
        self.version = version
        self.sessionID = sessionID
    }
}

/// Destination → source on the urgent channel: the guest faulted on these pages; send them first.
public struct PageRequest: Equatable, Sendable {
    /// Echoed in the answering `pageData`.
    public let requestID: UInt64
    /// The pages wanted; never empty.
    public let pages: PageSet<PageIndex>

    /// A validated request; throws `invalidField` if `pages` is empty.
    public init(requestID: UInt64, pages: PageSet<PageIndex>) throws(ProtocolError) {
        guard !pages.isEmpty else {
            throw .invalidField(message: PeerMessage.Kind.pageRequest.messageName, field: "pages",
                                reason: "no pages requested")
        }
        self.requestID = requestID
        self.pages = pages
    }
}

/// Where the page bytes of an encoded `pageData` payload start, for zero-copy placement.
public struct PageDataHeader: Equatable, Sendable {
    /// The request answered, or 0 for a background push.
    public let requestID: UInt64
    /// The pages whose contents follow, in ascending page order.
    public let runs: PageSet<PageIndex>
    /// Offset in the payload of the first page's first byte; `runs.count * 4096` bytes follow exactly.
    public let dataOffset: Int
}

/// Source → destination: contents of some pages, 4096 bytes each in ascending page order.
public struct PageData: Equatable, Sendable {
    /// The request answered, or 0 for a background push.
    public let requestID: UInt64
    /// The pages carried; never empty.
    public let runs: PageSet<PageIndex>
    /// Exactly `runs.count * 4096` bytes of page contents.
    public let bytes: [UInt8]

    /// Validated page data; throws `invalidField` if `runs` is empty or `bytes` is not exactly one page per page.
    public init(requestID: UInt64, runs: PageSet<PageIndex>, bytes: [UInt8]) throws(ProtocolError) {
        let message = PeerMessage.Kind.pageData.messageName
        guard !runs.isEmpty else {
            throw .invalidField(message: message, field: "runs", reason: "no pages")
        }
        let (expected, overflow) = runs.count.multipliedReportingOverflow(by: PageGeometry.size)
        guard !overflow, UInt64(bytes.count) == expected else {
            throw .invalidField(message: message, field: "data",
                                reason: "runs cover \(runs.count) pages but \(bytes.count) bytes were given")
        }
        self.requestID = requestID
        self.runs = runs
        self.bytes = bytes
    }

    /// The payload bytes before the page contents, for senders that write pages straight from guest memory:
    /// the frame payload is this followed by `runs.count * 4096` bytes of pages. `runs` must not be empty.
    public static func encodedPayloadHeader(requestID: UInt64, runs: PageSet<PageIndex>) -> [UInt8] {
        var writer = ByteWriter(capacity: 8 + Int(PageSetCodec.encodedSize(of: runs, form: .ranges)))
        writer.writeU64(requestID)
        PageSetCodec.encode(runs, form: .ranges, into: &writer)
        return writer.bytes
    }

    /// Validates a `pageData` payload without copying the page contents: the pages are at
    /// `payload[dataOffset...]`, `runs.count * 4096` bytes exactly.
    public static func decodeHeader(
        payload: UnsafeRawBufferPointer, context: PeerDecodeContext
    ) throws(ProtocolError) -> PageDataHeader {
        var reader = FieldReader(payload, message: PeerMessage.Kind.pageData.messageName)
        return try decodeHeader(from: &reader, context: context)
    }

    static func decodeHeader(
        from reader: inout FieldReader, context: PeerDecodeContext
    ) throws(ProtocolError) -> PageDataHeader {
        let requestID = try reader.u64("requestID")
        let maxPages = max(context.maxPageDataPages, 0)
        // A run holds at least one page, so the page limit also bounds the run count before anything is reserved.
        let runs = try reader.pageSet("runs", PageIndex.self, pageLimit: context.regionPages,
                                      maxRanges: min(maxPages, context.maxRangesPerSet), allowBitmap: false)
        guard !runs.isEmpty else {
            throw reader.invalid("runs", "no pages")
        }
        guard runs.count <= UInt64(maxPages) else {
            throw .inField(message: reader.message, field: "runs",
                           underlying: .tooManyItems(what: "pages", count: runs.count, limit: UInt64(maxPages)))
        }
        let (expected, overflow) = runs.count.multipliedReportingOverflow(by: PageGeometry.size)
        let present = UInt64(reader.reader.remaining)
        guard !overflow, present == expected else {
            throw reader.invalid("data",
                                 "runs cover \(runs.count) pages (\(expected) bytes) but \(present) bytes follow")
        }
        return PageDataHeader(requestID: requestID, runs: runs, dataOffset: reader.reader.offset)
    }
}

/// Destination → source: periodic migration progress, for status display and the source's scheduling.
public struct PeerProgress: Equatable, Sendable {
    /// Pages now present at the destination.
    public let pagesPresent: UInt64
    /// Pages in the region.
    public let pagesTotal: UInt64
    /// Page-data bytes received so far.
    public let bytesReceived: UInt64
    /// Guest faults served by demand paging so far.
    public let faults: UInt64

    /// Validated progress; throws `invalidField` if `pagesPresent > pagesTotal`.
    public init(pagesPresent: UInt64, pagesTotal: UInt64, bytesReceived: UInt64, faults: UInt64) throws(ProtocolError) {
        guard pagesPresent <= pagesTotal else {
            throw .invalidField(message: PeerMessage.Kind.progress.messageName, field: "pagesPresent",
                                reason: "\(pagesPresent) above pagesTotal \(pagesTotal)")
        }
        self.pagesPresent = pagesPresent
        self.pagesTotal = pagesTotal
        self.bytesReceived = bytesReceived
        self.faults = faults
    }
}

/// Source → destination: every page has been sent.
public struct PeerDone: Equatable, Sendable {
    /// Pages sent in total.
    public let pagesSent: UInt64
    /// Page-data bytes sent in total.
    public let bytesSent: UInt64

    /// The totals of a finished migration.
    public init(pagesSent: UInt64, bytesSent: UInt64) {
        self.pagesSent = pagesSent
        self.bytesSent = bytesSent
    }
}

/// Either direction: the sender is giving up on the migration.
public struct PeerAbort: Equatable, Sendable {
    /// Longest reason, in bytes.
    public static let maxReasonLength = 1024

    /// Machine-readable cause (meaning defined by the engine).
    public let code: UInt16
    /// Human-readable cause, at most 1024 bytes of UTF-8.
    public let reason: String

    /// An abort; a longer `reason` is cut to 1024 bytes at a Unicode scalar boundary rather than refused, since an
    /// abort must always be sendable.
    public init(code: UInt16, reason: String) {
        self.code = code
        self.reason = truncatedUTF8(reason, maxBytes: PeerAbort.maxReasonLength)
    }
}

/// Destination → source after a reconnect: continue the session; these pages are already present.
public struct PeerResume: Equatable, Sendable {
    /// The session being resumed.
    public let sessionID: UInt64
    /// Pages the destination already has and must not be sent again.
    public let present: PageSet<PageIndex>

    /// A resume for `sessionID`.
    public init(sessionID: UInt64, present: PageSet<PageIndex>) {
        self.sessionID = sessionID
        self.present = present
    }
}
