// Opening a channel: connect or accept, hello, mutual authentication, version negotiation, welcome.
// Written once for all three channels of a session, both roles, and the daemons' control link (which
// names no session). The source (connecting side) speaks first; the destination accepts channels in any
// order and checks that each is a kind it serves and belongs to the session it waits for. With a key,
// each side proves it holds it by MACing the other's fresh nonce (HMAC-SHA256 over nonce, session and
// role), and neither side moves a page to or from a peer that did not. Every handshake step has a
// deadline; a refused connect is retried until the caller's deadline.

import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// What one end says about itself in the handshake.
public struct ChannelIdentity: Sendable {
    public var sessionID: UInt64
    public var vmName: String
    public var regionPages: UInt64
    /// Shared key; nil: no authentication (tests and benchmarks on one host).
    public var key: [UInt8]?

    public init(sessionID: UInt64, vmName: String, regionPages: UInt64, key: [UInt8]?) {
        self.sessionID = sessionID
        self.vmName = vmName
        self.regionPages = regionPages
        self.key = key
    }
}

extension PeerChannel {
    /// Source side: connects channel `kind` to `destination` and runs the handshake. Connection refusals,
    /// resets and unreachable routes are retried every 50 ms until `retryUntil` (monotonic nanoseconds), so
    /// a source may start before its destination listens, wait out a link that is down, or wait for a
    /// replacement destination. `giveUpIf` ends the retrying early (the destination has another address now).
    public static func connect(to destination: Endpoint, kind: PeerChannelKind, identity: ChannelIdentity,
                               timeoutMillis: Int32, retryUntil deadline: UInt64,
                               giveUpIf: () -> Bool = { false }) throws(PeerError) -> PeerChannel {
        let fd: FileDescriptor
        while true {
            do {
                fd = try TCP.connect(to: destination, timeoutMillis: timeoutMillis)
                break
            } catch {
                if monotonicNanos() < deadline, PeerError.linkErrnos.contains(error.errno), !giveUpIf() {
                    usleep(50_000)
                    continue
                }
                throw .syscall("connect to the destination \(destination) (\(kind) channel)", error)
            }
        }
        tune(fd.rawValue, kind)
        let channel = PeerChannel(descriptor: fd, channel: kind,
                                  context: PeerDecodeContext(regionPages: identity.regionPages))
        let nonce = Bytes32.random()
        let hello: PeerHello
        do {
            hello = try PeerHello(role: .source, channel: kind.rawValue, sessionID: identity.sessionID,
                                  vmName: identity.vmName, regionPages: identity.regionPages, nonce: nonce)
        } catch { throw .protocolViolation("hello", error) }
        try channel.send(.hello(hello))
        var destinationProven = false
        var reply = try channel.receive(timeoutMillis: timeoutMillis)
        if case .authResponse(let mac) = reply {
            // The destination proves it holds the key by MACing our nonce.
            guard let key = identity.key else {
                throw .unexpected("the destination requires authentication: give the shared key")
            }
            let expected = HMACSHA256.response(key: key, challenge: nonce, sessionID: identity.sessionID,
                                               role: .destination)
            guard mac.constantTimeEquals(expected) else {
                throw .unexpected("authentication failed on the \(kind) channel: the destination's key does not "
                                  + "match ours")
            }
            destinationProven = true
            guard case .authChallenge(let challenge) = try channel.receive(timeoutMillis: timeoutMillis) else {
                throw .unexpected("handshake: expected the destination's challenge")
            }
            try channel.send(.authResponse(mac: HMACSHA256.response(
                key: key, challenge: challenge, sessionID: identity.sessionID, role: .source)))
            reply = try channel.receive(timeoutMillis: timeoutMillis)
        }
        switch reply {
        case .welcome(let w) where w.sessionID == identity.sessionID:
            if identity.key != nil && !destinationProven {
                throw .unexpected("the destination did not authenticate; refusing to send memory to an "
                                  + "unauthenticated peer")
            }
            return channel
        case .abort(let a):
            throw .aborted(code: a.code, reason: a.reason)
        case let other:
            throw .unexpected("handshake on the \(kind) channel: expected welcome, got \(other.kind)")
        }
    }

    /// Destination side: accepts one connection on `listener` and runs the handshake. The channel's kind is
    /// what the source's hello says; a hello for a kind outside `kinds`, another session or region size is
    /// refused with an abort.
    public static func accept(on listener: borrowing Listener, identity: ChannelIdentity,
                              kinds: Set<PeerChannelKind>, timeoutMillis: Int32) throws(PeerError) -> PeerChannel {
        let fd: FileDescriptor
        do { fd = try TCP.accept(listener, timeoutMillis: timeoutMillis) } catch {
            throw .syscall("waiting for the source on \(listener.endpoint)", error)
        }
        return try answer(fd, identity: identity, kinds: kinds, timeoutMillis: timeoutMillis)
    }

    /// Destination side on a connection already accepted (a daemon accepts on one thread and answers each
    /// connection on its own).
    public static func answer(_ fd: consuming FileDescriptor, identity: ChannelIdentity, kinds: Set<PeerChannelKind>,
                              timeoutMillis: Int32) throws(PeerError) -> PeerChannel {
        let channel = PeerChannel(descriptor: fd, channel: .control,
                                  context: PeerDecodeContext(regionPages: identity.regionPages))
        let hello: PeerHello
        switch try channel.receive(timeoutMillis: timeoutMillis) {
        case .hello(let h): hello = h
        case let other: throw .unexpected("handshake: expected hello, got \(other.kind)")
        }
        guard let kind = PeerChannelKind(rawValue: hello.channel), kinds.contains(kind) else {
            let reason = PeerChannelKind(rawValue: hello.channel).map { "a \($0) channel is not served here" }
                ?? "unknown channel \(hello.channel)"
            try? channel.send(.abort(PeerAbort(code: 2, reason: reason)))
            throw .unexpected("handshake: \(reason)")
        }
        guard hello.role == .source, hello.sessionID == identity.sessionID, hello.regionPages == identity.regionPages
        else {
            let reason = "session \(hello.sessionID) with \(hello.regionPages) pages does not match session "
                + "\(identity.sessionID) with \(identity.regionPages) pages"
            try? channel.send(.abort(PeerAbort(code: 1, reason: reason)))
            throw .unexpected("handshake on the \(kind) channel: \(reason)")
        }
        channel.channel = kind
        if let key = identity.key {
            try channel.proveAndChallenge(hello: hello, key: key, timeoutMillis: timeoutMillis)
        }
        let version: UInt8
        do { version = try WireVersion.negotiate(local: WireVersion.supported, remote: hello.versions) } catch {
            throw .protocolViolation("version negotiation", error)
        }
        let welcome: PeerWelcome
        do { welcome = try PeerWelcome(version: version, sessionID: identity.sessionID) } catch {
            throw .protocolViolation("welcome", error)
        }
        try channel.send(.welcome(welcome))
        tune(channel.descriptor.rawValue, kind)
        return channel
    }

    /// Mutual HMAC challenge-response, destination side: answer the source's nonce, then make it answer ours.
    private func proveAndChallenge(hello: PeerHello, key: [UInt8], timeoutMillis: Int32) throws(PeerError) {
        try send(.authResponse(mac: HMACSHA256.response(key: key, challenge: hello.nonce,
                                                        sessionID: hello.sessionID, role: .destination)))
        let challenge = Bytes32.random()
        try send(.authChallenge(nonce: challenge))
        let reply = try receive(timeoutMillis: timeoutMillis)
        let expected = HMACSHA256.response(key: key, challenge: challenge, sessionID: hello.sessionID, role: .source)
        guard case .authResponse(let mac) = reply, mac.constantTimeEquals(expected) else {
            try? send(.abort(PeerAbort(code: 3, reason: "authentication failed")))
            throw .unexpected("authentication failed on the \(channel) channel: the source did not prove "
                              + "it holds the shared key")
        }
    }

    /// Socket options per channel: small messages leave at once (no Nagle) except on bulk; 1 MiB buffers.
    private static func tune(_ fd: Int32, _ kind: PeerChannelKind) {
        if kind != .bulk { TCP.setNoDelay(fd) }
        TCP.setBufferSizes(fd, bytes: 1 << 20)
    }
}
