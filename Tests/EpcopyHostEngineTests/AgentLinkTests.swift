// The host end of the agent port against agents that lie, babble, flood, stall or hang up — Firecracker's
// malicious_handler idea applied to the guest agent. The fake agents listen on a unix socket exactly as QEMU's
// chardev does; QEMU's virtio-serial passes a guest's bytes through unchanged, so these are the bytes a hostile
// guest could make the engine read. The honest one runs the real agent's code over fixture /proc files.

import CEpcopyLinux
import EpcopyGuestAgent
import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

/// A fake agent: accepts one connection on a fresh socket path and hands it to `behave`.
final class FakeAgent: @unchecked Sendable {
    let path: String
    private let listenFD: Int32
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    init(path: String? = nil, _ behave: @escaping @Sendable (Int32) -> Void) throws {
        self.path = path ?? "/tmp/epcopy-fake-agent-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        unlink(self.path)
        listenFD = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        var length: UInt32 = 0
        try #require(epc_unix_address(self.path, &addr, &length) == 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listenFD, $0, socklen_t(length)) }
        }
        try #require(bound == 0 && listen(listenFD, 1) == 0)
        let (fd, sem) = (listenFD, done)
        let t = Thread {
            let conn = accept(fd, nil, nil)
            if conn >= 0 {
                behave(conn)
                close(conn)
            }
            sem.signal()
        }
        t.start()
        thread = t
    }

    /// Waits until the fake has served its connection and closed it (true), or `seconds` pass (false).
    func waitServed(seconds: Double) -> Bool {
        guard done.wait(timeout: .now() + seconds) == .success else { return false }
        done.signal()  // `finish` waits for the same signal
        return true
    }

    func finish() {
        shutdown(listenFD, Int32(SHUT_RDWR))
        _ = done.wait(timeout: .now() + 10)
        close(listenFD)
        unlink(path)
    }

    /// Reads host frames from `fd` and calls `body` with each decoded message until the host hangs up.
    static func serve(_ fd: Int32, _ body: (AgentMessage) -> Void) {
        var decoder = FrameDecoder(link: .agent)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { return }
            decoder.append(buffer[..<n])
            while let frame = try? decoder.next() {
                if let message = try? AgentMessage.decode(frame: frame, context: AgentDecodeContext()) { body(message) }
            }
        }
    }

    static func write(_ fd: Int32, _ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }
}

@Suite(.serialized, .tier(.linux)) struct AgentLinkTests {
    /// A 4 MiB guest: RAM at frames 1..<0x9f and 0x100..<0x400, as /proc/iomem of the fixture says.
    static let layout = GuestRAMLayout(regionPages: 0x400)

    static func fixture() throws -> (CollectorSources, String) {
        let dir = "/tmp/epcopy-agentlink-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
            00000000-00000fff : Reserved
            00001000-0009fbff : System RAM
            000f0000-000fffff : System ROM
            00100000-003fffff : System RAM
            """.write(toFile: "\(dir)/iomem", atomically: true, encoding: .utf8)
        var words = [UInt64](repeating: KPageFlags([.lru, .anon]).rawValue, count: 0x400)
        for f in 0x200..<0x300 { words[f] = KPageFlags.buddy.rawValue }
        for f in 0x100..<0x120 { words[f] = KPageFlags.slab.rawValue }
        for f in 0x120..<0x140 { words[f] = KPageFlags([.lru, .active]).rawValue }
        try words.withUnsafeBytes { try Data($0).write(to: URL(fileURLWithPath: "\(dir)/kpageflags")) }
        return (CollectorSources(iomem: "\(dir)/iomem", kpageflags: "\(dir)/kpageflags", pageIdle: "\(dir)/none"), dir)
    }

    /// The real agent's answers, optionally mangled on the way out.
    static func honest(_ sources: CollectorSources, mangle: @escaping @Sendable ([UInt8]) -> [[UInt8]] = { [$0] })
        -> @Sendable (Int32) -> Void {
        { fd in
            var config = AgentConfig()
            config.sources = sources
            let service = AgentService(config: config, log: { _ in })
            FakeAgent.serve(fd) { message in
                for reply in service.respond(to: message) {
                    for piece in mangle(reply.encodedFrame()) { FakeAgent.write(fd, piece) }
                }
            }
        }
    }

    @Test func honestAgentReportsClassesAndFreePages() throws {
        let (sources, dir) = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let agent = try FakeAgent(Self.honest(sources))
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        let hello = try link.hello(timeoutMillis: 2000)
        #expect(hello.pageSize == 4096)
        let (report, pages) = try link.hotReport(windowMillis: 0, timeoutMillis: 2000)
        #expect(report.ramMap.count == 0x9e + 0x300)
        let byClass = Dictionary(uniqueKeysWithValues: pages.map { ($0.0, $0.1) })
        #expect(byClass[.believedFree] == PageSet(try PageRange(start: PageIndex(rawValue: 0x200), count: 0x100)))
        #expect(byClass[.kernel]?.count == 0x20)
        #expect(byClass[.recent]?.count == 0x20)
        let (_, free) = try link.freeAfterResume(sequence: 42, timeoutMillis: 2000)
        #expect(free == PageSet(try PageRange(start: PageIndex(rawValue: 0x200), count: 0x100)))
        #expect(link.complaints.isEmpty)
    }

    @Test func garbageBetweenFramesIsSkipped() throws {
        let (sources, dir) = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let agent = try FakeAgent(Self.honest(sources) { frame in
            var noise = (0..<3000).map { _ in UInt8.random(in: 0...255) }
            noise += Array(frame.prefix(9))  // a torn frame: a magic followed by nonsense
            return [noise, frame]
        })
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        _ = try link.hello(timeoutMillis: 2000)
        let (_, free) = try link.freeAfterResume(sequence: 1, timeoutMillis: 2000)
        #expect(free.count == 0x100)
        #expect(!link.complaints.isEmpty)
    }

    @Test func oneByteAtATimeStillWorks() throws {
        let (sources, dir) = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let agent = try FakeAgent(Self.honest(sources) { frame in frame.map { [$0] } })
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        let (_, pages) = try link.hotReport(windowMillis: 0, timeoutMillis: 5000)
        #expect(pages.reduce(0) { $0 + $1.1.count } == 0x9e + 0x300)
    }

    @Test func silentAgentTimesOutOnTime() throws {
        let agent = try FakeAgent { fd in FakeAgent.serve(fd) { _ in } }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        let start = Date()
        #expect(throws: AgentLinkError.timeout(waitingFor: "agentHello", millis: 300)) {
            try link.hello(timeoutMillis: 300)
        }
        #expect(Date().timeIntervalSince(start) < 2)
    }

    @Test func floodOfMessagesIsCutOff() throws {
        let agent = try FakeAgent { fd in
            let pong = AgentMessage.pong(nonce: 7).encodedFrame()
            let burst = Array((0..<512).map { _ in pong }.joined())
            for _ in 0..<64 { FakeAgent.write(fd, burst) }
            FakeAgent.serve(fd) { _ in }
        }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        #expect {
            try link.hello(timeoutMillis: 5000)
        } throws: { error in
            guard case AgentLinkError.flood = error else { return false }
            return true
        }
    }

    @Test func endlessAndOversizedFramesAreBounded() throws {
        let agent = try FakeAgent { fd in
            // A header promising 1 GiB (refused at once), then one promising 8 MiB that never arrives.
            var huge = encodeFrameHeader(link: .agent, type: AgentMessage.Kind.freeReport.rawValue,
                                         payloadLength: 1 << 30) { $0 }
            huge += encodeFrameHeader(link: .agent, type: AgentMessage.Kind.freeReport.rawValue,
                                      payloadLength: 8 << 20) { $0 }
            FakeAgent.write(fd, huge)
            // A trickling sender, paced on purpose: 100 bytes every 50 ms keeps the link busy for 1 s.
            for _ in 0..<20 {
                FakeAgent.write(fd, [UInt8](repeating: 0xAB, count: 100))
                usleep(50_000)
            }
            FakeAgent.serve(fd) { _ in }
        }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        let start = Date()
        #expect(throws: AgentLinkError.self) { try link.freeAfterResume(sequence: 3, timeoutMillis: 500) }
        #expect(Date().timeIntervalSince(start) < 2)
        #expect(link.complaints.contains { $0.contains("skipping") })
    }

    @Test func reportsReachingPastRAMAreRefused() throws {
        let agent = try FakeAgent { fd in
            FakeAgent.serve(fd) { message in
                guard case .vmResumed(let r) = message else { return }
                let id = UInt32(truncatingIfNeeded: r.sequence)
                // First a report naming frames far past the guest's RAM: refused whole. Then a stale answer to
                // another request: ignored. Then a truthful one.
                var lie = PageSet<GuestFrameNumber>(try! PageRange(start: GuestFrameNumber(rawValue: 0x300), count: 0x80))
                lie.insert(try! PageRange(start: GuestFrameNumber(rawValue: 1 << 30), count: 5))
                let truth = PageSet<GuestFrameNumber>(try! PageRange(start: GuestFrameNumber(rawValue: 0x300), count: 0x80))
                FakeAgent.write(fd, AgentMessage.freeReport(FreeReport(requestID: id, scanMicros: 1, free: lie)).encodedFrame())
                FakeAgent.write(fd, AgentMessage.freeReport(FreeReport(requestID: id &+ 1, scanMicros: 1, free: truth)).encodedFrame())
                FakeAgent.write(fd, AgentMessage.freeReport(FreeReport(requestID: id, scanMicros: 1, free: truth)).encodedFrame())
            }
        }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        let (_, free) = try link.freeAfterResume(sequence: 77, timeoutMillis: 2000)
        #expect(free == PageSet(try PageRange(start: PageIndex(rawValue: 0x300), count: 0x80)))
        #expect(link.complaints.contains { $0.contains("rejected") })
    }

    @Test func overlappingClassesAndErrorsAreRejected() throws {
        let agent = try FakeAgent { fd in
            FakeAgent.serve(fd) { message in
                guard case .reportRequest(let r) = message else { return }
                // A hand-built hot report whose classes overlap: the decoder must refuse it.
                var w = ByteWriter()
                w.writeU32(r.requestID); w.writeU32(0); w.writeU64(1)
                let ram = PageSet<GuestFrameNumber>(try! PageRange(start: GuestFrameNumber(rawValue: 0x100), count: 0x100))
                PageSetCodec.encode(ram, into: &w)
                w.writeU8(2)
                w.writeU8(PageClass.kernel.rawValue); PageSetCodec.encode(ram, into: &w)
                w.writeU8(PageClass.believedFree.rawValue); PageSetCodec.encode(ram, into: &w)
                FakeAgent.write(fd, encodeFrame(link: .agent, type: AgentMessage.Kind.hotReport.rawValue, payload: w.bytes))
                FakeAgent.write(fd, AgentMessage.agentError(AgentErrorReport(code: 9, message: "I am lying")).encodedFrame())
            }
        }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        #expect(throws: AgentLinkError.agentFailed(code: 9, message: "I am lying")) {
            try link.hotReport(windowMillis: 0, timeoutMillis: 500)
        }
        #expect(link.complaints.contains { $0.contains("overlaps") })
    }

    @Test func hangUpIsReported() throws {
        let agent = try FakeAgent { _ in }
        defer { agent.finish() }
        let link = try AgentLink(socketPath: agent.path, layout: Self.layout)
        try #require(agent.waitServed(seconds: 10), "the fake agent did not hang up")
        #expect(throws: AgentLinkError.self) { try link.hello(timeoutMillis: 2000) }
    }

    @Test func noSocketIsAClearError() {
        #expect(throws: AgentLinkError.self) { try AgentLink(socketPath: "/nonexistent/agent.sock", layout: Self.layout) }
    }

    @Test func q35LayoutMapsFramesAroundThePCIHole() throws {
        let big = GuestRAMLayout(regionPages: 3584 << 8)  // 3.5 GiB: 2 GiB low, 1.5 GiB from 4 GiB up
        #expect(big.pageIndex(GuestFrameNumber(rawValue: 0x7FFFF)) == PageIndex(rawValue: 0x7FFFF))
        #expect(big.pageIndex(GuestFrameNumber(rawValue: 0x80000)) == nil)
        #expect(big.pageIndex(GuestFrameNumber(rawValue: 0x100000)) == PageIndex(rawValue: 0x80000))
        #expect(big.frameLimit == 0x100000 + 0x60000)
        let span = PageSet<GuestFrameNumber>(try PageRange(start: GuestFrameNumber(rawValue: 0x7FFF0), count: 0x80020))
        let (pages, outside) = big.pages(span)
        // 0x10 frames below the hole, 0x10 from 4 GiB up: adjacent in the file.
        #expect(pages == PageSet(try PageRange(start: PageIndex(rawValue: 0x7FFF0), count: 0x20)))
        #expect(outside == 0x80020 - 0x20)
    }
}
