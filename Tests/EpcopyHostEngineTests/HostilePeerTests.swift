// A malicious or broken peer (Firecracker keeps a malicious_handler fixture for the same reason): every
// byte off the network is untrusted. Garbage, a truncated frame and a page outside the region must each
// end the session with an error that names what was wrong — never a crash, never a wrong page.

import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

/// A destination engine over a fresh 4 MiB region, listening on loopback.
final class DestinationFixture: @unchecked Sendable {
    let file: TestRAMFile
    let engine: DestinationEngine
    let listener: ListenerBox
    let pages: UInt64 = 1024
    let session: UInt64 = 99

    init() throws {
        file = try TestRAMFile("hostile-\(UInt32.random(in: 0...UInt32.max))", size: Int(pages * 4096))
        let fd = try FileDescriptor.open(file.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: fd, length: Int(pages * 4096))
        engine = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: session,
                                                                                acceptTimeoutMillis: 5000))
        listener = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
    }

    var endpoint: Endpoint { listener.listener.endpoint }

    func run() -> Background<DestinationReport> {
        Background("dst") { [self] in try engine.run(listener: listener.listener) }
    }

    /// Opens the three channels with a valid handshake, as a real source would.
    func handshake() throws -> [PeerChannelKind: PeerChannel] {
        var channels: [PeerChannelKind: PeerChannel] = [:]
        for kind in [PeerChannelKind.control, .urgent, .bulk] {
            let fd = try TCP.connect(to: endpoint, timeoutMillis: 5000)
            let connection = PeerChannel(descriptor: fd, channel: kind, context: PeerDecodeContext(regionPages: pages))
            try connection.send(.hello(PeerHello(role: .source, channel: kind.rawValue, sessionID: session,
                                                  vmName: "hostile", regionPages: pages, nonce: .random())))
            guard case .welcome = try connection.receive(timeoutMillis: 5000) else {
                throw PeerError.unexpected("no welcome")
            }
            channels[kind] = connection
        }
        guard case .resume = try channels[.control]!.receive(timeoutMillis: 5000) else {
            throw PeerError.unexpected("no resume")
        }
        return channels
    }
}

func expectPeerError(_ result: () throws -> DestinationReport, contains text: String) {
    do {
        _ = try result()
        Issue.record("the engine accepted a hostile peer")
    } catch {
        #expect("\(error)".contains(text), "error was: \(error)")
    }
}

@Suite(.serialized, .tier(.linux)) struct HostilePeerTests {
    @Test func garbageInsteadOfAHelloIsRejected() throws {
        let fixture = try DestinationFixture()
        let run = fixture.run()
        let fd = try TCP.connect(to: fixture.endpoint, timeoutMillis: 5000)
        var garbage = [UInt8](repeating: 0, count: 64)
        for i in garbage.indices { garbage[i] = UInt8.random(in: 0...255) }
        garbage[0] = 0x00  // never the magic
        try garbage.withUnsafeBytes { try TCP.sendAll(fd.rawValue, $0) }
        expectPeerError({ try run.value() }, contains: "bad magic")
    }

    @Test func aPageOutsideTheRegionIsRejected() throws {
        let fixture = try DestinationFixture()
        let run = fixture.run()
        let channels = try fixture.handshake()
        // A well-formed frame whose run points past the region's last page.
        let outside = PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: fixture.pages + 5), count: 1))
        let data = try PageData(requestID: 0, runs: outside, bytes: [UInt8](repeating: 7, count: 4096))
        try channels[.bulk]!.send(.pageData(data))
        expectPeerError({ try run.value() }, contains: "out of range")
        // Nothing was placed.
        #expect(fixture.engine.pages.presentCount == 0)
    }

    @Test func aTruncatedFrameEndsTheSessionWithAnError() throws {
        let fixture = try DestinationFixture()
        let run = fixture.run()
        let channels = try fixture.handshake()
        let data = try PageData(requestID: 0, runs: PageSet(try PageRange(start: PageIndex(rawValue: 3), count: 2)),
                                bytes: [UInt8](repeating: 1, count: 8192))
        let frame = PeerMessage.pageData(data).encodedFrame()
        try frame.prefix(100).withUnsafeBytes { try TCP.sendAll(channels[.bulk]!.descriptor.rawValue, $0) }
        shutdown(channels[.bulk]!.descriptor.rawValue, Int32(SHUT_WR))
        expectPeerError({ try run.value() }, contains: "closed")
        #expect(fixture.engine.pages.presentCount == 0)
    }

    @Test func aCorruptedPageFrameIsRejectedByItsChecksum() throws {
        let fixture = try DestinationFixture()
        let run = fixture.run()
        let channels = try fixture.handshake()
        let data = try PageData(requestID: 0, runs: PageSet(try PageRange(start: PageIndex(rawValue: 3), count: 1)),
                                bytes: [UInt8](repeating: 1, count: 4096))
        var frame = PeerMessage.pageData(data).encodedFrame()
        frame[frame.count - 100] ^= 0x40  // one flipped bit in the page contents
        try frame.withUnsafeBytes { try TCP.sendAll(channels[.bulk]!.descriptor.rawValue, $0) }
        expectPeerError({ try run.value() }, contains: "checksum")
        #expect(fixture.engine.pages.presentCount == 0)
    }

    @Test func aWrongSessionIsRefusedAtTheHandshake() throws {
        let fixture = try DestinationFixture()
        let run = fixture.run()
        let fd = try TCP.connect(to: fixture.endpoint, timeoutMillis: 5000)
        let connection = PeerChannel(descriptor: fd, channel: .control,
                                        context: PeerDecodeContext(regionPages: fixture.pages))
        try connection.send(.hello(PeerHello(role: .source, channel: 1, sessionID: 12345, vmName: "other",
                                              regionPages: fixture.pages, nonce: .random())))
        guard case .abort(let abort) = try connection.receive(timeoutMillis: 5000) else {
            Issue.record("expected an abort")
            return
        }
        #expect(abort.reason.contains("does not match"))
        expectPeerError({ try run.value() }, contains: "does not match")
    }

    @Test func aSourceRejectsAnAckOutsideTheRegion() throws {
        let pages: UInt64 = 256
        let file = try TestRAMFile("hostile-src", size: Int(pages * 4096))
        try file.fillPattern(seed: 1, holes: PageSet())
        let listener = try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = listener.endpoint
        let box = ListenerBox(listener)
        // A fake destination: welcomes all three channels, then acknowledges a page that does not exist.
        let fake = Background("fake-dst") { () -> Int in
            var connections: [PeerChannel] = []
            for _ in 0..<3 {
                let fd = try TCP.accept(box.listener, timeoutMillis: 5000)
                let c = PeerChannel(descriptor: fd, channel: .control, context: PeerDecodeContext(regionPages: pages))
                guard case .hello(let hello) = try c.receive(timeoutMillis: 5000) else { return 1 }
                try c.send(.welcome(PeerWelcome(version: 1, sessionID: hello.sessionID)))
                c.channel = PeerChannelKind(rawValue: hello.channel)!
                connections.append(c)
            }
            let control = connections.first { $0.channel == .control }!
            try control.send(.resume(PeerResume(sessionID: 5, present: PageSet())))
            var w = ByteWriter()
            PageSetCodec.encode(PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: 1_000_000), count: 1)),
                                form: .ranges, into: &w)
            let frame = encodeFrame(link: .peer, type: PeerMessage.Kind.ack.rawValue, payload: w.bytes)
            try frame.withUnsafeBytes { try TCP.sendAll(control.descriptor.rawValue, $0) }
            // Hold every channel open until the source, having refused the ack, closes the control channel.
            var scratch = [UInt8](repeating: 0, count: 4096)
            let closed = waitUntil(deadline: .seconds(10)) {
                let n = recv(control.descriptor.rawValue, &scratch, scratch.count, Int32(MSG_DONTWAIT))
                return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            }
            return closed ? connections.count : 0
        }
        let engine = try SourceEngine(ramFile: file.path, options: SourceOptions(sessionID: 5, vmName: "t",
                                                                                releaseMemory: false))
        do {
            _ = try engine.run(destination: endpoint)
            Issue.record("the source accepted an ack for a page outside the region")
        } catch {
            #expect("\(error)".contains("out of range"), "error was: \(error)")
        }
        #expect(try fake.value() == 3, "the source did not close the control channel after refusing the ack")
    }
}
