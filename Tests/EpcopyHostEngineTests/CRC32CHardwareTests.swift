// The hardware CRC-32C (three interleaved crc32 chains merged with shift tables) must agree bit for bit with the
// pure-Swift reference and with the old single-chain version, for every length, alignment and chaining split.
// Lengths cluster around the block boundaries of the C code (3 × 8192 and 3 × 256 bytes). Seeded, so failures
// reproduce.

import CEpcopyLinux
import EpcopyProtocol
import EpcopyTestSupport
import Testing


private enum CRCBlocks {
    static let long = 8192
    static let short = 256
}

/// `count` random bytes preceded by up to 15 bytes of slack, so a slice can start at any alignment.
private func randomBytes(_ count: Int, using rng: inout SplitMix64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count + 16)
    bytes.withUnsafeMutableBytes { raw in
        var i = 0
        while i < raw.count {
            var word = rng.next()
            for _ in 0..<8 where i < raw.count {
                raw[i] = UInt8(truncatingIfNeeded: word)
                word >>= 8
                i += 1
            }
        }
    }
    return bytes
}

/// The lengths to check: all small ones, both sides of every block boundary, and random ones up to 100 000.
private func testLengths(using rng: inout SplitMix64) -> [Int] {
    var lengths = Array(0...64)
    let boundaries = [
        CRCBlocks.short * 3, CRCBlocks.short * 6, CRCBlocks.long * 3, CRCBlocks.long * 6,
        CRCBlocks.long * 3 + CRCBlocks.short * 3, 4096, 65536,
    ]
    for boundary in boundaries {
        for delta in -9...9 { lengths.append(boundary + delta) }
    }
    for _ in 0..<60 { lengths.append(Int.random(in: 0...100_000, using: &rng)) }
    lengths.append(100_000)
    return lengths
}

@Suite(.tier(.unit), .enabled(if: epc_cpu_has_sse42() != 0, "needs SSE4.2"))
struct CRC32CHardwareTests {
    @Test func standardCheckValue() {
        let bytes = Array("123456789".utf8)
        let crc = bytes.withUnsafeBytes { epc_crc32c_hw(0, $0.baseAddress, $0.count) }
        #expect(crc == 0xE306_9283)
        let serial = bytes.withUnsafeBytes { epc_crc32c_hw_serial(0, $0.baseAddress, $0.count) }
        #expect(serial == 0xE306_9283)
        #expect(CRC32C.checksum(bytes) == 0xE306_9283)
    }

    @Test func emptyInputReturnsTheSeed() {
        for seed: UInt32 in [0, 1, 0xE306_9283, 0xFFFF_FFFF] {
            #expect(epc_crc32c_hw(seed, nil, 0) == seed)
            #expect(epc_crc32c_hw_serial(seed, nil, 0) == seed)
        }
    }

    @Test func matchesTheSwiftReferenceAtEveryLengthAndAlignment() {
        var rng = SplitMix64(seed: 0xC0FF_EE00_1234_5678)
        for length in testLengths(using: &rng) {
            let bytes = randomBytes(length, using: &rng)
            let offset = Int.random(in: 0...15, using: &rng)
            let seed: UInt32 = Bool.random(using: &rng) ? 0 : UInt32.random(in: .min ... .max, using: &rng)
            bytes.withUnsafeBytes { all in
                let slice = UnsafeRawBufferPointer(rebasing: all[offset..<(offset + length)])
                let expected = CRC32C.checksum(slice, seed: seed)
                let hardware = epc_crc32c_hw(seed, slice.baseAddress, slice.count)
                #expect(hardware == expected, "length \(length), offset \(offset), seed \(seed)")
            }
        }
    }

    @Test func matchesTheSerialVersion() {
        var rng = SplitMix64(seed: 0x5EED_0000_0000_0002)
        for length in testLengths(using: &rng) {
            let bytes = randomBytes(length, using: &rng)
            for offset in [0, 1, 3, 7, 8, 13, 15] {
                bytes.withUnsafeBytes { all in
                    let base = all.baseAddress.unsafelyUnwrapped + offset
                    let seed = UInt32(truncatingIfNeeded: rng.next())
                    #expect(epc_crc32c_hw(seed, base, length) == epc_crc32c_hw_serial(seed, base, length),
                            "length \(length), offset \(offset), seed \(seed)")
                }
            }
        }
    }

    @Test func chainsAtAnySplitPoint() {
        var rng = SplitMix64(seed: 0x5EED_0000_0000_0003)
        for length in testLengths(using: &rng) {
            let bytes = randomBytes(length, using: &rng)
            let offset = Int.random(in: 0...15, using: &rng)
            bytes.withUnsafeBytes { all in
                let base = all.baseAddress.unsafelyUnwrapped + offset
                let whole = epc_crc32c_hw(0, base, length)
                var splits = [0, length]
                for _ in 0..<4 { splits.append(Int.random(in: 0...length, using: &rng)) }
                for split in splits {
                    let first = epc_crc32c_hw(0, base, split)
                    let chained = epc_crc32c_hw(first, base + split, length - split)
                    #expect(chained == whole, "length \(length), offset \(offset), split \(split)")
                }
                // Three pieces, the middle one possibly long enough for the three-way path on its own.
                let a = Int.random(in: 0...length, using: &rng)
                let b = Int.random(in: a...length, using: &rng)
                var crc = epc_crc32c_hw(0, base, a)
                crc = epc_crc32c_hw(crc, base + a, b - a)
                crc = epc_crc32c_hw(crc, base + b, length - b)
                #expect(crc == whole, "length \(length), offset \(offset), splits \(a), \(b)")
            }
        }
    }

    @Test func manySmallPiecesEqualOneLongRun() {
        var rng = SplitMix64(seed: 0x5EED_0000_0000_0004)
        let length = CRCBlocks.long * 7 + CRCBlocks.short * 5 + 3
        let bytes = randomBytes(length, using: &rng)
        bytes.withUnsafeBytes { all in
            let base = all.baseAddress.unsafelyUnwrapped + 5
            let expected = CRC32C.checksum(UnsafeRawBufferPointer(start: base, count: length))
            var crc: UInt32 = 0
            var position = 0
            while position < length {
                let piece = min(length - position, Int.random(in: 0...3 * CRCBlocks.long + 17, using: &rng))
                crc = epc_crc32c_hw(crc, base + position, piece)
                position += piece
            }
            #expect(crc == expected)
        }
    }
}
