// Wire versioning. Both links carry the version in every frame header and agree on one during the handshake; this
// file holds the versions this build speaks and the negotiation rule, so both ends pick the same one.

/// The wire versions this build supports and how two ends agree on one.
public enum WireVersion: Sendable {
    /// The version this build sends by default.
    public static let current: UInt8 = 1
    /// Every version this build can decode.
    public static let supported: ClosedRange<UInt8> = 1...1

    /// The highest version in both ranges; throws `noCommonVersion` if they do not overlap.
    public static func negotiate(
        local: ClosedRange<UInt8>, remote: ClosedRange<UInt8>
    ) throws(ProtocolError) -> UInt8 {
        let lowest = max(local.lowerBound, remote.lowerBound)
        let highest = min(local.upperBound, remote.upperBound)
        guard lowest <= highest else {
            throw .noCommonVersion(local: local, remote: remote)
        }
        return highest
    }
}
