// Peer-link messages: every case round-trips through a frame, and every field rule is enforced on decode with the
// exact, readable error.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

/// Payload of `message` with bytes replaced at `offset`.
private func payload(_ message: PeerMessage, patching offset: Int, with replacement: [UInt8]) -> [UInt8] {
    var bytes = message.encodedPayload()
    bytes.replaceSubrange(offset..<offset + replacement.count, with: replacement)
    return bytes
}

private func decodePeer(_ kind: PeerMessage.Kind, _ payload: [UInt8],
                        context: PeerDecodeContext = samplePeerContext) throws -> PeerMessage {
    try PeerMessage.decode(type: kind.rawValue, payload: payload, context: context)
}

private let name = "peer message "

@Suite(.tier(.unit)) struct PeerMessageTests {
    @Test func everyCaseRoundTripsThroughAFrame() throws {
        let messages = try samplePeerMessages()
        #expect(Set(messages.map(\.kind)) == Set(PeerMessage.Kind.allCases))
        for message in messages {
            let bytes = message.encodedFrame()
            let frame = try decodeFrame(bytes: bytes, link: .peer)
            #expect(frame.type == message.typeCode)
            let decoded = try PeerMessage.decode(frame: frame, context: samplePeerContext)
            #expect(decoded == message, "\(message.kind)")
            #expect(decoded.encodedFrame() == bytes, "\(message.kind)")
        }
    }

    @Test func typeCodesAreStable() {
        let codes = PeerMessage.Kind.allCases.map { "\($0)=\($0.rawValue)" }
        #expect(codes == ["hello=1", "authChallenge=2", "authResponse=3", "welcome=4", "pageRequest=5",
                          "pageData=6", "zeroPages=7", "freePages=8", "ack=9", "progress=10", "done=11",
                          "abort=12", "resume=13", "freeScanDone=14", "keepalive=15"])
    }

    @Test func unknownTypesAndTrailingBytes() {
        #expect(throws: ProtocolError.unknownMessageType(link: .peer, type: 0)) {
            try PeerMessage.decode(type: 0, payload: [], context: samplePeerContext)
        }
        #expect(throws: ProtocolError.unknownMessageType(link: .peer, type: 16)) {
            try PeerMessage.decode(type: 16, payload: [], context: samplePeerContext)
        }
        // A keepalive has no payload: any byte after its header is refused.
        #expect(throws: ProtocolError.trailingBytes(count: 1)) { try decodePeer(.keepalive, [0]) }
        #expect(ProtocolError.unknownMessageType(link: .peer, type: 14).description == "unknown peer message type 14")
        let done = PeerMessage.done(PeerDone(pagesSent: 1, bytesSent: 2)).encodedPayload()
        #expect(throws: ProtocolError.trailingBytes(count: 3)) { try decodePeer(.done, done + [1, 2, 3]) }
        #expect(throws: ProtocolError.inField(message: name + "done", field: "bytesSent",
                                              underlying: .truncated(needed: 8, available: 7))) {
            try decodePeer(.done, Array(done.dropLast()))
        }
    }

    @Test func helloValidation() throws {
        let hello = PeerMessage.hello(try PeerHello(role: .source, sessionID: 1, vmName: "vm", regionPages: 10,
                                                    nonce: .zero))
        // Layout: role 0, channel 1, versions 2-3, session 4-11, name length 12, name 13-14, region 15-22, page size 23-26.
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "role", reason: "unknown role 3")) {
            try decodePeer(.hello, payload(hello, patching: 0, with: [3]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "channel",
                                                   reason: "5, must be 1...4")) {
            try decodePeer(.hello, payload(hello, patching: 1, with: [5]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "versions",
                                                   reason: "minimum version 2 above maximum 1")) {
            try decodePeer(.hello, payload(hello, patching: 2, with: [2, 1]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "versions",
                                                   reason: "minimum version 0 does not exist")) {
            try decodePeer(.hello, payload(hello, patching: 2, with: [0, 1]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "vmName",
                                                   reason: "only A-Z, a-z, 0-9, '.', '_', '-' allowed")) {
            try decodePeer(.hello, payload(hello, patching: 13, with: Array("v/".utf8)))
        }
        #expect(throws: ProtocolError.inField(message: name + "hello", field: "vmName", underlying: .invalidUTF8)) {
            try decodePeer(.hello, payload(hello, patching: 13, with: [0xFF, 0xFE]))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "regionPages",
                                                   reason: "0 pages, must be 1...1099511627776")) {
            try decodePeer(.hello, payload(hello, patching: 15, with: littleEndian(UInt64(0))))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "pageSize",
                                                   reason: "8192, only 4096 is supported")) {
            try decodePeer(.hello, payload(hello, patching: 23, with: littleEndian(UInt32(8192))))
        }
        // A 257-byte name on the wire is refused by its length before the bytes are read.
        var long = ByteWriter()
        long.writeBytes([1, 1, 1, 1] + littleEndian(UInt64(1)))
        long.writeVarint(257)
        #expect(throws: ProtocolError.inField(message: name + "hello", field: "vmName",
                                              underlying: .stringTooLong(length: 257, limit: 256))) {
            try decodePeer(.hello, long.bytes)
        }
        // Construction applies the same rules.
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "vmName", reason: "empty")) {
            try PeerHello(role: .source, sessionID: 1, vmName: "", regionPages: 1, nonce: .zero)
        }
        #expect(throws: ProtocolError.inField(message: name + "hello", field: "vmName",
                                              underlying: .stringTooLong(length: 257, limit: 256))) {
            try PeerHello(role: .source, sessionID: 1, vmName: String(repeating: "a", count: 257), regionPages: 1,
                          nonce: .zero)
        }
        #expect(throws: ProtocolError.invalidField(message: name + "hello", field: "regionPages",
                                                   reason: "1099511627777 pages, must be 1...1099511627776")) {
            try PeerHello(role: .source, sessionID: 1, vmName: "a", regionPages: (1 << 40) + 1, nonce: .zero)
        }
    }

    @Test func pageRequestValidation() throws {
        let context = PeerDecodeContext(regionPages: 1000, maxRequestRanges: 4)
        let outOfRange = PeerMessage.pageRequest(try PageRequest(requestID: 1, pages: pageSet([(10, 1), (1000, 1)])))
        let error = caught { try decodePeer(.pageRequest, outOfRange.encodedPayload(), context: context) }
        #expect(error == .inField(message: name + "pageRequest", field: "pages",
                                  underlying: .pageOutOfRange(page: 1000, limit: 1000)))
        #expect(error?.rootCause == .pageOutOfRange(page: 1000, limit: 1000))
        #expect(error?.description == "peer message pageRequest: field pages: page 1000 out of range (limit 1000)")

        let five = PeerMessage.pageRequest(try PageRequest(
            requestID: 1, pages: pageSet([(0, 1), (2, 1), (4, 1), (6, 1), (8, 1)])))
        #expect(caught { try decodePeer(.pageRequest, five.encodedPayload(), context: context) }?.rootCause
            == .tooManyItems(what: "ranges", count: 5, limit: 4))
        // An empty request on the wire: request ID then an empty range list.
        #expect(throws: ProtocolError.invalidField(message: name + "pageRequest", field: "pages",
                                                   reason: "no pages requested")) {
            try decodePeer(.pageRequest, littleEndian(UInt64(1)) + [0, 0])
        }
    }

    @Test func pageDataValidation() throws {
        let runs = pageSet([(1, 2)])
        let message = PeerMessage.pageData(try PageData(requestID: 9, runs: runs,
                                                        bytes: patternBytes(count: 8192, seed: 1)))
        let bytes = message.encodedPayload()
        #expect(throws: ProtocolError.invalidField(message: name + "pageData", field: "data",
                                                   reason: "runs cover 2 pages (8192 bytes) but 8191 bytes follow")) {
            try decodePeer(.pageData, Array(bytes.dropLast()))
        }
        #expect(throws: ProtocolError.invalidField(message: name + "pageData", field: "data",
                                                   reason: "runs cover 2 pages (8192 bytes) but 8193 bytes follow")) {
            try decodePeer(.pageData, bytes + [0])
        }
        // Adjacent runs (gap 0) in the run list: the example error of the spec.
        let adjacent = littleEndian(UInt64(9)) + [0, 2, 1, 1, 0, 1] + patternBytes(count: 8192, seed: 1)
        let error = caught { try decodePeer(.pageData, adjacent) }
        #expect(error == .inField(message: name + "pageData", field: "runs", underlying: .unmergedRanges(index: 1)))
        #expect(error?.description == "peer message pageData: field runs: range 1 is adjacent to range 0 (not merged)")
        // Run lists only: the bitmap form is refused for page data.
        let bitmapRuns = littleEndian(UInt64(9)) + PageSetCodec.encode(runs, form: .bitmap)
            + patternBytes(count: 8192, seed: 1)
        #expect(caught { try decodePeer(.pageData, bitmapRuns) }?.rootCause == .unsupportedPageSetForm(1))
        // Page count limit, checked before the byte count.
        let context = PeerDecodeContext(regionPages: 1 << 20, maxPageDataPages: 1)
        #expect(caught { try decodePeer(.pageData, bytes, context: context) }?.rootCause
            == .tooManyItems(what: "pages", count: 2, limit: 1))
        #expect(throws: ProtocolError.invalidField(message: name + "pageData", field: "runs", reason: "no pages")) {
            try decodePeer(.pageData, littleEndian(UInt64(9)) + [0, 0])
        }
        // Construction checks the byte count too.
        #expect(throws: ProtocolError.invalidField(message: name + "pageData", field: "data",
                                                   reason: "runs cover 2 pages but 4096 bytes were given")) {
            try PageData(requestID: 1, runs: runs, bytes: [UInt8](repeating: 0, count: 4096))
        }
        // The zero-copy header decode agrees with the full decode.
        let header = try bytes.withUnsafeBytes { try PageData.decodeHeader(payload: $0, context: samplePeerContext) }
        #expect(header.requestID == 9 && header.runs == runs && header.dataOffset == bytes.count - 8192)
    }

    @Test func progressAbortAndSetValidation() throws {
        let progress = littleEndian(UInt64(11)) + littleEndian(UInt64(10)) + littleEndian(UInt64(0))
            + littleEndian(UInt64(0))
        #expect(throws: ProtocolError.invalidField(message: name + "progress", field: "pagesPresent",
                                                   reason: "11 above pagesTotal 10")) {
            try decodePeer(.progress, progress)
        }
        let tooBig = littleEndian(UInt64(1)) + littleEndian(UInt64(2000)) + littleEndian(UInt64(0))
            + littleEndian(UInt64(0))
        #expect(throws: ProtocolError.invalidField(message: name + "progress", field: "pagesTotal",
                                                   reason: "2000 above the region's 1000 pages")) {
            try decodePeer(.progress, tooBig, context: PeerDecodeContext(regionPages: 1000))
        }
        var abort = ByteWriter()
        abort.writeU16(1)
        abort.writeVarint(1025)
        abort.writeBytes([UInt8](repeating: 0x41, count: 1025))
        #expect(throws: ProtocolError.inField(message: name + "abort", field: "reason",
                                              underlying: .stringTooLong(length: 1025, limit: 1024))) {
            try decodePeer(.abort, abort.bytes)
        }
        // Constructing an abort never fails: an over-long reason is cut at a scalar boundary.
        let cut = PeerAbort(code: 1, reason: String(repeating: "é", count: 600))
        #expect(cut.reason.utf8.count == 1024 && cut.reason == String(repeating: "é", count: 512))
        let odd = PeerAbort(code: 1, reason: "a" + String(repeating: "é", count: 600))
        #expect(odd.reason.utf8.count == 1023)

        let ack = PeerMessage.ack(pageSet([(999, 2)])).encodedPayload()
        #expect(caught { try decodePeer(.ack, ack, context: PeerDecodeContext(regionPages: 1000)) }
            == .inField(message: name + "ack", field: "pages", underlying: .pageOutOfRange(page: 1000, limit: 1000)))
        #expect(throws: ProtocolError.invalidField(message: name + "welcome", field: "version",
                                                   reason: "version 0 does not exist")) {
            try decodePeer(.welcome, [0] + littleEndian(UInt64(1)))
        }
    }

    @Test func authFieldsAreExactly32Bytes() throws {
        let nonce = bytes32(seed: 9)
        #expect(nonce.bytes == patternBytes(count: 32, seed: 9))
        #expect(Bytes32(patternBytes(count: 31, seed: 9)) == nil)
        #expect(nonce.constantTimeEquals(bytes32(seed: 9)) && !nonce.constantTimeEquals(.zero))
        #expect(Bytes32.zero.description == String(repeating: "0", count: 64))
        #expect(caught { try decodePeer(.authResponse, [UInt8](repeating: 1, count: 31)) }?.rootCause
            == .truncated(needed: 32, available: 31))
        #expect(throws: ProtocolError.trailingBytes(count: 1)) {
            try decodePeer(.authChallenge, [UInt8](repeating: 1, count: 33))
        }
    }
}
