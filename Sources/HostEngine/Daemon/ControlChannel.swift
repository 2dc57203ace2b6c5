// The daemons' control link: a PeerChannel opened with the engines' handshake (hello, mutual HMAC with
// the host's shared key, version, welcome) as a `daemon` channel, then carrying ControlRequest and
// ControlReply values as JSON, one per line. Every line off the network is untrusted: bounded in size
// and decoded into the typed messages: a line that does not decode is answered with an error naming
// what was wrong, an oversized line ends that connection; neither ends the daemon.

import EpcopyProtocol
import Foundation

public enum ControlError: Error, CustomStringConvertible {
    case io(String)
    /// Nothing came within the wait asked for; the connection is intact and the next receive may succeed.
    case timedOut
    case protocolViolation(String)
    case refused(String)
    case remote(String)

    public var description: String {
        switch self {
        case .io(let text): text
        case .timedOut: "the peer did not answer in time"
        case .protocolViolation(let text): "the peer broke the control protocol: \(text)"
        case .refused(let text): "refused: \(text)"
        case .remote(let text): text
        }
    }
}

public final class ControlChannel: @unchecked Sendable {
    // SAFETY (@unchecked): receives come from one thread; sends are serialised by `sendLock`.
    private let peer: PeerChannel
    private var buffer: [UInt8]
    /// Sends may come from a progress thread and the request thread at once; lines must not interleave.
    private let sendLock = NSLock()
    /// Largest line accepted (page digests of a 4 GiB guest fit with room to spare).
    public static let maxLine = 32 << 20

    /// The handshake's identity on a daemon link: no session, no region.
    static func identity(key: [UInt8]) -> ChannelIdentity {
        ChannelIdentity(sessionID: 0, vmName: "epcopy-daemon", regionPages: 1, key: key)
    }

    private init(_ peer: PeerChannel) {
        self.peer = peer
        self.buffer = peer.takeBufferedBytes()
    }

    /// Client side (a CLI command, or a source daemon calling its peer): connect and prove we hold the key,
    /// and make the daemon prove it too.
    public static func connect(_ endpoint: Endpoint, key: [UInt8], timeoutMillis: Int32 = 10_000) throws -> ControlChannel {
        do throws(PeerError) {
            return ControlChannel(try PeerChannel.connect(to: endpoint, kind: .daemon, identity: identity(key: key),
                                                          timeoutMillis: timeoutMillis, retryUntil: 0))
        } catch .unexpected(let text) where text.contains("authentication") || text.contains("key") {
            throw ControlError.refused(text)
        } catch .aborted(_, let reason) {
            throw ControlError.refused("the daemon at \(endpoint): \(reason)")
        } catch {
            throw ControlError.io("cannot reach the epcopy daemon at \(endpoint): \(error)")
        }
    }

    /// Daemon side, on a connection just accepted: the peer must prove it holds the key first.
    public static func answer(_ fd: consuming FileDescriptor, key: [UInt8]) throws -> ControlChannel {
        do throws(PeerError) {
            return ControlChannel(try PeerChannel.answer(fd, identity: identity(key: key), kinds: [.daemon],
                                                         timeoutMillis: 10_000))
        } catch {
            throw ControlError.refused("\(error)")
        }
    }

    /// Ends the connection both ways from any thread: a receive blocked on it (on another thread) fails at
    /// once, as on a lost connection. The descriptor stays open until the channel goes.
    public func shutDown() { _ = Glibc.shutdown(peer.descriptor.rawValue, Int32(SHUT_RDWR)) }

    public func send(_ request: ControlRequest) throws { try sendLine(request) }
    public func send(_ reply: ControlReply) throws { try sendLine(reply) }

    private func sendLine(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(value) + Data([0x0A])
        let fd = peer.descriptor.rawValue
        sendLock.lock()
        defer { sendLock.unlock() }
        let result: Result<Void, SyscallError> = data.withUnsafeBytes { raw in
            Result { () throws(SyscallError) in try TCP.sendAll(fd, raw) }
        }
        if case .failure(let error) = result { throw ControlError.io("send to the peer: \(error)") }
    }

    /// The next request (daemon side).
    public func receiveRequest(timeoutMillis: Int32) throws -> ControlRequest {
        try decode(ControlRequest.self, try receiveLine(timeoutMillis: timeoutMillis))
    }

    /// The next reply (client side); an error reply is thrown as `ControlError.remote`.
    public func receiveReply(timeoutMillis: Int32) throws -> ControlReply {
        let reply = try decode(ControlReply.self, try receiveLine(timeoutMillis: timeoutMillis))
        if case .error(let text) = reply { throw ControlError.remote(text) }
        return reply
    }

    private func decode<T: Decodable>(_ type: T.Type, _ line: Data) throws -> T {
        do { return try JSONDecoder().decode(type, from: line) } catch let error as DecodingError {
            throw ControlError.protocolViolation(error.controlDescription)
        }
    }

    private func receiveLine(timeoutMillis: Int32) throws -> Data {
        var chunk = [UInt8](repeating: 0, count: 65536)
        // Only bytes that arrived since the last look are searched for the newline, so a long line costs
        // one pass, not one pass per chunk.
        var searched = 0
        while true {
            if let newline = buffer[searched...].firstIndex(of: 0x0A) {
                let line = Data(buffer[..<newline])
                buffer.removeSubrange(...newline)
                return line
            }
            searched = buffer.count
            // An oversized line cannot be skipped safely (its end is unknown): the connection must end.
            guard buffer.count <= Self.maxLine else { throw ControlError.refused("a line over \(Self.maxLine) bytes") }
            let fd = peer.descriptor.rawValue
            let result: Result<Int, SyscallError> = chunk.withUnsafeMutableBytes { raw in
                Result { () throws(SyscallError) in try TCP.receive(fd, into: raw, timeoutMillis: timeoutMillis) }
            }
            let n: Int
            switch result {
            case .success(let count): n = count
            case .failure(let error) where error.errno == ETIMEDOUT:
                throw ControlError.timedOut
            case .failure(let error):
                throw ControlError.io("receive: \(error)")
            }
            if n == 0 { throw ControlError.io("the peer closed the connection") }
            buffer += chunk[0..<n]
        }
    }
}
