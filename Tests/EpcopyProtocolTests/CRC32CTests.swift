// CRC-32C must match the published check value and a bit-at-a-time reference on every length and alignment, since
// the host engine's hardware implementation must produce the same values.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

/// Bit-at-a-time CRC-32C: slow and obviously correct.
private func referenceCRC32C(_ bytes: ArraySlice<UInt8>, seed: UInt32 = 0) -> UInt32 {
    var crc = ~seed
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 {
            crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1
        }
    }
    return ~crc
}

@Suite(.tier(.unit)) struct CRC32CTests {
    @Test func checkValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        #expect(CRC32C.checksum([UInt8](), seed: 0x1234) == 0x1234)
        // RFC 3720 (iSCSI) B.4 vector: 32 bytes of zeros.
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    }

    @Test func chainingEqualsWholeBuffer() {
        let seed: UInt64 = 0xC4C_0001
        var rng = SplitMix64(seed: seed)
        for iteration in 0..<300 {
            let bytes = patternBytes(count: Int.random(in: 0..<600, using: &rng), seed: rng.next())
            let split = Int.random(in: 0...bytes.count, using: &rng)
            let first = CRC32C.checksum(Array(bytes[..<split]))
            let chained = CRC32C.checksum(Array(bytes[split...]), seed: first)
            #expect(chained == CRC32C.checksum(bytes), "seed \(seed) iteration \(iteration) split \(split)")
        }
    }

    @Test func slicingBy8MatchesBitwiseReference() {
        let seed: UInt64 = 0xC4C_0002
        var rng = SplitMix64(seed: seed)
        let buffer = patternBytes(count: 4200, seed: seed)
        buffer.withUnsafeBytes { raw in
            for iteration in 0..<600 {
                // Random start offsets exercise every alignment of the 8-byte loads.
                let start = Int.random(in: 0..<16, using: &rng)
                let length = Int.random(in: 0..<(iteration < 500 ? 80 : 4000), using: &rng)
                let chainSeed = iteration % 3 == 0 ? UInt32.random(in: .min ... .max, using: &rng) : 0
                let fast = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[start..<start + length]),
                                           seed: chainSeed)
                let slow = referenceCRC32C(buffer[start..<start + length], seed: chainSeed)
                #expect(fast == slow, "seed \(seed) iteration \(iteration) start \(start) length \(length)")
            }
        }
    }

    @Test func softwareFunctionValueMatchesStaticFunction() {
        let bytes = patternBytes(count: 1000, seed: 3)
        let viaFunction = bytes.withUnsafeBytes { CRC32C.software($0, 77) }
        #expect(viaFunction == CRC32C.checksum(bytes, seed: 77))
    }
}
