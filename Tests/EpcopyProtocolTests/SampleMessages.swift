// A corpus with every message case of both links and non-trivial contents, shared by the round-trip, framing and
// fuzz tests so that each of them covers every message type.

import EpcopyProtocol
import Testing

/// Decode context used with the sample peer messages: a 4 GiB region.
let samplePeerContext = PeerDecodeContext(regionPages: 1 << 20)
/// Decode context used with the sample agent messages.
let sampleAgentContext = AgentDecodeContext()

/// Every other page of `count` pages from `start`: a set the encoder sends as a bitmap.
func alternatingPages<Unit: PageNumber>(_ unit: Unit.Type, from start: UInt64, count: UInt64) -> PageSet<Unit> {
    PageSet(pages: stride(from: start, to: start + count, by: 2).map { Unit(rawValue: $0) })
}

/// At least one message of every peer kind. `pageDataPages` keeps fuzz corpora small.
func samplePeerMessages(pageDataPages: UInt64 = 3) throws -> [PeerMessage] {
    let dataRuns = pageSet([(5, 1), (9, pageDataPages - 1)].filter { $0.1 > 0 })
    return [
        .hello(try PeerHello(role: .source, sessionID: 0xDEAD_BEEF_0000_0001, vmName: "vm-01.prod_a",
                             regionPages: 1 << 20, nonce: bytes32(seed: 1))),
        .hello(try PeerHello(role: .destination, versions: 1...3, sessionID: 2,
                             vmName: String(repeating: "x", count: 256), regionPages: PeerHello.maxRegionPages,
                             nonce: bytes32(seed: 2))),
        .authChallenge(nonce: bytes32(seed: 3)),
        .authResponse(mac: bytes32(seed: 4)),
        .welcome(try PeerWelcome(version: 1, sessionID: 0xDEAD_BEEF_0000_0001)),
        .pageRequest(try PageRequest(requestID: 7, pages: pageSet([(5, 1), (100, 3), (1 << 19, 16)]))),
        .pageRequest(try PageRequest(requestID: .max, pages: alternatingPages(PageIndex.self, from: 64, count: 100))),
        .pageData(try PageData(requestID: 7, runs: dataRuns,
                               bytes: patternBytes(count: Int(dataRuns.count) * 4096, seed: 5))),
        .pageData(try PageData(requestID: 0, runs: pageSet([((1 << 20) - 1, 1)]),
                               bytes: patternBytes(count: 4096, seed: 6))),
        .zeroPages(pageSet([(0, 100), (200, 50), (70_000, 1)])),
        .zeroPages(alternatingPages(PageIndex.self, from: 1000, count: 300)),
        .freePages(pageSet([(17, 4000), (900_000, 2)])),
        .ack(pageSet([(5, 1), (9, 2)])),
        .ack(PageSet()),
        .progress(try PeerProgress(pagesPresent: 1000, pagesTotal: 1 << 20, bytesReceived: 4_096_000, faults: 17)),
        .done(PeerDone(pagesSent: 1 << 20, bytesSent: 1 << 32)),
        .abort(PeerAbort(code: 3, reason: "destination disk full: ünïcødé ✓")),
        .resume(PeerResume(sessionID: 0xDEAD_BEEF_0000_0001, present: pageSet([(0, 500), (600, 10)]))),
        .resume(PeerResume(sessionID: 9, present: PageSet())),
        .freeScanDone(agentAnswered: true, pagesReported: 12_345),
        .freeScanDone(agentAnswered: false, pagesReported: 0),
        .keepalive,
    ]
}

/// At least one message of every agent kind.
func sampleAgentMessages() throws -> [AgentMessage] {
    let ram = frameSet([(0, 0xA0), (0x100, 0x7_FF00), (0x10_0000, 0x4_0000)])
    return [
        .agentHello(try AgentHello(agentVersion: "epcopy-agent 1.2.3", kernelRelease: "6.8.0-45-generic")),
        .agentHello(try AgentHello(versions: 1...2, agentVersion: "",
                                   kernelRelease: String(repeating: "k", count: 128))),
        .hostHello(try HostHello(version: 1)),
        .reportRequest(try ReportRequest(requestID: 11, kind: .hot, windowMillis: 250)),
        .reportRequest(try ReportRequest(requestID: 12, kind: .free, windowMillis: 0)),
        .hotReport(try HotReport(
            requestID: 11, windowMillis: 250, collectMicros: 12_345, ramMap: ram,
            classes: [
                ClassifiedPages(.kernel, frameSet([(0x100, 0x2000)])),
                ClassifiedPages(.recent, alternatingPages(GuestFrameNumber.self, from: 0x3000, count: 200)),
                ClassifiedPages(.inUse, frameSet([(0x5000, 0x1000), (0x10_0000, 16)])),
                ClassifiedPages(.believedFree, frameSet([(0x7_0000, 0x100)])),
            ])),
        .hotReport(try HotReport(requestID: 13, windowMillis: 0, collectMicros: 0, ramMap: frameSet([(0, 1)]),
                                 classes: [])),
        .vmResumed(VMResumed(sequence: 2)),
        .freeReport(FreeReport(requestID: 12, scanMicros: 999, free: frameSet([(0x200, 0x300), (0x9000, 1)]))),
        .freeReport(FreeReport(requestID: 14, scanMicros: 1, free: alternatingPages(GuestFrameNumber.self,
                                                                                     from: 0x4000, count: 64))),
        .agentError(AgentErrorReport(code: 5, message: "cannot open /proc/kpageflags: EPERM")),
        .ping(nonce: 0x0123_4567_89AB_CDEF),
        .pong(nonce: 0x0123_4567_89AB_CDEF),
    ]
}
