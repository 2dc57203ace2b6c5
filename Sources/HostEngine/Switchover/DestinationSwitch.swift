// The destination's switch step: a watcher thread records QEMU's RESUME (the guest runs here; downtime ends),
// pins the vCPUs to the RAM's node, and in enlightened mode has the agent scan for free pages at once, so
// that pages the guest no longer uses are never fetched.

import CEpcopyLinux
import EpcopyProtocol
import Foundation

extension DestinationSide {
    /// A thread that records RESUME as it happens (or takes `resumedAt`, when a previous process saw it), then
    /// (enlightened mode) runs the agent's free scan, unless a previous process's scan already answered (`free`).
    func watchSwitch(session: UInt64, options: MigrationOptions, resumedAt: Double?,
                             free: PageSet<PageIndex>?) -> JoinableThread {
        let (qmp, slot, since, engine, scanSlot) = (qemu.qmp, resumed, start, self.engine, freeScan)
        let (agentSocket, useAgent) = (qemu.config.agentSocket, mode == .enlightened && options.useAgent)
        let regionPages = qemu.config.regionPages
        // The switch does not wait for the free scan (the guest already runs here), so it may take longer than a
        // hot report: a large guest's first scan right after RESUME runs with a cold translation cache under TCG.
        let agentTimeout = max(options.agentTimeoutMillis, options.freeScanTimeoutMillis)
        return JoinableThread(name: "epcopy-resume") { [self] in
            let timestamp: Double
            do {
                timestamp = try resumedAt ?? qmp.waitForEvent("RESUME", timeout: .seconds(600), after: since).timestamp
            } catch {
                slot.set(.failure(.step("destination: waiting for RESUME", error)))
                engine?.finishFreeScan(agentAnswered: false, pagesReported: 0)
                return
            }
            slot.set(.success(timestamp))
            if resumedAt == nil { updateSuccession { $0.resumeTimestamp = timestamp } }
            pinVCPUs()
            guard let engine else { return }
            if let free {
                engine.markFree(free)
                engine.finishFreeScan(agentAnswered: true, pagesReported: free.count)
                scanSlot.set(.success(FreeScanOutcome(answered: true, millis: 0, scanMillis: 0, free: free,
                                                      notes: ["destination: the free scan answered before the takeover"])))
                return
            }
            // The agent port is opened only now: the guest runs here, and whatever answers on the port is the
            // guest's (a connection made earlier would only sit idle).
            var link: AgentLink?
            var note: String?
            if useAgent {
                do { link = try AgentLink(socketPath: agentSocket, layout: GuestRAMLayout(regionPages: regionPages)) }
                catch { note = "destination: \(error)" }
            }
            // The free pages are on record before the engine acts on them: a successor marks them again.
            scanSlot.set(.success(Self.freeScan(link: link, linkNote: note, engine: engine, session: session,
                                                timeoutMillis: agentTimeout,
                                                beforeMarking: { pages in updateSuccession { $0.setFreePages(pages) } })))
        }
    }

    /// After RESUME: the agent scans for free pages at once; each one not yet here is never fetched. Whatever
    /// happens, the source hears that the scan is over, so it stops holding the believed-free pages back.
    static func freeScan(link: AgentLink?, linkNote: String?, engine: DestinationEngine, session: UInt64,
                                 timeoutMillis: UInt64, beforeMarking: (PageSet<PageIndex>) -> Void) -> FreeScanOutcome {
        var outcome = FreeScanOutcome(answered: false, millis: 0, scanMillis: 0, free: PageSet(),
                                      notes: linkNote.map { [$0] } ?? [])
        guard let link else {
            engine.finishFreeScan(agentAnswered: false, pagesReported: 0)
            return outcome
        }
        let start = monotonicNanos()
        do {
            let (report, pages) = try link.freeAfterResume(sequence: session, timeoutMillis: timeoutMillis)
            beforeMarking(pages)
            engine.markFree(pages)
            engine.finishFreeScan(agentAnswered: true, pagesReported: pages.count)
            outcome.answered = true
            outcome.scanMillis = Double(report.scanMicros) / 1000
            outcome.free = pages
        } catch {
            engine.finishFreeScan(agentAnswered: false, pagesReported: 0)
            outcome.notes.append("destination: \(error)")
        }
        outcome.millis = Double(monotonicNanos() - start) / 1e6
        outcome.notes += link.complaints.map { "destination agent: \($0)" }
        return outcome
    }
}
