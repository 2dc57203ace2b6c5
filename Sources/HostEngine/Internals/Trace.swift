// Developer tracing: EPCOPY_TRACE=1 prints engine state lines to stderr. Off by default; costs one
// branch when off.

#if canImport(Glibc)
import Glibc
#endif

public enum Trace {
    public static let enabled: Bool = getenv("EPCOPY_TRACE") != nil

    public static func log(_ text: @autoclosure () -> String) {
        guard enabled else { return }
        let line = "[epcopy \(monotonicNanos() / 1_000_000 % 100_000)] \(text())\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
    }
}
