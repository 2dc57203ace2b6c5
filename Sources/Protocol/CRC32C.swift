// CRC-32C (Castagnoli) protects every frame. This is the portable software version (slicing-by-8); the host engine
// injects a hardware SSE4.2 implementation through `ChecksumFunction`, and both must agree bit for bit.

/// A CRC-32C implementation: checksum of the bytes, continuing from the given seed (the checksum of the bytes that
/// came before, or 0 to start).
public typealias ChecksumFunction = @Sendable (UnsafeRawBufferPointer, UInt32) -> UInt32

/// Software CRC-32C (reflected polynomial 0x82F63B78), slicing-by-8.
public enum CRC32C: Sendable {
    /// The reflected Castagnoli polynomial.
    public static let polynomial: UInt32 = 0x82F6_3B78

    /// The software implementation as a `ChecksumFunction`, the default everywhere one is accepted.
    public static let software: ChecksumFunction = { bytes, seed in checksum(bytes, seed: seed) }

    /// Eight 256-entry tables laid out back to back: table k maps a byte to its CRC contribution when it is
    /// followed by k further bytes of zeros, which lets the main loop consume eight bytes per step.
    private static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for byte in 0..<256 {
            var crc = UInt32(byte)
            for _ in 0..<8 {
                crc = crc & 1 == 1 ? (crc >> 1) ^ polynomial : crc >> 1
            }
            tables[byte] = crc
        }
        for table in 1..<8 {
            for byte in 0..<256 {
                let previous = tables[(table - 1) * 256 + byte]
                tables[table * 256 + byte] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    /// CRC-32C of `bytes`. Chaining holds: `checksum(b, seed: checksum(a)) == checksum(a + b)`.
    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        guard let start = bytes.baseAddress, !bytes.isEmpty else {
            return seed
        }
        return tables.withUnsafeBufferPointer { table in
            // The tables are a non-empty static array, so the base address exists.
            let t = table.baseAddress.unsafelyUnwrapped
            var crc = ~seed
            var pointer = start
            var remaining = bytes.count
            while remaining >= 8 {
                let word = pointer.loadUnaligned(as: UInt64.self).littleEndian
                let low = UInt32(truncatingIfNeeded: word) ^ crc
                let high = UInt32(truncatingIfNeeded: word >> 32)
                crc = t[7 * 256 + Int(low & 0xFF)]
                    ^ t[6 * 256 + Int((low >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((low >> 16) & 0xFF)]
                    ^ t[4 * 256 + Int(low >> 24)]
                    ^ t[3 * 256 + Int(high & 0xFF)]
                    ^ t[2 * 256 + Int((high >> 8) & 0xFF)]
                    ^ t[1 * 256 + Int((high >> 16) & 0xFF)]
                    ^ t[Int(high >> 24)]
                pointer += 8
                remaining -= 8
            }
            while remaining > 0 {
                crc = t[Int((crc ^ UInt32(pointer.load(as: UInt8.self))) & 0xFF)] ^ (crc >> 8)
                pointer += 1
                remaining -= 1
            }
            return ~crc
        }
    }

    /// CRC-32C of `bytes`, continuing from `seed`.
    public static func checksum(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }
}
