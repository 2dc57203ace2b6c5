// Malformed-input fuzzing (over 100 000 inputs in total). The property for every input: decoding either throws a
// ProtocolError or yields a message that re-encodes and decodes to an equal message; inputs that must be rejected
// (bad CRC, truncation, oversized length, trailing bytes) are counted and must all have been rejected.

import EpcopyProtocol
import EpcopyTestSupport
import Testing

/// Valid frames of every message type of both links, kept small so the fuzz loops stay fast in debug builds.
private func corpus() throws -> [(link: Link, bytes: [UInt8])] {
    try samplePeerMessages(pageDataPages: 1).map { (Link.peer, $0.encodedFrame()) }
        + sampleAgentMessages().map { (Link.agent, $0.encodedFrame()) }
}

/// Outcome of decoding one fuzz input.
private enum Outcome {
    case rejected(ProtocolError)
    case accepted
}

/// Decodes `bytes` as one complete frame and its message on `link`. An accepted message must survive re-encoding
/// and decoding unchanged; an issue is recorded (with `note`) if it does not.
private func decodeAndCheck(_ bytes: [UInt8], link: Link, note: String) -> Outcome {
    do {
        let frame = try decodeFrame(bytes: bytes, link: link)
        return try checkMessage(frame: frame, note: note)
    } catch let error as ProtocolError {
        return .rejected(error)
    } catch {
        Issue.record("non-protocol error \(error): \(note)")
        return .accepted
    }
}

/// Decodes the message in an already framed payload; same property as `decodeAndCheck(_:link:note:)`.
private func decodeAndCheck(frame: Frame, note: String) -> Outcome {
    do {
        return try checkMessage(frame: frame, note: note)
    } catch let error as ProtocolError {
        return .rejected(error)
    } catch {
        Issue.record("non-protocol error \(error): \(note)")
        return .accepted
    }
}

/// Decodes the message in `frame`; same property as `decodeAndCheck`.
private func checkMessage(frame: Frame, note: String) throws -> Outcome {
    switch frame.link {
    case .peer:
        let message = try PeerMessage.decode(frame: frame, context: samplePeerContext)
        let again = caught {
            try PeerMessage.decode(frame: decodeFrame(bytes: message.encodedFrame(version: frame.version), link: .peer),
                                   context: samplePeerContext)
        }
        #expect(again == nil, "re-decoding an accepted message failed: \(note)")
        let reencoded = try? PeerMessage.decode(frame: decodeFrame(bytes: message.encodedFrame(), link: .peer),
                                                context: samplePeerContext)
        #expect(reencoded == message, "\(note)")
    case .agent:
        let message = try AgentMessage.decode(frame: frame, context: sampleAgentContext)
        let reencoded = try? AgentMessage.decode(frame: decodeFrame(bytes: message.encodedFrame(), link: .agent),
                                                 context: sampleAgentContext)
        #expect(reencoded == message, "\(note)")
    }
    return .accepted
}

/// Random bytes of a length in `lengths`.
private func randomBytes(_ lengths: Range<Int>, using rng: inout SplitMix64) -> [UInt8] {
    (0..<Int.random(in: lengths, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
}

@Suite(.tier(.unit)) struct FuzzTests {
    @Test func randomInputsAreRejectedOrRoundTrip() {
        let seed: UInt64 = 0xF022_0001
        var rng = SplitMix64(seed: seed)
        var accepted = 0
        var rejected = 0
        for iteration in 0..<36_000 {
            let link: Link = Bool.random(using: &rng) ? .peer : .agent
            let note = "seed \(seed) iteration \(iteration)"
            let outcome: Outcome
            switch iteration % 3 {
            case 0:
                // Pure noise, sometimes long enough to hold a header.
                outcome = decodeAndCheck(randomBytes(0..<80, using: &rng), link: link, note: note)
            case 1:
                // A correct header around a random payload, so decoding reaches the message validators.
                let type = UInt8.random(in: 0...15, using: &rng)
                let frame = encodeFrame(link: link, type: type, payload: randomBytes(0..<64, using: &rng))
                outcome = decodeAndCheck(frame, link: link, note: note)
            default:
                // Longer random payloads straight into the message decoders, no framing involved.
                let frame = Frame(link: link, type: UInt8.random(in: 0...15, using: &rng),
                                  payload: randomBytes(0..<200, using: &rng))
                outcome = decodeAndCheck(frame: frame, note: note)
            }
            switch outcome {
            case .accepted: accepted += 1
            case .rejected: rejected += 1
            }
        }
        #expect(accepted + rejected == 36_000)
        #expect(rejected > 30_000, "seed \(seed): only \(rejected) of 36000 random inputs rejected")
    }

    @Test func corruptedFramesAreAllRejected() throws {
        let seed: UInt64 = 0xF022_0002
        var rng = SplitMix64(seed: seed)
        let frames = try corpus()
        var mustReject = 0
        var rejected = 0
        var tooLarge = 0
        for iteration in 0..<40_000 {
            let (link, original) = frames[iteration % frames.count]
            var bytes = original
            let note = "seed \(seed) iteration \(iteration)"
            let mutation = Int.random(in: 0..<4, using: &rng)
            switch mutation {
            case 0:
                bytes.removeLast(Int.random(in: 1...bytes.count, using: &rng))
            case 1:
                // Up to three distinct bit flips: CRC-32C detects all of them at these lengths.
                let bits = Set((0..<Int.random(in: 1...3, using: &rng)).map { _ in
                    Int.random(in: 0..<bytes.count * 8, using: &rng)
                })
                for bit in bits {
                    bytes[bit / 8] ^= 1 << UInt8(bit % 8)
                }
            case 2:
                let huge = UInt32.random(in: link.maxPayload + 1 ... .max, using: &rng)
                bytes.replaceSubrange(8..<12, with: littleEndian(huge))
            default:
                bytes += randomBytes(1..<20, using: &rng)
            }
            mustReject += 1
            if case .rejected(let error) = decodeAndCheck(bytes, link: link, note: note) {
                rejected += 1
                if mutation == 2 {
                    #expect(error == .frameTooLarge(length: UInt64(UInt32(littleEndian: bytes.withUnsafeBytes {
                        $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                    })), limit: UInt64(link.maxPayload)), "\(note)")
                    tooLarge += 1
                }
            } else {
                Issue.record("corrupted frame accepted (mutation \(mutation)): \(note)")
            }
            // The streaming decoder must not produce a frame from these bytes either (truncated ones just wait).
            var decoder = FrameDecoder(link: link)
            decoder.append(bytes)
            let streamed = try? decoder.next()
            #expect(streamed == nil || mutation == 3, "\(note)")
        }
        #expect(rejected == mustReject, "seed \(seed): \(rejected) of \(mustReject) corrupted frames rejected")
        #expect(tooLarge > 0)
    }

    @Test func mutatedPayloadsWithValidChecksums() throws {
        let seed: UInt64 = 0xF022_0003
        var rng = SplitMix64(seed: seed)
        let frames = try corpus().map { entry in
            // Frames from the corpus are valid by construction.
            (entry.link, (try? decodeFrame(bytes: entry.bytes, link: entry.link)) ?? Frame(link: entry.link, type: 0,
                                                                                          payload: []))
        }
        var accepted = 0
        var rejected = 0
        for iteration in 0..<40_000 {
            let (link, frame) = frames[iteration % frames.count]
            var payload = frame.payload
            var type = frame.type
            let note = "seed \(seed) iteration \(iteration)"
            switch Int.random(in: 0..<7, using: &rng) {
            case 0 where !payload.isEmpty:
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    payload[Int.random(in: 0..<payload.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            case 1 where !payload.isEmpty:
                // Small values: page-set forms, counts, gaps and class codes live near zero.
                payload[Int.random(in: 0..<min(payload.count, 64), using: &rng)] = UInt8.random(in: 0...6, using: &rng)
            case 2 where !payload.isEmpty:
                payload.removeLast(Int.random(in: 1...payload.count, using: &rng))
            case 3:
                payload.insert(contentsOf: randomBytes(1..<8, using: &rng),
                               at: Int.random(in: 0...payload.count, using: &rng))
            case 4 where !payload.isEmpty:
                let start = Int.random(in: 0..<payload.count, using: &rng)
                payload.removeSubrange(start..<min(payload.count, start + Int.random(in: 1...8, using: &rng)))
            case 5:
                type = UInt8.random(in: 1...13, using: &rng)
            default:
                payload += randomBytes(1..<4, using: &rng)
            }
            let bytes = encodeFrame(link: link, version: frame.version, type: type, payload: payload)
            switch decodeAndCheck(bytes, link: link, note: note) {
            case .accepted: accepted += 1
            case .rejected: rejected += 1
            }
        }
        // Both outcomes must occur, or the mutations are not reaching the validators.
        #expect(accepted > 1000 && rejected > 10_000, "seed \(seed): accepted \(accepted), rejected \(rejected)")
    }

    @Test func hostileSizeClaimsFailFast() {
        let clock = ContinuousClock()
        let started = clock.now
        // An ack whose page set claims 2^60 ranges in 10 bytes (form byte and a 9-byte varint).
        let payload = [UInt8(0)] + varint(1 << 60)
        #expect(payload.count == 10)
        let frame = encodeFrame(link: .peer, type: PeerMessage.Kind.ack.rawValue, payload: payload)
        let error = caught { try PeerMessage.decode(frame: decodeFrame(bytes: frame, link: .peer),
                                                    context: samplePeerContext) }
        #expect(error?.rootCause == .tooManyItems(what: "ranges", count: 1 << 60, limit: 0))
        // A bitmap claiming 2^63 pages with two bytes behind it.
        let bitmap = [UInt8(1), 0] + varint(1 << 63) + [0xFF, 0xFF]
        #expect(caught { try PeerMessage.decode(type: PeerMessage.Kind.zeroPages.rawValue, payload: bitmap,
                                                context: samplePeerContext) }?.rootCause
            == .truncated(needed: 1 << 60, available: 2))
        // A string claiming UInt64.max bytes.
        let abort = littleEndian(UInt16(1)) + varint(.max)
        #expect(caught { try PeerMessage.decode(type: PeerMessage.Kind.abort.rawValue, payload: abort,
                                                context: samplePeerContext) }?.rootCause
            == .stringTooLong(length: .max, limit: 1024))
        #expect(clock.now - started < .seconds(1))
    }
}
