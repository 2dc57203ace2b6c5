// `epcopy bench`: benchmark programs. They print measurements (and ratios against a baseline measured
// in the same run), never pass/fail: the machines are shared and noisy.

import ArgumentParser

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a benchmark and print what it measured.",
        subcommands: [BenchCodec.self]
    )
}
