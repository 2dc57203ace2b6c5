// The push scheduler's contract: every page of the region goes out exactly once (or is skipped, or was
// claimed by the urgent path), classes go out in priority order with a page in several classes pushed
// once under the highest, a fault turns the next chunks into its neighbourhood at the minimum chunk size,
// and the chunk size doubles up to the maximum while no fault comes.

@testable import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Testing

// MARK: - Helpers


/// The run `[start, end)`.
private func run(_ start: UInt64, _ end: UInt64) -> PageRange<PageIndex> {
    try! PageRange(start: PageIndex(rawValue: start), count: end - start)
}

/// The set of the runs `[start, end)`.
private func set(_ runs: (UInt64, UInt64)...) -> PageSet<PageIndex> {
    PageSet(ranges: runs.map { run($0.0, $0.1) })
}

/// The pages `[start, end)` as a plain set, for reference comparisons.
private func pageSet(_ start: UInt64, _ end: UInt64) -> Set<UInt64> { Set(start..<end) }

private func pagesOf(_ chunk: PushChunk) -> [UInt64] {
    chunk.runs.flatMap { Array($0.lowerBound.rawValue..<$0.upperBound.rawValue) }
}

/// The class a page must be pushed in: the highest class naming it, else `.unclassified`.
private func expectedClass(_ page: UInt64, _ classes: [(PushClass, PageSet<PageIndex>)]) -> PushClass {
    classes.filter { $0.1.contains(PageIndex(rawValue: page)) }.map(\.0).min { $0.rawValue < $1.rawValue }
        ?? .unclassified
}

/// A random set inside `0..<region`, of up to `maxRuns` runs of up to `maxLength` pages.
private func randomSet(region: UInt64, maxRuns: Int, maxLength: UInt64, using rng: inout SplitMix64) -> PageSet<PageIndex> {
    var runs: [PageRange<PageIndex>] = []
    for _ in 0..<Int.random(in: 0...maxRuns, using: &rng) {
        let start = UInt64.random(in: 0..<region, using: &rng)
        let length = UInt64.random(in: 1...min(maxLength, region - start), using: &rng)
        runs.append(run(start, start + length))
    }
    return PageSet(ranges: runs)
}

/// `next()` with the invariants every chunk must satisfy: non-empty, runs inside the region, sorted and
/// disjoint, no more pages than the chunk size in force when it was asked for.
private func checkedNext(_ scheduler: PushScheduler, sourceLocation: SourceLocation = #_sourceLocation) -> PushChunk? {
    let limit = scheduler.chunk.pages
    guard let chunk = scheduler.next() else { return nil }
    #expect(!chunk.runs.isEmpty, "empty chunk", sourceLocation: sourceLocation)
    #expect(chunk.pageCount >= 1, sourceLocation: sourceLocation)
    #expect(chunk.pageCount <= limit, "chunk of \(chunk.pageCount) pages exceeds size \(limit)",
            sourceLocation: sourceLocation)
    #expect(chunk.pageCount <= scheduler.chunk.maxPages, sourceLocation: sourceLocation)
    var previousEnd: UInt64? = nil
    for r in chunk.runs {
        #expect(r.upperBound.rawValue <= scheduler.regionPages, "run \(r) past region", sourceLocation: sourceLocation)
        if let previousEnd {
            // Sorted and disjoint; adjacent runs are allowed (a chunk may gather them from separate claims).
            #expect(r.lowerBound.rawValue >= previousEnd, "runs not sorted/disjoint: \(chunk.runs)",
                    sourceLocation: sourceLocation)
        }
        previousEnd = r.upperBound.rawValue
    }
    return chunk
}

/// Every chunk until nil (bounded: each chunk carries at least one page).
private func drain(_ scheduler: PushScheduler, sourceLocation: SourceLocation = #_sourceLocation) -> [PushChunk] {
    var chunks: [PushChunk] = []
    while let chunk = checkedNext(scheduler, sourceLocation: sourceLocation) {
        chunks.append(chunk)
        if chunks.count > Int(scheduler.regionPages) + 1 {
            Issue.record("scheduler did not terminate", sourceLocation: sourceLocation)
            break
        }
    }
    return chunks
}

private func makeScheduler(region: UInt64, classes: [(PushClass, PageSet<PageIndex>)] = [],
                           chunk: AdaptiveChunk = AdaptiveChunk(), prefetchPages: UInt64 = 64,
                           hint: FaultHint = FaultHint()) -> PushScheduler {
    PushScheduler(regionPages: region, classes: classes, sent: AtomicPageBitmap(pageCount: region), hint: hint,
                  chunk: chunk, prefetchPages: prefetchPages)
}

// MARK: - Tests

@Suite(.tier(.unit)) struct SchedulerTests {
    // MARK: Randomised contract

    /// Random class layouts (overlapping, empty, duplicated), a skip set before the start and more skips,
    /// urgent claims and faults mid-transfer. Checks against a per-page reference model: each page goes out
    /// exactly once with the class it must have, class chunks never go back to a higher class, prefetch
    /// chunks follow the latest fault, and at the end every page is accounted for exactly once.
    @Test(arguments: Array(UInt64(1)...8))
    func randomLayoutsPushEveryPageExactlyOnce(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed &* 0x1234_5678_9ABC)
        for iteration in 0..<25 {
            let region: UInt64 = Bool.random(using: &rng) ? .random(in: 1...70, using: &rng)
                                                           : .random(in: 1...3000, using: &rng)
            var classes: [(PushClass, PageSet<PageIndex>)] = []
            for _ in 0..<Int.random(in: 0...7, using: &rng) {
                let pushClass = PushClass.allCases.randomElement(using: &rng)!
                classes.append((pushClass, randomSet(region: region, maxRuns: 6, maxLength: 300, using: &rng)))
            }
            let minPages = UInt64.random(in: 1...16, using: &rng)
            let chunk = AdaptiveChunk(minPages: minPages, maxPages: minPages << UInt64.random(in: 0...5, using: &rng))
            let prefetchPages = UInt64.random(in: 0...64, using: &rng)
            let hint = FaultHint()
            let scheduler = makeScheduler(region: region, classes: classes, chunk: chunk,
                                          prefetchPages: prefetchPages, hint: hint)
            let context = "seed \(seed) iteration \(iteration) region \(region)"

            // 0 = pending, 1 = pushed, 2 = skipped, 3 = claimed by the "urgent path".
            var state = [UInt8](repeating: 0, count: Int(region))
            var skipped: UInt64 = 0
            func applySkip(_ skip: PageSet<PageIndex>) {
                let pending = skip.pages.filter { state[Int($0.rawValue)] == 0 }
                let newly = scheduler.skip(skip)
                #expect(newly == UInt64(pending.count), "\(context): skip reported \(newly)")
                for page in pending { state[Int(page.rawValue)] = 2 }
                skipped += UInt64(pending.count)
                #expect(scheduler.skippedPages == skipped, "\(context)")
            }
            applySkip(randomSet(region: region, maxRuns: 4, maxLength: 200, using: &rng))

            var lastClass = PushClass.device
            var prefetchWindow: Range<UInt64>? = nil
            var chunks = 0
            while true {
                // The urgent path claims a few pages between chunks.
                for _ in 0..<Int.random(in: 0...2, using: &rng) {
                    let page = UInt64.random(in: 0..<region, using: &rng)
                    if scheduler.sent.insert(page) {
                        #expect(state[Int(page)] == 0, "\(context): page \(page) claimable twice")
                        state[Int(page)] = 3
                    }
                }
                if Int.random(in: 0..<40, using: &rng) == 0 {
                    applySkip(randomSet(region: region, maxRuns: 3, maxLength: 100, using: &rng))
                }
                // A fault, sometimes on the last page or past the region (no neighbourhood there).
                var expectedPrefetchStart: UInt64?? = nil  // .some(nil): a fault with nothing to prefetch
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    let page = UInt64.random(in: 0..<(region + 3), using: &rng)
                    hint.publish(page: page)
                    let window = (page + 1)..<(page + 1 + prefetchPages)
                    prefetchWindow = window
                    if let first = scheduler.sent.firstClear(atOrAfter: page + 1), window.contains(first) {
                        expectedPrefetchStart = .some(first)
                    } else {
                        expectedPrefetchStart = .some(nil)
                    }
                }

                guard let next = checkedNext(scheduler) else {
                    if case .some(.some(let start)) = expectedPrefetchStart {
                        Issue.record("\(context): no chunk although page \(start) was to be prefetched")
                    }
                    break
                }
                chunks += 1
                if chunks > Int(region) + 1 {
                    Issue.record("\(context): scheduler did not terminate")
                    break
                }
                let pages = pagesOf(next)
                for page in pages {
                    let s = state[Int(page)]
                    #expect(s == 0, "\(context): page \(page) returned although \(["", "pushed", "skipped", "urgent"][Int(s)])")
                    state[Int(page)] = 1
                }
                if case .some(let start) = expectedPrefetchStart {
                    if let start {
                        #expect(next.prefetch, "\(context): chunk after a fault is not a prefetch chunk")
                        #expect(pages.first == start, "\(context): prefetch starts at \(pages[0]), not \(start)")
                        #expect(next.pageCount <= minPages, "\(context)")
                        #expect(scheduler.chunk.pages == minPages, "\(context): chunk size not back to minimum")
                    } else {
                        #expect(!next.prefetch, "\(context): prefetch chunk with nothing in the neighbourhood")
                        #expect(next.pageCount <= minPages, "\(context): chunk size not dropped on fault")
                    }
                }
                if next.prefetch {
                    let window = try #require(prefetchWindow, "\(context): prefetch chunk without a fault")
                    #expect(pages.allSatisfy { window.contains($0) }, "\(context): prefetch \(next.runs) outside \(window)")
                    #expect(next.pushClass == expectedClass(pages[0], classes), "\(context)")
                } else {
                    for page in pages {
                        #expect(expectedClass(page, classes) == next.pushClass,
                                "\(context): page \(page) pushed as \(next.pushClass)")
                    }
                    #expect(next.pushClass.rawValue >= lastClass.rawValue,
                            "\(context): \(next.pushClass) after \(lastClass)")
                    lastClass = next.pushClass
                }
            }
            #expect(scheduler.next() == nil, "\(context): next() not nil again")
            #expect(!state.contains(0), "\(context): \(state.filter { $0 == 0 }.count) pages never pushed")
            #expect(scheduler.sent.count == region, "\(context)")
            #expect(scheduler.skippedPages == UInt64(state.filter { $0 == 2 }.count), "\(context)")
        }
    }

    // MARK: Class order and overlap

    @Test func overlappingClassesPushEachPageOnceUnderTheHighestClass() {
        // Given out of order; recent covers everything, kernel overlaps device.
        let classes: [(PushClass, PageSet<PageIndex>)] = [
            (.recent, set((0, 100))), (.device, set((0, 50))), (.kernel, set((25, 75))),
        ]
        let scheduler = makeScheduler(region: 100, classes: classes,
                                      chunk: AdaptiveChunk(minPages: 1024, maxPages: 1024))
        let chunks = drain(scheduler)
        #expect(chunks == [
            PushChunk(runs: [run(0, 50)], pushClass: .device, prefetch: false),
            PushChunk(runs: [run(50, 75)], pushClass: .kernel, prefetch: false),
            PushChunk(runs: [run(75, 100)], pushClass: .recent, prefetch: false),
        ])
        #expect(scheduler.classOf(PageIndex(rawValue: 30)) == .device)
        #expect(scheduler.classOf(PageIndex(rawValue: 60)) == .kernel)
        #expect(scheduler.classOf(PageIndex(rawValue: 99)) == .recent)
    }

    @Test func classesGoOutInPriorityOrderWithUnnamedPagesLast() {
        // Each class scattered so class order differs from address order.
        let classes: [(PushClass, PageSet<PageIndex>)] = [
            (.believedFree, set((0, 40))),
            (.inUse, set((40, 80), (300, 320))),
            (.recent, set((200, 260))),
            (.kernel, set((100, 130), (400, 410))),
            (.device, set((500, 512), (10, 12))),  // overlaps believedFree: pushed as device
        ]
        let scheduler = makeScheduler(region: 600, classes: classes, chunk: AdaptiveChunk(minPages: 4, maxPages: 32))
        let chunks = drain(scheduler)
        #expect(chunks.allSatisfy { !$0.prefetch })
        let order = chunks.map(\.pushClass)
        #expect(order == order.sorted { $0.rawValue < $1.rawValue }, "classes out of order: \(order)")
        #expect(Set(order) == Set(PushClass.allCases))
        var perClass: [PushClass: Set<UInt64>] = [:]
        for chunk in chunks { perClass[chunk.pushClass, default: []].formUnion(pagesOf(chunk)) }
        #expect(perClass[.device] == pageSet(500, 512).union([10, 11]))
        #expect(perClass[.kernel] == pageSet(100, 130).union(pageSet(400, 410)))
        #expect(perClass[.recent] == pageSet(200, 260))
        #expect(perClass[.inUse] == pageSet(40, 80).union(pageSet(300, 320)))
        #expect(perClass[.believedFree] == pageSet(0, 40).subtracting([10, 11]))
        let named = perClass.filter { $0.key != .unclassified }.values.reduce(Set<UInt64>()) { $0.union($1) }
        #expect(perClass[.unclassified] == pageSet(0, 600).subtracting(named))
        #expect(chunks.reduce(0) { $0 + $1.pageCount } == 600)
    }

    // MARK: Urgent claims and skips

    @Test func pagesClaimedByTheUrgentPathAreNeverReturned() {
        let region: UInt64 = 2000
        let scheduler = makeScheduler(region: region, classes: [(.kernel, set((1000, 1500)))])
        var urgent = Set<UInt64>()
        var pushed = Set<UInt64>()
        var step: UInt64 = 0
        while true {
            // Claim pages ahead of the push (in both the current and later classes) and behind it.
            for page in [(step * 37 + 1000) % region, (step * 101) % region, (step * 13 + 7) % region]
            where scheduler.sent.insert(page) {
                urgent.insert(page)
            }
            step += 1
            guard let chunk = checkedNext(scheduler) else { break }
            for page in pagesOf(chunk) {
                #expect(!urgent.contains(page), "page \(page) claimed by the urgent path was pushed")
                #expect(pushed.insert(page).inserted, "page \(page) pushed twice")
            }
        }
        #expect(!urgent.isEmpty)
        #expect(pushed.isDisjoint(with: urgent))
        #expect(pushed.union(urgent) == pageSet(0, region))
        #expect(scheduler.skippedPages == 0)
    }

    @Test func skipBeforeTheStartCountsAndHidesPages() {
        let scheduler = makeScheduler(region: 1000, classes: [(.device, set((0, 100)))])
        // Part of the skip set lies past the region and is ignored.
        #expect(scheduler.skip(set((50, 150), (900, 1500))) == 200)
        #expect(scheduler.skippedPages == 200)
        // Skipping the same pages again skips nothing new.
        #expect(scheduler.skip(set((60, 70))) == 0)
        #expect(scheduler.skippedPages == 200)
        let pushed = drain(scheduler).flatMap(pagesOf)
        #expect(pushed.count == 800)
        #expect(Set(pushed) == pageSet(0, 1000).subtracting(pageSet(50, 150)).subtracting(pageSet(900, 1000)))
    }

    @Test func skipArrivingMidTransferRemovesPendingPages() {
        let region: UInt64 = 1000
        let scheduler = makeScheduler(region: region, chunk: AdaptiveChunk(minPages: 16, maxPages: 64))
        var pushed = Set<UInt64>()
        for _ in 0..<3 { pushed.formUnion(pagesOf(checkedNext(scheduler)!)) }
        #expect(pushed == pageSet(0, 112))  // 16 + 32 + 64
        // Half of this was already sent: only the rest is newly skipped.
        let newly = scheduler.skip(set((100, 300), (700, 710)))
        #expect(newly == 188 + 10)
        #expect(scheduler.skippedPages == 198)
        let rest = drain(scheduler).flatMap(pagesOf)
        #expect(rest.count == Set(rest).count)
        #expect(Set(rest).isDisjoint(with: pageSet(100, 300).union(pageSet(700, 710))))
        #expect(pushed.union(rest) == pageSet(0, region).subtracting(pageSet(112, 300)).subtracting(pageSet(700, 710)))
    }

    // MARK: Faults, prefetch and chunk size

    @Test func adaptiveChunkGrowsAndShrinks() {
        var chunk = AdaptiveChunk(minPages: 16, maxPages: 100)
        #expect(chunk.pages == 16)
        chunk.grow()
        #expect(chunk.pages == 32)
        chunk.grow()
        chunk.grow()
        #expect(chunk.pages == 100)  // capped, not 128
        chunk.grow()
        #expect(chunk.pages == 100)
        chunk.shrink()
        #expect(chunk.pages == 16)
        #expect(AdaptiveChunk().minPages == 16 && AdaptiveChunk().maxPages == 1024)
    }

    @Test func withoutFaultsTheChunkSizeDoublesUpToTheMaximum() {
        let scheduler = makeScheduler(region: 5000, chunk: AdaptiveChunk(minPages: 16, maxPages: 256))
        let chunks = drain(scheduler)
        var expected: [UInt64] = []
        var size: UInt64 = 16
        var left: UInt64 = 5000
        while left > 0 {
            expected.append(min(size, left))
            left -= min(size, left)
            size = min(size * 2, 256)
        }
        #expect(chunks.map(\.pageCount) == expected)
        // One unclassified class pushed in address order, back to back.
        var next: UInt64 = 0
        for chunk in chunks {
            #expect(chunk.runs == [run(next, next + chunk.pageCount)])
            #expect(chunk.pushClass == .unclassified && !chunk.prefetch)
            next += chunk.pageCount
        }
        #expect(scheduler.chunk.pages == 256)
    }

    @Test func aFaultTurnsTheNextChunksIntoItsNeighbourhoodAtMinimumSize() {
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 4096, chunk: AdaptiveChunk(minPages: 16, maxPages: 1024),
                                      prefetchPages: 64, hint: hint)
        for _ in 0..<5 { _ = checkedNext(scheduler) }  // 16+32+64+128+256 = 496 pages
        #expect(scheduler.chunk.pages == 512)
        hint.publish(page: 2000)
        let first = checkedNext(scheduler)
        #expect(first == PushChunk(runs: [run(2001, 2017)], pushClass: .unclassified, prefetch: true))
        #expect(scheduler.chunk.pages == 16)
        // The rest of the 64-page neighbourhood, still at the minimum size.
        let more = (0..<3).compactMap { _ in checkedNext(scheduler) }
        #expect(more.map(\.runs) == [[run(2017, 2033)], [run(2033, 2049)], [run(2049, 2065)]])
        #expect(more.allSatisfy { $0.prefetch })
        #expect(scheduler.chunk.pages == 16)
        // Then class order resumes where it stopped, growing again from the minimum.
        let resumed = checkedNext(scheduler)
        #expect(resumed == PushChunk(runs: [run(496, 512)], pushClass: .unclassified, prefetch: false))
        #expect(scheduler.chunk.pages == 32)
        let all = drain(scheduler).flatMap(pagesOf) + [first, resumed].compactMap { $0 }.flatMap(pagesOf)
            + more.flatMap(pagesOf)
        #expect(all.count == 4096 - 496)
        #expect(Set(all) == pageSet(496, 4096))
    }

    @Test func prefetchSkipsPagesAlreadyClaimedAfterTheFault() throws {
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 1000, chunk: AdaptiveChunk(minPages: 8, maxPages: 64),
                                      prefetchPages: 32, hint: hint)
        for page: UInt64 in 500..<505 { scheduler.sent.insert(page) }  // the urgent path got these
        hint.publish(page: 499)
        let chunk = try #require(checkedNext(scheduler))
        #expect(chunk.prefetch)
        #expect(pagesOf(chunk).first == 505)
        #expect(pagesOf(chunk).allSatisfy { $0 >= 505 && $0 < 532 })
        #expect(chunk.pageCount <= 8)
    }

    @Test func onlyTheLatestFaultIsPrefetched() throws {
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 1000, hint: hint)
        hint.publish(page: 100)
        hint.publish(page: 700)
        let chunk = try #require(checkedNext(scheduler))
        #expect(chunk.prefetch)
        #expect(chunk.runs.first?.lowerBound.rawValue == 701)
    }

    @Test func prefetchIsLabelledWithTheClassOfItsFirstPage() throws {
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 1000, classes: [(.kernel, set((500, 600)))], hint: hint)
        hint.publish(page: 499)
        let chunk = try #require(checkedNext(scheduler))
        #expect(chunk == PushChunk(runs: [run(500, 516)], pushClass: .kernel, prefetch: true))
    }

    @Test func aFaultWithNothingLeftAroundItStillShrinksTheChunk() throws {
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 3000, chunk: AdaptiveChunk(minPages: 4, maxPages: 512), hint: hint)
        for _ in 0..<6 { _ = checkedNext(scheduler) }  // 4+8+16+32+64+128 = 252 pages
        #expect(scheduler.chunk.pages == 256)
        hint.publish(page: 2999)  // last page: no neighbourhood
        let chunk = try #require(checkedNext(scheduler))
        #expect(chunk == PushChunk(runs: [run(252, 256)], pushClass: .unclassified, prefetch: false))
        // The neighbourhood of a fault behind the push was already sent.
        hint.publish(page: 10)
        let after = try #require(checkedNext(scheduler))
        #expect(!after.prefetch)
        #expect(after.runs == [run(256, 260)])
    }

    // MARK: Edge cases

    @Test func aOnePageRegionPushesThatPage() {
        #expect(drain(makeScheduler(region: 1))
                == [PushChunk(runs: [run(0, 1)], pushClass: .unclassified, prefetch: false)])
        #expect(drain(makeScheduler(region: 1, classes: [(.device, set((0, 1)))]))
                == [PushChunk(runs: [run(0, 1)], pushClass: .device, prefetch: false)])
        let hint = FaultHint()
        let faulted = makeScheduler(region: 1, hint: hint)
        hint.publish(page: 0)
        #expect(drain(faulted) == [PushChunk(runs: [run(0, 1)], pushClass: .unclassified, prefetch: false)])
    }

    @Test func anEmptyRegionHasNothingToPush() {
        let scheduler = makeScheduler(region: 0)
        #expect(scheduler.next() == nil)
        #expect(scheduler.skip(set((0, 10))) == 0)
    }

    @Test func anEmptyClassIsIgnored() {
        let scheduler = makeScheduler(region: 100, classes: [(.device, PageSet()), (.kernel, set((10, 20)))],
                                      chunk: AdaptiveChunk(minPages: 1024, maxPages: 1024))
        let chunks = drain(scheduler)
        #expect(chunks.map(\.pushClass) == [.kernel, .unclassified])
        #expect(chunks.map(\.runs) == [[run(10, 20)], [run(0, 10), run(20, 100)]])
    }

    @Test func skippingTheWholeRegionLeavesNothing() {
        let scheduler = makeScheduler(region: 777, classes: [(.device, set((0, 5)))])
        #expect(scheduler.skip(set((0, 777))) == 777)
        #expect(scheduler.skippedPages == 777)
        #expect(scheduler.next() == nil)
        #expect(scheduler.next() == nil)
    }

    @Test func chunksNeverExceedTheChunkSize() {
        // Fragmented classes so chunks gather many runs; checkedNext asserts the limit on every chunk.
        var rng = SplitMix64(seed: 42)
        let classes: [(PushClass, PageSet<PageIndex>)] = [
            (.kernel, PageSet(pages: (UInt64(0)..<4000).filter { _ in Bool.random(using: &rng) }.map(PageIndex.init(rawValue:)))),
            (.recent, PageSet(pages: stride(from: UInt64(1), to: 4000, by: 3).map(PageIndex.init(rawValue:)))),
        ]
        let hint = FaultHint()
        let scheduler = makeScheduler(region: 4000, classes: classes, chunk: AdaptiveChunk(minPages: 3, maxPages: 5),
                                      prefetchPages: 20, hint: hint)
        var total: UInt64 = 0
        var maxSeen: UInt64 = 0
        var calls = 0
        while let chunk = checkedNext(scheduler) {
            total += chunk.pageCount
            maxSeen = max(maxSeen, chunk.pageCount)
            calls += 1
            if calls % 50 == 0 { hint.publish(page: UInt64(calls * 7 % 4000)) }
        }
        #expect(total == 4000)
        #expect(maxSeen == 5)
    }

    // MARK: Bugs

    /// A class that reaches past the end of the region (a hot report naming a page the region does not have)
    /// makes `next()` claim past the bitmap: `AtomicPageBitmap.claim`'s precondition traps, killing the
    /// source. `skip` clips its ranges to the region; the classes are not clipped.
    @Test
    func classRangesPastTheRegionAreClipped() async {
        await #expect(processExitsWith: .success) {
            let sent = AtomicPageBitmap(pageCount: 100)
            let scheduler = PushScheduler(
                regionPages: 100,
                classes: [(.device, PageSet(try! PageRange(start: PageIndex(rawValue: 90), count: 20)))],
                sent: sent, hint: FaultHint())
            var total: UInt64 = 0
            while let chunk = scheduler.next() { total += chunk.pageCount }
            precondition(total == 100 && sent.count == 100)
        }
    }
}
