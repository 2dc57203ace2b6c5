// `epcopy bench codec`: the cost of the agent's biggest message. A hot report for a large guest is a
// page set of a million pages in scattered ranges; this encodes it into a frame and decodes it back,
// and prints the time next to a baseline measured in the same run (checksumming the same bytes), so
// the figure means something on a noisy shared machine.

import ArgumentParser
import EpcopyHostEngine
import EpcopyProtocol
import Foundation

struct BenchCodec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "Encode and decode a hot report of N pages in random ranges; print the time.",
        discussion: """
            The report has four classes over a guest whose RAM spans twice the report's pages, in random \
            runs of 1-16 pages with random gaps. Times are the median of --iterations runs. Build with \
            `-c release` (make bench-codec) for meaningful numbers.
            """
    )

    @Option(help: "Pages in the report.") var pages: UInt64 = 1_048_576
    @Option(help: "Timed runs (the median is printed).") var iterations = 9
    @Option(help: "Random seed, so runs are comparable.") var seed: UInt64 = 42
    @OptionGroup var output: OutputOptions

    struct Result: Codable {
        var pages: UInt64
        var ranges: Int
        var frameBytes: Int
        var encodeMillis: Double
        var decodeMillis: Double
        var checksumBaselineMillis: Double
        var decodeVsChecksum: Double

        enum CodingKeys: String, CodingKey {
            case pages, ranges
            case frameBytes = "frame_bytes"
            case encodeMillis = "encode_ms"
            case decodeMillis = "decode_ms"
            case checksumBaselineMillis = "checksum_baseline_ms"
            case decodeVsChecksum = "decode_vs_checksum"
        }
    }

    func validate() throws {
        guard pages > 0, pages <= 1 << 28 else { throw ValidationError("--pages must be 1...268435456") }
        guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1") }
    }

    func run() throws {
        var rng = SplitMix64(seed: seed)
        let ramMap = PageSet<GuestFrameNumber>(try PageRange(start: GuestFrameNumber(rawValue: 0), count: pages * 2))
        var classes: [[PageRange<GuestFrameNumber>]] = [[], [], [], []]
        var next: UInt64 = 0
        var total: UInt64 = 0
        var rangeCount = 0
        while total < pages {
            next += 1 + rng.next() % 16
            let length = min(1 + rng.next() % 16, pages - total)
            classes[Int(rng.next() % 4)].append(try PageRange(start: GuestFrameNumber(rawValue: next), count: length))
            next += length
            total += length
            rangeCount += 1
        }
        let classified = zip(PageClass.allCases, classes).map { ClassifiedPages($0, PageSet(ranges: $1)) }
        let report = try HotReport(requestID: 1, windowMillis: 1000, collectMicros: 0, ramMap: ramMap,
                                   classes: classified)
        let message = AgentMessage.hotReport(report)
        let context = AgentDecodeContext(maxFrame: pages * 2)

        var encodeTimes: [Double] = []
        var decodeTimes: [Double] = []
        var checksumTimes: [Double] = []
        var frameBytes = 0
        for _ in 0..<iterations {
            let t0 = monotonicNanos()
            let bytes = message.encodedFrame(checksum: fastChecksum)
            let t1 = monotonicNanos()
            let frame = try decodeFrame(bytes: bytes, link: .agent, checksum: fastChecksum)
            let decoded = try AgentMessage.decode(frame: frame, context: context)
            let t2 = monotonicNanos()
            let crc = bytes.withUnsafeBytes { fastChecksum($0, 0) }
            let t3 = monotonicNanos()
            guard decoded == message, crc != 0 || bytes.isEmpty else {
                throw ValidationError("the decoded report differs from the encoded one")
            }
            frameBytes = bytes.count
            encodeTimes.append(Double(t1 - t0) / 1e6)
            decodeTimes.append(Double(t2 - t1) / 1e6)
            checksumTimes.append(Double(t3 - t2) / 1e6)
        }
        func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
        let result = Result(pages: pages, ranges: rangeCount, frameBytes: frameBytes,
                            encodeMillis: median(encodeTimes), decodeMillis: median(decodeTimes),
                            checksumBaselineMillis: median(checksumTimes),
                            decodeVsChecksum: median(decodeTimes) / max(median(checksumTimes), 1e-9))
        if output.json {
            print(try JSONOutput.string(result))
        } else {
            print("hot report: \(result.pages) pages in \(result.ranges) ranges, frame \(result.frameBytes) bytes")
            print(String(format: "encode %.2f ms, decode %.2f ms (median of %d); CRC32C of the frame alone %.3f ms",
                         result.encodeMillis, result.decodeMillis, iterations, result.checksumBaselineMillis))
        }
    }
}
