// The daemon's control link against hostile clients: a real Daemon on loopback, clients that open the
// link with the shared handshake and then send lines that are not requests (wrong-typed fields, unknown
// requests, not JSON, an oversized line), engine channels and wrong keys. Each must be refused with an
// error that names what was wrong, and the daemon must go on serving the next request.

import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Synchronization
import Testing

@Suite(.serialized, .tier(.linux)) struct ControlProtocolTests {
    static let key = [UInt8]("control-protocol-test-key-0123456789".utf8)

    /// A daemon serving on loopback until the fixture is dropped.
    final class RunningDaemon: @unchecked Sendable {
        let endpoint: Endpoint
        private final class Flag: Sendable { let value = Mutex(false) }
        private let stop = Flag()
        private let serving: Background<Void>

        init() throws {
            let box = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
            endpoint = box.listener.endpoint
            let daemon = Daemon(options: DaemonOptions(listen: endpoint, key: ControlProtocolTests.key,
                                                       preloadLibrary: "/nonexistent", vmDeadlineSeconds: 60,
                                                       instance: "ctl-\(getpid())"))
            let stop = self.stop
            serving = Background("daemon") { daemon.serve(listener: box.listener, shouldStop: { stop.value.withLock { $0 } }) }
        }

        func finish() throws {
            stop.value.withLock { $0 = true }
            try serving.value()
        }
    }

    /// Opens a daemon link with the real handshake and returns it as a raw channel, to write anything on.
    static func rawLink(_ endpoint: Endpoint, key: [UInt8] = key) throws -> PeerChannel {
        try PeerChannel.connect(to: endpoint, kind: .daemon,
                                identity: ChannelIdentity(sessionID: 0, vmName: "epcopy-daemon", regionPages: 1, key: key),
                                timeoutMillis: 5000, retryUntil: 0)
    }

    static func sendRaw(_ link: PeerChannel, _ text: String) throws {
        let bytes = Array(text.utf8)
        try bytes.withUnsafeBytes { try TCP.sendAll(link.descriptor.rawValue, $0) }
    }

    /// Reads one reply line from a raw link.
    static func readLine(_ link: PeerChannel) throws -> String {
        var line = link.takeBufferedBytes()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while !line.contains(0x0A) {
            let n = try chunk.withUnsafeMutableBytes { try TCP.receive(link.descriptor.rawValue, into: $0, timeoutMillis: 10_000) }
            guard n > 0 else { throw ControlError.io("closed") }
            line += chunk[0..<n]
        }
        return String(decoding: line[..<line.firstIndex(of: 0x0A)!], as: UTF8.self)
    }

    @Test func malformedRequestsAreRefusedByNameAndTheDaemonKeepsServing() throws {
        let daemon = try RunningDaemon()
        defer { try? daemon.finish() }
        let link = try Self.rawLink(daemon.endpoint)
        let cases: [(line: String, says: String)] = [
            (#"{"vmStop":{"name":5}}"#, "vmStop.name: expected String"),
            (#"{"vmStart":{"name":"a"}}"#, "missing field spec"),
            (#"{"migrate":{"_0":{"name":"a","to":"1.2.3.4:5","options":{"mode":"teleport","verify":true,"agent":true,"agentTimeoutMillis":5}}}}"#,
             "mode"),
            (#"{"explode":{}}"#, "not a request"),
            ("hello there", "not a request"),
        ]
        for (line, says) in cases {
            try Self.sendRaw(link, line + "\n")
            let reply = try Self.readLine(link)
            #expect(reply.contains("\"error\""), "\(line) → \(reply)")
            #expect(reply.contains(says), "\(line) → \(reply)")
        }
        // The same connection still serves a valid request.
        try Self.sendRaw(link, #"{"vmList":{}}"# + "\n")
        #expect(try Self.readLine(link).contains("\"vms\""))

        // Values that decode but are out of range are refused by the daemon's own checks.
        let client = try ControlChannel.connect(daemon.endpoint, key: Self.key)
        let spec = VMSpec(name: "x", memoryMiB: 1 << 30, kernel: nil, initrd: nil, append: nil)
        try client.send(.vmStart(name: "bad name!", spec: spec))
        #expect(throws: ControlError.self) { try client.receiveReply(timeoutMillis: 10_000) }
        try client.send(.vmStart(name: "x", spec: spec))
        do {
            _ = try client.receiveReply(timeoutMillis: 10_000)
            Issue.record("a 1 PiB VM was accepted")
        } catch { #expect("\(error)".contains("memory must be"), "\(error)") }
        try client.send(.vmList)
        guard case .vms(let vms) = try client.receiveReply(timeoutMillis: 10_000) else {
            Issue.record("vm list did not answer with vms")
            return
        }
        #expect(vms.isEmpty)
    }

    @Test func anOversizedLineEndsThatConnectionOnly() throws {
        let daemon = try RunningDaemon()
        defer { try? daemon.finish() }
        let link = try Self.rawLink(daemon.endpoint)
        let big = [UInt8](repeating: 0x20, count: ControlChannel.maxLine + 65536 * 2)
        // The daemon stops reading once the line is over the limit; the send fails or completes, and the link
        // ends either way.
        _ = try? big.withUnsafeBytes { try TCP.sendAll(link.descriptor.rawValue, $0) }
        // At most one reply, an error naming the limit (it may be lost to the reset), then the link is closed.
        do {
            let reply = try Self.readLine(link)
            #expect(reply.contains("\"error\"") && reply.contains("a line over"), "\(reply)")
            #expect(throws: (any Error).self) { _ = try Self.readLine(link) }
        } catch {}
        let client = try ControlChannel.connect(daemon.endpoint, key: Self.key)
        try client.send(.vmList)
        guard case .vms = try client.receiveReply(timeoutMillis: 10_000) else {
            Issue.record("the daemon stopped serving after an oversized line")
            return
        }
    }

    @Test func wrongKeysAndEngineChannelsAreRefusedAtTheHandshake() throws {
        let daemon = try RunningDaemon()
        defer { try? daemon.finish() }
        do {
            _ = try ControlChannel.connect(daemon.endpoint, key: [UInt8]("another-key-of-enough-length".utf8))
            Issue.record("a client with the wrong key was let in")
        } catch { #expect("\(error)".contains("key does not match"), "\(error)") }
        do {
            _ = try PeerChannel.connect(to: daemon.endpoint, kind: .control,
                                        identity: ChannelIdentity(sessionID: 0, vmName: "x", regionPages: 1, key: Self.key),
                                        timeoutMillis: 5000, retryUntil: 0)
            Issue.record("an engine channel was accepted by a daemon")
        } catch { #expect("\(error)".contains("not served here"), "\(error)") }
        // And a daemon link is not accepted by a migration's destination engine either: see HostilePeerTests.
        let client = try ControlChannel.connect(daemon.endpoint, key: Self.key)
        try client.send(.vmList)
        guard case .vms = try client.receiveReply(timeoutMillis: 10_000) else {
            Issue.record("the daemon stopped serving")
            return
        }
    }

    @Test func alternateAddressesThatCannotWorkAreRefusedBeforeAnythingMoves() throws {
        let daemon = try RunningDaemon()
        defer { try? daemon.finish() }
        let client = try ControlChannel.connect(daemon.endpoint, key: Self.key)
        let enlightened = MigrationRequestOptions(mode: .enlightened, verify: true, agent: true, agentTimeoutMillis: 3000)
        let postcopy = MigrationRequestOptions(mode: .postcopy, verify: true, agent: true, agentTimeoutMillis: 3000)
        var slow = enlightened
        slow.failoverAfterMillis = 5
        let cases: [(request: MigrateRequest, says: String)] = [
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.1.0.2"], options: enlightened),
             "10.1.0.2 is not IPv4-ADDRESS:PORT"),
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.0.0.2:7470"], options: enlightened),
             "given twice"),
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.1.0.2:7470", "10.1.0.2:7470"], options: enlightened),
             "given twice"),
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: (1...9).map { "10.1.0.\($0):7470" }, options: enlightened),
             "at most 8"),
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.1.0.2:7470"], options: postcopy),
             "needs enlightened mode"),
            (MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.1.0.2:7470"], options: slow),
             "failoverAfterMillis must be"),
        ]
        for (request, says) in cases {
            try client.send(.migrate(request))
            do {
                _ = try client.receiveReply(timeoutMillis: 10_000)
                Issue.record("accepted: \(request.alsoTo ?? [])")
            } catch { #expect("\(error)".contains(says), "\(request.alsoTo ?? []) → \(error)") }
        }
        // Good alternates get as far as the VM, which is not here.
        try client.send(.migrate(MigrateRequest(name: "vm", to: "10.0.0.2:7470", alsoTo: ["10.1.0.2:7470"], options: enlightened)))
        do {
            _ = try client.receiveReply(timeoutMillis: 10_000)
            Issue.record("a migration of a VM that does not exist was accepted")
        } catch { #expect("\(error)".contains("no running VM vm"), "\(error)") }
    }

    @Test func requestsRoundTripWithFullWidthSessions() throws {
        let spec = VMSpec(name: "vm", memoryMiB: 512, kernel: "/k", initrd: nil, append: "console=ttyS0")
        let request = ControlRequest.incoming(IncomingRequest(
            spec: spec, session: UInt64.max,
            options: MigrationRequestOptions(mode: .enlightened, verify: true, agent: false, agentTimeoutMillis: 3000)))
        let decoded = try JSONDecoder().decode(ControlRequest.self, from: JSONEncoder().encode(request))
        guard case .incoming(let incoming) = decoded else {
            Issue.record("decoded as \(decoded.name)")
            return
        }
        #expect(incoming.session == UInt64.max)
        #expect(incoming.spec == spec)
        #expect(incoming.options == MigrationRequestOptions(mode: .enlightened, verify: true, agent: false,
                                                            agentTimeoutMillis: 3000))
    }
}
