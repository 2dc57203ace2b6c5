// The transfer core end to end inside one process: a source engine and a destination engine on
// loopback, a real userfaultfd on the destination's shared mapping, and a toucher thread faulting
// random pages while the push runs. Every page of the destination is compared with the source's
// pattern afterwards, and the source file must have been released completely.

import CEpcopyLinux
import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Synchronization
import Testing

/// A /dev/shm file standing in for a VM's RAM file; removed when the test ends.
final class TestRAMFile {
    let path: String
    let size: Int

    init(_ name: String, size: Int) throws {
        path = "/dev/shm/epcopy-test-\(getpid())-\(name)"
        self.size = size
        unlink(path)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        try #require(fd >= 0, "create \(path): \(String(cString: strerror(errno)))")
        defer { close(fd) }
        try #require(ftruncate(fd, off_t(size)) == 0)
    }

    /// Writes the pattern to every page except `holes`, which stay unallocated (zero by construction).
    func fillPattern(seed: UInt64, holes: PageSet<PageIndex>) throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        let map = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        defer { munmap(map, size) }
        var page: UInt64 = 0
        let total = UInt64(size) / 4096
        while page < total {
            if holes.contains(PageIndex(rawValue: page)) { page += 1; continue }
            var end = page
            while end < total, !holes.contains(PageIndex(rawValue: end)) { end += 1 }
            MemoryCompare.fillPattern(map + Int(page * 4096), firstPage: page, pages: end - page, seed: seed)
            page = end
        }
    }

    /// Bytes of the file still backed by memory.
    var allocatedBytes: Int {
        var st = stat()
        stat(path, &st)
        return Int(st.st_blocks) * 512
    }

    deinit { unlink(path) }
}

/// Runs a closure on a thread and keeps its result.
final class Background<T: Sendable>: Sendable {
    private final class Slot: Sendable {
        let result = Mutex<Result<T, any Error>?>(nil)
    }
    private let slot = Slot()
    private let thread: JoinableThread

    init(_ name: String, _ body: @escaping @Sendable () throws -> T) {
        let slot = self.slot
        thread = JoinableThread(name: name) {
            let r = Result { try body() }
            slot.result.withLock { $0 = r }
        }
    }

    func value() throws -> T {
        thread.join()
        return try slot.result.withLock { $0! }.get()
    }
}

@Suite(.serialized, .tier(.linux)) struct EngineTransferTests {
    @Test func twoEnginesMoveARegionWhileFaultsHappen() throws {
        let pages: UInt64 = 16384  // 64 MiB
        let seed: UInt64 = 0x5EED
        let holes = PageSet<PageIndex>(ranges: [
            try PageRange(start: PageIndex(rawValue: 100), count: 900),
            try PageRange(start: PageIndex(rawValue: 8000), count: 1),
            try PageRange(start: PageIndex(rawValue: 16000), count: 384),
        ])
        let source = try TestRAMFile("src", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: holes)
        let target = try TestRAMFile("dst", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 7))
        let base = try #require(destination.ownMappingAddress)
        let listener = try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = listener.endpoint
        let listenerBox = ListenerBox(listener)

        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        let engine = try SourceEngine(ramFile: source.path, options: SourceOptions(sessionID: 7, vmName: "test-vm"))
        let src = Background("src") { try engine.run(destination: endpoint) }
        // Fault random pages while the push runs; each must read the source's content or zero.
        let toucher = Background("touch") { () -> UInt64 in
            var rng = SystemRandomNumberGenerator()
            var bad: UInt64 = 0
            for _ in 0..<3000 {
                let page = UInt64.random(in: 0..<pages, using: &rng)
                let address = UnsafeRawPointer(bitPattern: base + UInt(page * 4096))!
                let ok = holes.contains(PageIndex(rawValue: page))
                    ? MemoryCompare.isZeroPage(address)
                    : epc_pattern_check(address, page, 1, seed) < 0
                if !ok { bad += 1 }
            }
            return bad
        }
        let dstReport = try dst.value()
        let srcReport = try src.value()
        #expect(try toucher.value() == 0, "the toucher read wrong content")

        let all = UnsafeRawPointer(bitPattern: base)!
        let comparison = MemoryCompare.comparePattern(actual: all, pages: pages, seed: seed, zero: holes)
        #expect(comparison.mismatchedPages == 0, "mismatched pages: \(comparison.firstMismatches)")
        #expect(comparison.pagesCompared == pages)
        // Holes are never sent; everything else is sent exactly once.
        #expect(srcReport.pagesZero == holes.count)
        #expect(srcReport.pagesPushed + srcReport.pagesUrgent == pages - holes.count)
        #expect(dstReport.pagesReceived == pages - holes.count)
        #expect(dstReport.metrics.faults > 0)
        // The source gave every page back.
        #expect(source.allocatedBytes == 0, "source still holds \(source.allocatedBytes) bytes")
        withExtendedLifetime(targetFD) {}
    }
}

extension EngineTransferTests {
    @Test func pagesReportedFreeAfterResumeAreNeverSentAndReadAsZero() throws {
        let pages: UInt64 = 16384
        let seed: UInt64 = 0xF4EE
        let free = PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: 14000), count: 2384))
        let source = try TestRAMFile("src-free", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: PageSet())
        let target = try TestRAMFile("dst-free", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        // A 1 Gbit/s link: the push reaches the end of the region long after the report arrives.
        let link = LinkSpec(bytesPerSecond: 125_000_000)
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 8, link: link))
        let base = try #require(destination.ownMappingAddress)
        // As the agent's post-resume scan would: these pages are free in the guest.
        destination.markFree(free)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listenerBox.listener.endpoint
        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        let engine = try SourceEngine(ramFile: source.path, options: SourceOptions(sessionID: 8, vmName: "t", link: link))
        let src = Background("src") { try engine.run(destination: endpoint) }
        let toucher = Background("touch") { () -> UInt64 in
            var bad: UInt64 = 0
            for page in stride(from: UInt64(13990), to: 14010, by: 1) {
                let address = UnsafeRawPointer(bitPattern: base + UInt(page * 4096))!
                let ok = free.contains(PageIndex(rawValue: page))
                    ? MemoryCompare.isZeroPage(address) : epc_pattern_check(address, page, 1, seed) < 0
                if !ok { bad += 1 }
            }
            return bad
        }
        _ = try dst.value()
        let report = try src.value()
        #expect(try toucher.value() == 0)
        // Free pages already on their way when the report reached the source (the neighbour prefetch after the
        // toucher's faults at 13990.. can take up to 64 of them) are delivered and discarded; none other is sent.
        #expect(report.pagesPushed + report.pagesUrgent + report.pagesFree == pages)
        #expect(report.pagesFree + 64 >= free.count, "free pages were sent: only \(report.pagesFree) skipped")
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed, zero: free)
        #expect(comparison.mismatchedPages == 0, "\(comparison.firstMismatches)")
        #expect(source.allocatedBytes == 0)
        withExtendedLifetime(targetFD) {}
    }
}

/// Lets a ~Copyable listener be borrowed from a @Sendable closure.
final class ListenerBox: @unchecked Sendable {
    let listener: Listener
    init(_ listener: consuming Listener) { self.listener = listener }
}

extension EngineTransferTests {
    /// Believed-free pages wait for the destination's free scan even on a fast link; what the scan finds free
    /// is never sent, the rest arrives intact. Without a scan the push goes on after `freeHoldMillis`.
    @Test(arguments: [true, false])
    func believedFreePagesWaitForTheFreeScan(scanArrives: Bool) throws {
        let pages: UInt64 = 16384
        let seed: UInt64 = 0xB0F
        let hinted = PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: 8000), count: pages - 8000))
        // The guest reallocated a few hinted pages before the scan: those must still arrive.
        let free = hinted.subtracting(PageSet(try PageRange(start: PageIndex(rawValue: 9000), count: 100)))
        let source = try TestRAMFile("src-hold-\(scanArrives)", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: PageSet())
        let target = try TestRAMFile("dst-hold-\(scanArrives)", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 9))
        let base = try #require(destination.ownMappingAddress)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listenerBox.listener.endpoint
        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        var options = SourceOptions(sessionID: 9, vmName: "t",
                                    classes: [(.inUse, PageSet(try PageRange(start: PageIndex(rawValue: 0), count: 8000))),
                                              (.believedFree, hinted)])
        options.holdFreeUntilScan = true
        options.freeHoldMillis = 400
        let engine = try SourceEngine(ramFile: source.path, options: options)
        let src = Background("src") { try engine.run(destination: endpoint) }
        if scanArrives {
            // The agent's scan takes a while. The push sends the 8000 in-use pages and must then hold: the event
            // that would prove it wrong is one more page going out before the scan is in.
            #expect(waitUntil(deadline: .seconds(20)) { engine.pagesSent >= 8000 }, "the in-use pages did not go out")
            #expect(!waitUntil(deadline: .milliseconds(250)) { engine.pagesSent > 8000 },
                    "believed-free pages went out before the scan")
            destination.markFree(free)
            destination.finishFreeScan(agentAnswered: true, pagesReported: free.count)
        }
        _ = try dst.value()
        let report = try src.value()
        let sent = report.pagesPushed + report.pagesUrgent
        if scanArrives {
            #expect(report.freeScanAnswered == true)
            #expect(sent == pages - free.count, "sent \(sent): believed-free pages went out before the scan")
            #expect(report.pagesFree == free.count)
            #expect(report.freeHoldMillis > 100)
        } else {
            #expect(report.freeScanAnswered == nil)
            #expect(sent == pages)
            #expect(report.freeHoldMillis >= 350)
        }
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed, zero: scanArrives ? free : PageSet())
        #expect(comparison.mismatchedPages == 0, "\(comparison.firstMismatches)")
        withExtendedLifetime(targetFD) {}
    }
}

extension EngineTransferTests {
    /// A page is faulted and requested; before its data arrives (150 ms link delay) the guest's free scan reports
    /// it free. The reply must not be placed — and the faulting thread must still be woken, with a zero page.
    @Test func aRequestedPageReportedFreeBeforeItsReplyWakesWithZero() throws {
        let pages: UInt64 = 4096
        let seed: UInt64 = 0x5EED
        let target: UInt64 = 4000
        let source = try TestRAMFile("src-reqfree", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: PageSet())
        let dst = try TestRAMFile("dst-reqfree", size: Int(pages * 4096))
        let dstFD = try FileDescriptor.open(dst.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: dstFD, length: Int(pages * 4096))
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 11))
        let base = try #require(destination.ownMappingAddress)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listenerBox.listener.endpoint
        let dstRun = Background("dst") { try destination.run(listener: listenerBox.listener) }
        let engine = try SourceEngine(ramFile: source.path, options: SourceOptions(
            sessionID: 11, vmName: "t", link: LinkSpec(delayNanos: 150_000_000), prefetchPages: 0))
        let srcRun = Background("src") { try engine.run(destination: endpoint) }
        // Touch once the session is up (the push has begun), so the fault is requested over a live link.
        try #require(waitUntil(deadline: .seconds(10)) { engine.pagesSent > 0 }, "the session did not start")
        let toucher = Background("touch") { () -> Bool in
            MemoryCompare.isZeroPage(UnsafeRawPointer(bitPattern: base + UInt(target * 4096))!)
        }
        #expect(waitUntil(deadline: .seconds(5), poll: .milliseconds(1)) {
            destination.metrics.faults.load(ordering: .relaxed) > 0
        })
        destination.markFree(PageSet(PageRange(PageIndex(rawValue: target))))
        #expect(try toucher.value() == true, "the faulting thread read the stale page instead of a zero page")
        _ = try dstRun.value()
        _ = try srcRun.value()
        // Every other page arrived intact.
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages, seed: seed,
                                                      zero: PageSet(PageRange(PageIndex(rawValue: target))))
        #expect(comparison.mismatchedPages == 0, "\(comparison.firstMismatches)")
        withExtendedLifetime(dstFD) {}
    }
}

extension EngineTransferTests {
    /// Pages that exist in the file but hold only zeros are sent as zero ranges, not data, and read as zero on
    /// the destination — also when a fault asks for one first.
    @Test func zeroContentPagesTravelAsRanges() throws {
        let pages: UInt64 = 8192
        let seed: UInt64 = 0x2E50
        let zeroed = PageSet<PageIndex>(ranges: [try PageRange(start: PageIndex(rawValue: 100), count: 500),
                                                 try PageRange(start: PageIndex(rawValue: 4001), count: 1),
                                                 try PageRange(start: PageIndex(rawValue: 8000), count: 192)])
        let source = try TestRAMFile("src-zc", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: PageSet())
        // Written with zeros: allocated in the file (not holes), zero by content.
        let fd = open(source.path, O_RDWR | O_CLOEXEC)
        let zeros = [UInt8](repeating: 0, count: 4096)
        for page in zeroed.pages { _ = pwrite(fd, zeros, 4096, off_t(page.rawValue * 4096)) }
        close(fd)
        #expect(source.allocatedBytes == Int(pages * 4096))
        let target = try TestRAMFile("dst-zc", size: Int(pages * 4096))
        let targetFD = try FileDescriptor.open(target.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(pages * 4096))
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 12))
        let base = try #require(destination.ownMappingAddress)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listenerBox.listener.endpoint
        let dst = Background("dst") { try destination.run(listener: listenerBox.listener) }
        let engine = try SourceEngine(ramFile: source.path, options: SourceOptions(sessionID: 12, vmName: "t"))
        let src = Background("src") { try engine.run(destination: endpoint) }
        let toucher = Background("touch") { () -> UInt64 in
            var bad: UInt64 = 0
            for page in [UInt64(8100), 4001, 350, 4000, 4002, 99, 600] {
                let address = UnsafeRawPointer(bitPattern: base + UInt(page * 4096))!
                let ok = zeroed.contains(PageIndex(rawValue: page))
                    ? MemoryCompare.isZeroPage(address) : epc_pattern_check(address, page, 1, seed) < 0
                if !ok { bad += 1 }
            }
            return bad
        }
        _ = try dst.value()
        let report = try src.value()
        #expect(try toucher.value() == 0)
        #expect(report.pagesZeroContent + report.pagesUrgent >= zeroed.count - 8, "\(report)")
        #expect(report.pagesPushed + report.pagesUrgent + report.pagesZeroContent == pages)
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed, zero: zeroed)
        #expect(comparison.mismatchedPages == 0, "\(comparison.firstMismatches)")
        #expect(source.allocatedBytes == 0)
        withExtendedLifetime(targetFD) {}
    }
}

extension EngineTransferTests {
    /// The push claims a zero-content page for a zeroPages message; before that message arrives (it waits on the
    /// shaped link behind a bulk frame), the guest faults on the page and the request reaches the source, which
    /// rightly sends nothing (the page is claimed). The zeroPages message must then wake the fault. (Found in a
    /// real migration: the vCPU hung for the rest of the run and the guest agent could not answer.)
    @Test func aFaultOnAPageAlreadyQueuedAsZeroIsWokenByTheZeroMessage() throws {
        let pages: UInt64 = 8192  // data, 2048 zero-content pages, then 16 MiB more data (2 s on this link)
        let seed: UInt64 = 0x2E51
        let zeroed = PageSet<PageIndex>(try PageRange(start: PageIndex(rawValue: 2048), count: 2048))
        let target: UInt64 = 2048  // the first zero page: in the first zero message the push queues
        let source = try TestRAMFile("src-zrace", size: Int(pages * 4096))
        try source.fillPattern(seed: seed, holes: PageSet())
        let fd = open(source.path, O_RDWR | O_CLOEXEC)
        let zeros = [UInt8](repeating: 0, count: 4096)
        for page in zeroed.pages { _ = pwrite(fd, zeros, 4096, off_t(page.rawValue * 4096)) }
        close(fd)
        let dst = try TestRAMFile("dst-zrace", size: Int(pages * 4096))
        let dstFD = try FileDescriptor.open(dst.path, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: dstFD, length: Int(pages * 4096))
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: 13))
        let base = try #require(destination.ownMappingAddress)
        let listenerBox = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listenerBox.listener.endpoint
        let dstRun = Background("dst") { try destination.run(listener: listenerBox.listener) }
        // 8 MB/s and 300 ms one way: the zero message arrives at least 300 ms after the push queued it, while the
        // request (the destination's direction is not shaped) reaches the source at once.
        let engine = try SourceEngine(ramFile: source.path, options: SourceOptions(
            sessionID: 13, vmName: "t", link: LinkSpec(bytesPerSecond: 8_000_000, delayNanos: 300_000_000),
            prefetchPages: 0))
        let srcRun = Background("src") { try engine.run(destination: endpoint) }
        #expect(waitUntil(deadline: .seconds(20), poll: .microseconds(200)) { engine.pagesSentAsZero > 0 })
        let faultsBefore = destination.metrics.faults.load(ordering: .relaxed)
        let woken = WokenFlag()
        let toucher = Background("touch") { () -> Bool in
            let ok = MemoryCompare.isZeroPage(UnsafeRawPointer(bitPattern: base + UInt(target * 4096))!)
            woken.set()
            return ok
        }
        // The zero message arrives ~0.3 s after the push queued it; the transfer goes on for 2 s more. (Before the
        // fix the fault was woken only when the transfer ended and guest memory was unregistered.)
        #expect(waitUntil(deadline: .milliseconds(1500), poll: .milliseconds(1)) { woken.isSet }, "the fault on a page queued as zero was not woken by the zero message")
        #expect(destination.metrics.faults.load(ordering: .relaxed) > faultsBefore, "the touch did not fault")
        _ = try dstRun.value()
        _ = try srcRun.value()
        #expect(try toucher.value() == true)
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed, zero: zeroed)
        #expect(comparison.mismatchedPages == 0, "\(comparison.firstMismatches)")
        withExtendedLifetime(dstFD) {}
    }
}

private final class WokenFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .releasing) }
    var isSet: Bool { flag.load(ordering: .acquiring) }
}
