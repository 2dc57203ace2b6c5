// The result of one migration — what `epcopy migrate --json` prints and the daemon returns — and the one
// place it is built from the two sides' outcomes. Every JSON key is a contract: all are always present,
// null where they do not apply.

import EpcopyProtocol

public struct MigrationResult: Sendable, Codable {
    public var mode: MigrationMode
    public var downtimeMillis: Double
    public var tReleaseMillis: Double
    public var bytesWire: UInt64
    public var faults: UInt64
    public var faultP50Micros: UInt64
    public var faultP99Micros: UInt64
    public var faultsBeforeResume: UInt64
    public var pagesCompared: UInt64
    public var mismatchedPages: UInt64
    /// How memory was verified: "digests" (every placed page against the source at STOP), or "guest"
    /// (QEMU's own modes: the guest's own verifier only).
    public var verification: String
    public var guestVerdict: String
    public var guestCounterBefore: Int?
    public var guestCounterAfter: Int?
    /// The guest agent answered (source hot report or destination free scan): enlightened post-copy. False:
    /// plain external post-copy with neighbour prefetch (nil in QEMU's own modes).
    public var enlightened: Bool?
    public var pagesByClass: [String: UInt64]?
    public var pagesSkippedFree: UInt64?
    /// Source: how long the switch waited for the hot report (asking and receiving it; ~0 for a kept one).
    public var agentReportMillis: Double?
    /// Source: age of the hot report at the switch when a daemon kept it in the background (nil: asked then).
    public var agentReportAgeMillis: Double?
    /// Destination: from RESUME's notice to the agent to having its free report.
    public var freeScanMillis: Double?
    public var pagesReportedFree: UInt64?
    /// Why the agent was not used, or what it got wrong.
    public var agentNotes: [String]?
    /// QEMU's STOP on the source and RESUME on the destination, wall clock (unix seconds; each host's clock).
    public var stopUnixSeconds: Double?
    public var resumeUnixSeconds: Double?
    /// Times the link between the engines was lost after the switch (enlightened mode; nil otherwise).
    public var linkLosses: Int? = nil
    /// Every loss was recovered and the migration finished (true only when there was a loss).
    public var recovered: Bool? = nil
    /// Time spent with the link down, from noticing the loss to the resumed session.
    public var pausedMillis: Double? = nil
    /// A libvirt domain's migration: the destination's libvirt version, and what each host's libvirt says of the
    /// domain afterwards ("running", "shut off", "absent"); nil for VMs epcopy's daemons started.
    public var libvirtVersion: String? = nil
    public var sourceState: String? = nil
    public var destinationState: String? = nil
    /// The destination host's NUMA node for the guest's RAM, and the fraction of its resident pages there.
    public var numaNode: Int? = nil
    public var pagesOnNodeFraction: Double? = nil

    enum CodingKeys: String, CodingKey {
        case mode
        case downtimeMillis = "downtime_ms"
        case tReleaseMillis = "t_release_ms"
        case bytesWire = "bytes_wire"
        case faults
        case faultP50Micros = "fault_p50_us"
        case faultP99Micros = "fault_p99_us"
        case faultsBeforeResume = "faults_before_resume"
        case pagesCompared = "pages_compared"
        case mismatchedPages = "mismatched_pages"
        case verification
        case guestVerdict = "guest_verdict"
        case guestCounterBefore = "guest_counter_before"
        case guestCounterAfter = "guest_counter_after"
        case enlightened
        case pagesByClass = "pages_by_class"
        case pagesSkippedFree = "pages_skipped_free"
        case agentReportMillis = "agent_report_ms"
        case agentReportAgeMillis = "agent_report_age_ms"
        case freeScanMillis = "free_scan_ms"
        case pagesReportedFree = "pages_reported_free"
        case agentNotes = "agent_notes"
        case stopUnixSeconds = "stop_unix_s"
        case resumeUnixSeconds = "resume_unix_s"
        case linkLosses = "link_losses"
        case recovered
        case pausedMillis = "paused_ms"
        case libvirtVersion = "libvirt_version"
        case sourceState = "source_state"
        case destinationState = "destination_state"
        case numaNode = "numa_node"
        case pagesOnNodeFraction = "pages_on_node_fraction"
    }

    /// Every key always present (`--json` is a contract): what does not apply is null, and `enlightened` is false
    /// for QEMU's own modes.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(mode, forKey: .mode)
        try c.encode(downtimeMillis, forKey: .downtimeMillis)
        try c.encode(tReleaseMillis, forKey: .tReleaseMillis)
        try c.encode(bytesWire, forKey: .bytesWire)
        try c.encode(faults, forKey: .faults)
        try c.encode(faultP50Micros, forKey: .faultP50Micros)
        try c.encode(faultP99Micros, forKey: .faultP99Micros)
        try c.encode(faultsBeforeResume, forKey: .faultsBeforeResume)
        try c.encode(pagesCompared, forKey: .pagesCompared)
        try c.encode(mismatchedPages, forKey: .mismatchedPages)
        try c.encode(verification, forKey: .verification)
        try c.encode(guestVerdict, forKey: .guestVerdict)
        try c.encode(guestCounterBefore, forKey: .guestCounterBefore)
        try c.encode(guestCounterAfter, forKey: .guestCounterAfter)
        try c.encode(enlightened ?? false, forKey: .enlightened)
        try c.encode(pagesByClass, forKey: .pagesByClass)
        try c.encode(pagesSkippedFree, forKey: .pagesSkippedFree)
        try c.encode(agentReportMillis, forKey: .agentReportMillis)
        try c.encode(agentReportAgeMillis, forKey: .agentReportAgeMillis)
        try c.encode(freeScanMillis, forKey: .freeScanMillis)
        try c.encode(pagesReportedFree, forKey: .pagesReportedFree)
        try c.encode(agentNotes, forKey: .agentNotes)
        try c.encode(stopUnixSeconds, forKey: .stopUnixSeconds)
        try c.encode(resumeUnixSeconds, forKey: .resumeUnixSeconds)
        try c.encode(linkLosses, forKey: .linkLosses)
        try c.encode(recovered, forKey: .recovered)
        try c.encode(pausedMillis, forKey: .pausedMillis)
        try c.encode(libvirtVersion, forKey: .libvirtVersion)
        try c.encode(sourceState, forKey: .sourceState)
        try c.encode(destinationState, forKey: .destinationState)
        try c.encode(numaNode, forKey: .numaNode)
        try c.encode(pagesOnNodeFraction, forKey: .pagesOnNodeFraction)
    }
}

extension MigrationResult {
    /// The result from what each side saw and what the destination checked against the source. Downtime uses the
    /// two QEMUs' own event timestamps (each host's clock), so it holds when the sides run in different processes.
    init(options: MigrationOptions, source: SourceOutcome, destination: DestinationOutcome, check: DestinationCheck) {
        let enlightenedMode = options.mode == .enlightened
        let scan = destination.freeScan
        let report = destination.report
        self.init(
            mode: options.mode, downtimeMillis: (destination.resumeTimestamp - source.stopTimestamp) * 1000,
            tReleaseMillis: source.tReleaseMillis, bytesWire: source.bytesWire,
            faults: report?.metrics.faults ?? 0, faultP50Micros: report?.metrics.faultP50Micros ?? 0,
            faultP99Micros: report?.metrics.faultP99Micros ?? 0, faultsBeforeResume: destination.faultsBeforeResume,
            pagesCompared: check.memory.pagesCompared, mismatchedPages: check.memory.mismatchedPages,
            verification: enlightenedMode && options.verify ? "digests" : "guest",
            guestVerdict: check.guest.verdict, guestCounterBefore: source.counterBefore,
            guestCounterAfter: check.guest.counterAfter,
            enlightened: enlightenedMode ? (source.hotReport ?? false) || (scan?.answered ?? false) : nil,
            pagesByClass: source.pagesByClass, pagesSkippedFree: source.pagesSkippedFree,
            agentReportMillis: source.agentReportMillis, agentReportAgeMillis: source.agentReportAgeMillis,
            freeScanMillis: scan?.answered == true ? scan?.millis : nil,
            pagesReportedFree: scan?.answered == true ? scan?.free.count : nil,
            agentNotes: enlightenedMode ? (source.agentNotes ?? []) + (scan?.notes ?? []) : nil,
            stopUnixSeconds: source.stopTimestamp, resumeUnixSeconds: destination.resumeTimestamp)
        if enlightenedMode {
            // Each side counts the sessions it lost; one cut may be seen by one side only (the other had
            // reconnected before it noticed), so the larger count and pause stand for the migration.
            let losses = max(source.linkLosses ?? 0, report?.linkLosses ?? 0)
            linkLosses = losses
            recovered = losses > 0
            pausedMillis = max(source.pausedMillis ?? 0, report?.pausedMillis ?? 0)
        }
        sourceState = source.sourceState
        numaNode = destination.numaNode
        pagesOnNodeFraction = destination.pagesOnNodeFraction
    }
}
