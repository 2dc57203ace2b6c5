// Field primitives: little-endian integers, varints (including every rejection that keeps one canonical encoding per
// value), bounds-checked reads and validated strings.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

/// Runs `body` with a reader over `bytes`.
private func reading<T>(_ bytes: [UInt8], _ body: (inout ByteReader) throws -> T) throws -> T {
    try bytes.withUnsafeBytes { raw in
        var reader = ByteReader(raw)
        return try body(&reader)
    }
}

@Suite(.tier(.unit)) struct BytesTests {
    @Test func integersAreLittleEndian() throws {
        var writer = ByteWriter()
        writer.writeU8(0xAB)
        writer.writeU16(0x0102)
        writer.writeU32(0x0304_0506)
        writer.writeU64(0x0708_090A_0B0C_0D0E)
        #expect(writer.bytes == [0xAB, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03,
                                 0x0E, 0x0D, 0x0C, 0x0B, 0x0A, 0x09, 0x08, 0x07])
        let values = try reading(writer.bytes) { reader in
            (try reader.readU8(), try reader.readU16(), try reader.readU32(), try reader.readU64(), reader.isAtEnd)
        }
        #expect(values == (0xAB, 0x0102, 0x0304_0506, 0x0708_090A_0B0C_0D0E, true))
    }

    @Test func readsPastTheEndThrowTruncated() {
        #expect(throws: ProtocolError.truncated(needed: 8, available: 3)) {
            try reading([1, 2, 3]) { try $0.readU64() }
        }
        #expect(throws: ProtocolError.truncated(needed: 4, available: 2)) {
            try reading([1, 2]) { try $0.readBytes(count: 4) }
        }
        #expect(throws: ProtocolError.truncated(needed: -1, available: 2)) {
            try reading([1, 2]) { try $0.skip(-1) }
        }
        #expect(throws: ProtocolError.trailingBytes(count: 1)) {
            try reading([1, 2]) { reader in
                _ = try reader.readU8()
                try reader.expectEnd()
            }
        }
    }

    @Test(arguments: [UInt64(0), 1, 127, 128, 255, 300, 16_383, 16_384, 1 << 32, 1 << 56, 1 << 63, .max - 1, .max])
    func varintEdgeValuesRoundTrip(value: UInt64) throws {
        let encoded = varint(value)
        #expect(encoded.count == ByteWriter.varintSize(value))
        #expect(encoded.count <= 10)
        let decoded = try reading(encoded) { reader in (try reader.readVarint(), reader.isAtEnd) }
        #expect(decoded == (value, true))
    }

    @Test func varintKnownEncodings() {
        #expect(varint(0) == [0x00])
        #expect(varint(127) == [0x7F])
        #expect(varint(128) == [0x80, 0x01])
        #expect(varint(300) == [0xAC, 0x02])
        #expect(varint(.max) == [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
    }

    @Test func varintRandomRoundTrip() throws {
        let seed: UInt64 = 0xB17E_0001
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<2000 {
            // Random bit widths so every encoded length is covered.
            let value = rng.next() >> UInt64.random(in: 0...63, using: &rng)
            let decoded = try reading(varint(value)) { try $0.readVarint() }
            #expect(decoded == value, "seed \(seed) iteration \(iteration)")
        }
    }

    @Test func varintRejectsOverlongAndOverflowingEncodings() {
        // 11 bytes: continuation bit on the tenth byte.
        #expect(throws: ProtocolError.overlongVarint) {
            try reading([UInt8](repeating: 0x80, count: 10) + [0x00]) { try $0.readVarint() }
        }
        // Tenth byte carrying more than bit 63.
        #expect(throws: ProtocolError.varintOverflow) {
            try reading([UInt8](repeating: 0xFF, count: 9) + [0x02]) { try $0.readVarint() }
        }
        #expect(throws: ProtocolError.varintOverflow) {
            try reading([UInt8](repeating: 0xFF, count: 9) + [0x7F]) { try $0.readVarint() }
        }
        // Redundant zero groups.
        #expect(throws: ProtocolError.overlongVarint) {
            try reading([0x80, 0x00]) { try $0.readVarint() }
        }
        #expect(throws: ProtocolError.overlongVarint) {
            try reading([0xFF, 0x80, 0x00]) { try $0.readVarint() }
        }
        #expect(throws: ProtocolError.truncated(needed: 3, available: 2)) {
            try reading([0x80, 0x80]) { try $0.readVarint() }
        }
        #expect(throws: ProtocolError.truncated(needed: 1, available: 0)) {
            try reading([]) { try $0.readVarint() }
        }
    }

    @Test func stringsRoundTripAndAreValidated() throws {
        let text = "päge-😀-Ω"
        var writer = ByteWriter()
        writer.writeString(text, maxLength: 64)
        #expect(writer.bytes.first == UInt8(text.utf8.count))
        let decoded = try reading(writer.bytes) { try $0.readString(maxLength: 64) }
        #expect(decoded == text)

        #expect(throws: ProtocolError.stringTooLong(length: UInt64(text.utf8.count), limit: 4)) {
            try reading(writer.bytes) { try $0.readString(maxLength: 4) }
        }
        // 0xC3 0x28: a lead byte followed by a non-continuation byte.
        #expect(throws: ProtocolError.invalidUTF8) {
            try reading([2, 0xC3, 0x28]) { try $0.readString(maxLength: 10) }
        }
        // Lone surrogate encoded as UTF-8 (ED A0 80) is not valid UTF-8 either.
        #expect(throws: ProtocolError.invalidUTF8) {
            try reading([3, 0xED, 0xA0, 0x80]) { try $0.readString(maxLength: 10) }
        }
        #expect(throws: ProtocolError.truncated(needed: 5, available: 2)) {
            try reading([5, 0x41, 0x42]) { try $0.readString(maxLength: 10) }
        }
        // A huge claimed length is refused by the limit, before any read.
        #expect(throws: ProtocolError.stringTooLong(length: .max, limit: 10)) {
            try reading(varint(.max)) { try $0.readString(maxLength: 10) }
        }
    }
}

@Suite(.tier(.unit)) struct AddressTests {
    @Test func conversions() {
        let offset = RAMOffset(rawValue: 0x5123)
        #expect(offset.pageIndex == PageIndex(rawValue: 5))
        #expect(!offset.isPageAligned)
        #expect(RAMOffset(rawValue: 0x5000).isPageAligned)
        #expect(PageIndex(rawValue: 5).ramOffset == RAMOffset(rawValue: 0x5000))
        let address = GuestPhysicalAddress(rawValue: 0x1_0000_0FFF)
        #expect(address.frame == GuestFrameNumber(rawValue: 0x10_0000))
        #expect(address.frame.address == GuestPhysicalAddress(rawValue: 0x1_0000_0000))
        #expect(HostVirtualAddress(rawValue: 0x7F00_0000_1000).isPageAligned)
        #expect(PageGeometry.size == 1 << PageGeometry.shift)
        #expect(GuestPhysicalAddress(rawValue: 1) < GuestPhysicalAddress(rawValue: 2))
        #expect(PageIndex(rawValue: 1) < PageIndex(rawValue: 2))
    }

    @Test func descriptionsAreHex() {
        #expect(GuestPhysicalAddress(rawValue: 0x1F000).description == "gpa 0x1f000")
        #expect(RAMOffset(rawValue: 0x2000).description == "ram 0x2000")
        #expect(HostVirtualAddress(rawValue: 0x7F00).description == "hva 0x7f00")
        #expect(PageIndex(rawValue: 31).description == "page 0x1f")
        #expect(GuestFrameNumber(rawValue: 31).description == "gfn 0x1f")
    }

    @Test func pageRangeValidation() throws {
        let range = try RAMPageRange(start: PageIndex(rawValue: 10), count: 5)
        #expect(range.lowerBound == PageIndex(rawValue: 10))
        #expect(range.upperBound == PageIndex(rawValue: 15))
        #expect(range.count == 5)
        #expect(range.contains(PageIndex(rawValue: 14)))
        #expect(!range.contains(PageIndex(rawValue: 15)))
        #expect(!range.contains(PageIndex(rawValue: 9)))
        #expect(range.description == "[0xa, 0xf)")
        let frames = try GuestFrameRange(lowerBound: GuestFrameNumber(rawValue: 3),
                                         upperBound: GuestFrameNumber(rawValue: 4))
        #expect(frames.count == 1)

        #expect(throws: ProtocolError.invalidRange("empty range at page 10")) {
            try RAMPageRange(start: PageIndex(rawValue: 10), count: 0)
        }
        let overflow = ProtocolError.invalidRange("range at page 18446744073709551615 with 1 pages overflows 64 bits")
        #expect(throws: overflow) {
            try RAMPageRange(start: PageIndex(rawValue: .max), count: 1)
        }
        #expect(throws: ProtocolError.invalidRange("range 4..<4 is empty")) {
            try RAMPageRange(lowerBound: PageIndex(rawValue: 4), upperBound: PageIndex(rawValue: 4))
        }
        // The largest representable run ends exactly at 2^64 - 1.
        #expect(try RAMPageRange(start: PageIndex(rawValue: 0), count: .max).upperBound.rawValue == .max)
    }

    @Test func versionNegotiation() throws {
        #expect(try WireVersion.negotiate(local: 1...3, remote: 2...5) == 3)
        #expect(try WireVersion.negotiate(local: WireVersion.supported, remote: 1...1) == WireVersion.current)
        #expect(throws: ProtocolError.noCommonVersion(local: 1...1, remote: 2...4)) {
            try WireVersion.negotiate(local: 1...1, remote: 2...4)
        }
        #expect(ProtocolError.noCommonVersion(local: 1...1, remote: 2...4).description
            == "no common wire version: local 1...1, remote 2...4")
    }
}
