// The destination's fault thread. It only resolves and enqueues (QEMU's postcopy fault thread does the
// same): a fault on a page that is already here is woken, a fault on a page known to be zero (a hole at
// the source, or free in the guest) is zero-filled without asking anyone, and anything else becomes a
// request for the urgent channel. Transfer and placement live elsewhere, so a fault never waits behind
// a bulk copy. The thread polls the uffd and a quit eventfd and nothing else.

import CEpcopyLinux
import EpcopyProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Pages whose faults are waiting for the urgent channel, with the time each fault was read.
public final class PendingFaults: Sendable {
    private let waiting = Mutex<[UInt64: UInt64]>([:])
    private let size = Atomic<Int>(0)

    public init() {}

    /// Records a fault; returns false if the page was already waiting (no second request needed).
    public func add(page: UInt64, at time: UInt64) -> Bool {
        waiting.withLock { w in
            guard w[page] == nil else { return false }
            w[page] = time
            size.store(w.count, ordering: .relaxed)
            return true
        }
    }

    /// Removes the pages of `[start, start+count)` that were waiting and returns their fault times.
    public func resolve(start: UInt64, count: UInt64) -> [UInt64] {
        guard size.load(ordering: .relaxed) > 0 else { return [] }
        return waiting.withLock { w in
            var times: [UInt64] = []
            if count < UInt64(w.count) {
                for page in start..<(start + count) { if let t = w.removeValue(forKey: page) { times.append(t) } }
            } else {
                for (page, t) in w where page >= start && page < start + count {
                    times.append(t)
                    w[page] = nil
                }
            }
            size.store(w.count, ordering: .relaxed)
            return times
        }
    }

    /// Removes and returns the waiting pages that lie in `set` (pages just marked zero: nothing will be sent
    /// for them, so whoever takes them must zero-fill and wake).
    public func take(in set: PageSet<PageIndex>) -> [UInt64] {
        guard size.load(ordering: .relaxed) > 0, !set.isEmpty else { return [] }
        return waiting.withLock { w in
            let pages = w.keys.filter { set.contains(PageIndex(rawValue: $0)) }
            for page in pages { w[page] = nil }
            size.store(w.count, ordering: .relaxed)
            return pages
        }
    }
}

/// Requests from the fault thread to the urgent loop: a page list and an eventfd to wake the ring.
public final class RequestQueue: @unchecked Sendable {
    // SAFETY (@unchecked): `pages` is behind a Mutex; the eventfd is only written and read.
    private let pages = Mutex<[UInt64]>([])
    public let event: EventFD

    public init() throws(SyscallError) { event = try EventFD() }

    public func push(_ newPages: [UInt64]) {
        guard !newPages.isEmpty else { return }
        pages.withLock { $0.append(contentsOf: newPages) }
        event.signal()
    }

    public func take() -> [UInt64] {
        event.drain()
        return pages.withLock { p in
            defer { p.removeAll(keepingCapacity: true) }
            return p
        }
    }
}

/// Page states the destination threads share. `present`: placed in guest memory. `zero`: never fetch,
/// zero-fill on fault (holes, free pages, ranges the guest removed). `known`: present or zero — the
/// transfer is complete when every page is known.
public final class DestinationPages: Sendable {
    public let present: AtomicPageBitmap
    public let zero: AtomicPageBitmap
    public let known: AtomicPageBitmap
    public let regionPages: UInt64
    /// Pages known so far (popcount of `known`, kept as a counter: the loops test it every iteration).
    public let knownCount = Atomic<UInt64>(0)
    /// Pages the guest freed or removed that were not here yet: the source must not send them.
    public let freedNotPresent = Mutex(PageSet<PageIndex>())

    public init(regionPages: UInt64) {
        self.regionPages = regionPages
        present = AtomicPageBitmap(pageCount: regionPages)
        zero = AtomicPageBitmap(pageCount: regionPages)
        known = AtomicPageBitmap(pageCount: regionPages)
    }

    /// Marks a page known (present or zero); counts it once.
    @inline(__always)
    public func markKnown(_ page: UInt64) {
        if known.insert(page) { knownCount.add(1, ordering: .relaxed) }
    }

    /// Marks pages never to be fetched (zero on fault); returns the pages newly marked. Works a bitmap
    /// word at a time: the source's hole list covers most of a fresh guest and arrives in the middle of
    /// the switchover, so a page-at-a-time loop here showed up as 120 ms of downtime.
    public func markZero(_ pages: PageSet<PageIndex>) -> PageSet<PageIndex> {
        var marked: [PageRange<PageIndex>] = []
        for range in pages.ranges where range.lowerBound.rawValue < regionPages {
            let start = range.lowerBound.rawValue
            let count = min(range.upperBound.rawValue, regionPages) - start
            zero.claim(start: start, count: count) { first, n in
                marked.append(try! PageRange(start: PageIndex(rawValue: first), count: n))
                var newlyKnown: UInt64 = 0
                known.claim(start: first, count: n) { _, k in newlyKnown += k }
                knownCount.add(newlyKnown, ordering: .relaxed)
            }
        }
        // A page already present stays as it is: place() and the fault thread check `present` first.
        return PageSet(ranges: marked)
    }
}

public final class FaultService: @unchecked Sendable {
    // SAFETY (@unchecked): immutable configuration plus Sendable shared state; `run` executes on one thread.
    private let uffd: Int32
    private let base: UInt
    private let length: Int
    private let firstPage: UInt64
    private let mode: PlacementMode
    private let pages: DestinationPages
    private let requests: RequestQueue
    private let pending: PendingFaults
    private let metrics: TransferMetrics
    private let quitFD: Int32

    public init(uffd: Int32, base: UInt, length: Int, firstPage: UInt64, mode: PlacementMode,
                pages: DestinationPages, requests: RequestQueue, pending: PendingFaults,
                metrics: TransferMetrics, quitFD: Int32) {
        self.uffd = uffd
        self.base = base
        self.length = length
        self.firstPage = firstPage
        self.mode = mode
        self.pages = pages
        self.requests = requests
        self.pending = pending
        self.metrics = metrics
        self.quitFD = quitFD
    }

    /// Serves faults until the quit eventfd is signalled. Throws only on a broken uffd.
    public func run() throws(SyscallError) {
        JoinableThread.setCurrentNice(-10)
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
            var toRequest: [UInt64] = []
            for i in 0..<n {
                let message = buffer + i * messageSize
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
        let lo = max(start, base)
        let hi = min(end, base + UInt(length))
        guard hi > lo else { return }
        let first = UInt64((lo - base) >> UInt(PageGeometry.shift)) + firstPage
        let count = UInt64((hi - lo) >> UInt(PageGeometry.shift))
        var freed = PageSet<PageIndex>()
        for page in first..<(first + count) {
            let wasPresent = pages.present.contains(page)
            pages.present.remove(page)
            if pages.zero.insert(page) { pages.markKnown(page) }
            if !wasPresent { freed.insert(PageIndex(rawValue: page)) }
        }
        if !freed.isEmpty { pages.freedNotPresent.withLock { $0.formUnion(freed) } }
        // A fault already requested in the range waits for data that will not be placed (the page is zero now):
        // answer it here, as every other place that marks pages zero does.
        for page in pending.take(in: freed) {
            try zeroFill(base + UInt((page - firstPage) << UInt64(PageGeometry.shift)), page: page)
        }
    }

    /// Resolves a fault on its own when it can; returns the page if it must be fetched.
    private func resolve(address: UInt, now: UInt64) throws(SyscallError) -> UInt64? {
        guard address >= base, address < base + UInt(length) else { return nil }
        let page = UInt64((address - base) >> UInt(PageGeometry.shift)) + firstPage
        metrics.faults.add(1, ordering: .relaxed)
        metrics.recordFaultTime()
        if pages.present.contains(page) {
            metrics.faultsAlreadyPresent.add(1, ordering: .relaxed)
            try wakeOrContinue(address)
            return nil
        }
        if pages.zero.contains(page) {
            try zeroFill(address, page: page)
            return nil
        }
        guard pending.add(page: page, at: now) else { return nil }
        // The page may have been marked zero between the check above and `add` (a zeroPages message or the
        // free report, on another thread). The marker then looks at `pending` after setting the bit, and this
        // thread looks at the bit after `add`: whichever comes second finds the other (the pending set is
        // behind one lock), and only the one that takes the page from it fills it. Without this, the source
        // — which already claimed the page for its zero message — never answers, and the vCPU waits forever.
        if pages.zero.contains(page), !pending.resolve(start: page, count: 1).isEmpty {
            try zeroFill(address, page: page)
            return nil
        }
        Trace.log("fault: page \(page) requested")
        return page
    }

    /// A fault on a page known to be zero: map a zero page (which wakes the faulting thread).
    private func zeroFill(_ address: UInt, page: UInt64) throws(SyscallError) {
        metrics.faultsZeroFilled.add(1, ordering: .relaxed)
        while case .retry = try Userfaultfd.zeroFillPage(fd: uffd, address: address) {}
        pages.present.insert(page)
    }

    private func wake(_ address: UInt) throws(SyscallError) {
        _ = try Syscall.check("UFFDIO_WAKE") { epc_uffd_wake(uffd, UInt64(address), PageGeometry.size) }
    }

    private func wakeOrContinue(_ address: UInt) throws(SyscallError) {
        switch mode {
        case .copy:
            try wake(address)
        case .continueMinor:
            // The page is in the page cache but this mapping may not map it yet (a MINOR fault).
            var done: Int64 = 0
            let rc = epc_uffd_continue(uffd, UInt64(address), PageGeometry.size, 0, &done)
            if case .alreadyPresent = try Userfaultfd.placement("UFFDIO_CONTINUE", rc: rc, done: done) {
                try wake(address)
            }
        }
    }
}

/// How pages are put into guest memory.
public enum PlacementMode: String, Sendable, Codable {
    /// Receive into a buffer, then UFFDIO_COPY (the range is registered MISSING).
    case copy
    /// Write into the RAM file through the engine's own mapping, then UFFDIO_CONTINUE (MISSING|MINOR):
    /// one copy instead of two. Each page is written once, before the guest can map it.
    case continueMinor = "continue"
}
