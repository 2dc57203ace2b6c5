// Blocking framed I/O on one peer channel, for the handshake and for tests. Once a session runs, the
// channels are driven by io_uring loops instead; both use the same framing and decoder.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// The three TCP connections of a session. Urgent traffic never queues behind bulk pages: a fault's
/// request and reply have a connection of their own (QEMU's postcopy-preempt made the same split).
public enum PeerChannelKind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case control = 1
    case urgent = 2
    case bulk = 3

    public var description: String {
        switch self {
        case .control: "control"
        case .urgent: "urgent"
        case .bulk: "bulk"
        }
    }
}

/// What can go wrong between two engines, with the step that failed.
public enum PeerError: Error, CustomStringConvertible, Equatable {
    case syscall(String, SyscallError)
    case protocolViolation(String, ProtocolError)
    case unexpected(String)
    case closed(String)
    case aborted(code: UInt16, reason: String)
    case timedOut(String)

    public var description: String {
        switch self {
        case .syscall(let step, let e): "\(step): \(e)"
        case .protocolViolation(let step, let e): "\(step): peer sent an invalid frame: \(e)"
        case .unexpected(let text): text
        case .closed(let step): "\(step): the peer closed the connection"
        case .aborted(let code, let reason): "the peer aborted the migration (code \(code)): \(reason)"
        case .timedOut(let step): "\(step): timed out"
        }
    }
}

extension PeerError {
    /// The peer went away (closed, reset, broken pipe) rather than saying something wrong.
    public var isConnectionLoss: Bool {
        switch self {
        case .closed: return true
        case .syscall(_, let error): return [ECONNRESET, EPIPE, ECONNABORTED].contains(error.errno)
        default: return false
        }
    }
}

/// Hardware CRC32C when the CPU has it (8–10 GB/s against ~1 GB/s for the table version).
public let fastChecksum: ChecksumFunction = makeFastChecksum()

private func makeFastChecksum() -> ChecksumFunction {
    guard epc_cpu_has_sse42() != 0 else { return CRC32C.software }
    return { (bytes: UnsafeRawBufferPointer, seed: UInt32) -> UInt32 in
        epc_crc32c_hw(seed, bytes.baseAddress, bytes.count)
    }
}

public final class PeerConnection {
    public let descriptor: FileDescriptor
    /// Known once the peer has said which channel this is (the destination accepts in any order).
    public var channel: PeerChannelKind
    private var decoder: FrameDecoder
    public let context: PeerDecodeContext

    public init(descriptor: consuming FileDescriptor, channel: PeerChannelKind, context: PeerDecodeContext,
                buffered: [UInt8] = []) {
        self.descriptor = descriptor
        self.channel = channel
        self.context = context
        self.decoder = FrameDecoder(link: .peer, checksum: fastChecksum)
        decoder.append(buffered)
    }

    public func send(_ message: PeerMessage) throws(PeerError) {
        let bytes = message.encodedFrame(checksum: fastChecksum)
        let fd = descriptor.rawValue
        let result: Result<Void, SyscallError> = bytes.withUnsafeBytes { raw in
            Result { () throws(SyscallError) in try TCP.sendAll(fd, raw) }
        }
        if case .failure(let error) = result {
            throw .syscall("send \(message.kind) on the \(channel) channel", error)
        }
    }

    /// Waits up to `timeoutMillis` for one message.
    public func receive(timeoutMillis: Int32) throws(PeerError) -> PeerMessage {
        var buffer = [UInt8](repeating: 0, count: 65536)
        let fd = descriptor.rawValue
        while true {
            do throws(ProtocolError) {
                if let frame = try decoder.next() {
                    return try PeerMessage.decode(frame: frame, context: context)
                }
            } catch {
                throw .protocolViolation("\(channel) channel", error)
            }
            let result: Result<Int, SyscallError> = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(SyscallError) in try TCP.receive(fd, into: raw, timeoutMillis: timeoutMillis) }
            }
            switch result {
            case .failure(let error) where error.errno == ETIMEDOUT:
                throw .timedOut("waiting on the \(channel) channel")
            case .failure(let error) where error.errno == ECONNRESET:
                throw .closed("\(channel) channel")
            case .failure(let error):
                throw .syscall("recv on the \(channel) channel", error)
            case .success(0):
                throw .closed("\(channel) channel")
            case .success(let n):
                decoder.append(buffer[0..<n])
            }
        }
    }

    /// Bytes already read past the last decoded frame (handed to the io_uring loop that takes over).
    public func takeBufferedBytes() -> [UInt8] { decoder.takeBuffered() }
}
