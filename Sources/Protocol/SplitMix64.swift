// The seeded generator behind every reproducible input in the tree: the tests' randomised cases (each failure
// names its seed) and `epcopy bench codec`'s inputs. It lives here, in the one module with no dependencies that
// both the CLI and every test target reach, so there is one copy of it.

/// SplitMix64 (Steele, Lea and Flood): small, fast, and good enough to make test and benchmark data.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
