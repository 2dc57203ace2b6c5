// The destination's drain and verify steps: wait for RESUME and for the engine to place every page (it then
// unregisters the uffd), then check each placed page against the source's digests at STOP and watch the
// guest's own verdict on its serial log.

import EpcopyProtocol
import Foundation

extension DestinationSide {
    /// Waits for RESUME and, in enlightened mode, for every page to arrive.
    public func finish(timeout: Duration = .seconds(600)) throws -> DestinationOutcome {
        switchWatcher?.join()
        let resumeTimestamp: Double
        do { resumeTimestamp = try resumed.get() } catch {
            abandon()
            throw error
        }
        let report = try drain()
        // Counted by time against QEMU's own RESUME timestamp (same host clock): the guest already runs and
        // faults by the time anyone here hears of RESUME.
        let faultsBeforeResume = engine.map { $0.metrics.faults(before: resumeTimestamp) } ?? 0
        var scan: FreeScanOutcome?
        if mode == .enlightened, engine != nil { scan = try? freeScan.get() }
        return DestinationOutcome(resumeTimestamp: resumeTimestamp, faultsBeforeResume: faultsBeforeResume,
                                  report: report, freeScan: scan, numaNode: numa?.node,
                                  pagesOnNodeFraction: pagesOnNodeFraction())
    }

    /// The engine's report once it has placed every page (nil in QEMU's own modes).
    func drain() throws -> DestinationReport? {
        guard let engineThread else { return nil }
        engineThread.join()
        do { return try engineResult.get() } catch {
            throw MigrationError.step("RAM transfer (destination)", error)
        }
    }

    // MARK: verify

    /// Every page placed here against the source as it was at STOP, except those the guest reported free after
    /// RESUME (they hold nothing the guest may read); then the guest's own verdict, watched for `settle` seconds.
    func verify(against source: SourceOutcome, free: PageSet<PageIndex>?, settle: Double) -> DestinationCheck {
        var memory = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        if let digests = engine?.digests, let sourceDigests = source.sourceDigests {
            memory = digests.compare(sourceDigests: sourceDigests, free: free ?? PageSet())
        }
        return DestinationCheck(memory: memory,
                                guest: GuestVerdict.watch(qemu, before: source.counterBefore, settle: settle))
    }
}
