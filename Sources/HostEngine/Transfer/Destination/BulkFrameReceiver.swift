// Receiving the source's bulk push: page-data frames read whole (header, then payload, each with
// MSG_WAITALL) into one page-aligned staging buffer, checked, and handed to the PagePlacer. The
// receive is armed on the destination's ChannelLoop under the bulk tag. (One-copy receive — payload
// straight into the RAM file — replaces the staging buffer here.)

import EpcopyProtocol
import Logging
#if canImport(Glibc)
import Glibc
#endif

final class BulkFrameReceiver {
    private let fd: Int32
    private let ring: Ring
    private let placer: PagePlacer
    private let counters: ReceiveCounters
    private let context: PeerDecodeContext
    // SAFETY: allocated here, freed in deinit; the kernel writes into it only while a receive armed by
    // `arm()` is in flight, and the owner (the engine's bulk thread) outlives every such receive — it
    // drains the ring before it lets this object go.
    private let staging: UnsafeMutableRawPointer
    /// Bytes the handshake read past its last frame, consumed before the socket.
    private var carried: ArraySlice<UInt8>
    private var want = FrameHeader.size
    private var have = 0
    private var header: FrameHeader? = nil
    /// Set by the owner once the transfer is complete: nothing more is armed.
    var finished = false
    private(set) var closed = false

    init(channel: PeerChannel, loop: ChannelLoop, placer: PagePlacer, counters: ReceiveCounters) {
        fd = channel.descriptor.rawValue
        ring = loop.ring
        self.placer = placer
        self.counters = counters
        context = channel.context
        carried = channel.takeBufferedBytes()[...]
        staging = .allocate(byteCount: Int(Link.peer.maxPayload) + FrameHeader.size, alignment: 4096)
    }

    deinit { staging.deallocate() }

    /// Arms the next receive (or consumes carried bytes first).
    func arm() throws {
        let take = min(carried.count, want - have)
        if take > 0 {
            carried.withUnsafeBytes { staging.advanced(by: have).copyMemory(from: $0.baseAddress!, byteCount: take) }
            carried = carried.dropFirst(take)
            have += take
        }
        if have == want {
            try received()
            return
        }
        try ring.recv(fd: fd, staging + have, length: want - have, flags: Int32(MSG_WAITALL),
                      userData: CompletionTag.bulkReceive.rawValue)
    }

    /// Handles the completion of an armed receive. `mayClose`: a close now is the end of the transfer.
    func complete(_ completion: Completion, mayClose: Bool) throws {
        if completion.result < 0 {
            if finished { return }
            throw PeerError.syscall("recv on the bulk channel", SyscallError(call: "recv", errno: -completion.result))
        }
        if completion.result == 0 {
            closed = true
            if !finished && !mayClose { throw PeerError.closed("bulk channel") }
            return
        }
        have += Int(completion.result)
        if have < want { try arm() } else { try received() }
    }

    private func received() throws {
        if header == nil {
            let h: FrameHeader
            do {
                h = try FrameHeader.parse(UnsafeRawBufferPointer(start: staging, count: FrameHeader.size), link: .peer)
            } catch { throw PeerError.protocolViolation("bulk channel", error) }
            guard h.type == PeerMessage.Kind.pageData.rawValue else {
                throw PeerError.unexpected("bulk channel: only page data may arrive here, got type \(h.type)")
            }
            header = h
            want = FrameHeader.size + h.length
        } else if let h = header {
            // SAFETY: `have == want == FrameHeader.size + h.length` bytes are in `staging` (parse bounded
            // h.length by the link's maximum payload, which is what `staging` holds).
            let payload = UnsafeRawBufferPointer(start: staging + FrameHeader.size, count: h.length)
            let runs: PageSet<PageIndex>
            let dataOffset: Int
            do {
                try h.verify(header: UnsafeRawBufferPointer(start: staging, count: FrameHeader.size),
                             payload: payload, checksum: fastChecksum)
                let decoded = try PageData.decodeHeader(payload: payload, context: context)
                runs = decoded.runs
                dataOffset = decoded.dataOffset
            } catch { throw PeerError.protocolViolation("bulk channel", error) }
            var offset = dataOffset
            for run in runs.ranges {
                // SAFETY: decodeHeader checked that the payload holds every run's pages after dataOffset.
                try placer.place(run: run, from: payload.baseAddress! + offset, urgent: false)
                offset += Int(run.count << PageGeometry.shift)
            }
            counters.bytes.add(UInt64(FrameHeader.size + h.length), ordering: .relaxed)
            Log.engine.trace("destination: bulk frame \(runs.rangeCount) runs placed")
            header = nil
            want = FrameHeader.size
            have = 0
        }
        if !finished { try arm() }
    }

    var traceState: String { "bulk want \(want) have \(have) header \(header != nil)" }
}
