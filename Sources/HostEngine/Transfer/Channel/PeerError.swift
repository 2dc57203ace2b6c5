// What can go wrong between two engines, with the step that failed, and the frame checksum both ends
// use. Shared by every channel: the handshake, the blocking channel and the io_uring loops.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// What can go wrong between two engines, with the step that failed.
public enum PeerError: Error, CustomStringConvertible, Equatable {
    case syscall(String, SyscallError)
    case protocolViolation(String, ProtocolError)
    case unexpected(String)
    case closed(String)
    case aborted(code: UInt16, reason: String)
    case timedOut(String)
    /// Nothing heard from the peer for `seconds` on a session that keepalives should fill: the link is
    /// down or black-holed (no error arrives for packets that are silently dropped).
    case silent(String, seconds: Double)

    public var description: String {
        switch self {
        case .syscall(let step, let e): "\(step): \(e)"
        case .protocolViolation(let step, let e): "\(step): peer sent an invalid frame: \(e)"
        case .unexpected(let text): text
        case .closed(let step): "\(step): the peer closed the connection"
        case .aborted(let code, let reason): "the peer aborted the migration (code \(code)): \(reason)"
        case .timedOut(let step): "\(step): timed out"
        case .silent(let step, let seconds):
            "\(step): nothing heard from the peer for \(String(format: "%.1f", seconds)) s (the link is down or dropping packets)"
        }
    }
}

extension PeerError {
    /// The peer or the path to it went away (closed, reset, broken pipe, unreachable, silent) rather than
    /// saying something wrong: what a session may recover from by reconnecting.
    public var isConnectionLoss: Bool {
        switch self {
        case .closed, .silent: return true
        case .syscall(_, let error): return Self.linkErrnos.contains(error.errno)
        default: return false
        }
    }

    /// Errors of a socket whose connection or route is gone.
    static let linkErrnos: Set<Int32> = [ECONNRESET, EPIPE, ECONNABORTED, ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH,
                                         ENETUNREACH, ENETDOWN, EHOSTDOWN]
}

/// Hardware CRC32C when the CPU has it (8–10 GB/s against ~1 GB/s for the table version).
public let fastChecksum: ChecksumFunction = makeFastChecksum()

private func makeFastChecksum() -> ChecksumFunction {
    guard epc_cpu_has_sse42() != 0 else { return CRC32C.software }
    return { (bytes: UnsafeRawBufferPointer, seed: UInt32) -> UInt32 in
        epc_crc32c_hw(seed, bytes.baseAddress, bytes.count)
    }
}

extension PeerAbort {
    /// The engines' abort codes: 1 session mismatch, 2 a channel not served, 3 called off before the switch.
    public static let cancelledCode: UInt16 = 3
}
