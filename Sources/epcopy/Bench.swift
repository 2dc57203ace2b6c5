// `epcopy bench`: benchmark programs. They print measurements (and ratios against a baseline measured
// in the same run), never pass/fail: the machines are shared and noisy.

import ArgumentParser
import EpcopyHostEngine
import Foundation

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a benchmark and print what it measured.",
        subcommands: [BenchCodec.self, BenchEngine.self, BenchMigrate.self, BenchFaults.self]
    )
}

struct BenchEngine: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "Move a region between two engines on loopback while a thread faults; compare with raw TCP.",
        discussion: """
            In one run: (1) plain TCP between two threads on loopback, (2) a source and a destination engine \
            moving --size bytes with a known pattern while a toucher thread reads random pages (each read of \
            a missing page is a fault served on the urgent channel). Prints push throughput against raw TCP, \
            fault latency percentiles, engine CPU per GB, T_release and the number of pages that differ \
            from the source afterwards (must be 0). --rate and --rtt emulate a link in user space.
            """
    )

    @Option(help: "Region size, e.g. 256MiB, 1GiB.") var size = "1GiB"
    @OptionGroup var link: LinkOptions
    @Option(help: "Microseconds between the toucher's page reads.") var touchInterval: UInt32 = 200
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard let bytes = parseSize(size), bytes % 4096 == 0, bytes > 0 else {
            throw ValidationError("--size must be a positive multiple of 4 KiB, e.g. 256MiB or 1GiB")
        }
        let result = try EngineBenchmark.run(sizeBytes: bytes, link: try link.spec(), touchIntervalMicros: touchInterval)
        if output.json {
            print(try JSONOutput.string(result))
        } else {
            print(String(format: """
                region %.0f MiB, %@
                raw TCP   %.2f Gbit/s
                push      %.2f Gbit/s  (%.2f× raw)
                faults    %llu (p50 %llu µs, p99 %llu µs), %llu pages urgent
                CPU       %.3f s per GB
                T_release %.1f ms
                mismatched pages: %llu
                """, Double(bytes) / 1048576, result.link, result.rawTCPGbps, result.pushGbps, result.pushVsRaw,
                result.faults, result.faultP50Micros, result.faultP99Micros, result.pagesUrgent,
                result.cpuSecondsPerGB, result.tReleaseMillis, result.mismatchedPages))
        }
        if result.mismatchedPages != 0 { throw ExitCode(1) }
    }
}

/// "256MiB", "1GiB", "4096" → bytes.
func parseSize(_ text: String) -> UInt64? {
    let units: [(String, UInt64)] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("G", 1 << 30),
                                     ("M", 1 << 20), ("K", 1 << 10)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        return UInt64(text.dropLast(suffix.count)).map { $0 * scale }
    }
    return UInt64(text)
}
