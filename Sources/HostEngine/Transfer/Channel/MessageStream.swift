// Receiving small messages (requests, acks, control) with one armed multishot receive per channel:
// the kernel fills provided buffers as bytes arrive, the bytes go through the frame decoder, and the
// buffer goes straight back to the kernel. Every message is validated before anyone acts on it.

import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

public final class MessageStream {
    public let fd: Int32
    public let tag: UInt64
    public let channel: PeerChannelKind
    private let buffers: ProvidedBuffers
    private var decoder: FrameDecoder
    public let context: PeerDecodeContext
    public private(set) var closed = false
    public private(set) var bytesReceived: UInt64 = 0
    /// Monotonic time of the last bytes from the peer: the hook for keepalives and black-hole detection.
    public private(set) var lastReceivedNanos: UInt64 = monotonicNanos()

    public init(fd: Int32, tag: UInt64, channel: PeerChannelKind, ring: Ring, group: UInt16,
                context: PeerDecodeContext, alreadyRead: [UInt8] = []) throws(SyscallError) {
        self.fd = fd
        self.tag = tag
        self.channel = channel
        self.context = context
        self.buffers = try ProvidedBuffers(ring: ring, group: group, count: 64, size: 64 * 1024)
        self.decoder = FrameDecoder(link: .peer, checksum: fastChecksum)
        decoder.append(alreadyRead)
    }

    public func arm(_ ring: Ring) throws(SyscallError) {
        try ring.recvMultishot(fd: fd, group: buffers.group, userData: tag)
    }

    /// Messages already buffered (e.g. read during the handshake) before any completion arrives.
    public func drainBuffered(_ body: (PeerMessage) throws -> Void) throws {
        try decodeAll(body)
    }

    /// Handles one completion of this stream's receive; calls `body` for each complete message.
    public func complete(_ completion: Completion, ring: Ring, _ body: (PeerMessage) throws -> Void) throws {
        if completion.result == -ENOBUFS {
            // Every buffer was in use: they are all recycled by now, so arm again.
            try arm(ring)
            return
        }
        if completion.result == -ECONNRESET || completion.result == -EPIPE {
            // A peer that died (killed engine, reset connection) is a closed channel, not a protocol error:
            // the caller decides whether to wait for a replacement.
            closed = true
            return
        }
        if completion.result < 0 {
            throw PeerError.syscall("recv on the \(channel) channel", SyscallError(call: "recv", errno: -completion.result))
        }
        if completion.result == 0 {
            closed = true
            return
        }
        guard let id = completion.bufferID else {
            throw PeerError.unexpected("recv on the \(channel) channel completed without a buffer")
        }
        let n = Int(completion.result)
        decoder.append(buffers.bytes(id: id, length: n))
        buffers.recycle(id: id)
        bytesReceived += UInt64(n)
        lastReceivedNanos = monotonicNanos()
        if !completion.more { try arm(ring) }
        try decodeAll(body)
    }

    private func decodeAll(_ body: (PeerMessage) throws -> Void) throws {
        while true {
            let message: PeerMessage
            do {
                guard let frame = try decoder.next() else { return }
                message = try PeerMessage.decode(frame: frame, context: context)
            } catch {
                throw PeerError.protocolViolation("\(channel) channel", error)
            }
            try body(message)
        }
    }
}

