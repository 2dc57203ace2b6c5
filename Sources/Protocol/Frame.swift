// Framing shared by the agent link (virtio-serial) and the peer link (TCP). Both are byte streams, so each message
// travels in a frame with a fixed 16-byte header carrying magic, version, type, length and a CRC32C. The streaming
// decoder validates a header before it waits for the payload, so a hostile length never causes an allocation.
//
// Header layout, all little-endian:
//   0  u32 magic    4  u8 version    5  u8 type    6  u16 flags (0)    8  u32 length    12  u32 crc
// The CRC covers header bytes 0..<12 followed by the payload.

/// Which link a frame travels on; selects the magic number and the default size limit.
public enum Link: Sendable, Hashable, CustomStringConvertible {
    /// In-guest agent ↔ host engine, over virtio-serial.
    case agent
    /// Source engine ↔ destination engine, over TCP.
    case peer

    /// The header magic: "EPCA" / "EPCE" as bytes in memory.
    public var magic: UInt32 {
        switch self {
        case .agent: return 0x4143_5045
        case .peer: return 0x4543_5045
        }
    }

    /// Default payload limit: 8 MiB for the agent; 8 MiB + 4 KiB for peers, room for 2048 pages of data plus the
    /// run list in front of them.
    public var maxPayload: UInt32 {
        switch self {
        case .agent: return 8 << 20
        case .peer: return (8 << 20) + 4096
        }
    }

    public var description: String {
        switch self {
        case .agent: return "agent"
        case .peer: return "peer"
        }
    }
}

/// Receiver-side limits on frames.
public struct FrameLimits: Sendable, Hashable {
    /// Largest payload accepted, in bytes. Longer frames are rejected from their header alone.
    public var maxPayload: UInt32

    /// Limits with the given maximum payload.
    public init(maxPayload: UInt32) {
        self.maxPayload = maxPayload
    }

    /// The default limits for `link`.
    public static func defaults(for link: Link) -> FrameLimits {
        FrameLimits(maxPayload: link.maxPayload)
    }
}

/// The fields of a validated frame header.
public struct FrameHeader: Sendable, Hashable {
    /// Size of the encoded header in bytes.
    public static let size = 16

    /// Link the frame arrived on.
    public var link: Link
    /// Wire version from the header.
    public var version: UInt8
    /// Message type code (meaning depends on the link).
    public var type: UInt8
    /// Payload length in bytes.
    public var length: Int
    /// CRC32C from the header.
    public var checksum: UInt32

    /// Parses and validates the first 16 bytes of `bytes`; everything except the CRC, which needs the payload.
    /// Public for receivers that read the header and the payload separately (the engine's bulk channel
    /// reads page data straight into a staging area sized from the header).
    public static func parse(
        _ bytes: UnsafeRawBufferPointer, link: Link, limits: FrameLimits? = nil,
        supportedVersions: ClosedRange<UInt8> = WireVersion.supported
    ) throws(ProtocolError) -> FrameHeader {
        let limits = limits ?? .defaults(for: link)
        var reader = ByteReader(bytes)
        let magic = try reader.readU32()
        guard magic == link.magic else {
            throw .badMagic(found: magic)
        }
        let version = try reader.readU8()
        guard supportedVersions.contains(version) else {
            throw .unsupportedVersion(found: version, supported: supportedVersions)
        }
        let type = try reader.readU8()
        let flags = try reader.readU16()
        guard flags == 0 else {
            throw .nonZeroFlags(found: flags)
        }
        let length = try reader.readU32()
        guard length <= limits.maxPayload else {
            throw .frameTooLarge(length: UInt64(length), limit: UInt64(limits.maxPayload))
        }
        let checksum = try reader.readU32()
        return FrameHeader(link: link, version: version, type: type, length: Int(length), checksum: checksum)
    }

    /// Throws `checksumMismatch` unless the CRC over `header[0..<12]` and `payload` equals the header's.
    public func verify(
        header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, checksum function: ChecksumFunction
    ) throws(ProtocolError) {
        let seed = function(UnsafeRawBufferPointer(rebasing: header[0..<12]), 0)
        let computed = function(payload, seed)
        guard computed == checksum else {
            throw .checksumMismatch(expected: checksum, computed: computed)
        }
    }
}

/// One decoded frame: the link-level envelope of a message.
public struct Frame: Sendable, Hashable {
    /// Link the frame belongs to.
    public var link: Link
    /// Wire version.
    public var version: UInt8
    /// Message type code.
    public var type: UInt8
    /// The payload bytes.
    public var payload: [UInt8]

    /// A frame with the given fields.
    public init(link: Link, version: UInt8 = WireVersion.current, type: UInt8, payload: [UInt8]) {
        self.link = link
        self.version = version
        self.type = type
        self.payload = payload
    }

    /// Header and payload ready to send.
    public func encoded(checksum: ChecksumFunction = CRC32C.software) -> [UInt8] {
        encodeFrame(link: link, version: version, type: type, payload: payload, checksum: checksum)
    }
}

/// Header plus payload ready to send. Traps if the payload exceeds 4 GiB, which no message can reach.
public func encodeFrame(
    link: Link, version: UInt8 = WireVersion.current, type: UInt8, payload: [UInt8],
    checksum: ChecksumFunction = CRC32C.software
) -> [UInt8] {
    var bytes = payload.withUnsafeBytes { payloadBytes in
        encodeFrameHeader(link: link, version: version, type: type, payloadLength: payloadBytes.count,
                          checksum: checksum) { seed in checksum(payloadBytes, seed) }
    }
    bytes.reserveCapacity(FrameHeader.size + payload.count)
    bytes.append(contentsOf: payload)
    return bytes
}

/// The 16-byte header for a payload that the caller sends from several buffers (e.g. page data straight out of
/// guest memory) instead of one array. `chainPayload` receives the CRC of header bytes 0..<12 and must return it
/// chained over every payload byte in order, e.g. `{ checksum(pages, checksum(runHeader, $0)) }`.
public func encodeFrameHeader(
    link: Link, version: UInt8 = WireVersion.current, type: UInt8, payloadLength: Int,
    checksum: ChecksumFunction = CRC32C.software, chainPayload: (UInt32) -> UInt32
) -> [UInt8] {
    precondition(payloadLength >= 0 && payloadLength <= Int(UInt32.max), "payload does not fit a frame")
    var writer = ByteWriter(capacity: FrameHeader.size)
    writer.writeU32(link.magic)
    writer.writeU8(version)
    writer.writeU8(type)
    writer.writeU16(0)
    writer.writeU32(UInt32(payloadLength))
    var header = writer.bytes
    let crc = chainPayload(header.withUnsafeBytes { checksum($0, 0) })
    withUnsafeBytes(of: crc.littleEndian) { header.append(contentsOf: $0) }
    return header
}

/// Decodes `bytes`, which must hold exactly one complete frame: `truncated` if short, `trailingBytes` if long.
public func decodeFrame(
    bytes: UnsafeRawBufferPointer, link: Link, limits: FrameLimits? = nil,
    supportedVersions: ClosedRange<UInt8> = WireVersion.supported, checksum: ChecksumFunction = CRC32C.software
) throws(ProtocolError) -> Frame {
    guard bytes.count >= FrameHeader.size else {
        throw .truncated(needed: FrameHeader.size, available: bytes.count)
    }
    let header = try FrameHeader.parse(bytes, link: link, limits: limits ?? .defaults(for: link),
                                       supportedVersions: supportedVersions)
    let total = FrameHeader.size + header.length
    guard bytes.count >= total else {
        throw .truncated(needed: total, available: bytes.count)
    }
    guard bytes.count == total else {
        throw .trailingBytes(count: bytes.count - total)
    }
    let payload = UnsafeRawBufferPointer(rebasing: bytes[FrameHeader.size..<total])
    try header.verify(header: bytes, payload: payload, checksum: checksum)
    return Frame(link: link, version: header.version, type: header.type, payload: [UInt8](payload))
}

/// Decodes `bytes`, which must hold exactly one complete frame.
public func decodeFrame(
    bytes: [UInt8], link: Link, limits: FrameLimits? = nil,
    supportedVersions: ClosedRange<UInt8> = WireVersion.supported, checksum: ChecksumFunction = CRC32C.software
) throws(ProtocolError) -> Frame {
    try withBytes(bytes) { (raw) throws(ProtocolError) in
        try decodeFrame(bytes: raw, link: link, limits: limits, supportedVersions: supportedVersions,
                        checksum: checksum)
    }
}

/// Splits a byte stream into frames.
///
/// Feed received bytes with `append`, then call `next()` until it returns nil. A header is validated as soon as its
/// 16 bytes are buffered, before any payload is awaited, so an oversized length costs nothing. After the first error
/// the decoder is poisoned: a byte stream cannot resynchronise, so every later `next()` throws the same error and
/// appended bytes are dropped; the caller should close the connection.
///
/// Memory: if the caller drains with `next()` after each `append`, the buffer never holds more than one header, one
/// maximum payload and the last appended chunk.
public struct FrameDecoder: Sendable {
    /// The link whose magic and message space the decoder expects.
    public let link: Link
    /// Limits applied to every header.
    public let limits: FrameLimits
    /// Versions accepted in headers.
    public let supportedVersions: ClosedRange<UInt8>
    private let checksum: ChecksumFunction
    private var buffer: [UInt8] = []
    /// Start of the first unconsumed byte in `buffer`.
    private var readIndex = 0
    /// The validated header of the frame whose payload is still arriving.
    private var pending: FrameHeader?
    private var failure: ProtocolError?

    /// A decoder for `link`, using the link's default limits unless `limits` is given.
    public init(
        link: Link, limits: FrameLimits? = nil, supportedVersions: ClosedRange<UInt8> = WireVersion.supported,
        checksum: @escaping ChecksumFunction = CRC32C.software
    ) {
        self.link = link
        self.limits = limits ?? .defaults(for: link)
        self.supportedVersions = supportedVersions
        self.checksum = checksum
    }

    /// Bytes received but not yet returned as frames.
    public var bufferedByteCount: Int { buffer.count - readIndex }

    /// Removes and returns the bytes not yet decoded, so another reader can continue the stream (the
    /// engine hands a channel from its blocking handshake to an io_uring loop this way).
    public mutating func takeBuffered() -> [UInt8] {
        let rest = Array(buffer[readIndex...])
        buffer.removeAll(keepingCapacity: false)
        readIndex = 0
        pending = nil
        return rest
    }

    /// Bytes held in the internal buffer, including consumed bytes not yet compacted away.
    public var storedByteCount: Int { buffer.count }

    /// The error that poisoned the decoder, if any.
    public var error: ProtocolError? { failure }

    /// Adds received bytes. Ignored once the decoder is poisoned.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard failure == nil else { return }
        compactIfMostlyConsumed()
        buffer.append(contentsOf: bytes)
    }

    /// Adds received bytes. Ignored once the decoder is poisoned.
    public mutating func append<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        guard failure == nil else { return }
        compactIfMostlyConsumed()
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, or nil if more bytes are needed.
    public mutating func next() throws(ProtocolError) -> Frame? {
        guard let (header, payload) = try nextFrameBounds() else {
            return nil
        }
        let frame = Frame(link: link, version: header.version, type: header.type, payload: Array(buffer[payload]))
        releaseConsumed()
        return frame
    }

    /// Calls `body` with the next complete frame's header and a view of its payload inside the decoder's buffer, so
    /// large payloads can be used without copying; returns nil (without calling `body`) if more bytes are needed.
    /// The view is only valid inside `body`. The frame counts as consumed even if `body` throws, and an error from
    /// `body` does not poison the decoder.
    public mutating func withNextFrame<R>(
        _ body: (FrameHeader, UnsafeRawBufferPointer) throws -> R
    ) throws -> R? {
        guard let (header, payload) = try nextFrameBounds() else {
            return nil
        }
        defer { releaseConsumed() }
        return try buffer.withUnsafeBytes { bytes in
            try body(header, UnsafeRawBufferPointer(rebasing: bytes[payload]))
        }
    }

    /// Validates and consumes the next frame, returning its header and payload position; poisons on error.
    private mutating func nextFrameBounds() throws(ProtocolError) -> (FrameHeader, Range<Int>)? {
        if let failure {
            throw failure
        }
        do throws(ProtocolError) {
            guard let bounds = try locateFrame() else {
                // Waiting for more bytes: move the partial frame to the front now, while it is smallest.
                compact()
                return nil
            }
            return bounds
        } catch {
            failure = error
            buffer = []
            readIndex = 0
            throw error
        }
    }

    private mutating func locateFrame() throws(ProtocolError) -> (FrameHeader, Range<Int>)? {
        let start = readIndex
        let header: FrameHeader
        if let pending {
            header = pending
        } else {
            guard buffer.count - start >= FrameHeader.size else {
                return nil
            }
            let (link, limits, versions) = (self.link, self.limits, self.supportedVersions)
            header = try withBytes(buffer) { (bytes) throws(ProtocolError) in
                try FrameHeader.parse(UnsafeRawBufferPointer(rebasing: bytes[start..<start + FrameHeader.size]),
                                      link: link, limits: limits, supportedVersions: versions)
            }
            pending = header
        }
        let end = start + FrameHeader.size + header.length
        guard buffer.count >= end else {
            return nil
        }
        let payload = start + FrameHeader.size..<end
        let checksum = self.checksum
        try withBytes(buffer) { (bytes) throws(ProtocolError) in
            try header.verify(header: UnsafeRawBufferPointer(rebasing: bytes[start..<start + FrameHeader.size]),
                              payload: UnsafeRawBufferPointer(rebasing: bytes[payload]), checksum: checksum)
        }
        pending = nil
        readIndex = end
        return (header, payload)
    }

    /// Drops consumed bytes cheaply when nothing else is buffered.
    private mutating func releaseConsumed() {
        if readIndex == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            readIndex = 0
        }
    }

    /// Compaction for callers that append without draining: the move costs no more than the bytes consumed.
    private mutating func compactIfMostlyConsumed() {
        if readIndex > 0 && readIndex >= buffer.count - readIndex {
            compact()
        }
    }

    private mutating func compact() {
        guard readIndex > 0 else { return }
        buffer.removeSubrange(0..<readIndex)
        readIndex = 0
    }
}
