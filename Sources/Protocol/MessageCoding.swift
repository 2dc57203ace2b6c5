// Pieces shared by the peer and agent message codecs: a field-by-field payload reader that labels every error with
// the message and field it came from, the fixed 32-byte value type used for nonces and MACs, and the text-field
// truncation used by free-text messages.

/// A 32-byte value (nonce, HMAC-SHA256 tag) with value semantics.
public struct Bytes32: Hashable, Sendable, CustomStringConvertible {
    /// Size in bytes.
    public static let count = 32
    /// All zero bytes.
    public static let zero = Bytes32(words: (0, 0, 0, 0))

    // Stored as four words so the value is inline, Hashable and cheap to copy.
    private let w0: UInt64
    private let w1: UInt64
    private let w2: UInt64
    private let w3: UInt64

    private init(words: (UInt64, UInt64, UInt64, UInt64)) {
        (w0, w1, w2, w3) = words
    }

    /// The value of `bytes`, or nil unless there are exactly 32 of them.
    /// 32 bytes from the system's secure generator (nonces).
    public static func random() -> Bytes32 {
        var rng = SystemRandomNumberGenerator()
        return Bytes32(words: (rng.next(), rng.next(), rng.next(), rng.next()))
    }

    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == Bytes32.count else {
            return nil
        }
        var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &words) { raw in
            for (index, byte) in bytes.enumerated() {
                raw[index] = byte
            }
        }
        self.init(words: words)
    }

    /// Reads 32 bytes from `reader`.
    init(from reader: inout ByteReader) throws(ProtocolError) {
        let raw = try reader.readBytes(count: Bytes32.count)
        var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &words) { $0.copyMemory(from: raw) }
        self.init(words: words)
    }

    /// The 32 bytes, in order.
    public var bytes: [UInt8] {
        withUnsafeBytes(of: (w0, w1, w2, w3)) { [UInt8]($0) }
    }

    /// Equality that takes the same time whatever the contents, for comparing MACs without leaking where they
    /// differ.
    public func constantTimeEquals(_ other: Bytes32) -> Bool {
        ((w0 ^ other.w0) | (w1 ^ other.w1) | (w2 ^ other.w2) | (w3 ^ other.w3)) == 0
    }

    /// Appends the 32 bytes to `writer`.
    func write(to writer: inout ByteWriter) {
        withUnsafeBytes(of: (w0, w1, w2, w3)) { writer.writeBytes($0) }
    }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}

/// Reads a message payload field by field. Errors from the byte-level readers are wrapped in
/// `ProtocolError.inField` naming the message and field; validation errors are already specific and pass through.
struct FieldReader {
    var reader: ByteReader
    /// E.g. "peer message hello"; the prefix of every error.
    let message: String

    init(_ payload: UnsafeRawBufferPointer, message: String) {
        reader = ByteReader(payload)
        self.message = message
    }

    /// Runs `body` on the underlying reader, labelling any error with `field`.
    mutating func read<T>(
        _ field: String, _ body: (inout ByteReader) throws(ProtocolError) -> T
    ) throws(ProtocolError) -> T {
        do throws(ProtocolError) {
            return try body(&reader)
        } catch {
            switch error {
            case .invalidField, .inField:
                throw error
            default:
                throw .inField(message: message, field: field, underlying: error)
            }
        }
    }

    mutating func u8(_ field: String) throws(ProtocolError) -> UInt8 {
        try read(field) { (reader) throws(ProtocolError) in try reader.readU8() }
    }

    mutating func u16(_ field: String) throws(ProtocolError) -> UInt16 {
        try read(field) { (reader) throws(ProtocolError) in try reader.readU16() }
    }

    mutating func u32(_ field: String) throws(ProtocolError) -> UInt32 {
        try read(field) { (reader) throws(ProtocolError) in try reader.readU32() }
    }

    mutating func u64(_ field: String) throws(ProtocolError) -> UInt64 {
        try read(field) { (reader) throws(ProtocolError) in try reader.readU64() }
    }

    mutating func bytes32(_ field: String) throws(ProtocolError) -> Bytes32 {
        try read(field) { (reader) throws(ProtocolError) in try Bytes32(from: &reader) }
    }

    mutating func string(_ field: String, maxLength: Int) throws(ProtocolError) -> String {
        try read(field) { (reader) throws(ProtocolError) in try reader.readString(maxLength: maxLength) }
    }

    /// Reads a `min` byte and a `max` byte and checks `1 <= min <= max` before forming the range (which would trap
    /// otherwise).
    mutating func versions(_ field: String) throws(ProtocolError) -> ClosedRange<UInt8> {
        let low = try u8(field)
        let high = try u8(field)
        guard low >= 1 else {
            throw invalid(field, "minimum version 0 does not exist")
        }
        guard low <= high else {
            throw invalid(field, "minimum version \(low) above maximum \(high)")
        }
        return low...high
    }

    mutating func pageSet<Unit: PageNumber>(
        _ field: String, _ unit: Unit.Type, pageLimit: UInt64, maxRanges: Int = .max, allowBitmap: Bool = true
    ) throws(ProtocolError) -> PageSet<Unit> {
        try read(field) { (reader) throws(ProtocolError) in
            try PageSetCodec.decode(Unit.self, from: &reader, pageLimit: pageLimit, maxRanges: maxRanges,
                                    allowBitmap: allowBitmap)
        }
    }

    /// The error for a field whose value is not allowed.
    func invalid(_ field: String, _ reason: String) -> ProtocolError {
        .invalidField(message: message, field: field, reason: reason)
    }

    /// Throws `trailingBytes` unless the payload was consumed exactly.
    func finish() throws(ProtocolError) {
        try reader.expectEnd()
    }
}

/// Shortens `text` to at most `maxBytes` of UTF-8, cutting only between Unicode scalars.
func truncatedUTF8(_ text: String, maxBytes: Int) -> String {
    guard text.utf8.count > maxBytes else {
        return text
    }
    var kept = String.UnicodeScalarView()
    var used = 0
    for scalar in text.unicodeScalars {
        let width = UTF8.width(scalar)
        guard used + width <= maxBytes else {
            break
        }
        kept.append(scalar)
        used += width
    }
    return String(kept)
}

/// Throws, for a string field longer than `maxLength` UTF-8 bytes, the same error the decoder would raise.
func checkLength(
    _ text: String, maxLength: Int, message: String, field: String
) throws(ProtocolError) {
    let length = text.utf8.count
    guard length <= maxLength else {
        throw .inField(message: message, field: field,
                       underlying: .stringTooLong(length: UInt64(length), limit: UInt64(maxLength)))
    }
}
