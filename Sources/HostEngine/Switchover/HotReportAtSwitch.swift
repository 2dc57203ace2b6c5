// The source agent's hot report as the switch uses it: the one a keeper took in the background if it is
// fresh enough, else asked for now. Any failure — no agent installed, a silent or lying one — only means
// plain external post-copy: the classes are push order, never correctness. Part of SourceSide's prepare.

import EpcopyProtocol

struct HotReportAtSwitch: Sendable {
    /// A report arrived (fresh or kept).
    var answered = false
    /// From asking the agent to having its report (nil without one).
    var millis: Double?
    /// Age of a kept report used at the switch (nil: asked for now).
    var ageMillis: Double?
    var notes: [String] = []
    /// The push classes, highest first.
    var classes: [(PushClass, PageSet<PageIndex>)] = []

    static func take(agentSocket: String, regionPages: UInt64, options: MigrationOptions) -> HotReportAtSwitch {
        let start = monotonicNanos()
        var notes: [String] = []
        var pages: [(PageClass, PageSet<PageIndex>)]?
        var age: Double?
        var kept = options.keptHotReport
        if let k = kept, k.ageMillis > Double(options.hotReportMaxAgeMillis) {
            notes.append("source: the kept hot report was \(Int(k.ageMillis)) ms old (limit \(options.hotReportMaxAgeMillis)); "
                         + "asked for a new one")
            kept = nil
        }
        // With a usable kept report, a fresh one is worth only a short wait.
        let budget = kept == nil ? options.agentTimeoutMillis : min(options.freshReportBudgetMillis, options.agentTimeoutMillis)
        if budget > 0 {
            do {
                let link = try AgentLink(socketPath: agentSocket, layout: GuestRAMLayout(regionPages: regionPages))
                defer { notes += link.complaints.map { "source agent: \($0)" } }
                let deadline = monotonicNanos() + budget * 1_000_000
                _ = try link.hello(timeoutMillis: min(budget, 1500))
                let left = max(deadline &- monotonicNanos(), 1_000_000) / 1_000_000
                pages = try link.hotReport(windowMillis: options.hotWindowMillis,
                                           timeoutMillis: kept == nil ? options.agentTimeoutMillis : left).pages
            } catch {
                notes.append(kept == nil ? "source: \(error)"
                             : "source: no fresh hot report within \(budget) ms (\(error)); used the kept one")
            }
        }
        if pages == nil, let k = kept {
            pages = k.pages
            age = k.ageMillis
            notes += k.complaints.map { "source agent: \($0)" }
        }
        var classes: [(PushClass, PageSet<PageIndex>)] = []
        for (pageClass, set) in pages ?? [] {
            let pushClass: PushClass = switch pageClass {
            case .kernel: .kernel
            case .recent: .recent
            case .inUse: .inUse
            case .believedFree: .believedFree
            }
            classes.append((pushClass, set))
        }
        let answered = pages != nil
        return HotReportAtSwitch(answered: answered, millis: answered ? Double(monotonicNanos() - start) / 1e6 : nil,
                                 ageMillis: age, notes: notes, classes: classes)
    }
}
