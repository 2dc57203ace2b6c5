// Link loss after the switch, between two real engines over a real relay (CuttableLink): the relay resets
// every connection, or black-holes them (nothing moves, nobody is told), in the middle of the push. The
// engines must notice by themselves (an error, or keepalive silence), reconnect, resume from what the
// destination has, and finish with every page intact; a guest thread that faults on a missing page during
// the outage must wait for it — never read a zero page — and then read the source's content.

import CEpcopyLinux
import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Synchronization
import Testing

@Suite(.serialized, .tier(.linux)) struct LinkLossTests {
    /// One failure of the link, at a fraction of the pages present.
    enum Cut: CustomStringConvertible, Sendable {
        case reset(at: Double)
        case blackHole(at: Double, for: Duration)
        /// A black hole, then a reset of the connections the source opens to recover from it.
        case blackHoleThenResetDuringRecovery(at: Double, for: Duration)

        var description: String {
            switch self {
            case .reset(let f): "reset at \(Int(f * 100)) %"
            case .blackHole(let f, let d): "black hole at \(Int(f * 100)) % for \(d)"
            case .blackHoleThenResetDuringRecovery(let f, let d): "black hole at \(Int(f * 100)) % for \(d), reset in recovery"
            }
        }
    }

    static let pages: UInt64 = 16384  // 64 MiB
    /// Faster than the engines' defaults, so a test's outage is seconds; the mechanism is the same.
    static let keepalive = KeepaliveSpec(intervalMillis: 100, timeoutMillis: 800)

    @Test(arguments: [Cut.reset(at: 0.3), .blackHole(at: 0.4, for: .milliseconds(2500)),
                      .blackHoleThenResetDuringRecovery(at: 0.3, for: .milliseconds(1500))])
    func theTransferSurvivesACut(_ cut: Cut) throws {
        let pages = Self.pages
        let seed: UInt64 = 0x11AC
        let holes = PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: 500), count: 300))
        let source = try TestRAMFile("src-cut", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: holes)
        let target = try TestRAMFile("dst-cut", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        var destinationOptions = DestinationOptions(sessionID: 21)
        destinationOptions.reconnectTimeoutMillis = 30_000
        destinationOptions.keepalive = Self.keepalive
        let destination = DestinationEngine(memory: memory, options: destinationOptions)
        let base = try #require(destination.ownMappingAddress)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let link = try CuttableLink(to: listenerBox.listener.endpoint)
        defer { link.stop() }
        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        // 40 MB/s: the push takes about 1.7 s, so the cut lands in its middle.
        var sourceOptions = SourceOptions(sessionID: 21, vmName: "cut", link: LinkSpec(bytesPerSecond: 40_000_000),
                                          reconnectTimeoutMillis: 30_000)
        sourceOptions.keepalive = Self.keepalive
        let engine = try SourceEngine(ramFile: source.path, options: sourceOptions)
        let linkEndpoint = link.endpoint
        let src = Background("src") { try engine.run(destination: linkEndpoint) }

        let fraction: Double
        switch cut {
        case .reset(let f), .blackHole(let f, _), .blackHoleThenResetDuringRecovery(let f, _): fraction = f
        }
        try #require(waitUntil(deadline: .seconds(30), poll: .milliseconds(1)) {
            Double(destination.pages.presentCount) >= Double(pages) * fraction
        }, "the push did not reach \(fraction)")
        // The guest's view: the last 64 pages are not here yet; a thread reads them during the outage.
        let tail = (pages - 64)..<pages
        var toucher: Background<UInt64>?
        switch cut {
        case .reset:
            link.reset()
        case .blackHole(_, let outage), .blackHoleThenResetDuringRecovery(_, let outage):
            link.blackHole()
            let touched = Background("touch") { () -> UInt64 in
                var bad: UInt64 = 0
                for page in tail where epc_pattern_check(UnsafeRawPointer(bitPattern: base + UInt(page * 4096))!,
                                                         page, 1, seed) >= 0 {
                    bad += 1
                }
                return bad
            }
            toucher = touched
            // The engines must see the silence by themselves.
            #expect(waitUntil(deadline: .seconds(10)) { engine.link.downFor != nil && destination.link.downFor != nil },
                    "an engine did not notice the black hole")
            // Faults on missing pages wait: the event that would prove it wrong is one of them being resolved.
            #expect(!waitUntil(deadline: outage) { tail.contains { destination.pages.isPresent(PageIndex(rawValue: $0)) } },
                    "a page was placed while the link was down")
            let before = link.connections
            link.restore()
            if case .blackHoleThenResetDuringRecovery = cut {
                try #require(waitUntil(deadline: .seconds(10), poll: .milliseconds(1)) { link.connections > before },
                             "the source did not reconnect")
                link.reset()
            }
        }
        let dstReport = try dst.value()
        let srcReport = try src.value()
        if let toucher { #expect(try toucher.value() == 0, "a faulting thread read something else than the source's page") }

        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed, zero: holes)
        #expect(comparison.mismatchedPages == 0, "\(cut): mismatched pages \(comparison.firstMismatches)")
        #expect(srcReport.reconnects >= 1 && dstReport.linkLosses >= 1,
                "\(cut): source reconnects \(srcReport.reconnects), destination losses \(dstReport.linkLosses)")
        #expect(engine.link.downFor == nil && destination.link.downFor == nil)
        // The destination said what it had: pages that landed before the cut were not sent again. What was in
        // flight may be: socket buffers on three hops (source, relay both ways, destination), each autotuned up
        // to several MiB — 32 MiB per loss bounds it (seen: 16.2 MiB in a black hole then reset).
        #expect(srcReport.pagesPresentAtResume >= UInt64(Double(pages) * fraction),
                "resume said \(srcReport.pagesPresentAtResume) pages")
        let sent = srcReport.pagesPushed + srcReport.pagesUrgent
        #expect(sent <= pages - holes.count + 8192 * UInt64(srcReport.reconnects), "\(cut): \(sent) pages sent")
        #expect(srcReport.pausedMillis > 0 && dstReport.pausedMillis > 0)
        #expect(source.allocatedBytes == 0, "the source still holds \(source.allocatedBytes) bytes")
        withExtendedLifetime(targetFD) {}
    }

    /// Without a reconnect deadline a lost link ends the transfer at once, with an error that says so — the
    /// behaviour a caller that cannot recover (a test harness, a one-shot copy) asks for.
    @Test func withoutAReconnectDeadlineALostLinkFailsPlainly() throws {
        let pages: UInt64 = 4096
        let source = try TestRAMFile("src-nocut", size: Int(pages * 4096))
        try source.fillPattern(seed: 3, holes: PageSet())
        let target = try TestRAMFile("dst-nocut", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        var destinationOptions = DestinationOptions(sessionID: 22)
        destinationOptions.keepalive = Self.keepalive
        destinationOptions.unregisterWhenDone = false
        let destination = DestinationEngine(memory: memory, options: destinationOptions)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let link = try CuttableLink(to: listenerBox.listener.endpoint)
        defer { link.stop() }
        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        var sourceOptions = SourceOptions(sessionID: 22, vmName: "nocut", link: LinkSpec(bytesPerSecond: 8_000_000))
        sourceOptions.keepalive = Self.keepalive
        let engine = try SourceEngine(ramFile: source.path, options: sourceOptions)
        let linkEndpoint = link.endpoint
        let src = Background("src") { try engine.run(destination: linkEndpoint) }
        try #require(waitUntil(deadline: .seconds(30)) { destination.pages.presentCount > 256 })
        link.blackHole()
        #expect { try src.value() } throws: { error in
            guard let peer = error as? PeerError, case .silent = peer else { return false }
            return "\(peer)".contains("nothing heard from the peer")
        }
        #expect { try dst.value() } throws: { error in (error as? PeerError)?.isConnectionLoss == true }
        withExtendedLifetime(targetFD) {}
    }
}
