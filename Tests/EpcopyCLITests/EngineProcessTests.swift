// Two engine processes move a 256 MiB RAM file while a separate program — running under the LD_PRELOAD
// shim exactly as the destination QEMU will — touches every page in random order and checks it. Then
// the destination file is compared with the source pattern page by page, holes must read as zero and
// must never have been sent, and the source file must be fully released. Variants: across a veth pair
// between two network namespaces, and with the destination engine killed mid-transfer and replaced.

import CEpcopyLinux
import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

struct TransferScenario {
    var pages: UInt64 = 65536  // 256 MiB
    var seed: UInt64 = 0xC0FFEE
    var holes = PageSet<PageIndex>(ranges: [
        try! PageRange(start: PageIndex(rawValue: 10), count: 2000),
        try! PageRange(start: PageIndex(rawValue: 30000), count: 1),
        try! PageRange(start: PageIndex(rawValue: 65000), count: 536),
    ])
    /// Network namespaces (source, destination) and the destination's address there.
    var namespaces: (source: String, destination: String, address: String)?
    /// Kill the destination engine once this fraction of the pages has landed, and start a replacement.
    var killDestinationAtFraction: Double?
    var rate: String?
}

final class ScenarioFiles {
    let tag = "epcopy-t\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    var source: String { "/dev/shm/\(tag)-src" }
    var target: String { "/dev/shm/\(tag)-dst" }
    var socket: String { "/tmp/\(tag).sock" }
    var state: String { "/tmp/\(tag).state" }
    deinit {
        for path in [source, target, socket, state, state + ".tmp"] { unlink(path) }
    }
}

func makeFile(_ path: String, pages: UInt64, fill: ((UnsafeMutableRawPointer) -> Void)?) throws {
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    try #require(fd >= 0)
    defer { close(fd) }
    try #require(ftruncate(fd, off_t(pages * 4096)) == 0)
    guard let fill else { return }
    let map = try #require(mmap(nil, Int(pages * 4096), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
    fill(map)
    munmap(map, Int(pages * 4096))
}

func allocatedBytes(_ path: String) -> Int {
    var st = stat()
    stat(path, &st)
    return Int(st.st_blocks) * 512
}

func runTransfer(_ scenario: TransferScenario) throws {
    let files = ScenarioFiles()
    let pages = scenario.pages
    let holes = scenario.holes
    try makeFile(files.source, pages: pages) { base in
        var page: UInt64 = 0
        while page < pages {
            if holes.contains(PageIndex(rawValue: page)) { page += 1; continue }
            var end = page
            while end < pages, !holes.contains(PageIndex(rawValue: end)) { end += 1 }
            MemoryCompare.fillPattern(base + Int(page * 4096), firstPage: page, pages: end - page, seed: scenario.seed)
            page = end
        }
    }
    try makeFile(files.target, pages: pages, fill: nil)

    let epcopy = productsDirectory.appendingPathComponent("epcopy").path
    let port = freePort()
    let address = scenario.namespaces?.address ?? "127.0.0.1"
    let session = String(UInt64.random(in: 1...UInt64.max))
    let sourcePrefix = scenario.namespaces.map { ["/usr/sbin/ip", "netns", "exec", $0.source] } ?? []
    let destinationPrefix = scenario.namespaces.map { ["/usr/sbin/ip", "netns", "exec", $0.destination] } ?? []
    let rate = scenario.rate.map { ["--rate", $0] } ?? []

    var destination = try Spawned("destination", epcopy, [
        "engine", "destination", "--listen", "\(address):\(port)", "--session", session,
        "--handover-socket", files.socket, "--state", files.state, "--json"] + rate, prefix: destinationPrefix)
    try #require(waitForFile(files.socket, seconds: 20), "destination never listened: \(destination.stderr)")

    let zeroList = holes.ranges.map { "\($0.lowerBound.rawValue)-\($0.upperBound.rawValue - 1)" }.joined(separator: ",")
    let toucher = try Spawned("memtouch", productsDirectory.appendingPathComponent("epcopy-memtouch").path,
                              [files.target, String(pages * 4096), String(scenario.seed)], environment: [
                                  "LD_PRELOAD": productsDirectory.appendingPathComponent("libEpcopyPreload.so").path,
                                  "EPCOPY_SHIM_SOCKET": files.socket,
                                  "EPCOPY_SHIM_PREFIX": files.target,
                                  "MEMTOUCH_ZERO_PAGES": zeroList,
                              ])
    let source = try Spawned("source", epcopy, [
        "engine", "source", "--ram-file", files.source, "--to", "\(address):\(port)", "--session", session,
        "--reconnect-timeout", "30", "--json"] + rate, prefix: sourcePrefix)

    if let fraction = scenario.killDestinationAtFraction {
        // Pages land in the destination's tmpfs file, so its allocated size is how far the transfer has got.
        let landed = Int(Double(pages * 4096) * fraction)
        try #require(waitUntil(deadline: .seconds(60), poll: .milliseconds(1)) {
            allocatedBytes(files.target) >= landed || !destination.isRunning
        }, "\(Int(fraction * 100)) % of the pages did not land within 60 s")
        try #require(destination.isRunning, "the transfer ended before the kill: \(destination.stdout)")
        destination.kill(SIGKILL)
        destination.wait(seconds: 5)
        // Without an engine, faults must hang — the program must neither finish nor read zeros. The event that
        // would prove it wrong is memtouch exiting.
        #expect(!waitUntil(deadline: .milliseconds(500)) { !toucher.isRunning }, "memtouch did not wait for the engine: \(toucher.stdout) \(toucher.stderr)")
        #expect(!toucher.stdout.contains("CORRUPT"))
        destination = try Spawned("replacement", epcopy, [
            "engine", "destination", "--listen", "\(address):\(port)", "--session", session,
            "--take-over", files.state, "--json"] + rate, environment: ["EPCOPY_LOG": "debug"],
            prefix: destinationPrefix)
    }

    let sourceStatus = source.wait(seconds: 180)
    let destinationStatus = destination.wait(seconds: 30)
    let toucherStatus = toucher.wait(seconds: 30)
    #expect(sourceStatus == 0, "source: \(source.stderr)")
    #expect(destinationStatus == 0, "destination: \(destination.stderr)")
    #expect(toucherStatus == 0, "memtouch: \(toucher.stdout) \(toucher.stderr) \(blockedOn(toucher.pid)); destination said: \(destination.stderr)")
    #expect(toucher.stdout.contains("OK pages=\(pages)"), "memtouch: \(toucher.stdout) \(toucher.stderr)")

    // The destination file, read directly, equals the source pattern; holes are zero.
    let fd = open(files.target, O_RDONLY)
    try #require(fd >= 0)
    defer { close(fd) }
    let map = try #require(mmap(nil, Int(pages * 4096), PROT_READ, MAP_SHARED, fd, 0))
    defer { munmap(map, Int(pages * 4096)) }
    let comparison = MemoryCompare.comparePattern(actual: map, pages: pages, seed: scenario.seed, zero: holes)
    #expect(comparison.mismatchedPages == 0, "mismatched pages: \(comparison.firstMismatches)")

    let report = try JSONDecoder().decode(SourceReport.self, from: Data(source.stdout.utf8))
    #expect(report.pagesZero == holes.count)
    if scenario.killDestinationAtFraction == nil {
        // Holes are never sent; everything else exactly once.
        #expect(report.pagesPushed + report.pagesUrgent == pages - holes.count)
    } else {
        #expect(report.reconnects == 1)
        #expect(report.pagesPresentAtResume > 0)
    }
    #expect(allocatedBytes(files.source) == 0, "the source still holds memory")
}

/// Where a process that should have finished is stuck: its kernel wait channel and stack (root only), so a
/// hang in CI says whether a fault was left unanswered.
func blockedOn(_ pid: Int32) -> String {
    let wchan = (try? String(contentsOfFile: "/proc/\(pid)/wchan", encoding: .utf8)) ?? "?"
    let stack = (try? String(contentsOfFile: "/proc/\(pid)/stack", encoding: .utf8)) ?? "?"
    return "blocked in \(wchan): \(stack.split(separator: "\n").prefix(6).joined(separator: " < "))"
}

@Suite(.serialized, .tier(.linux)) struct EngineProcessTests {
    @Test func twoEngineProcessesOnLoopback() throws {
        try runTransfer(TransferScenario())
    }

    @Test func twoEngineProcessesAcrossAVethPair() throws {
        let id = getpid() % 10000
        let (a, b) = ("epc-s\(id)", "epc-d\(id)")
        let subnet = "10.213.\(id % 250)"
        defer {
            sh("ip netns del \(a)")
            sh("ip netns del \(b)")
        }
        try #require(sh("ip netns add \(a) && ip netns add \(b)") == 0, "ip netns add failed (root needed)")
        try #require(sh("""
            ip link add vs\(id) type veth peer name vd\(id) && \
            ip link set vs\(id) netns \(a) && ip link set vd\(id) netns \(b) && \
            ip -n \(a) addr add \(subnet).1/30 dev vs\(id) && ip -n \(b) addr add \(subnet).2/30 dev vd\(id) && \
            ip -n \(a) link set vs\(id) up && ip -n \(b) link set vd\(id) up && \
            ip -n \(a) link set lo up && ip -n \(b) link set lo up
            """) == 0)
        try runTransfer(TransferScenario(namespaces: (a, b, "\(subnet).2")))
    }

    @Test func aKilledDestinationEngineIsReplacedAndTheTransferCompletes() throws {
        try runTransfer(TransferScenario(killDestinationAtFraction: 0.3, rate: "1gbit"))
    }
}
