// The source half of a migration taken up again after the daemon that ran it was killed past the switch.
// Its QEMU died with it, but the fenced RAM file (final since STOP) is still here, and the destination
// engine waits for a source with the same session. A new engine over that file connects, hears from the
// destination exactly which pages it holds (resume), and sends the rest; pages punched out of the file
// before the crash are ones the destination had acknowledged, so they are in what it holds and are never
// sent as zeros. Then the file goes and the outcome is built as SourceSide.release builds it, from what
// the record kept (STOP's timestamp, the guest's counter) and what this engine saw.

import EpcopyProtocol
import Foundation

public enum SourceResumption {
    /// Moves what the destination lacks from `record.ramFile`; returns when this host holds none of the VM.
    /// `holdPunching`: nothing is punched until `allowPunching()` on the engine (`engineStarted` gets it): a libvirt
    /// domain whose migration libvirt has not ended yet may still be resumed here.
    public static func run(_ record: SourceSessionRecord, options: MigrationOptions, holdPunching: Bool = false,
                           engineStarted: ((SourceEngine) -> Void)? = nil) throws -> SourceOutcome {
        guard FileManager.default.fileExists(atPath: record.ramFile) else {
            throw MigrationError.failed("the fenced RAM file \(record.ramFile) is gone: the pages the destination "
                + "still lacked are lost with it")
        }
        guard let endpoint = Endpoint(record.engine) else {
            throw MigrationError.failed("the record names no destination engine (\(record.engine))")
        }
        var sourceOptions = options.sourceEngineOptions(session: record.session, vmName: record.vmName, classes: [])
        // The push order died with the old daemon, so every page is unclassified, and unclassified pages are held
        // like believed-free ones until the destination's free scan is over (the destination says so at the start
        // of every session once it is): a crash during the scan must not send the hundreds of MiB it is about to
        // report free. Faults are answered meanwhile.
        sourceOptions.holdFreeUntilScan = true
        sourceOptions.punchOnlyOnceAllowed = holdPunching
        let engine: SourceEngine
        do { engine = try SourceEngine(ramFile: record.ramFile, options: sourceOptions) } catch {
            throw MigrationError.step("source engine over \(record.ramFile)", error)
        }
        guard engine.regionPages == record.regionPages else {
            throw MigrationError.failed("\(record.ramFile) holds \(engine.regionPages) pages, the record says "
                + "\(record.regionPages): not this migration's file")
        }
        // The session was lost with the previous daemon: the link is down until this engine is back in it (which is
        // what a route going round the destination's addresses watches for).
        engine.link.lost(at: monotonicNanos())
        engineStarted?(engine)
        // QEMU's device stream ended long ago: nothing holds the bulk push (holdBulkUntilReleased stays off).
        let report: SourceReport
        do { report = try engine.run(destination: endpoint) } catch {
            throw MigrationError.step("RAM transfer (resumed source)", error)
        }
        // As in SourceSide.release: with `verify` the digests are the test's cost, not the migration's, so
        // T_release is when the engine ended.
        let released = Date().timeIntervalSince1970
        let digests = options.verify ? try? PageDigests.ofFile(record.ramFile) : nil
        unlink(record.ramFile)
        var outcome = SourceOutcome(stopTimestamp: record.stopTimestamp,
                                    tReleaseMillis: (released - record.stopTimestamp) * 1000,
                                    bytesWire: report.bytesWire, counterBefore: record.counterBefore,
                                    sourceDigests: digests)
        outcome.pagesSkippedFree = report.pagesFree
        // The crash itself was a loss of the link, recovered here.
        outcome.linkLosses = report.reconnects + 1
        outcome.pausedMillis = report.pausedMillis
        outcome.agentNotes = ["source: the daemon was restarted after the switch and resumed the push"]
        return outcome
    }
}
