// What each side of a migration saw, handed to whoever builds the MigrationResult: the source's outcome
// travels to the destination's daemon as JSON (its Codable keys are a wire format between daemons), the
// destination's stays where it was measured. Also how a step fails, and how a side's thread hands its
// result to the step that joins it.

import EpcopyProtocol
import Synchronization

/// What the destination saw.
public struct DestinationOutcome: Sendable {
    /// QMP timestamp of RESUME (seconds, the destination host's clock).
    public var resumeTimestamp: Double
    public var faultsBeforeResume: UInt64
    public var report: DestinationReport?
    /// The destination agent's post-resume free scan (enlightened mode).
    public var freeScan: FreeScanOutcome?
    /// The host NUMA node the guest's RAM was bound to, and the fraction of its resident pages there after the drain.
    public var numaNode: Int? = nil
    public var pagesOnNodeFraction: Double? = nil
}

/// What the destination's agent said after RESUME.
public struct FreeScanOutcome: Sendable {
    public var answered: Bool
    /// From sending vmResumed to having the report (host clock).
    public var millis: Double
    /// The agent's own scan time.
    public var scanMillis: Double
    /// RAM-file pages the guest reported free (only these may differ from the source: they are free).
    public var free: PageSet<PageIndex>
    public var notes: [String]
}

/// What the source saw.
public struct SourceOutcome: Sendable, Codable {
    public var stopTimestamp: Double
    public var tReleaseMillis: Double
    public var bytesWire: UInt64
    public var counterBefore: Int?
    /// Page digests of the source RAM file at STOP (`verify`, enlightened mode).
    public var sourceDigests: [UInt32]?
    /// The source agent's hot report arrived (enlightened mode).
    public var hotReport: Bool? = nil
    /// From asking the source agent to having its hot report (what the switch waited for it).
    public var agentReportMillis: Double? = nil
    /// Age of a kept hot report at the switch (nil: the report was asked for at the switch).
    public var agentReportAgeMillis: Double? = nil
    public var agentNotes: [String]? = nil
    public var pagesByClass: [String: UInt64]? = nil
    /// Pages the destination's free scan removed from the push.
    public var pagesSkippedFree: UInt64? = nil
    /// Time the push waited for the destination's free scan.
    public var freeHoldMillis: Double? = nil
    /// Sessions the source engine lost to the link and resumed, and the time between loss and resume.
    public var linkLosses: Int? = nil
    public var pausedMillis: Double? = nil
    /// A libvirt domain: what the source's libvirt says of it after the migration ("shut off", "absent"), and the
    /// downtime its completed job reported, if it kept the job.
    public var sourceState: String? = nil
    public var libvirtDowntimeMillis: Double? = nil
    /// Pages a libvirt post-copy destination asked for (libvirt's job statistics on the source).
    public var postcopyRequests: UInt64? = nil
}

/// How far a migration has got, as a progress display shows it.
public struct MigrationProgress: Sendable, Codable, Equatable {
    public var bytesMoved: UInt64
    public var bytesTotal: UInt64
    /// How long the link between the engines has been down (nil: up, or QEMU's own modes).
    public var linkDownMillis: Double?
    /// Link losses so far (each recovered, or being recovered).
    public var linkLosses: Int

    public init(bytesMoved: UInt64, bytesTotal: UInt64, linkDownMillis: Double? = nil, linkLosses: Int = 0) {
        self.bytesMoved = bytesMoved
        self.bytesTotal = bytesTotal
        self.linkDownMillis = linkDownMillis
        self.linkLosses = linkLosses
    }
}

/// How the destination's memory and guest compare with the source at STOP (see DestinationSide.verify).
struct DestinationCheck: Sendable {
    var memory: MemoryComparison
    var guest: GuestVerdict
}

public enum MigrationError: Error, CustomStringConvertible {
    case step(String, any Error)
    case failed(String)
    /// A cancel came before the switch: the VM keeps running on the source.
    case cancelled

    public var description: String {
        switch self {
        case .step(let step, let error): "\(step): \(error)"
        case .failed(let text): text
        case .cancelled: "cancelled before the switch"
        }
    }
}

/// A result handed from a thread to whoever joins it.
final class ResultSlot<Value: Sendable, Failure: Error>: Sendable {
    private let value = Mutex<Result<Value, Failure>?>(nil)
    func set(_ result: Result<Value, Failure>) { value.withLock { $0 = result } }
    /// The result if it has been set, without waiting or failing.
    func peek() -> Result<Value, Failure>? { value.withLock { $0 } }
    func get() throws(Failure) -> Value {
        guard let result = value.withLock({ $0 }) else { preconditionFailure("result read before it was set") }
        return try result.get()
    }
}
