// Frames on their way out of an io_uring loop. Page data is sent straight from the mapped RAM file:
// the frame's iovecs point at the header bytes and then at each run of pages in the mapping, so the
// only copy is the kernel's into the socket. One send per socket is in flight at a time: two
// independent SQEs on one stream socket may be reordered when one of them has to wait.

import CURing
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// One frame and the iovecs that describe it; owns everything the kernel reads until completion.
public final class OutgoingFrame {
    // SAFETY: `iovecs` and `message` are allocated here and freed in deinit, after the completion of
    // the send that uses them (the queue keeps the frame alive until then). Page iovecs point into a
    // mapping the engine keeps mapped for the whole session.
    let head: UnsafeMutableRawBufferPointer
    let iovecs: UnsafeMutablePointer<iovec>
    let iovecCount: Int
    let message = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)
    var firstIovec = 0
    public let totalBytes: Int
    /// Pages this frame carries (0 for control messages), for accounting on completion.
    public let pages: UInt64
    public let pushClass: PushClass?
    /// Earliest monotonic time the frame may be handed to the socket (link emulation).
    var notBefore: UInt64 = 0

    /// A small frame (a control message) from encoded bytes.
    public init(bytes: [UInt8]) {
        head = .allocate(byteCount: bytes.count, alignment: 8)
        head.copyBytes(from: bytes)
        iovecs = .allocate(capacity: 1)
        iovecs[0] = iovec(iov_base: head.baseAddress, iov_len: bytes.count)
        iovecCount = 1
        totalBytes = bytes.count
        pages = 0
        pushClass = nil
    }

    /// A pageData frame whose pages are read from `mapping` (the RAM file mapped at page 0).
    public init(requestID: UInt64, runs: [PageRange<PageIndex>], mapping: UnsafeRawPointer,
                pushClass: PushClass?, checksum: ChecksumFunction) {
        let set = PageSet<PageIndex>(ranges: runs)
        let payloadHead = PageData.encodedPayloadHeader(requestID: requestID, runs: set)
        let pageBytes = Int(set.count) * Int(PageGeometry.size)
        let header = encodeFrameHeader(link: .peer, type: PeerMessage.Kind.pageData.rawValue,
                                       payloadLength: payloadHead.count + pageBytes, checksum: checksum) { seed in
            var crc = payloadHead.withUnsafeBytes { checksum($0, seed) }
            for run in set.ranges {
                let start = mapping + Int(run.lowerBound.rawValue << PageGeometry.shift)
                crc = checksum(UnsafeRawBufferPointer(start: start, count: Int(run.count << PageGeometry.shift)), crc)
            }
            return crc
        }
        head = .allocate(byteCount: header.count + payloadHead.count, alignment: 8)
        head.copyBytes(from: header + payloadHead)
        iovecCount = 1 + set.rangeCount
        iovecs = .allocate(capacity: iovecCount)
        iovecs[0] = iovec(iov_base: head.baseAddress, iov_len: head.count)
        for (i, run) in set.ranges.enumerated() {
            let start = mapping + Int(run.lowerBound.rawValue << PageGeometry.shift)
            iovecs[i + 1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: start),
                                  iov_len: Int(run.count << PageGeometry.shift))
        }
        totalBytes = head.count + pageBytes
        pages = set.count
        self.pushClass = pushClass
    }

    deinit {
        head.deallocate()
        iovecs.deallocate()
        message.deallocate()
    }

    /// The msghdr for the unsent part of the frame (heap-allocated: the kernel reads it after we return).
    func prepareMessage() -> UnsafePointer<msghdr> {
        message.pointee = msghdr()
        message.pointee.msg_iov = iovecs + firstIovec
        message.pointee.msg_iovlen = iovecCount - firstIovec
        return UnsafePointer(message)
    }

    /// Skips `n` bytes that were sent (after a short send).
    func advance(by n: Int) {
        var left = n
        while left > 0, firstIovec < iovecCount {
            if left >= iovecs[firstIovec].iov_len {
                left -= iovecs[firstIovec].iov_len
                firstIovec += 1
            } else {
                iovecs[firstIovec].iov_base += left
                iovecs[firstIovec].iov_len -= left
                left = 0
            }
        }
    }
}

/// A FIFO of frames for one socket with at most one send in flight.
public final class SendQueue {
    public let fd: Int32
    private let tag: UInt64
    private var queue: [OutgoingFrame] = []
    private var head = 0
    private(set) var inFlight: OutgoingFrame?
    private var inFlightRemaining = 0
    public private(set) var bytesSent: UInt64 = 0
    private let shaper: LinkShaper?

    /// Sparse queues (urgent, control) are served ahead of bulk backlog on an emulated link.
    private let sparse: Bool

    /// `tag` is the io_uring user_data of this queue's sends.
    public init(fd: Int32, tag: UInt64, shaper: LinkShaper?, sparse: Bool = true) {
        self.fd = fd
        self.tag = tag
        self.shaper = shaper
        self.sparse = sparse
    }

    public var pending: Int { queue.count - head + (inFlight == nil ? 0 : 1) }
    public var isIdle: Bool { inFlight == nil && head == queue.count }

    public func enqueue(_ frame: OutgoingFrame, now: UInt64) {
        if let shaper, shaper.spec.isShaped {
            frame.notBefore = shaper.arrival(bytes: frame.totalBytes, now: now, sparse: sparse)
        }
        queue.append(frame)
    }

    /// Submits the next frame if none is in flight and its time has come. Returns the time the head
    /// frame becomes sendable when it is held back by link emulation, else nil.
    public func pump(ring: Ring, now: UInt64) throws(SyscallError) -> UInt64? {
        guard inFlight == nil, head < queue.count else { return nil }
        let frame = queue[head]
        if frame.notBefore > now { return frame.notBefore }
        head += 1
        if head > 64 && head * 2 > queue.count {
            queue.removeFirst(head)
            head = 0
        }
        inFlight = frame
        inFlightRemaining = frame.totalBytes
        try ring.sendmsg(fd: fd, frame.prepareMessage(), flags: UInt32(MSG_NOSIGNAL | MSG_WAITALL), userData: tag)
        return nil
    }

    /// Handles this queue's completion; returns the frame when it has been sent completely.
    public func complete(_ completion: Completion, ring: Ring) throws(SyscallError) -> OutgoingFrame? {
        guard let frame = inFlight else { return nil }
        if completion.result < 0 {
            throw SyscallError(call: "sendmsg", errno: -completion.result)
        }
        let n = Int(completion.result)
        bytesSent += UInt64(n)
        inFlightRemaining -= n
        if inFlightRemaining > 0 {
            // Short send (the socket was shut down mid-way or a signal): send the rest.
            frame.advance(by: n)
            try ring.sendmsg(fd: fd, frame.prepareMessage(), flags: UInt32(MSG_NOSIGNAL | MSG_WAITALL), userData: tag)
            return nil
        }
        inFlight = nil
        return frame
    }
}
