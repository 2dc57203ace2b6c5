// Placement: the one place where the destination puts pages into guest memory or wakes a thread that
// waits for one. Every uffd ioctl the destination makes after registration goes through here (and from
// here through Userfaultfd's wrappers and the syscall layer), so the kernel's answers are handled once:
// EEXIST (already present: wake the waiters), EAGAIN (a remove event is still unread: retry after it is
// read), ENOENT/ESRCH (the process that owned guest memory is gone) — `man 2 ioctl_userfaultfd`.
// The fault thread and the engine's receive paths share one Placement; it holds no mutable state.

import EpcopyProtocol

/// Guest memory as registered with a userfaultfd, addressed by RAM-file page.
public struct Placement: Sendable {
    /// The registered userfaultfd (owned by DestinationMemory, which outlives every user of this value).
    public let uffd: Int32
    /// Start of the registered range in the process that owns guest memory.
    public let base: UInt
    public let length: Int
    /// RAM-file page at `base`.
    public let firstPage: PageIndex
    public let mode: PlacementMode

    public init(uffd: Int32, base: UInt, length: Int, firstPage: PageIndex, mode: PlacementMode) {
        precondition(base & UInt(PageGeometry.size - 1) == 0 && length % Int(PageGeometry.size) == 0)
        self.uffd = uffd
        self.base = base
        self.length = length
        self.firstPage = firstPage
        self.mode = mode
    }

    /// One past the last RAM-file page of the range.
    public var endPage: PageIndex { PageIndex(rawValue: firstPage.rawValue + UInt64(length) >> PageGeometry.shift) }

    /// Host address of `page` in the registered process (an integer: it is not our address space).
    @inline(__always)
    public func address(of page: PageIndex) -> UInt {
        precondition(page >= firstPage && page < endPage, "\(page) is outside the registered range")
        return base + UInt((page.rawValue - firstPage.rawValue) << PageGeometry.shift)
    }

    /// The page a fault address falls in, or nil outside the range.
    @inline(__always)
    public func page(at address: UInt) -> PageIndex? {
        guard address >= base, address < base + UInt(length) else { return nil }
        return PageIndex(rawValue: UInt64((address - base) >> UInt(PageGeometry.shift)) + firstPage.rawValue)
    }

    /// UFFDIO_COPY of `count` pages from `source` to `first`…; wakes the faulting threads.
    /// `.alreadyPresent(n)`: the page after the first `n` bytes was placed by someone else first.
    /// `.retry(n)`: a remove event is pending; the caller retries the rest after the fault thread reads it.
    public func copy(first: PageIndex, count: UInt64, from source: UnsafeRawPointer)
        throws(SyscallError) -> Userfaultfd.Placement
    {
        try Userfaultfd.copy(fd: uffd, to: address(of: first), from: source,
                             length: Int(count << PageGeometry.shift))
    }

    /// Answers a fault on `page` with a zero page. UFFDIO_ZEROPAGE wakes the faulting threads; if the page
    /// was mapped meanwhile (`.alreadyPresent`) they are woken with UFFDIO_WAKE. `.retry` is returned as is.
    public func zeroFill(_ page: PageIndex) throws(SyscallError) -> Userfaultfd.Placement {
        let address = address(of: page)
        let result = try Userfaultfd.zeroPage(fd: uffd, at: address, length: Int(PageGeometry.size))
        if case .alreadyPresent = result {
            try Userfaultfd.wake(fd: uffd, start: address, length: Int(PageGeometry.size))
        }
        return result
    }

    /// A fault on a page that is already here: in copy mode the page is mapped and the thread only needs
    /// waking; in MINOR mode the page is in the page cache but this mapping may not map it yet, so
    /// UFFDIO_CONTINUE maps it (and wakes), falling back to a wake when it is already mapped.
    public func wakeOrContinue(_ page: PageIndex) throws(SyscallError) {
        let address = address(of: page)
        switch mode {
        case .copy:
            try Userfaultfd.wake(fd: uffd, start: address, length: Int(PageGeometry.size))
        case .continueMinor:
            if case .alreadyPresent = try Userfaultfd.continue(fd: uffd, at: address, length: Int(PageGeometry.size)) {
                try Userfaultfd.wake(fd: uffd, start: address, length: Int(PageGeometry.size))
            }
        }
    }

    /// Wakes every thread waiting anywhere in the range, so that faults an earlier engine read and never
    /// answered are raised again to this one (takeover).
    public func wakeAll() throws(SyscallError) {
        try Userfaultfd.wake(fd: uffd, start: base, length: length)
    }

    /// Ends the registration: from here on a page never placed reads as zero, which is exactly what holes
    /// and free pages are — so call it only when every page is present or known to be zero.
    public func unregister() throws(SyscallError) {
        try Userfaultfd.unregister(fd: uffd, start: base, length: length)
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
