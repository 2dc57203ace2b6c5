// One connection between two engines: blocking framed I/O for the handshake (Handshake.swift) and for
// tests. Once a session runs, the channel's descriptor is driven by a ChannelLoop instead, which takes
// over the bytes already read past the last frame; both use the same framing and decoder. This is the
// seam where reconnect, per-frame sealing and keepalives land.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// The three TCP connections of a session, and a daemon's control link. Urgent traffic never queues behind
/// bulk pages: a fault's request and reply have a connection of their own (QEMU's postcopy-preempt made the
/// same split). The daemon link opens with the same handshake and then carries the daemon's requests.
public enum PeerChannelKind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case control = 1
    case urgent = 2
    case bulk = 3
    case daemon = 4

    /// The channels one migration session opens, each once.
    public static let session: Set<PeerChannelKind> = [.control, .urgent, .bulk]

    public var description: String {
        switch self {
        case .control: "control"
        case .urgent: "urgent"
        case .bulk: "bulk"
        case .daemon: "daemon control"
        }
    }
}

public final class PeerChannel: @unchecked Sendable {
    // SAFETY (@unchecked): a channel is used by one thread at a time — the thread that ran the handshake
    // hands it to the loop thread that drives it from then on, and never touches it again.
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
