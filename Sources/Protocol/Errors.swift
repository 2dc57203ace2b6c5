// The single error type of the wire-format module. Everything read off a link is untrusted, so every way an input
// can be malformed maps to a case here; callers log `description` and close the connection.

/// Why an encoded frame, payload or field was rejected.
///
/// Decoders never trap on malformed input; they throw one of these instead. Errors raised while reading a named
/// field of a message are wrapped in `inField(message:field:underlying:)` so the log line says where the problem
/// was; use `rootCause` to match on the underlying error.
public indirect enum ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Fewer bytes were available than the current read needs.
    case truncated(needed: Int, available: Int)
    /// The first four bytes of a frame header are not the link's magic number.
    case badMagic(found: UInt32)
    /// The frame's wire version is outside the versions this side accepts.
    case unsupportedVersion(found: UInt8, supported: ClosedRange<UInt8>)
    /// The frame header's flags field is non-zero; version 1 defines no flags.
    case nonZeroFlags(found: UInt16)
    /// The message type code is not defined for the link.
    case unknownMessageType(link: Link, type: UInt8)
    /// The frame header announces a payload longer than the receiver's limit.
    case frameTooLarge(length: UInt64, limit: UInt64)
    /// The frame's CRC32C field does not match the header and payload bytes.
    case checksumMismatch(expected: UInt32, computed: UInt32)
    /// A LEB128 varint encodes a value that does not fit in 64 bits.
    case varintOverflow
    /// A LEB128 varint is longer than 10 bytes or not minimally encoded.
    case overlongVarint
    /// A string field is not valid UTF-8.
    case invalidUTF8
    /// A string field is longer (in UTF-8 bytes) than the field allows.
    case stringTooLong(length: UInt64, limit: UInt64)
    /// A page range is empty, overflows 64 bits or is otherwise unusable.
    case invalidRange(String)
    /// Range `index` starts before range `index - 1`.
    case unsortedRanges(index: Int)
    /// Range `index` overlaps range `index - 1`.
    case overlappingRanges(index: Int)
    /// Range `index` starts exactly where range `index - 1` ends, so the two should have been one range.
    case unmergedRanges(index: Int)
    /// A page number is at or above the exclusive limit for its field.
    case pageOutOfRange(page: UInt64, limit: UInt64)
    /// The page-set form byte is unknown or the form is not allowed in this field.
    case unsupportedPageSetForm(UInt8)
    /// A page bitmap has bits set past its declared bit count.
    case bitmapPaddingNotZero
    /// Bytes were left over after a payload (or a whole frame) was fully decoded.
    case trailingBytes(count: Int)
    /// A message field has a value the protocol does not allow.
    case invalidField(message: String, field: String, reason: String)
    /// A lower-level error raised while reading a named field of a message.
    case inField(message: String, field: String, underlying: ProtocolError)
    /// Version negotiation found no version both sides support.
    case noCommonVersion(local: ClosedRange<UInt8>, remote: ClosedRange<UInt8>)
    /// A count (ranges, pages, ...) exceeds what the field or the remaining bytes allow.
    case tooManyItems(what: String, count: UInt64, limit: UInt64)
    /// A frame of one link was handed to the other link's message decoder.
    case linkMismatch(expected: Link, found: Link)

    /// The innermost error, with every `inField` wrapper removed.
    public var rootCause: ProtocolError {
        var error = self
        while case .inField(_, _, let underlying) = error {
            error = underlying
        }
        return error
    }

    public var description: String {
        switch self {
        case .truncated(let needed, let available):
            return "truncated: needed \(needed) bytes, \(available) available"
        case .badMagic(let found):
            return "bad magic \(hex(found, digits: 8))"
        case .unsupportedVersion(let found, let supported):
            return "unsupported wire version \(found) (supported \(supported.lowerBound)...\(supported.upperBound))"
        case .nonZeroFlags(let found):
            return "non-zero frame flags \(hex(found, digits: 4)) (must be 0 in version 1)"
        case .unknownMessageType(let link, let type):
            return "unknown \(link) message type \(type)"
        case .frameTooLarge(let length, let limit):
            return "frame too large: \(length) bytes (limit \(limit))"
        case .checksumMismatch(let expected, let computed):
            return "checksum mismatch: frame says \(hex(expected, digits: 8)), computed \(hex(computed, digits: 8))"
        case .varintOverflow:
            return "varint overflows 64 bits"
        case .overlongVarint:
            return "varint is longer than 10 bytes or not minimally encoded"
        case .invalidUTF8:
            return "string is not valid UTF-8"
        case .stringTooLong(let length, let limit):
            return "string too long: \(length) bytes (limit \(limit))"
        case .invalidRange(let reason):
            return "invalid range: \(reason)"
        case .unsortedRanges(let index):
            return "range \(index) starts before range \(index - 1) (unsorted)"
        case .overlappingRanges(let index):
            return "range \(index) overlaps range \(index - 1)"
        case .unmergedRanges(let index):
            return "range \(index) is adjacent to range \(index - 1) (not merged)"
        case .pageOutOfRange(let page, let limit):
            return "page \(page) out of range (limit \(limit))"
        case .unsupportedPageSetForm(let form):
            return "unsupported page-set form \(form)"
        case .bitmapPaddingNotZero:
            return "page bitmap has padding bits set past its bit count"
        case .trailingBytes(let count):
            return "\(count) trailing bytes after the end of the message"
        case .invalidField(let message, let field, let reason):
            return "\(message): field \(field): \(reason)"
        case .inField(let message, let field, let underlying):
            return "\(message): field \(field): \(underlying)"
        case .noCommonVersion(let local, let remote):
            return "no common wire version: local \(local.lowerBound)...\(local.upperBound), "
                + "remote \(remote.lowerBound)...\(remote.upperBound)"
        case .tooManyItems(let what, let count, let limit):
            return "too many \(what): \(count) (limit \(limit))"
        case .linkMismatch(let expected, let found):
            return "\(found) link frame given to the \(expected) link decoder"
        }
    }
}

/// Formats `value` as `0x` followed by at least `digits` lowercase hex digits.
func hex<T: BinaryInteger>(_ value: T, digits: Int = 1) -> String {
    let text = String(value, radix: 16)
    let padding = text.count < digits ? String(repeating: "0", count: digits - text.count) : ""
    return "0x" + padding + text
}
