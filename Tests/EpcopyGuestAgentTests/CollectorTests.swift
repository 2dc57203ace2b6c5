// The agent's collectors: the page classifier's rules, a census over fixture files whose answer is known page by
// page, and a census of this very host (root), checked against the kernel's own counters.

import EpcopyGuestAgent
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

@Suite(.tier(.unit)) struct CollectorTests {
    @Test func classifierRules() {
        #expect(PageClassifier.classify([.buddy]) == .believedFree)
        #expect(PageClassifier.classify([.offline]) == .believedFree)
        // Free wins over anything stale.
        #expect(PageClassifier.classify([.buddy, .referenced]) == .believedFree)
        #expect(PageClassifier.classify([.slab]) == .kernel)
        #expect(PageClassifier.classify([.pageTable]) == .kernel)
        #expect(PageClassifier.classify([.reserved]) == .kernel)
        #expect(PageClassifier.classify([]) == .kernel, "a flagless page is most likely a kernel allocation")
        #expect(PageClassifier.classify([.lru, .active]) == .recent)
        #expect(PageClassifier.classify([.lru, .referenced, .anon]) == .recent)
        #expect(PageClassifier.classify([.lru, .anon]) == .inUse)
        #expect(PageClassifier.classify([.thp]) == .inUse, "THP tail pages carry THP but not LRU")
        // Idle page tracking, where present, decides "recent" for user pages.
        #expect(PageClassifier.classify([.lru, .active], young: false) == .inUse)
        #expect(PageClassifier.classify([.lru], young: true) == .recent)
        #expect(PageClassifier.classify([.slab], young: true) == .kernel)
        #expect(PageClassifier.isFree([.buddy]) && !PageClassifier.isFree([.lru]))
    }

    /// A fake /proc: RAM at frames 1..<0x9f and 0x100..<0x400 (q35-like), flags chosen per frame.
    static func fixture() throws -> (CollectorSources, [UInt64: KPageFlags], String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("epcopy-collect-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let iomem = """
            00000000-00000fff : Reserved
            00001000-0009fbff : System RAM
            000f0000-000fffff : System ROM
            00100000-003fffff : System RAM
              00200000-002fffff : Kernel code
            00400000-00ffffff : PCI Bus 0000:00
            """
        try iomem.write(toFile: "\(dir)/iomem", atomically: true, encoding: .utf8)
        var flags: [UInt64: KPageFlags] = [:]
        var words = [UInt64](repeating: 0, count: 0x400)
        var generator = SystemRandomNumberGenerator()
        let choices: [KPageFlags] = [[.buddy], [.slab], [], [.lru, .active], [.lru, .anon], [.lru, .referenced, .mmap],
                                     [.pageTable], [.thp]]
        for frame in 0..<UInt64(0x400) {
            // Long runs, as real memory has, with random breaks.
            let f = frame > 0 && UInt64.random(in: 0..<8, using: &generator) != 0
                ? flags[frame - 1] ?? [] : choices.randomElement(using: &generator)!
            flags[frame] = f
            words[Int(frame)] = f.rawValue
        }
        try words.withUnsafeBytes { try Data($0).write(to: URL(fileURLWithPath: "\(dir)/kpageflags")) }
        return (CollectorSources(iomem: "\(dir)/iomem", kpageflags: "\(dir)/kpageflags",
                                 pageIdle: "\(dir)/no-page-idle"), flags, dir)
    }

    @Test func censusOfFixtureIsExact() throws {
        let (sources, flags, dir) = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let census = try Collector.census(sources)
        let ram = Array(1..<UInt64(0x9f)) + Array(0x100..<UInt64(0x400))
        #expect(census.ramMap.count == UInt64(ram.count))
        #expect(census.recentSignal == "flags")
        var union = PageSet<GuestFrameNumber>()
        for c in PageClass.allCases {
            let set = census.classes[c] ?? PageSet()
            #expect(union.isDisjoint(with: set), "classes overlap at \(c)")
            union.formUnion(set)
        }
        #expect(union == census.ramMap)
        for frame in ram {
            let expected = PageClassifier.classify(flags[frame]!)
            #expect(census.classes[expected]?.contains(GuestFrameNumber(rawValue: frame)) == true, "frame \(frame)")
        }
        let free = try Collector.freeFrames(sources, ramMap: census.ramMap)
        #expect(free == census.free)
        // The hot report a census makes passes the protocol's own validation and round-trips.
        let report = try census.hotReport(requestID: 7)
        let frame = AgentMessage.hotReport(report).encodedFrame()
        var decoder = FrameDecoder(link: .agent)
        decoder.append(frame)
        let decoded = try AgentMessage.decode(frame: try #require(try decoder.next()), context: AgentDecodeContext())
        #expect(decoded == .hotReport(report))
    }

    @Test func truncatedFlagsFileReadsAsNoPage() throws {
        let (sources, _, dir) = try Self.fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The kernel knows fewer frames than iomem claims: the missing ones are not RAM we can classify.
        truncate(sources.kpageflags, 0x200 * 8)
        let census = try Collector.census(sources)
        #expect(census.ramMap.count == census.classes.values.reduce(0) { $0 + $1.count })
        #expect(census.classes[.kernel]?.contains(GuestFrameNumber(rawValue: 0x3ff)) == true)
    }

    @Test func missingFilesSayWhich() {
        let sources = CollectorSources(iomem: "/nonexistent/iomem")
        #expect(throws: GuestFileError.self) { try Collector.census(sources) }
        do { _ = try Collector.census(sources) } catch { #expect("\(error)".contains("/nonexistent/iomem")) }
    }

    /// The agent on this host, as `epcopy agent --once` runs it: classes add up to System RAM, and the free
    /// count matches the buddy allocator's own (nr_free_pages) within 10 %.
    @Test(.enabled(if: geteuid() == 0 && access("/proc/kpageflags", R_OK) == 0, "needs root and /proc/kpageflags"))
    func censusOfThisHost() throws {
        let ram = try IOMem.systemRAM(String(contentsOfFile: "/proc/iomem", encoding: .utf8))
        let census = try Collector.census()
        let kernelFree = try #require(AgentCommand.vmstatPages("nr_free_pages"))
        #expect(census.ramMap == ram)
        #expect(PageClass.allCases.reduce(0) { $0 + census.count($1) } == ram.count)
        let free = Double(census.free.count)
        #expect(abs(free - Double(kernelFree)) <= 0.10 * Double(kernelFree),
                "free \(census.free.count) vs nr_free_pages \(kernelFree)")
        #expect(census.count(.kernel) > 0 && census.count(.believedFree) > 0)
    }
}
