// Agent-link messages: every case round-trips, and the checks that keep a compromised guest from feeding the engine
// nonsense (frames beyond the limit, classes outside RAM, overlapping or duplicated classes) report exact errors.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

private func decodeAgent(_ kind: AgentMessage.Kind, _ payload: [UInt8],
                         context: AgentDecodeContext = sampleAgentContext) throws -> AgentMessage {
    try AgentMessage.decode(type: kind.rawValue, payload: payload, context: context)
}

private let name = "agent message "

/// Hot-report payload with the given RAM map and raw class entries, in wire order.
private func hotReportPayload(ramMap: PageSet<GuestFrameNumber>,
                              classes: [(UInt8, PageSet<GuestFrameNumber>)]) -> [UInt8] {
    var writer = ByteWriter()
    writer.writeU32(1)
    writer.writeU32(100)
    writer.writeU64(5)
    PageSetCodec.encode(ramMap, into: &writer)
    writer.writeU8(UInt8(classes.count))
    for (code, pages) in classes {
        writer.writeU8(code)
        PageSetCodec.encode(pages, into: &writer)
    }
    return writer.bytes
}

@Suite(.tier(.unit)) struct AgentMessageTests {
    @Test func everyCaseRoundTripsThroughAFrame() throws {
        let messages = try sampleAgentMessages()
        #expect(Set(messages.map(\.kind)) == Set(AgentMessage.Kind.allCases))
        for message in messages {
            let bytes = message.encodedFrame()
            let frame = try decodeFrame(bytes: bytes, link: .agent)
            let decoded = try AgentMessage.decode(frame: frame, context: sampleAgentContext)
            #expect(decoded == message, "\(message.kind)")
            #expect(decoded.encodedFrame() == bytes, "\(message.kind)")
        }
    }

    @Test func typeCodesAreStable() {
        let codes = AgentMessage.Kind.allCases.map { "\($0)=\($0.rawValue)" }
        #expect(codes == ["agentHello=1", "hostHello=2", "reportRequest=3", "hotReport=4", "vmResumed=5",
                          "freeReport=6", "agentError=7", "ping=8", "pong=9"])
        #expect(PageClass.allCases.map(\.rawValue) == [1, 2, 3, 4])
        #expect(PageClass.kernel < PageClass.believedFree)
    }

    @Test func hotReportClassesMustBeDisjointWithinRAMAndUnique() throws {
        let ram = frameSet([(0, 1000)])
        let kernel = frameSet([(0, 100)])
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classes",
                                                   reason: "class recent overlaps class kernel")) {
            try decodeAgent(.hotReport, hotReportPayload(ramMap: ram, classes: [(1, kernel), (2, frameSet([(99, 5)]))]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classes",
                                                   reason: "class inUse is not within ramMap")) {
            try decodeAgent(.hotReport, hotReportPayload(ramMap: ram, classes: [(3, frameSet([(990, 20)]))]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classes",
                                                   reason: "class kernel appears twice")) {
            try decodeAgent(.hotReport,
                            hotReportPayload(ramMap: ram, classes: [(1, kernel), (1, frameSet([(500, 1)]))]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classes",
                                                   reason: "unknown page class 5")) {
            try decodeAgent(.hotReport, hotReportPayload(ramMap: ram, classes: [(5, kernel)]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classCount",
                                                   reason: "5 classes, at most 4 exist")) {
            try decodeAgent(.hotReport, hotReportPayload(ramMap: ram, classes: Array(repeating: (1, kernel), count: 5)))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "ramMap", reason: "empty")) {
            try decodeAgent(.hotReport, hotReportPayload(ramMap: PageSet(), classes: []))
        }
        // Construction applies the same rules, naming both classes.
        #expect(throws: ProtocolError.invalidField(message: name + "hotReport", field: "classes",
                                                   reason: "class believedFree overlaps class inUse")) {
            try HotReport(requestID: 1, windowMillis: 1, collectMicros: 1, ramMap: ram,
                          classes: [ClassifiedPages(.believedFree, frameSet([(10, 1)])),
                                    ClassifiedPages(.inUse, frameSet([(5, 10)]))])
        }
        // Classes may arrive in any order; they are stored highest priority first.
        let shuffled = try decodeAgent(.hotReport, hotReportPayload(
            ramMap: ram, classes: [(4, frameSet([(900, 10)])), (1, kernel)]))
        guard case .hotReport(let report) = shuffled else {
            Issue.record("decoded \(shuffled)")
            return
        }
        #expect(report.classes.map(\.pageClass) == [.kernel, .believedFree])
        #expect(report.pages(of: .kernel) == kernel && report.pages(of: .recent) == nil)
    }

    @Test func framesAndRangeCountsAreLimited() throws {
        let context = AgentDecodeContext(maxFrame: 1 << 20, maxRAMRanges: 2)
        let report = hotReportPayload(ramMap: frameSet([(0, 10), ((1 << 20) - 1, 2)]), classes: [])
        #expect(caught { try decodeAgent(.hotReport, report, context: context) }
            == .inField(message: name + "hotReport", field: "ramMap",
                        underlying: .pageOutOfRange(page: 1 << 20, limit: 1 << 20)))
        let fragmented = hotReportPayload(ramMap: frameSet([(0, 1), (5, 1), (9, 1)]), classes: [])
        #expect(caught { try decodeAgent(.hotReport, fragmented, context: context) }?.rootCause
            == .tooManyItems(what: "ranges", count: 3, limit: 2))
        let free = AgentMessage.freeReport(FreeReport(requestID: 1, scanMicros: 1, free: frameSet([(1 << 36, 1)])))
        #expect(caught { try decodeAgent(.freeReport, free.encodedPayload()) }?.rootCause
            == .pageOutOfRange(page: 1 << 36, limit: 1 << 36))
    }

    @Test func requestHelloAndErrorValidation() throws {
        #expect(throws: ProtocolError.invalidField(message: name + "reportRequest", field: "kind",
                                                   reason: "unknown report kind 3")) {
            try decodeAgent(.reportRequest, littleEndian(UInt32(1)) + [3] + littleEndian(UInt32(10)))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "reportRequest", field: "windowMillis",
                                                   reason: "60001 ms, at most 60000 allowed")) {
            try decodeAgent(.reportRequest, littleEndian(UInt32(1)) + [1] + littleEndian(UInt32(60_001)))
        }
        var hello = ByteWriter()
        hello.writeBytes([1, 1])
        hello.writeString("agent", maxLength: 64)
        hello.writeString("6.1", maxLength: 128)
        hello.writeU32(65536)
        #expect(throws: ProtocolError.invalidField(message: name + "agentHello", field: "pageSize",
                                                   reason: "65536, only 4096 is supported")) {
            try decodeAgent(.agentHello, hello.bytes)
        }
        #expect(throws: ProtocolError.inField(message: name + "agentHello", field: "agentVersion",
                                              underlying: .stringTooLong(length: 65, limit: 64))) {
            try AgentHello(agentVersion: String(repeating: "v", count: 65), kernelRelease: "6.1")
        }
        #expect(throws: ProtocolError.inField(message: name + "agentHello", field: "kernelRelease",
                                              underlying: .invalidUTF8)) {
            try decodeAgent(.agentHello, [1, 1, 0, 2, 0xC0, 0x80] + littleEndian(UInt32(4096)))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hostHello", field: "version",
                                                   reason: "version 0 does not exist")) {
            try decodeAgent(.hostHello, [0])
        }
        var error = ByteWriter()
        error.writeU16(1)
        error.writeVarint(513)
        error.writeBytes([UInt8](repeating: 0x61, count: 513))
        #expect(throws: ProtocolError.inField(message: name + "agentError", field: "message",
                                              underlying: .stringTooLong(length: 513, limit: 512))) {
            try decodeAgent(.agentError, error.bytes)
        }
        #expect(AgentErrorReport(code: 1, message: String(repeating: "€", count: 200)).message.utf8.count == 510)
        #expect(throws: ProtocolError.trailingBytes(count: 1)) {
            try decodeAgent(.ping, littleEndian(UInt64(1)) + [0])
        }
        #expect(throws: ProtocolError.unknownMessageType(link: .agent, type: 10)) {
            try AgentMessage.decode(type: 10, payload: [], context: sampleAgentContext)
        }
    }
}
