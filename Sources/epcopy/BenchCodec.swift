import ArgumentParser
struct BenchCodec: ParsableCommand { static let configuration = CommandConfiguration(commandName: "codec") ; func run() {} }
