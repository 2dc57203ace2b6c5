// The link emulation: tc-style rate and duration strings, and LinkShaper.arrival's FIFO serialisation
// (frames queue behind each other at the link rate, an idle link starts a frame at once, the one-way
// delay is added on top).

@testable import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Synchronization
import Testing

@Suite(.tier(.unit)) struct ShaperTests {
    // MARK: Parsing

    @Test func parseRateReadsBitsPerSecondAsBytes() {
        #expect(LinkSpec.parseRate("1gbit") == 125_000_000)
        #expect(LinkSpec.parseRate("10gbit") == 1_250_000_000)
        #expect(LinkSpec.parseRate("500mbit") == 62_500_000)
        #expect(LinkSpec.parseRate("100mbit") == 12_500_000)
        #expect(LinkSpec.parseRate("800kbit") == 100_000)
        #expect(LinkSpec.parseRate("8000bit") == 1000)
        #expect(LinkSpec.parseRate("2.5gbit") == 312_500_000)
        #expect(LinkSpec.parseRate("1Gbit") == 125_000_000)
        #expect(LinkSpec.parseRate("1GBIT") == 125_000_000)
    }

    @Test(arguments: ["", "gbit", "bit", "1", "1gb", "1gbps", "abc", "-1gbit", "0gbit", "0", "1 gbit", "1gbit ",
                      "one gbit", "1.2.3mbit", "nangbit", "1tbit"])
    func parseRateRejectsBadInput(text: String) {
        #expect(LinkSpec.parseRate(text) == nil)
    }

    @Test func parseDurationReadsNanoseconds() {
        #expect(LinkSpec.parseDuration("2ms") == 2_000_000)
        #expect(LinkSpec.parseDuration("500us") == 500_000)
        #expect(LinkSpec.parseDuration("1s") == 1_000_000_000)
        #expect(LinkSpec.parseDuration("0") == 0)
        #expect(LinkSpec.parseDuration("0ms") == 0)
        #expect(LinkSpec.parseDuration("250ns") == 250)
        #expect(LinkSpec.parseDuration("1.5ms") == 1_500_000)
        #expect(LinkSpec.parseDuration("10MS") == 10_000_000)
    }

    @Test(arguments: ["", "ms", "s", "2", "2m", "2min", "2h", "-1ms", "2 ms", " 2ms", "abc", "1.2.3ms", "nans",
                      "00"])
    func parseDurationRejectsBadInput(text: String) {
        #expect(LinkSpec.parseDuration(text) == nil)
    }

    /// Non-finite or huge numbers make `UInt64(Double)` trap instead of returning nil, so `epcopy bench --rate
    /// infgbit` (or `--rtt 1e30s`) crashes rather than failing validation.
    @Test
    func parsingRejectsNonFiniteAndHugeNumbers() async {
        await #expect(processExitsWith: .success) {
            precondition(LinkSpec.parseRate("infgbit") == nil)
            precondition(LinkSpec.parseRate("1e30gbit") == nil)
            precondition(LinkSpec.parseDuration("infs") == nil)
            precondition(LinkSpec.parseDuration("1e30s") == nil)
        }
    }

    @Test func specShapedness() {
        #expect(!LinkSpec.unshaped.isShaped)
        #expect(LinkSpec(bytesPerSecond: 125_000_000).isShaped)
        #expect(LinkSpec(delayNanos: 1).isShaped)
    }

    // MARK: arrival

    @Test func unshapedFramesArriveImmediatelyAndNeverQueue() {
        let shaper = LinkShaper(.unshaped)
        #expect(shaper.arrival(bytes: 1 << 30, now: 123) == 123)
        #expect(shaper.arrival(bytes: 1 << 30, now: 123) == 123)
        #expect(shaper.arrival(bytes: 0, now: 5) == 5)
    }

    @Test func delayOnlyLinkAddsTheDelayWithoutSerialising() {
        let shaper = LinkShaper(LinkSpec(delayNanos: 2_000_000))
        #expect(shaper.arrival(bytes: 1 << 30, now: 1000) == 2_001_000)
        #expect(shaper.arrival(bytes: 1 << 30, now: 1000) == 2_001_000)
        #expect(shaper.arrival(bytes: 10, now: 50_000) == 2_050_000)
    }

    @Test func backToBackFramesSerialiseAtTheRate() {
        // 1 Gbit/s: 125,000 bytes take 1 ms on the wire.
        let shaper = LinkShaper(LinkSpec(bytesPerSecond: 125_000_000))
        let first = shaper.arrival(bytes: 125_000, now: 1000)
        #expect(first == 1000 + 1_000_000)
        // Entering at the same time, the second frame waits for the first, then takes its own time.
        let second = shaper.arrival(bytes: 62_500, now: 1000)
        #expect(second == first + 500_000)
        // Entering while the link is still busy: queued behind, not started at `now`.
        let third = shaper.arrival(bytes: 1250, now: first)
        #expect(third == second + 10_000)
        // After the link went idle, a frame starts at `now`.
        let idle = shaper.arrival(bytes: 125_000, now: 10_000_000)
        #expect(idle == 11_000_000)
    }

    @Test func theDelayIsAddedOnceAfterSerialisation() {
        let delay: UInt64 = 2_000_000
        let shaper = LinkShaper(LinkSpec(bytesPerSecond: 125_000_000, delayNanos: delay))
        let first = shaper.arrival(bytes: 125_000, now: 0)
        #expect(first == 1_000_000 + delay)
        // The second frame queues behind the first's serialisation only; the delay is not cumulative.
        let second = shaper.arrival(bytes: 125_000, now: 0)
        #expect(second == first + 1_000_000)
        let idle = shaper.arrival(bytes: 1250, now: 100_000_000)
        #expect(idle == 100_000_000 + 10_000 + delay)
    }

    /// The link is one FIFO shared by all threads: frames entering at once from several threads get distinct,
    /// back-to-back slots.
    @Test func concurrentSendersShareOneFifoLink() {
        let shaper = LinkShaper(LinkSpec(bytesPerSecond: 125_000_000))  // 1250 bytes = 10 µs
        final class Arrivals: Sendable { let perThread = Mutex<[[UInt64]]>([]) }
        let arrivals = Arrivals()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            var mine: [UInt64] = []
            for _ in 0..<250 { mine.append(shaper.arrival(bytes: 1250, now: 0)) }
            arrivals.perThread.withLock { $0.append(mine) }
        }
        let perThread = arrivals.perThread.withLock { $0 }
        #expect(perThread.count == 4)
        // Each sender's frames leave in the order it sent them.
        #expect(perThread.allSatisfy { $0 == $0.sorted() && Set($0).count == $0.count })
        #expect(perThread.joined().sorted() == (1...1000).map { UInt64($0) * 10_000 })
    }
}
