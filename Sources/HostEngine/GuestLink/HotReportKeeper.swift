// The source agent's hot report, kept fresh in the background while the VM runs, so that a migration does not
// wait for a scan at the moment it is asked for: the operator migrates because the host is overloaded, and then
// the guest's scan is at its slowest (3.0 of the 3.2 s before STOP in the first `make bench`, a 2 GiB guest
// sharing its CPU with the neighbour). A report is only push order, never correctness (free pages are skipped
// only after the destination's own post-resume scan), so one some seconds old is as safe as a new one and nearly
// as good. The keeper holds the agent port between reports; `stop` closes it at once, even mid-request.

import EpcopyProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One hot report as the keeper took it.
public struct KeptHotReport: Sendable {
    public var pages: [(PageClass, PageSet<PageIndex>)]
    /// monotonicNanos() when the report arrived.
    public var takenAt: UInt64
    /// How long the agent took to answer (host clock).
    public var millis: Double
    public var complaints: [String]

    public var ageMillis: Double { Double(monotonicNanos() - takenAt) / 1e6 }
}

public final class HotReportKeeper: Sendable {
    public let socketPath: String
    public let everyMillis: UInt64
    private let state = Mutex<(latest: KeptHotReport?, reports: Int, failures: Int, lastError: String?)>((nil, 0, 0, nil))
    private let stopping = StopFlag()
    private let thread = Mutex<JoinableThread?>(nil)

    /// Starts asking at once, then every `everyMillis`.
    public init(socketPath: String, regionPages: UInt64, everyMillis: UInt64, windowMillis: UInt32 = 0,
                timeoutMillis: UInt64 = 10_000) {
        self.socketPath = socketPath
        self.everyMillis = max(everyMillis, 100)
        let layout = GuestRAMLayout(regionPages: regionPages)
        thread.withLock { $0 = JoinableThread(name: "epcopy-hotkeep") { [self] in
            run(layout: layout, windowMillis: windowMillis, timeoutMillis: timeoutMillis)
        } }
    }

    /// Reports taken so far, failures, and the last failure.
    public var counts: (reports: Int, failures: Int, lastError: String?) {
        state.withLock { ($0.reports, $0.failures, $0.lastError) }
    }

    /// The latest report without stopping.
    public var latest: KeptHotReport? { state.withLock { $0.latest } }

    /// Stops the keeper (within ~100 ms, closing the agent port) and returns its latest report.
    public func stop() -> KeptHotReport? {
        stopping.flag.store(true, ordering: .releasing)
        if let t = thread.withLock({ t -> JoinableThread? in defer { t = nil }; return t }) { t.join() }
        return latest
    }

    deinit { _ = stop() }

    private func run(layout: GuestRAMLayout, windowMillis: UInt32, timeoutMillis: UInt64) {
        let stopping = self.stopping
        let cancelled: @Sendable () -> Bool = { stopping.flag.load(ordering: .acquiring) }
        var link: AgentLink?
        var next = monotonicNanos()
        while !cancelled() {
            let now = monotonicNanos()
            if now < next {
                usleep(UInt32(min((next - now) / 1000, 100_000)))
                continue
            }
            next = now + everyMillis * 1_000_000
            do {
                if link == nil {
                    let fresh = try AgentLink(socketPath: socketPath, layout: layout)
                    fresh.cancelled = cancelled
                    _ = try fresh.hello(timeoutMillis: min(timeoutMillis, 3000))
                    link = fresh
                }
                guard let current = link else { continue }
                let start = monotonicNanos()
                let (_, pages) = try current.hotReport(windowMillis: windowMillis, timeoutMillis: timeoutMillis)
                let done = monotonicNanos()
                let report = KeptHotReport(pages: pages, takenAt: done, millis: Double(done - start) / 1e6,
                                           complaints: current.complaints)
                state.withLock {
                    $0.latest = report
                    $0.reports += 1
                }
            } catch AgentLinkError.cancelled {
                break
            } catch {
                // No agent (yet: the guest may still be booting), or a broken conversation: start over with a new
                // connection soon, not a whole period later.
                link = nil
                next = min(next, monotonicNanos() + 1_000_000_000)
                state.withLock {
                    $0.failures += 1
                    $0.lastError = "\(error)"
                }
            }
        }
        link = nil
    }
}

private final class StopFlag: Sendable {
    let flag = Atomic<Bool>(false)
}
