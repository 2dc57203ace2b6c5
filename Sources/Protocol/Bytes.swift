// Primitive encoders and bounds-checked decoders for payload fields. Every message codec is written in terms of
// these, so this is the one place where untrusted bytes are turned into integers and strings.

/// Appends little-endian integers, LEB128 varints, raw bytes and length-prefixed strings to a byte array.
public struct ByteWriter: Sendable {
    @usableFromInline var storage: [UInt8]

    /// Everything written so far.
    public var bytes: [UInt8] { storage }

    /// An empty writer, optionally reserving room for `capacity` bytes.
    public init(capacity: Int = 0) {
        storage = []
        storage.reserveCapacity(capacity)
    }

    /// Number of bytes written so far.
    public var count: Int { storage.count }

    /// Appends `value` as `T.bitWidth / 8` little-endian bytes.
    @inlinable
    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { storage.append(contentsOf: $0) }
    }

    /// Appends one byte.
    @inlinable public mutating func writeU8(_ value: UInt8) { storage.append(value) }
    /// Appends a little-endian UInt16.
    @inlinable public mutating func writeU16(_ value: UInt16) { write(value) }
    /// Appends a little-endian UInt32.
    @inlinable public mutating func writeU32(_ value: UInt32) { write(value) }
    /// Appends a little-endian UInt64.
    @inlinable public mutating func writeU64(_ value: UInt64) { write(value) }

    /// Appends `value` as an unsigned LEB128 varint (7 bits per byte, least significant group first), minimal length.
    @inlinable
    public mutating func writeVarint(_ value: UInt64) {
        var rest = value
        while rest >= 0x80 {
            storage.append(UInt8(truncatingIfNeeded: rest) | 0x80)
            rest >>= 7
        }
        storage.append(UInt8(rest))
    }

    /// Number of bytes `writeVarint(value)` appends (1...10).
    @inlinable
    public static func varintSize(_ value: UInt64) -> Int {
        value == 0 ? 1 : (64 - value.leadingZeroBitCount + 6) / 7
    }

    /// Appends `source` unchanged.
    public mutating func writeBytes(_ source: some Sequence<UInt8>) {
        storage.append(contentsOf: source)
    }

    /// Appends `source` unchanged.
    public mutating func writeBytes(_ source: UnsafeRawBufferPointer) {
        storage.append(contentsOf: source)
    }

    /// Appends `string` as a varint byte length followed by its UTF-8 bytes. The message types validate lengths when
    /// they are constructed, so a string longer than `maxLength` here is a programming error and traps.
    public mutating func writeString(_ string: String, maxLength: Int) {
        let utf8 = string.utf8
        precondition(utf8.count <= maxLength, "string of \(utf8.count) bytes exceeds its field limit \(maxLength)")
        writeVarint(UInt64(utf8.count))
        storage.append(contentsOf: utf8)
    }
}

/// Reads fields from a borrowed byte buffer, checking every access against the end.
///
/// The reader only borrows memory: it must not outlive the buffer it was created on (typically the closure of a
/// `withUnsafeBytes` call). For that reason it is the one public type here that is deliberately not `Sendable`.
public struct ByteReader {
    /// The whole buffer being read.
    public let buffer: UnsafeRawBufferPointer
    /// Offset of the next byte to read.
    @usableFromInline var position: Int = 0

    /// Offset of the next byte to read.
    @inlinable public var offset: Int { position }

    /// A reader positioned at the start of `buffer`.
    public init(_ buffer: UnsafeRawBufferPointer) {
        self.buffer = buffer
    }

    /// Bytes not yet read.
    @inlinable public var remaining: Int { buffer.count - position }

    /// Whether every byte has been read.
    @inlinable public var isAtEnd: Bool { position == buffer.count }

    /// Throws `truncated` unless `count` more bytes are available.
    @inlinable
    public func require(_ count: Int) throws(ProtocolError) {
        guard count >= 0, count <= remaining else {
            throw .truncated(needed: count, available: remaining)
        }
    }

    /// Reads a `T.bitWidth / 8`-byte little-endian integer.
    @inlinable
    public mutating func read<T: FixedWidthInteger>(_ type: T.Type = T.self) throws(ProtocolError) -> T {
        let size = MemoryLayout<T>.size
        try require(size)
        let value = buffer.loadUnaligned(fromByteOffset: position, as: T.self)
        position += size
        return T(littleEndian: value)
    }

    /// Reads one byte.
    @inlinable public mutating func readU8() throws(ProtocolError) -> UInt8 { try read() }
    /// Reads a little-endian UInt16.
    @inlinable public mutating func readU16() throws(ProtocolError) -> UInt16 { try read() }
    /// Reads a little-endian UInt32.
    @inlinable public mutating func readU32() throws(ProtocolError) -> UInt32 { try read() }
    /// Reads a little-endian UInt64.
    @inlinable public mutating func readU64() throws(ProtocolError) -> UInt64 { try read() }

    /// Reads an unsigned LEB128 varint. Rejects encodings longer than 10 bytes or with a redundant trailing zero
    /// group (`overlongVarint`), and values above `UInt64.max` (`varintOverflow`), so each value has one encoding.
    @inlinable
    public mutating func readVarint() throws(ProtocolError) -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var length = 0
        while true {
            guard position + length < buffer.count else {
                throw .truncated(needed: length + 1, available: length)
            }
            let byte = buffer[position + length]
            length += 1
            if length == 10 {
                // The tenth group holds only bit 63; a continuation bit means more than 10 bytes.
                if byte & 0x80 != 0 {
                    throw .overlongVarint
                }
                if byte > 1 {
                    throw .varintOverflow
                }
            }
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 {
                if byte == 0 && length > 1 {
                    throw .overlongVarint
                }
                position += length
                return value
            }
            shift += 7
        }
    }

    /// Reads `count` bytes and returns a view of them inside the buffer (no copy).
    @inlinable
    public mutating func readBytes(count: Int) throws(ProtocolError) -> UnsafeRawBufferPointer {
        try require(count)
        let view = UnsafeRawBufferPointer(rebasing: buffer[position..<position + count])
        position += count
        return view
    }

    /// Reads `count` bytes into a new array.
    public mutating func readByteArray(count: Int) throws(ProtocolError) -> [UInt8] {
        [UInt8](try readBytes(count: count))
    }

    /// Skips `count` bytes.
    public mutating func skip(_ count: Int) throws(ProtocolError) {
        try require(count)
        position += count
    }

    /// Reads a varint byte length and that many bytes of UTF-8. The length is checked against `maxLength` before
    /// anything else, and the bytes must be valid UTF-8.
    public mutating func readString(maxLength: Int) throws(ProtocolError) -> String {
        let length = try readVarint()
        guard length <= UInt64(max(maxLength, 0)) else {
            throw .stringTooLong(length: length, limit: UInt64(max(maxLength, 0)))
        }
        let raw = try readBytes(count: Int(length))
        guard let string = String(validating: raw, as: UTF8.self) else {
            throw .invalidUTF8
        }
        return string
    }

    /// Throws `trailingBytes` unless every byte has been read.
    public func expectEnd() throws(ProtocolError) {
        guard isAtEnd else {
            throw .trailingBytes(count: remaining)
        }
    }
}

@available(*, unavailable, message: "ByteReader borrows memory that is only valid inside withUnsafeBytes")
extension ByteReader: Sendable {}

/// Runs `body` over the bytes of `array`, keeping `body`'s typed error (the standard library's `withUnsafeBytes` is
/// untyped `rethrows`).
@inlinable
func withBytes<R>(
    _ array: [UInt8], _ body: (UnsafeRawBufferPointer) throws(ProtocolError) -> R
) throws(ProtocolError) -> R {
    let result: Result<R, ProtocolError> = array.withUnsafeBytes { bytes in
        Result { () throws(ProtocolError) -> R in try body(bytes) }
    }
    return try result.get()
}
