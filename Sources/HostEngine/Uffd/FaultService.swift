// The destination's fault thread. It only resolves and enqueues (QEMU's postcopy fault thread does the
// same): a fault on a page that is already here is woken, a fault on a page known to be zero (a hole at
// the source, or free in the guest) is zero-filled without asking anyone, and anything else becomes a
// request for the urgent channel. Transfer and placement live elsewhere, so a fault never waits behind
// a bulk copy. The thread polls the uffd and a quit eventfd and nothing else.

import CEpcopyLinux
import EpcopyProtocol
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Requests from the fault thread to the urgent loop: a page list and an eventfd to wake the ring.
public final class RequestQueue: @unchecked Sendable {
    // SAFETY (@unchecked): `pages` is behind a Mutex; the eventfd is only written and read.
    private let pages = Mutex<[PageIndex]>([])
    public let event: EventFD

    public init() throws(SyscallError) { event = try EventFD() }

    public func push(_ newPages: [PageIndex]) {
        guard !newPages.isEmpty else { return }
        pages.withLock { $0.append(contentsOf: newPages) }
        event.signal()
    }

    public func take() -> [PageIndex] {
        event.drain()
        return pages.withLock { p in
            defer { p.removeAll(keepingCapacity: true) }
            return p
        }
    }
}

public final class FaultService: @unchecked Sendable {
    // SAFETY (@unchecked): immutable configuration plus Sendable shared state; `run` executes on one thread.
    private let placement: Placement
    private let pages: DestinationPages
    private let requests: RequestQueue
    private let pending: PendingFaults
    private let metrics: TransferMetrics
    private let quitFD: Int32

    public init(placement: Placement, pages: DestinationPages, requests: RequestQueue, pending: PendingFaults,
                metrics: TransferMetrics, quitFD: Int32) {
        self.placement = placement
        self.pages = pages
        self.requests = requests
        self.pending = pending
        self.metrics = metrics
        self.quitFD = quitFD
    }

    /// Serves faults until the quit eventfd is signalled. Throws only on a broken uffd.
    public func run() throws(SyscallError) {
        JoinableThread.setCurrentNice(-10)
        let uffd = placement.uffd
        let messageSize = epc_uffd_msg_size()
        let batch = 64
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: messageSize * batch, alignment: 8)
        defer { buffer.deallocate() }
        var fds = [pollfd(fd: uffd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: quitFD, events: Int16(POLLIN), revents: 0)]
        while true {
            _ = try Syscall.check("poll(uffd)") { Syscall.negErrno(Int(poll(&fds, 2, -1))) }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 {
                throw SyscallError(call: "poll(uffd)", errno: EIO)
            }
            let n: Int
            switch try Syscall.run("read(uffd)", { Syscall.negErrno(read(uffd, buffer, messageSize * batch)) }) {
            case .wouldBlock: continue
            case .done(let bytes): n = bytes / messageSize
            }
            let now = monotonicNanos()
            var toRequest: [PageIndex] = []
            for i in 0..<n {
                // SAFETY: the kernel wrote `n` whole uffd_msg records into `buffer` (read returns whole
                // messages), and `i < n <= batch`, so each record lies inside the allocation.
                let message = UnsafeRawPointer(buffer + i * messageSize)
                switch epc_uffd_msg_event(message) {
                case EPC_UFFD_EVENT_PAGEFAULT:
                    let address = UInt(epc_uffd_msg_fault_address(message)) & ~UInt(PageGeometry.size - 1)
                    if let page = try resolve(address: address, now: now) { toRequest.append(page) }
                case EPC_UFFD_EVENT_REMOVE:
                    // The owner punched or DONTNEED'd a range (balloon, free page reporting): those pages
                    // read as zero from now on, so never fetch them. uffd ioctls return EAGAIN until this
                    // event has been read (man 2 ioctl_userfaultfd).
                    try removed(start: UInt(epc_uffd_msg_remove_start(message)), end: UInt(epc_uffd_msg_remove_end(message)))
                default:
                    break
                }
            }
            requests.push(toRequest)
        }
    }

    private func removed(start: UInt, end: UInt) throws(SyscallError) {
        let lo = max(start, placement.base)
        let hi = min(end, placement.base + UInt(placement.length))
        guard hi > lo, let first = placement.page(at: lo) else { return }
        let freed = pages.markRemoved(first: first, count: UInt64((hi - lo) >> UInt(PageGeometry.shift)))
        pages.noteFreedNotPresent(freed)
        // A fault already requested in the range waits for data that will not be placed (the page is zero now):
        // answer it here, as every other place that marks pages zero does.
        for page in pending.take(in: freed) { try zeroFill(page) }
    }

    /// Resolves a fault on its own when it can; returns the page if it must be fetched.
    private func resolve(address: UInt, now: UInt64) throws(SyscallError) -> PageIndex? {
        guard let page = placement.page(at: address) else { return nil }
        metrics.faults.add(1, ordering: .relaxed)
        metrics.recordFaultTime()
        if pages.isPresent(page) {
            metrics.faultsAlreadyPresent.add(1, ordering: .relaxed)
            try placement.wakeOrContinue(page)
            return nil
        }
        if pages.isZero(page) {
            try zeroFill(page)
            return nil
        }
        guard pending.add(page, at: now) else { return nil }
        // The page may have been marked zero between the check above and `add` (a zeroPages message or the
        // free report, on another thread). The marker then looks at `pending` after setting the bit, and this
        // thread looks at the bit after `add`: whichever comes second finds the other (the pending set is
        // behind one lock), and only the one that takes the page from it fills it. Without this, the source
        // — which already claimed the page for its zero message — never answers, and the vCPU waits forever.
        if pages.isZero(page), !pending.resolve(first: page, count: 1).isEmpty {
            try zeroFill(page)
            return nil
        }
        Log.engine.trace("fault: \(page) requested")
        return page
    }

    /// A fault on a page known to be zero: map a zero page (which wakes the faulting thread). EAGAIN means a
    /// remove event is unread. It is retried in place, as before: if that event sits behind the batch this
    /// thread just read, the loop spins until it is read — never seen in a run, but it wants a retry after the
    /// next read instead.
    private func zeroFill(_ page: PageIndex) throws(SyscallError) {
        metrics.faultsZeroFilled.add(1, ordering: .relaxed)
        while case .retry = try placement.zeroFill(page) {}
        pages.markZeroFilled(page)
    }
}
