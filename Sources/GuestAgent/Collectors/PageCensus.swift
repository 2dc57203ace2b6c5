// One pass over the guest's RAM: every System RAM frame gets exactly one class. This is what the hot report
// (before the switch) and the free report (after it) are built from, and what `epcopy agent --once` prints.

#if canImport(Glibc)
import Glibc
#endif
import EpcopyProtocol

/// Every System RAM frame of the guest, classified.
public struct PageCensus: Sendable {
    public var ramMap: PageSet<GuestFrameNumber>
    /// Disjoint; their union is `ramMap`.
    public var classes: [PageClass: PageSet<GuestFrameNumber>]
    /// Which signal said "recent": "page_idle" (idle page tracking over `windowMillis`) or "flags"
    /// (ACTIVE/REFERENCED).
    public var recentSignal: String
    public var windowMillis: UInt32
    public var scanMicros: UInt64

    public var free: PageSet<GuestFrameNumber> { classes[.believedFree] ?? PageSet() }

    public func count(_ pageClass: PageClass) -> UInt64 { classes[pageClass]?.count ?? 0 }

    /// The census as a hot report (free pages are only a hint here: they may be in use by STOP).
    public func hotReport(requestID: UInt32) throws(ProtocolError) -> HotReport {
        try HotReport(requestID: requestID, windowMillis: windowMillis, collectMicros: scanMicros, ramMap: ramMap,
                      classes: PageClass.allCases.compactMap { c in classes[c].map { ClassifiedPages(c, $0) } })
    }
}

/// Where the collectors read from; tests point these at fixture files.
public struct CollectorSources: Sendable {
    public var iomem: String
    public var kpageflags: String
    public var pageIdle: String

    public init(iomem: String = "/proc/iomem", kpageflags: String = KPageFlagsReader.defaultPath,
                pageIdle: String = PageIdleTracker.defaultPath) {
        self.iomem = iomem
        self.kpageflags = kpageflags
        self.pageIdle = pageIdle
    }
}

public enum Collector {
    /// The guest's System RAM frames.
    public static func ramMap(_ sources: CollectorSources = CollectorSources()) throws -> PageSet<GuestFrameNumber> {
        try IOMem.systemRAM(GuestFiles.readText(sources.iomem))
    }

    /// Classifies every RAM frame. With idle page tracking and `windowMillis` > 0, "recent" means accessed in
    /// the window (the call sleeps that long); otherwise it means ACTIVE or REFERENCED.
    public static func census(_ sources: CollectorSources = CollectorSources(), windowMillis: UInt32 = 0,
                              ramMap: PageSet<GuestFrameNumber>? = nil) throws -> PageCensus {
        let start = GuestFiles.monotonicNanos()
        let ram = try ramMap ?? Self.ramMap(sources)
        let idle = PageIdleTracker(path: sources.pageIdle)
        var young: PageSet<GuestFrameNumber>?
        var window: UInt32 = 0
        if windowMillis > 0, idle.isAvailable {
            try idle.markIdle(ram)
            usleep(windowMillis * 1000)
            young = try idle.accessed(ram)
            window = windowMillis
        }
        var runs = RunCollector()
        try KPageFlagsReader(path: sources.kpageflags).forEachChunk(of: ram) { first, words in
            for (i, word) in words.enumerated() {
                let frame = first + UInt64(i)
                let isYoung = young.map { $0.contains(GuestFrameNumber(rawValue: frame)) }
                runs.add(frame, PageClassifier.classify(KPageFlags(rawValue: word), young: isYoung))
            }
        }
        return PageCensus(ramMap: ram, classes: runs.finish(), recentSignal: young == nil ? "flags" : "page_idle",
                          windowMillis: window, scanMicros: (GuestFiles.monotonicNanos() - start) / 1000)
    }

    /// The free frames only (the post-switch scan): cheaper than a census, and nothing else is trusted then.
    public static func freeFrames(_ sources: CollectorSources = CollectorSources(),
                                  ramMap: PageSet<GuestFrameNumber>) throws -> PageSet<GuestFrameNumber> {
        var runs: [PageRange<GuestFrameNumber>] = []
        var runStart: UInt64 = 0
        var runEnd: UInt64 = 0
        try KPageFlagsReader(path: sources.kpageflags).forEachChunk(of: ramMap) { first, words in
            for (i, word) in words.enumerated() where PageClassifier.isFree(KPageFlags(rawValue: word)) {
                let frame = first + UInt64(i)
                if frame == runEnd && runEnd > runStart {
                    runEnd += 1
                } else {
                    if runEnd > runStart { runs.append(try PageRange(start: GuestFrameNumber(rawValue: runStart), count: runEnd - runStart)) }
                    runStart = frame
                    runEnd = frame + 1
                }
            }
        }
        if runEnd > runStart { runs.append(try PageRange(start: GuestFrameNumber(rawValue: runStart), count: runEnd - runStart)) }
        return PageSet(ranges: runs)
    }
}
