// Host-side logging through swift-log: one Logger per part of the data path, one label each, one level
// for all of them, one line format on stderr. The level comes from the environment: EPCOPY_LOG=trace|
// debug|info|notice|warning|error|critical, or EPCOPY_TRACE=1 as a short form of trace (the engines'
// state lines); the default is info. The loggers are built with epcopy's own handler rather than the
// process-wide LoggingSystem bootstrap, so the library logs the same way whether it runs under the CLI,
// the daemon or a test runner that never bootstraps.

#if canImport(Glibc)
import Glibc
#endif
import Logging

public enum Log {
    /// The level every epcopy logger uses, read once from the environment.
    public static let level: Logger.Level = {
        if let text = getenv("EPCOPY_LOG").map({ String(cString: $0).lowercased() }),
           let level = Logger.Level(rawValue: text) {
            return level
        }
        return getenv("EPCOPY_TRACE") != nil ? .trace : .info
    }()

    /// True when trace lines are written; guard work done only to build a trace line with it.
    public static let tracing = level <= .trace

    /// A logger for one part of epcopy (`epcopy.<part>`), at the environment's level.
    public static func logger(_ part: String) -> Logger {
        var logger = Logger(label: "epcopy.\(part)") { StderrLogHandler(label: $0) }
        logger.logLevel = level
        return logger
    }

    /// The engines' data path: push, faults, placement, release.
    public static let engine = logger("engine")
    /// QEMU processes started and ended by the launcher.
    public static let qemu = logger("qemu")
    /// Every QMP line in both directions.
    public static let qmp = logger("qmp")
    /// The virtio-serial link to the guest agent.
    public static let agentLink = logger("agent-link")
}

/// Writes `[epcopy <ms>] <label> <level>: <metadata> message` as one write(2) per line, so lines from
/// several threads never interleave. The millisecond clock is monotonic, modulo 100 s, for reading
/// timings between lines.
struct StderrLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    init(label: String) { self.label = label }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let merged = event.metadata.map { metadata.merging($0) { _, new in new } } ?? metadata
        let fields = merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let level = event.level == .info ? "" : " \(event.level)"
        let line = "[epcopy \(monotonicNanos() / 1_000_000 % 100_000)] \(label)\(level): "
            + (fields.isEmpty ? "" : fields + " ") + "\(event.message)\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
    }
}
