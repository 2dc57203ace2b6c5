// A thin owner for one io_uring. Each transfer thread owns one ring and serves all of its channels
// through it — the value of io_uring here is one thread driving several sockets with few syscalls
// (on a single stream it does not beat read/write: DESIGN.md, measured). Not thread-safe by design:
// a ring is created, used and destroyed on one thread.

import CURing
#if canImport(Glibc)
import Glibc
#endif

/// One completion, copied out of the CQ so the slot can be released at once.
public struct Completion: Sendable {
    public var userData: UInt64
    /// Bytes transferred, or -errno.
    public var result: Int32
    public var flags: UInt32

    /// The provided buffer the kernel picked (multishot receive), if any.
    public var bufferID: UInt16? {
        flags & UInt32(IORING_CQE_F_BUFFER) != 0 ? UInt16(truncatingIfNeeded: flags >> UInt32(IORING_CQE_BUFFER_SHIFT)) : nil
    }

    /// A multishot request stays armed only while this is set; when clear it must be re-submitted.
    public var more: Bool { flags & UInt32(IORING_CQE_F_MORE) != 0 }
}

public final class Ring {
    fileprivate var ring = io_uring()

    public init(entries: UInt32 = 256) throws(SyscallError) {
        let rc = io_uring_queue_init(entries, &ring, 0)
        if rc < 0 { throw SyscallError(call: "io_uring_queue_init", errno: -rc) }
    }

    deinit { io_uring_queue_exit(&ring) }

    /// A free submission slot; when the SQ is full the queued entries are submitted first.
    public func nextSQE() throws(SyscallError) -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = io_uring_get_sqe(&ring) { return sqe }
        _ = try submit()
        guard let sqe = io_uring_get_sqe(&ring) else { throw SyscallError(call: "io_uring_get_sqe", errno: EBUSY) }
        return sqe
    }

    public func send(fd: Int32, _ buffer: UnsafeRawPointer, length: Int, flags: Int32 = Int32(MSG_NOSIGNAL),
                     userData: UInt64) throws(SyscallError) {
        let sqe = try nextSQE()
        io_uring_prep_send(sqe, fd, buffer, length, flags)
        io_uring_sqe_set_data64(sqe, userData)
    }

    /// SAFETY: `message` and everything it points to must stay valid until the completion arrives.
    public func sendmsg(fd: Int32, _ message: UnsafePointer<msghdr>, flags: UInt32 = UInt32(MSG_NOSIGNAL),
                        userData: UInt64) throws(SyscallError) {
        let sqe = try nextSQE()
        io_uring_prep_sendmsg(sqe, fd, message, flags)
        io_uring_sqe_set_data64(sqe, userData)
    }

    /// SAFETY: `buffer` must stay valid until the completion arrives.
    public func recv(fd: Int32, _ buffer: UnsafeMutableRawPointer, length: Int, flags: Int32 = 0,
                     userData: UInt64) throws(SyscallError) {
        let sqe = try nextSQE()
        io_uring_prep_recv(sqe, fd, buffer, length, flags)
        io_uring_sqe_set_data64(sqe, userData)
    }

    /// One request, many completions: each fills a buffer of `group` chosen by the kernel.
    public func recvMultishot(fd: Int32, group: UInt16, userData: UInt64) throws(SyscallError) {
        let sqe = try nextSQE()
        io_uring_prep_recv_multishot(sqe, fd, nil, 0, 0)
        sqe.pointee.flags |= UInt8(1 << IOSQE_BUFFER_SELECT_BIT)
        sqe.pointee.buf_group = group
        io_uring_sqe_set_data64(sqe, userData)
    }

    public func pollMultishot(fd: Int32, events: UInt32 = UInt32(POLLIN), userData: UInt64) throws(SyscallError) {
        let sqe = try nextSQE()
        io_uring_prep_poll_multishot(sqe, fd, events)
        io_uring_sqe_set_data64(sqe, userData)
    }

    @discardableResult
    public func submit() throws(SyscallError) -> Int {
        while true {
            let rc = io_uring_submit(&ring)
            if rc >= 0 { return Int(rc) }
            if rc == -EINTR { continue }
            if rc == -EAGAIN || rc == -EBUSY { return 0 }  // CQ overflow pressure: reap, then retry
            throw SyscallError(call: "io_uring_submit", errno: -rc)
        }
    }

    /// Submits what is queued and waits until a completion is ready or `timeoutNanos` passes.
    /// Returns false on timeout.
    public func submitAndWait(timeoutNanos: Int64?) throws(SyscallError) -> Bool {
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        while true {
            let rc: Int32
            if let timeoutNanos {
                var ts = __kernel_timespec(tv_sec: timeoutNanos / 1_000_000_000, tv_nsec: timeoutNanos % 1_000_000_000)
                rc = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, nil)
            } else {
                rc = io_uring_submit_and_wait(&ring, 1)
            }
            if rc >= 0 { return true }
            switch -rc {
            case EINTR: continue
            case ETIME: return false
            default: throw SyscallError(call: "io_uring_submit_and_wait", errno: -rc)
            }
        }
    }

    /// Hands every ready completion to `body` and releases the slots. Returns how many there were.
    @discardableResult
    public func drainCompletions(_ body: (Completion) throws -> Void) rethrows -> Int {
        var handled = 0
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        while io_uring_peek_cqe(&ring, &cqe) == 0, let entry = cqe {
            let completion = Completion(userData: entry.pointee.user_data, result: entry.pointee.res,
                                        flags: entry.pointee.flags)
            io_uring_cqe_seen(&ring, entry)
            handled += 1
            try body(completion)
        }
        return handled
    }
}

/// A ring of provided buffers for multishot receive (IORING_REGISTER_PBUF_RING): the kernel picks a
/// free buffer per completion, so one armed receive serves a channel for its whole life.
public final class ProvidedBuffers {
    public let group: UInt16
    public let count: Int
    public let size: Int
    private let ringMemory: UnsafeMutableRawPointer
    private let ringBytes: Int
    private let storage: UnsafeMutableRawPointer
    // Strong: the buffer ring must be unregistered before its io_uring goes away.
    private let owner: Ring

    /// `count` must be a power of two (≤ 32768).
    public init(ring: Ring, group: UInt16, count: Int, size: Int) throws(SyscallError) {
        precondition(count > 0 && count & (count - 1) == 0 && count <= 32768)
        self.group = group
        self.count = count
        self.size = size
        self.owner = ring
        ringBytes = count * MemoryLayout<io_uring_buf>.stride
        // The buffer ring must be page aligned; mmap gives that.
        guard let mem = mmap(nil, ringBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              mem != MAP_FAILED
        else { throw SyscallError(call: "mmap(buffer ring)", errno: errno) }
        ringMemory = mem
        storage = .allocate(byteCount: count * size, alignment: 4096)
        let bufRing = ringMemory.assumingMemoryBound(to: io_uring_buf_ring.self)
        io_uring_buf_ring_init(bufRing)
        var reg = io_uring_buf_reg()
        reg.ring_addr = UInt64(UInt(bitPattern: ringMemory))
        reg.ring_entries = UInt32(count)
        reg.bgid = group
        let rc = io_uring_register_buf_ring(&ring.ring, &reg, 0)
        if rc < 0 {
            munmap(ringMemory, ringBytes)
            storage.deallocate()
            throw SyscallError(call: "io_uring_register_buf_ring", errno: -rc)
        }
        let mask = io_uring_buf_ring_mask(UInt32(count))
        for id in 0..<count {
            io_uring_buf_ring_add(bufRing, storage + id * size, UInt32(size), UInt16(id), mask, Int32(id))
        }
        io_uring_buf_ring_advance(bufRing, Int32(count))
    }

    deinit {
        _ = io_uring_unregister_buf_ring(&owner.ring, Int32(group))
        munmap(ringMemory, ringBytes)
        storage.deallocate()
    }

    /// The bytes a completion delivered into buffer `id`.
    public func bytes(id: UInt16, length: Int) -> UnsafeRawBufferPointer {
        precondition(Int(id) < count && length <= size)
        return UnsafeRawBufferPointer(start: storage + Int(id) * size, count: length)
    }

    /// Gives buffer `id` back to the kernel once its bytes have been consumed.
    public func recycle(id: UInt16) {
        let bufRing = ringMemory.assumingMemoryBound(to: io_uring_buf_ring.self)
        io_uring_buf_ring_add(bufRing, storage + Int(id) * size, UInt32(size), id,
                              io_uring_buf_ring_mask(UInt32(count)), 0)
        io_uring_buf_ring_advance(bufRing, 1)
    }
}
