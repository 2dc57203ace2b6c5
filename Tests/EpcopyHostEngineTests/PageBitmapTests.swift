// AtomicPageBitmap against a reference Set<UInt64>: single-bit operations, claim's maximal in-order runs
// across word boundaries, firstClear, and concurrent claims partitioning a range exactly.

@testable import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Synchronization
import Testing

private struct Run: Equatable, CustomStringConvertible {
    var start: UInt64
    var count: UInt64
    var description: String { "(\(start), \(count))" }
}

/// The runs `claim` reports.
private func claimRuns(_ bitmap: AtomicPageBitmap, start: UInt64, count: UInt64) -> [Run] {
    var runs: [Run] = []
    bitmap.claim(start: start, count: count) { runs.append(Run(start: $0, count: $1)) }
    return runs
}

/// The maximal runs of pages in `[start, start+count)` not in `reference`, in order.
private func clearRuns(_ reference: Set<UInt64>, start: UInt64, count: UInt64) -> [Run] {
    var runs: [Run] = []
    for page in start..<(start + count) where !reference.contains(page) {
        if let last = runs.last, last.start + last.count == page {
            runs[runs.count - 1].count += 1
        } else {
            runs.append(Run(start: page, count: 1))
        }
    }
    return runs
}

/// A random pre-filled bitmap and its reference: sparse bits, dense bits or whole runs, so both the
/// fast (whole word ours) and slow (bit by bit) paths of claim run.
private func randomBitmap(pageCount: UInt64, using rng: inout SplitMix64) -> (AtomicPageBitmap, Set<UInt64>) {
    let bitmap = AtomicPageBitmap(pageCount: pageCount)
    var reference = Set<UInt64>()
    guard pageCount > 0 else { return (bitmap, reference) }
    switch Int.random(in: 0..<4, using: &rng) {
    case 0:
        break
    case 1:  // sparse
        for _ in 0..<Int.random(in: 0...8, using: &rng) { reference.insert(.random(in: 0..<pageCount, using: &rng)) }
    case 2:  // dense
        for page in 0..<pageCount where Int.random(in: 0..<4, using: &rng) != 0 { reference.insert(page) }
    default:  // runs
        for _ in 0..<Int.random(in: 1...5, using: &rng) {
            let start = UInt64.random(in: 0..<pageCount, using: &rng)
            let end = min(pageCount, start + .random(in: 1...150, using: &rng))
            reference.formUnion(start..<end)
        }
    }
    for page in reference { bitmap.insert(page) }
    return (bitmap, reference)
}

private func expectMatches(_ bitmap: AtomicPageBitmap, _ reference: Set<UInt64>, _ context: String,
                           sourceLocation: SourceLocation = #_sourceLocation) {
    let mismatched = (0..<bitmap.pageCount).filter { bitmap.contains($0) != reference.contains($0) }
    #expect(mismatched.isEmpty, "\(context): bits differ at \(mismatched.prefix(10))", sourceLocation: sourceLocation)
    #expect(bitmap.count == UInt64(reference.count), "\(context)", sourceLocation: sourceLocation)
}

/// Runs `body(0..<threads)` on that many threads at once, released together.
private func runConcurrently(threads: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let ready = DispatchSemaphore(value: 0)
    let go = DispatchSemaphore(value: 0)
    let group = DispatchGroup()
    for index in 0..<threads {
        group.enter()
        let thread = Thread {
            ready.signal()
            go.wait()
            body(index)
            group.leave()
        }
        thread.start()
    }
    for _ in 0..<threads { ready.wait() }
    for _ in 0..<threads { go.signal() }
    group.wait()
}

private final class Collected: Sendable {
    let runs = Mutex<[[Run]]>([])
}

@Suite(.tier(.unit)) struct PageBitmapTests {
    // MARK: Single bits

    @Test func insertContainsRemoveAndCount() {
        let bitmap = AtomicPageBitmap(pageCount: 200)
        #expect(bitmap.pageCount == 200)
        #expect(bitmap.count == 0)
        let pages: [UInt64] = [0, 1, 62, 63, 64, 65, 127, 128, 191, 192, 199]
        for page in pages {
            #expect(!bitmap.contains(page))
            #expect(bitmap.insert(page), "first insert of \(page) must report it set the bit")
            #expect(!bitmap.insert(page), "second insert of \(page) must report it was already set")
            #expect(bitmap.contains(page))
        }
        #expect(bitmap.count == UInt64(pages.count))
        #expect((0..<200).filter { bitmap.contains($0) } == pages)
        bitmap.remove(64)
        bitmap.remove(199)
        bitmap.remove(100)  // already clear: no effect
        #expect(!bitmap.contains(64) && !bitmap.contains(199))
        #expect(bitmap.contains(63) && bitmap.contains(65) && bitmap.contains(192))
        #expect(bitmap.count == UInt64(pages.count - 2))
        #expect(bitmap.insert(64), "a removed page can be claimed again")
    }

    @Test func randomSingleBitOperationsMatchAReferenceSet() {
        var rng = SplitMix64(seed: 7)
        for pageCount: UInt64 in [1, 63, 64, 65, 130, 1000] {
            let bitmap = AtomicPageBitmap(pageCount: pageCount)
            var reference = Set<UInt64>()
            for _ in 0..<2000 {
                let page = UInt64.random(in: 0..<pageCount, using: &rng)
                if Int.random(in: 0..<3, using: &rng) == 0 {
                    bitmap.remove(page)
                    reference.remove(page)
                } else {
                    #expect(bitmap.insert(page) == reference.insert(page).inserted)
                }
            }
            expectMatches(bitmap, reference, "pageCount \(pageCount)")
        }
    }

    // MARK: claim

    @Test func claimReportsOneRunAcrossWordBoundaries() {
        let bitmap = AtomicPageBitmap(pageCount: 300)
        #expect(claimRuns(bitmap, start: 60, count: 10) == [Run(start: 60, count: 10)])
        #expect(claimRuns(bitmap, start: 100, count: 200) == [Run(start: 100, count: 200)])
        // Everything in [60, 70) and [100, 300) is taken now.
        #expect(claimRuns(bitmap, start: 0, count: 300) == [Run(start: 0, count: 60), Run(start: 70, count: 30)])
        #expect(claimRuns(bitmap, start: 0, count: 300) == [])
        #expect(bitmap.count == 300)
    }

    @Test func claimSkipsPagesSetBySomeoneElse() {
        let bitmap = AtomicPageBitmap(pageCount: 256)
        for page: UInt64 in [63, 64, 128, 200] { bitmap.insert(page) }
        #expect(claimRuns(bitmap, start: 0, count: 256) == [
            Run(start: 0, count: 63), Run(start: 65, count: 63), Run(start: 129, count: 71), Run(start: 201, count: 55),
        ])
        #expect(claimRuns(bitmap, start: 5, count: 0) == [])
        #expect(claimRuns(bitmap, start: 256, count: 0) == [])
    }

    @Test func randomClaimsReportExactlyTheClearRuns() {
        var rng = SplitMix64(seed: 99)
        for iteration in 0..<300 {
            let pageCount = UInt64.random(in: 1...600, using: &rng)
            let (bitmap, initial) = randomBitmap(pageCount: pageCount, using: &rng)
            var reference = initial
            for step in 0..<4 {
                let start = UInt64.random(in: 0...pageCount, using: &rng)
                let count = UInt64.random(in: 0...(pageCount - start), using: &rng)
                let expected = clearRuns(reference, start: start, count: count)
                let got = claimRuns(bitmap, start: start, count: count)
                #expect(got == expected, "iteration \(iteration) step \(step): claim(\(start), \(count)) on \(pageCount)")
                reference.formUnion(start..<(start + count))
            }
            expectMatches(bitmap, reference, "iteration \(iteration)")
        }
    }

    // MARK: firstClear

    @Test func firstClearOnFullAndEmptyBitmaps() {
        let empty = AtomicPageBitmap(pageCount: 70)
        #expect(empty.firstClear(atOrAfter: 0) == 0)
        #expect(empty.firstClear(atOrAfter: 69) == 69)
        #expect(empty.firstClear(atOrAfter: 70) == nil)
        #expect(empty.firstClear(atOrAfter: 1000) == nil)
        // The unused tail bits of the last word are clear but are not pages.
        let full = AtomicPageBitmap(pageCount: 70)
        full.claim(start: 0, count: 70) { _, _ in }
        #expect(full.firstClear(atOrAfter: 0) == nil)
        #expect(full.firstClear(atOrAfter: 65) == nil)
        full.remove(3)
        #expect(full.firstClear(atOrAfter: 0) == 3)
        #expect(full.firstClear(atOrAfter: 4) == nil)
        #expect(AtomicPageBitmap(pageCount: 0).firstClear(atOrAfter: 0) == nil)
    }

    @Test func randomFirstClearMatchesAReference() {
        var rng = SplitMix64(seed: 1234)
        for iteration in 0..<150 {
            let pageCount = UInt64.random(in: 1...400, using: &rng)
            let (bitmap, reference) = randomBitmap(pageCount: pageCount, using: &rng)
            for page in 0...(pageCount + 2) {
                let expected = (min(page, pageCount)..<pageCount).first { !reference.contains($0) }
                #expect(bitmap.firstClear(atOrAfter: page) == expected,
                        "iteration \(iteration): firstClear(\(page)) on \(pageCount) pages")
            }
        }
    }

    // MARK: Concurrency

    /// 2–4 threads claim the same range, each in its own chunk size and starting at its own offset (wrapping
    /// around) so they collide in every word; together they must have claimed every page exactly once.
    @Test(arguments: [2, 3, 4])
    func concurrentClaimsPartitionTheRange(threads: Int) {
        let pageCount: UInt64 = 40_003
        for round in 0..<4 {
            let bitmap = AtomicPageBitmap(pageCount: pageCount)
            let collected = Collected()
            runConcurrently(threads: threads) { index in
                let chunkSizes: [UInt64] = [1, 7, 64, 129]
                let size = chunkSizes[(index + round) % chunkSizes.count]
                let offset = pageCount / UInt64(threads + 1) * UInt64(index) / 64 * 64 + UInt64(round)
                var runs: [Run] = []
                var done: UInt64 = 0
                while done < pageCount {
                    let start = (offset + done) % pageCount
                    let count = min(size, pageCount - start, pageCount - done)
                    var previousEnd: UInt64? = nil
                    bitmap.claim(start: start, count: count) { s, n in
                        // In order and maximal within one call.
                        precondition(previousEnd.map { s > $0 } ?? true)
                        previousEnd = s + n
                        runs.append(Run(start: s, count: n))
                    }
                    if index == 0 {  // also race single-page claims ahead of everyone
                        let page = (start + pageCount / 2) % pageCount
                        if bitmap.insert(page) { runs.append(Run(start: page, count: 1)) }
                    }
                    done += count
                }
                collected.runs.withLock { $0.append(runs) }
            }
            let perThread = collected.runs.withLock { $0 }
            #expect(perThread.count == threads)
            var times = [UInt8](repeating: 0, count: Int(pageCount))
            for runs in perThread {
                for run in runs {
                    #expect(run.count >= 1 && run.start + run.count <= pageCount)
                    for page in run.start..<(run.start + run.count) { times[Int(page)] &+= 1 }
                }
            }
            let twice = times.indices.filter { times[$0] > 1 }
            let missed = times.indices.filter { times[$0] == 0 }
            #expect(twice.isEmpty, "round \(round): pages claimed twice: \(twice.prefix(10))")
            #expect(missed.isEmpty, "round \(round): pages never claimed: \(missed.prefix(10))")
            #expect(perThread.map { $0.reduce(0) { $0 + $1.count } }.reduce(0, +) == pageCount)
            #expect(bitmap.count == pageCount)
        }
    }
}
