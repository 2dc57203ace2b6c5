// The daemons' control connection: JSON objects, one per line, over TCP, after a mutual HMAC
// challenge-response with the host's shared key (the same construction the engines use). Every line
// off the network is untrusted: bounded in size, parsed as JSON, and checked field by field by its
// handler; a malformed or oversized line ends the connection with an error, never the daemon.

import EpcopyProtocol
import Foundation

public enum ControlError: Error, CustomStringConvertible {
    case io(String)
    case protocolViolation(String)
    case refused(String)
    case remote(String)

    public var description: String {
        switch self {
        case .io(let text): text
        case .protocolViolation(let text): "the peer broke the control protocol: \(text)"
        case .refused(let text): "refused: \(text)"
        case .remote(let text): text
        }
    }
}

public final class ControlChannel: @unchecked Sendable {
    // SAFETY (@unchecked): one channel is used by one thread at a time.
    public let descriptor: FileDescriptor
    private var buffer: [UInt8] = []
    /// Sends may come from a progress thread and the request thread at once; lines must not interleave.
    private let sendLock = NSLock()
    /// Largest line accepted (page digests of a 4 GiB guest, base64, fit with room to spare).
    public static let maxLine = 32 << 20

    public init(descriptor: consuming FileDescriptor) { self.descriptor = descriptor }

    public static func connect(_ endpoint: Endpoint, timeoutMillis: Int32 = 10_000) throws -> ControlChannel {
        do { return ControlChannel(descriptor: try TCP.connect(to: endpoint, timeoutMillis: timeoutMillis)) } catch {
            throw ControlError.io("cannot reach the epcopy daemon at \(endpoint): \(error)")
        }
    }

    public func send(_ object: [String: Any]) throws {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) + Data([0x0A])
        let fd = descriptor.rawValue
        sendLock.lock()
        defer { sendLock.unlock() }
        let result: Result<Void, SyscallError> = data.withUnsafeBytes { raw in
            Result { () throws(SyscallError) in try TCP.sendAll(fd, raw) }
        }
        if case .failure(let error) = result { throw ControlError.io("send to the peer: \(error)") }
    }

    public func receive(timeoutMillis: Int32) throws -> [String: Any] {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Data(buffer[..<newline])
                buffer.removeSubrange(...newline)
                guard let object = (try? JSONSerialization.jsonObject(with: line)) as? [String: Any] else {
                    throw ControlError.protocolViolation("a line that is not a JSON object")
                }
                if let error = object["error"] as? String { throw ControlError.remote(error) }
                return object
            }
            guard buffer.count <= Self.maxLine else { throw ControlError.protocolViolation("a line over \(Self.maxLine) bytes") }
            let fd = descriptor.rawValue
            let result: Result<Int, SyscallError> = chunk.withUnsafeMutableBytes { raw in
                Result { () throws(SyscallError) in try TCP.receive(fd, into: raw, timeoutMillis: timeoutMillis) }
            }
            let n: Int
            switch result {
            case .success(let count): n = count
            case .failure(let error) where error.errno == ETIMEDOUT:
                throw ControlError.io("the peer did not answer in time")
            case .failure(let error):
                throw ControlError.io("receive: \(error)")
            }
            if n == 0 { throw ControlError.io("the peer closed the connection") }
            buffer += chunk[0..<n]
        }
    }

    // MARK: authentication

    /// Client side: prove we hold the key, and make the daemon prove it too.
    public func authenticateAsClient(key: [UInt8]) throws {
        let nonce = Bytes32.random()
        try send(["op": "hello", "nonce": Data(nonce.bytes).base64EncodedString()])
        let reply = try receive(timeoutMillis: 10_000)
        guard let mac = Self.bytes32(reply["mac"]), let challenge = Self.bytes32(reply["challenge"]) else {
            throw ControlError.protocolViolation("hello reply without mac and challenge")
        }
        guard mac.constantTimeEquals(HMACSHA256.response(key: key, challenge: nonce, sessionID: 0, role: .destination)) else {
            throw ControlError.refused("the daemon's key does not match ours")
        }
        try send(["mac": Data(HMACSHA256.response(key: key, challenge: challenge, sessionID: 0, role: .source).bytes)
            .base64EncodedString()])
        _ = try receive(timeoutMillis: 10_000)
    }

    /// Daemon side: the first line must be a hello; an unauthenticated peer is refused.
    public func authenticateAsServer(key: [UInt8]) throws {
        let hello = try receive(timeoutMillis: 10_000)
        guard hello["op"] as? String == "hello", let nonce = Self.bytes32(hello["nonce"]) else {
            try? send(["error": "authentication required: send hello first"])
            throw ControlError.refused("a peer that did not authenticate")
        }
        let challenge = Bytes32.random()
        try send(["mac": Data(HMACSHA256.response(key: key, challenge: nonce, sessionID: 0, role: .destination).bytes)
            .base64EncodedString(), "challenge": Data(challenge.bytes).base64EncodedString()])
        let answer = try receive(timeoutMillis: 10_000)
        guard let mac = Self.bytes32(answer["mac"]),
              mac.constantTimeEquals(HMACSHA256.response(key: key, challenge: challenge, sessionID: 0, role: .source))
        else {
            try? send(["error": "authentication failed"])
            throw ControlError.refused("a peer with the wrong key")
        }
        try send(["ok": true])
    }

    static func bytes32(_ value: Any?) -> Bytes32? {
        guard let text = value as? String, let data = Data(base64Encoded: text) else { return nil }
        return Bytes32([UInt8](data))
    }
}
