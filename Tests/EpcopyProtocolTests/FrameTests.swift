// Framing: exact header layout, every header rejection, the streaming decoder's early length check, poisoning and
// buffer bound, reassembly across arbitrary chunk boundaries, and checksum injection.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

/// `frame` with header bytes `offset..<offset + replacement.count` overwritten (CRC not recomputed).
private func patched(_ frame: [UInt8], at offset: Int, with replacement: [UInt8]) -> [UInt8] {
    var bytes = frame
    bytes.replaceSubrange(offset..<offset + replacement.count, with: replacement)
    return bytes
}

@Suite(.tier(.unit)) struct FrameTests {
    @Test func headerLayout() throws {
        let payload: [UInt8] = [1, 2, 3]
        let bytes = encodeFrame(link: .agent, type: 5, payload: payload)
        #expect(bytes.count == 19)
        #expect(Array(bytes[0..<4]) == Array("EPCA".utf8))
        #expect(Array(encodeFrame(link: .peer, type: 1, payload: [])[0..<4]) == Array("EPCE".utf8))
        #expect(bytes[4] == 1 && bytes[5] == 5 && bytes[6] == 0 && bytes[7] == 0)
        #expect(Array(bytes[8..<12]) == littleEndian(UInt32(3)))
        let crc = CRC32C.checksum(Array(bytes[0..<12]) + payload)
        #expect(Array(bytes[12..<16]) == littleEndian(crc))
        #expect(Array(bytes[16...]) == payload)
        let frame = try decodeFrame(bytes: bytes, link: .agent)
        #expect(frame == Frame(link: .agent, version: 1, type: 5, payload: payload))
        #expect(frame.encoded() == bytes)
        #expect(Link.agent.maxPayload == 8_388_608 && Link.peer.maxPayload == 8_392_704)
    }

    @Test func headerRejections() {
        let frame = encodeFrame(link: .peer, type: 9, payload: [0, 0])
        #expect(throws: ProtocolError.badMagic(found: Link.peer.magic)) {
            try decodeFrame(bytes: frame, link: .agent)
        }
        #expect(throws: ProtocolError.unsupportedVersion(found: 2, supported: 1...1)) {
            try decodeFrame(bytes: encodeFrame(link: .peer, version: 2, type: 9, payload: []), link: .peer)
        }
        #expect(throws: ProtocolError.unsupportedVersion(found: 0, supported: 1...1)) {
            try decodeFrame(bytes: encodeFrame(link: .peer, version: 0, type: 9, payload: []), link: .peer)
        }
        #expect(throws: ProtocolError.nonZeroFlags(found: 0x0100)) {
            try decodeFrame(bytes: patched(frame, at: 6, with: [0, 1]), link: .peer)
        }
        #expect(throws: ProtocolError.frameTooLarge(length: 8_392_705, limit: 8_392_704)) {
            try decodeFrame(bytes: patched(frame, at: 8, with: littleEndian(UInt32(8_392_705))), link: .peer)
        }
        #expect(throws: ProtocolError.frameTooLarge(length: 2, limit: 1)) {
            try decodeFrame(bytes: frame, link: .peer, limits: FrameLimits(maxPayload: 1))
        }
        #expect(throws: ProtocolError.truncated(needed: 16, available: 10)) {
            try decodeFrame(bytes: Array(frame[0..<10]), link: .peer)
        }
        #expect(throws: ProtocolError.truncated(needed: 18, available: 17)) {
            try decodeFrame(bytes: Array(frame[0..<17]), link: .peer)
        }
        #expect(throws: ProtocolError.trailingBytes(count: 1)) {
            try decodeFrame(bytes: frame + [0], link: .peer)
        }
        // A flipped payload bit is caught by the CRC, which reports both values.
        let corrupted = patched(frame, at: 17, with: [1])
        let stored = UInt32(frame[12]) | UInt32(frame[13]) << 8 | UInt32(frame[14]) << 16 | UInt32(frame[15]) << 24
        let computed = CRC32C.checksum(Array(corrupted[0..<12]) + Array(corrupted[16...]))
        #expect(throws: ProtocolError.checksumMismatch(expected: stored, computed: computed)) {
            try decodeFrame(bytes: corrupted, link: .peer)
        }
    }

    @Test func oversizedLengthRejectedFromTheHeaderAlone() {
        var decoder = FrameDecoder(link: .peer)
        var header = encodeFrame(link: .peer, type: 6, payload: [])
        header.replaceSubrange(8..<12, with: littleEndian(UInt32.max))
        decoder.append(header)
        let error = caught { try decoder.next() }
        #expect(error == .frameTooLarge(length: 4_294_967_295, limit: 8_392_704))
        #expect(error?.description == "frame too large: 4294967295 bytes (limit 8392704)")
        #expect(decoder.storedByteCount <= FrameHeader.size)
    }

    @Test func decoderWaitsForPayloadAfterValidHeader() throws {
        let frame = encodeFrame(link: .agent, type: 8, payload: [UInt8](repeating: 7, count: 100))
        var decoder = FrameDecoder(link: .agent)
        decoder.append(frame[0..<16])
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedByteCount == 16)
        decoder.append(frame[16..<115])
        #expect(try decoder.next() == nil)
        decoder.append(frame[115...])
        #expect(try decoder.next()?.payload == [UInt8](repeating: 7, count: 100))
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedByteCount == 0 && decoder.storedByteCount == 0)
    }

    @Test func decoderIsPoisonedAfterAnError() throws {
        var decoder = FrameDecoder(link: .agent)
        let good = AgentMessage.ping(nonce: 1).encodedFrame()
        decoder.append(good)
        #expect(try decoder.next() != nil)
        var bad = good
        bad[20] ^= 0x10
        decoder.append(bad)
        let first = caught { try decoder.next() }
        #expect(first?.rootCause == first && first != nil)
        guard case .checksumMismatch = first else {
            Issue.record("expected a checksum mismatch, got \(String(describing: first))")
            return
        }
        // Valid bytes afterwards do not help: the stream cannot be trusted to be aligned.
        decoder.append(good)
        #expect(caught { try decoder.next() } == first)
        #expect(caught { try decoder.next() } == first)
        #expect(decoder.error == first)
        #expect(decoder.storedByteCount == 0)
    }

    @Test func streamReassemblyAcrossRandomChunkBoundaries() throws {
        let seed: UInt64 = 0xF4A3_0001
        var rng = SplitMix64(seed: seed)
        let messages = try samplePeerMessages()
        for round in 0..<20 {
            var sent: [PeerMessage] = []
            var stream: [UInt8] = []
            for _ in 0..<40 {
                let message = messages.randomElement(using: &rng) ?? .ack(PageSet())
                sent.append(message)
                stream += message.encodedFrame()
            }
            var decoder = FrameDecoder(link: .peer)
            var received: [PeerMessage] = []
            var offset = 0
            let maxChunk = [1, 7, 100, 5000, 70_000][round % 5]
            while offset < stream.count {
                let chunk = min(Int.random(in: 1...maxChunk, using: &rng), stream.count - offset)
                decoder.append(stream[offset..<offset + chunk])
                offset += chunk
                #expect(decoder.storedByteCount <= FrameHeader.size + Int(Link.peer.maxPayload) + chunk)
                while let frame = try decoder.next() {
                    received.append(try PeerMessage.decode(frame: frame, context: samplePeerContext))
                }
            }
            #expect(received == sent, "seed \(seed) round \(round)")
            #expect(decoder.bufferedByteCount == 0, "seed \(seed) round \(round)")
        }
    }

    @Test func zeroCopyPageDataFromTheDecoderBuffer() throws {
        let runs = pageSet([(40, 2), (50, 1)])
        let pages = patternBytes(count: 3 * 4096, seed: 77)
        let message = PeerMessage.pageData(try PageData(requestID: 5, runs: runs, bytes: pages))
        var decoder = FrameDecoder(link: .peer)
        decoder.append(message.encodedFrame() + AgentMessage.ping(nonce: 1).encodedFrame().prefix(3))
        let placed = try decoder.withNextFrame { header, payload -> [UInt8] in
            #expect(header.type == PeerMessage.Kind.pageData.rawValue && header.length == payload.count)
            let parsed = try PageData.decodeHeader(payload: payload, context: samplePeerContext)
            #expect(parsed.requestID == 5 && parsed.runs == runs)
            return [UInt8](UnsafeRawBufferPointer(rebasing: payload[parsed.dataOffset...]))
        }
        #expect(placed == pages)
        #expect(decoder.bufferedByteCount == 3)
        #expect(try decoder.withNextFrame { _, _ in 0 } == nil)
    }

    @Test func injectedChecksumIsUsedOnBothSides() throws {
        // A deliberately different function: the plain CRC with its bits inverted.
        let custom: ChecksumFunction = { bytes, seed in ~CRC32C.checksum(bytes, seed: ~seed) }
        let message = AgentMessage.ping(nonce: 99)
        let bytes = message.encodedFrame(checksum: custom)
        #expect(bytes != message.encodedFrame())
        let frame = try decodeFrame(bytes: bytes, link: .agent, checksum: custom)
        #expect(try AgentMessage.decode(frame: frame, context: sampleAgentContext) == message)
        var decoder = FrameDecoder(link: .agent, checksum: custom)
        decoder.append(bytes)
        #expect(try decoder.next() == frame)
        let mismatch = caught { try decodeFrame(bytes: bytes, link: .agent) }
        guard case .checksumMismatch = mismatch else {
            Issue.record("default CRC accepted a frame made with another function: \(String(describing: mismatch))")
            return
        }
    }

    @Test func headerForPayloadSentFromSeveralBuffers() throws {
        let runs = pageSet([(1, 2)])
        let pages = patternBytes(count: 2 * 4096, seed: 8)
        let prefix = PageData.encodedPayloadHeader(requestID: 3, runs: runs)
        let header = encodeFrameHeader(link: .peer, type: PeerMessage.Kind.pageData.rawValue,
                                       payloadLength: prefix.count + pages.count) { seed in
            CRC32C.checksum(pages, seed: CRC32C.checksum(prefix, seed: seed))
        }
        let whole = PeerMessage.pageData(try PageData(requestID: 3, runs: runs, bytes: pages)).encodedFrame()
        #expect(header + prefix + pages == whole)
    }

    @Test func linkMismatchIsReported() {
        let frame = Frame(link: .agent, type: 8, payload: littleEndian(UInt64(1)))
        #expect(throws: ProtocolError.linkMismatch(expected: .peer, found: .agent)) {
            try PeerMessage.decode(frame: frame, context: samplePeerContext)
        }
    }
}
