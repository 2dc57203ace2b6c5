// What a successor needs to carry on receiving a migration whose destination process died (a daemon killed
// and restarted): the QEMU that outlived it (its name, spec and PID, behind its keeper), the shim's userfaultfd
// to take back (pidfd_getfd), where the source's engine reconnects, the persistent digest table, and how far
// the switch had got (RESUME seen at, the guest's free scan). The destination side keeps it current; the
// daemon writes it to disk at each step (SessionStore). Read back from disk, it is untrusted: every field is
// checked again by what acts on it (QEMUProcess.adopt checks the PID is that QEMU, the takeover that the
// descriptor is a userfaultfd, the digest table its own header).

import EpcopyProtocol

public struct DestinationSuccession: Codable, Sendable, Equatable {
    public var session: UInt64
    public var spec: VMSpec
    /// The QEMU's name (its files are named after it) and the address the source reaches this host at.
    public var qemuName: String
    public var bindHost: String
    public var deadlineSeconds: Double
    public var qemuPid: Int32
    /// The shim's uffd in that QEMU and the registered range (what a takeover needs).
    public var takeover: DestinationState
    /// Where the source engine connects (host:port), and QEMU's own migration stream.
    public var engine: String
    public var migrationURI: String
    /// The persistent digest table (with `--verify`).
    public var digestsFile: String?
    /// QMP's RESUME timestamp, once seen.
    public var resumeTimestamp: Double?
    /// The pages the guest's free scan after RESUME reported free, as [first, end) pairs, once it answered.
    public var freeRanges: [[UInt64]]?

    enum CodingKeys: String, CodingKey {
        case session, spec
        case qemuName = "qemu_name"
        case bindHost = "bind_host"
        case deadlineSeconds = "deadline_s"
        case qemuPid = "qemu_pid"
        case takeover, engine
        case migrationURI = "migration_uri"
        case digestsFile = "digests_file"
        case resumeTimestamp = "resume_timestamp"
        case freeRanges = "free_ranges"
    }

    /// The free scan's pages, if it answered; nil also for ranges that are not [first, end) pairs.
    public var freePages: PageSet<PageIndex>? {
        guard let freeRanges else { return nil }
        var set = PageSet<PageIndex>()
        for pair in freeRanges {
            guard pair.count == 2, let range = try? PageRange(lowerBound: PageIndex(rawValue: pair[0]),
                                                              upperBound: PageIndex(rawValue: pair[1]))
            else { return nil }
            set.insert(range)
        }
        return set
    }

    public mutating func setFreePages(_ pages: PageSet<PageIndex>) {
        freeRanges = pages.ranges.map { [$0.lowerBound.rawValue, $0.upperBound.rawValue] }
    }
}
