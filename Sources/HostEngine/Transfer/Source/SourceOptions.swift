// What a source engine is told (session, link, push classes, holds, release) and what it reports.

import EpcopyProtocol

public struct SourceOptions: Sendable {
    public var sessionID: UInt64
    public var vmName: String
    public var link: LinkSpec
    /// Push classes from the guest's hot report (RAM-file pages); unnamed pages go last.
    public var classes: [(PushClass, PageSet<PageIndex>)]
    public var connectTimeoutMillis: Int32
    /// How long to keep trying to reach a destination that went away, or whose link did (0: fail at once).
    public var reconnectTimeoutMillis: Int32
    /// Keepalives on the control channel, and how much silence is a lost link.
    public var keepalive: KeepaliveSpec = .standard
    /// Largest page-data frame, in pages (4 MiB by default).
    public var maxFramePages: UInt64
    /// Pages pushed right behind each fault.
    public var prefetchPages: UInt64
    /// Punch acknowledged pages out of the RAM file (the point of the source role; off only in tests
    /// that need the source intact afterwards).
    public var releaseMemory: Bool
    /// Shared key: both engines prove they hold it (HMAC-SHA256 challenge-response) before any page moves.
    public var authKey: [UInt8]?
    /// Push only the device class until `releaseBulk()` (the migration calls it at RESUME): during the
    /// switchover the destination QEMU needs the CPU for loading device state, and a full-speed push on
    /// a small host stretches the downtime. Faults are served throughout. Released automatically after
    /// `bulkHoldMillis` in case RESUME never comes.
    public var holdBulkUntilReleased: Bool = false
    public var bulkHoldMillis: UInt64 = 2000
    /// Punch nothing until `allowPunching()`: a source that another manager (libvirt) would resume if the
    /// destination failed after STOP must find its RAM whole until that manager says the destination runs.
    /// Pages acknowledged before then are punched once allowed (if the engine still runs).
    public var punchOnlyOnceAllowed: Bool = false
    /// Push believed-free pages (and anything after them) only once the destination says its guest's free scan
    /// is in (`freeScanDone`), or `freeHoldMillis` after the push first waited for it: the scan turns most of
    /// them into pages never sent. Set when the source agent gave a hint.
    public var holdFreeUntilScan: Bool = false
    public var freeHoldMillis: UInt64 = 3000

    public init(sessionID: UInt64, vmName: String, link: LinkSpec = .unshaped,
                classes: [(PushClass, PageSet<PageIndex>)] = [], connectTimeoutMillis: Int32 = 10_000,
                reconnectTimeoutMillis: Int32 = 0, maxFramePages: UInt64 = 256, prefetchPages: UInt64 = 64,
                releaseMemory: Bool = true, authKey: [UInt8]? = nil) {
        self.sessionID = sessionID
        self.vmName = vmName
        self.link = link
        self.classes = classes
        self.connectTimeoutMillis = connectTimeoutMillis
        self.reconnectTimeoutMillis = reconnectTimeoutMillis
        self.maxFramePages = maxFramePages
        self.prefetchPages = prefetchPages
        self.releaseMemory = releaseMemory
        self.authKey = authKey
    }
}

public struct SourceReport: Sendable, Codable, Equatable {
    public var regionPages: UInt64
    public var pagesPushed: UInt64
    public var pagesUrgent: UInt64
    public var pagesZero: UInt64
    public var pagesFree: UInt64
    public var pagesPresentAtResume: UInt64
    public var bytesWire: UInt64
    public var requests: UInt64
    public var pushMillis: Double
    public var tReleaseMillis: Double
    public var cpuSeconds: Double
    public var reconnects: Int
    /// Time between losing a session and the destination's resume on the next one, summed.
    public var pausedMillis: Double = 0
    public var pagesByClass: [String: UInt64]
    /// Pages whose content was zero, sent as ranges instead of data (holes are in `pagesZero`).
    public var pagesZeroContent: UInt64 = 0
    /// The destination's guest answered its free scan (nil: no word came from the destination).
    public var freeScanAnswered: Bool? = nil
    /// Time the push waited for the free scan.
    public var freeHoldMillis: Double = 0

    enum CodingKeys: String, CodingKey {
        case regionPages = "region_pages"
        case pagesPushed = "pages_pushed"
        case pagesUrgent = "pages_urgent"
        case pagesZero = "pages_zero"
        case pagesFree = "pages_free"
        case pagesPresentAtResume = "pages_present_at_resume"
        case bytesWire = "bytes_wire"
        case requests
        case pushMillis = "push_ms"
        case tReleaseMillis = "t_release_ms"
        case cpuSeconds = "cpu_s"
        case reconnects
        case pausedMillis = "paused_ms"
        case pagesByClass = "pages_by_class"
        case pagesZeroContent = "pages_zero_content"
        case freeScanAnswered = "free_scan_answered"
        case freeHoldMillis = "free_hold_ms"
    }
}
